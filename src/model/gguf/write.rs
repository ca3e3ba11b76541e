//! A small GGUF v3 writer. It exists so tests can craft (and then corrupt) GGUF files;
//! the engine itself never writes GGUF.

use super::read::{DEFAULT_ALIGNMENT, GGUF_MAGIC};
use super::types::{GgmlType, GgufTensorInfo, GgufValue};
use anyhow::{anyhow, bail, Context, Result};
use std::path::Path;

/// Builds a GGUF v3 file: metadata entries in insertion order (duplicates are written
/// as given), then tensor infos, then tensor data, each tensor aligned to
/// `general.alignment` (default 32).
#[derive(Default, Debug, Clone)]
pub struct GgufWriter {
    metadata: Vec<(String, GgufValue)>,
    tensors: Vec<(GgufTensorInfo, Vec<u8>)>,
}

impl GgufWriter {
    /// An empty file (no metadata, no tensors).
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a metadata entry. An empty array is written with element type u8.
    pub fn add_metadata(&mut self, key: impl Into<String>, value: GgufValue) -> &mut Self {
        self.metadata.push((key.into(), value));
        self
    }

    /// Appends a tensor; `dims` in ggml order, `data` its raw bytes of type `dtype`.
    pub fn add_tensor(&mut self, name: impl Into<String>, dims: &[u64], dtype: GgmlType, data: Vec<u8>) -> &mut Self {
        let info = GgufTensorInfo {
            name: name.into(),
            dims: dims.to_vec(),
            dtype,
            offset: 0,
        };
        self.tensors.push((info, data));
        self
    }

    /// The alignment this file will use.
    fn alignment(&self) -> Result<u64> {
        let v = self.metadata.iter().rev().find(|(k, _)| k == "general.alignment");
        match v.map(|(_, v)| v.as_u64()) {
            None => Ok(DEFAULT_ALIGNMENT),
            Some(Some(a)) if a.is_power_of_two() => Ok(a),
            Some(_) => bail!("general.alignment must be a power-of-two integer"),
        }
    }

    /// Serialises the file.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let align = self.alignment()?;
        let mut out = Vec::new();
        out.extend(GGUF_MAGIC);
        out.extend(3u32.to_le_bytes());
        out.extend((self.tensors.len() as u64).to_le_bytes());
        out.extend((self.metadata.len() as u64).to_le_bytes());
        for (key, value) in &self.metadata {
            write_str(&mut out, key);
            out.extend(value.type_id().to_le_bytes());
            write_value(&mut out, value).with_context(|| format!("metadata key `{key}`"))?;
        }
        let mut offset = 0u64;
        let mut offsets = Vec::new();
        for (t, data) in &self.tensors {
            let n = t.dims.iter().try_fold(1u64, |a, &d| a.checked_mul(d));
            let want = n
                .filter(|n| n % t.dtype.block_elems() == 0)
                .and_then(|n| (n / t.dtype.block_elems()).checked_mul(t.dtype.block_bytes()));
            if want != Some(data.len() as u64) {
                bail!(
                    "tensor `{}`: {:?} {:?} needs {want:?} bytes, got {}",
                    t.name,
                    t.dtype,
                    t.dims,
                    data.len()
                );
            }
            offset = align_up(offset, align);
            offsets.push(offset);
            write_str(&mut out, &t.name);
            out.extend((t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                out.extend(d.to_le_bytes());
            }
            out.extend(t.dtype.id().to_le_bytes());
            out.extend(offset.to_le_bytes());
            offset += data.len() as u64;
        }
        let data_start = align_up(out.len() as u64, align);
        for ((_, data), off) in self.tensors.iter().zip(offsets) {
            out.resize((data_start + off) as usize, 0);
            out.extend(data);
        }
        if !self.tensors.is_empty() {
            out.resize(align_up(out.len() as u64, align) as usize, 0);
        }
        Ok(out)
    }

    /// Serialises the file to `path`.
    pub fn write(&self, path: &Path) -> Result<()> {
        std::fs::write(path, self.to_bytes()?).map_err(|e| anyhow!("{}: cannot write: {e}", path.display()))
    }
}

fn align_up(x: u64, align: u64) -> u64 {
    x.div_ceil(align) * align
}

fn write_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

/// Writes a value's payload (without its type id).
fn write_value(out: &mut Vec<u8>, v: &GgufValue) -> Result<()> {
    match v {
        GgufValue::U8(x) => out.extend(x.to_le_bytes()),
        GgufValue::I8(x) => out.extend(x.to_le_bytes()),
        GgufValue::U16(x) => out.extend(x.to_le_bytes()),
        GgufValue::I16(x) => out.extend(x.to_le_bytes()),
        GgufValue::U32(x) => out.extend(x.to_le_bytes()),
        GgufValue::I32(x) => out.extend(x.to_le_bytes()),
        GgufValue::U64(x) => out.extend(x.to_le_bytes()),
        GgufValue::I64(x) => out.extend(x.to_le_bytes()),
        GgufValue::F32(x) => out.extend(x.to_le_bytes()),
        GgufValue::F64(x) => out.extend(x.to_le_bytes()),
        GgufValue::Bool(x) => out.push(u8::from(*x)),
        GgufValue::String(s) => write_str(out, s),
        GgufValue::Array(items) => {
            let ty = items.first().map_or(0, GgufValue::type_id);
            if items.iter().any(|e| e.type_id() != ty) {
                bail!("array elements must all be of one kind");
            }
            out.extend(ty.to_le_bytes());
            out.extend((items.len() as u64).to_le_bytes());
            for e in items {
                write_value(out, e)?;
            }
        }
    }
    Ok(())
}
