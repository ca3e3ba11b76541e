//! Hugging Face safetensors checkpoints: one `model.safetensors` file or shards listed
//! in `model.safetensors.index.json`, memory-mapped and converted to f32 on demand.

use super::shard::TensorShard;
use super::weights::{Tensor, TensorSource};
use anyhow::{bail, Context, Result};
use memmap2::Mmap;
use safetensors::tensor::{Dtype, Metadata};
use safetensors::SafeTensors;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

/// One memory-mapped safetensors file with its parsed header.
struct Shard {
    path: PathBuf,
    mmap: Mmap,
    header_len: usize,
    meta: Metadata,
}

/// A safetensors checkpoint directory.
pub struct SafetensorsDir {
    dir: PathBuf,
    shards: Vec<Shard>,
    /// Tensor name → index into `shards`.
    index: HashMap<String, usize>,
}

impl SafetensorsDir {
    /// Opens `dir/model.safetensors` or the shards named by `dir/model.safetensors.index.json`.
    pub fn open(dir: &Path) -> Result<Self> {
        let index_path = dir.join("model.safetensors.index.json");
        let files: Vec<String> = if index_path.exists() {
            let text =
                std::fs::read_to_string(&index_path).with_context(|| format!("reading {}", index_path.display()))?;
            #[derive(serde::Deserialize)]
            struct Index {
                weight_map: BTreeMap<String, String>,
            }
            let idx: Index = serde_json::from_str(&text)
                .with_context(|| format!("{}: not a valid shard index", index_path.display()))?;
            let mut files: Vec<String> = idx.weight_map.into_values().collect();
            files.sort();
            files.dedup();
            if files.is_empty() {
                bail!("{}: weight_map is empty", index_path.display());
            }
            files
        } else if dir.join("model.safetensors").exists() {
            vec!["model.safetensors".into()]
        } else {
            bail!(
                "{}: no model.safetensors or model.safetensors.index.json",
                dir.display()
            );
        };
        let mut shards = Vec::new();
        let mut index = HashMap::new();
        for name in files {
            if name.contains('/') || name.contains("..") {
                bail!("{}: shard name `{name}` leaves the directory", index_path.display());
            }
            let path = dir.join(&name);
            let file = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
            // SAFETY: the file is opened read-only; the map lives as long as the shard
            // and a checkpoint is not expected to change while it is being served.
            let mmap = unsafe { Mmap::map(&file) }.with_context(|| format!("memory-mapping {}", path.display()))?;
            let (header_len, meta) = SafeTensors::read_metadata(&mmap[..])
                .map_err(|e| anyhow::anyhow!("{}: invalid safetensors file: {e}", path.display()))?;
            for tname in meta.tensors().keys() {
                index.insert(tname.clone(), shards.len());
            }
            shards.push(Shard {
                path,
                mmap,
                header_len,
                meta,
            });
        }
        Ok(SafetensorsDir {
            dir: dir.to_path_buf(),
            shards,
            index,
        })
    }

    /// Every tensor's name, stored dtype (as a lowercase name) and byte size.
    pub fn tensor_summaries(&self) -> Vec<(String, String, u64)> {
        let mut v = Vec::new();
        for s in &self.shards {
            for (name, info) in s.meta.tensors() {
                let bytes = (info.data_offsets.1 - info.data_offsets.0) as u64;
                v.push((name, format!("{:?}", info.dtype).to_lowercase(), bytes));
            }
        }
        v.sort();
        v
    }
}

/// Appends the little-endian elements in `bytes` (a whole number of them) to `out` as f32.
type Convert = fn(&[u8], &mut Vec<f32>);

fn from_f32(bytes: &[u8], out: &mut Vec<f32>) {
    out.extend(
        bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
    )
}

fn from_f16(bytes: &[u8], out: &mut Vec<f32>) {
    out.extend(
        bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()),
    )
}

fn from_bf16(bytes: &[u8], out: &mut Vec<f32>) {
    out.extend(
        bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()),
    )
}

/// One tensor's place in a mapped file: its path, shape, element width and bytes.
struct Stored<'a> {
    path: &'a Path,
    shape: &'a [usize],
    width: usize,
    convert: Convert,
    bytes: &'a [u8],
}

impl SafetensorsDir {
    /// Where tensor `name` lies, with its byte length checked against its shape and
    /// dtype, or `None` when no file holds it.
    fn stored(&self, name: &str) -> Result<Option<Stored<'_>>> {
        let Some(&si) = self.index.get(name) else {
            return Ok(None);
        };
        let shard = &self.shards[si];
        let info = shard.meta.info(name).context("tensor vanished from header")?;
        let start = 8 + shard.header_len + info.data_offsets.0;
        let end = 8 + shard.header_len + info.data_offsets.1;
        let path = shard.path.as_path();
        let bytes = shard
            .mmap
            .get(start..end)
            .with_context(|| format!("{}: tensor `{name}` data runs past the end of the file", path.display()))?;
        let (width, convert): (usize, Convert) = match info.dtype {
            Dtype::F32 => (4, from_f32),
            Dtype::F16 => (2, from_f16),
            Dtype::BF16 => (2, from_bf16),
            other => bail!(
                "{}: tensor `{name}` has dtype {other:?} (supported: F32, F16, BF16)",
                path.display()
            ),
        };
        let n: usize = info.shape.iter().product();
        if bytes.len() != n * width {
            bail!(
                "{}: tensor `{name}` holds {} values, its shape needs {n}",
                path.display(),
                bytes.len() / width
            );
        }
        Ok(Some(Stored {
            path,
            shape: &info.shape,
            width,
            convert,
            bytes,
        }))
    }
}

impl TensorSource for SafetensorsDir {
    fn load(&self, name: &str) -> Result<Option<Tensor>> {
        self.load_shard(name, &TensorShard::Whole)
    }

    fn shape(&self, name: &str) -> Result<Option<Vec<usize>>> {
        Ok(self.stored(name)?.map(|s| s.shape.to_vec()))
    }

    /// Reads (and converts) only the shard's bytes: a row range is one contiguous
    /// slice of the map, a column range one slice per row.
    fn load_shard(&self, name: &str, shard: &TensorShard) -> Result<Option<Tensor>> {
        let Some(s) = self.stored(name)? else {
            return Ok(None);
        };
        let shape = shard
            .shape_in(name, s.shape)
            .with_context(|| s.path.display().to_string())?;
        let mut data = Vec::with_capacity(shape.iter().product());
        let (w, convert) = (s.width, s.convert);
        let row_bytes = w * s.shape.get(1..).unwrap_or(&[]).iter().product::<usize>();
        match shard {
            TensorShard::Whole => convert(s.bytes, &mut data),
            TensorShard::Rows(r) => convert(&s.bytes[r.start * row_bytes..r.end * row_bytes], &mut data),
            TensorShard::Cols(c) if row_bytes > 0 => {
                for row in s.bytes.chunks_exact(row_bytes) {
                    convert(&row[c.start * w..c.end * w], &mut data);
                }
            }
            TensorShard::Cols(_) => {} // no columns, so no elements
        }
        Ok(Some(Tensor { shape, data }))
    }

    fn describe(&self) -> String {
        self.dir.display().to_string()
    }
}
