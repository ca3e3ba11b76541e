//! The GGUF reader: validates the whole header up front, then serves metadata and
//! tensor bytes straight from a memory map.

use super::dequant;
use super::types::{GgmlType, GgufTensorInfo, GgufValue};
use anyhow::{anyhow, bail, Context, Result};
use memmap2::Mmap;
use std::collections::{BTreeMap, HashMap};
use std::fmt::Display;
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// The four magic bytes every GGUF file starts with.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
/// Alignment of tensor data when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// At most this many dimensions per tensor (ggml's `GGML_MAX_DIMS`).
pub const MAX_DIMS: u32 = 4;
/// Arrays may nest at most this many levels (an array of arrays is two levels).
pub const MAX_ARRAY_DEPTH: u32 = 8;

/// Smallest encoding of one metadata entry: key length, value type, one byte.
const MIN_KV_BYTES: u64 = 8 + 4 + 1;
/// Smallest encoding of one tensor info: name length, n_dims, type, offset.
const MIN_TENSOR_INFO_BYTES: u64 = 8 + 4 + 4 + 8;

/// An open GGUF file (versions 2 and 3, little-endian): metadata, tensor infos and the
/// memory-mapped tensor data. Every tensor's byte range was checked at `open`.
pub struct GgufFile {
    path: PathBuf,
    mmap: Mmap,
    version: u32,
    metadata: BTreeMap<String, GgufValue>,
    tensors: Vec<GgufTensorInfo>,
    by_name: HashMap<String, usize>,
    alignment: u64,
    data_start: u64,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata_entries", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .field("data_start", &self.data_start)
            .finish()
    }
}

impl GgufFile {
    /// Opens, maps and validates a GGUF file. Errors name the file and what is wrong.
    pub fn open(path: &Path) -> Result<Self> {
        let fail = |what: &str, e: std::io::Error| anyhow!("{}: cannot {what}: {e}", path.display());
        let file = File::open(path).map_err(|e| fail("open", e))?;
        let len = file.metadata().map_err(|e| fail("stat", e))?.len();
        if len == 0 {
            bail!("{}: file is empty (0 bytes), not a GGUF file", path.display());
        }
        // SAFETY: the map is read-only; like every mmap-based model loader we assume the
        // file is not truncated or rewritten while it is open.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| fail("mmap", e))?;
        let h = parse(&mmap).map_err(|e| anyhow!("{}: {e:#}", path.display()))?;
        let by_name = h.tensors.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect();
        Ok(GgufFile {
            path: path.to_path_buf(),
            mmap,
            version: h.version,
            metadata: h.metadata,
            tensors: h.tensors,
            by_name,
            alignment: h.alignment,
            data_start: h.data_start,
        })
    }

    /// The file's path, as given to [`GgufFile::open`].
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The GGUF format version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// All metadata entries, sorted by key.
    pub fn metadata(&self) -> &BTreeMap<String, GgufValue> {
        &self.metadata
    }

    /// The tensor data alignment (`general.alignment`, default 32).
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Absolute file offset of the tensor data section.
    pub fn data_start(&self) -> u64 {
        self.data_start
    }

    /// One metadata value.
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }

    fn wrong_type(&self, key: &str, v: &GgufValue, want: &str) -> anyhow::Error {
        let found = match v {
            GgufValue::String(s) if s.len() <= 40 => format!("string {s:?}"),
            GgufValue::Array(a) => format!("an array of {} values", a.len()),
            GgufValue::String(_) => "a string".to_string(),
            v => format!("{} {v:?}", v.kind_name()),
        };
        anyhow!(
            "{}: metadata key `{key}` should be {want}, found {found}",
            self.path.display()
        )
    }

    /// An integer value as u64; `Ok(None)` if absent, `Err` if not a non-negative integer.
    pub fn get_u64(&self, key: &str) -> Result<Option<u64>> {
        self.get(key)
            .map(|v| {
                v.as_u64()
                    .ok_or_else(|| self.wrong_type(key, v, "a non-negative integer"))
            })
            .transpose()
    }

    /// A numeric value as f64; `Ok(None)` if absent, `Err` if not a number.
    pub fn get_f64(&self, key: &str) -> Result<Option<f64>> {
        self.get(key)
            .map(|v| v.as_f64().ok_or_else(|| self.wrong_type(key, v, "a number")))
            .transpose()
    }

    /// A string value; `Ok(None)` if absent, `Err` if not a string.
    pub fn get_str(&self, key: &str) -> Result<Option<&str>> {
        self.get(key)
            .map(|v| v.as_str().ok_or_else(|| self.wrong_type(key, v, "a string")))
            .transpose()
    }

    /// An array of strings; `Ok(None)` if absent, `Err` if not an array of strings.
    pub fn get_str_array(&self, key: &str) -> Result<Option<Vec<&str>>> {
        let Some(v) = self.get(key) else { return Ok(None) };
        let arr = v
            .as_array()
            .ok_or_else(|| self.wrong_type(key, v, "an array of strings"))?;
        arr.iter()
            .enumerate()
            .map(|(i, e)| {
                e.as_str().ok_or_else(|| {
                    let path = self.path.display();
                    anyhow!(
                        "{path}: metadata key `{key}` element {i} is {}, expected a string",
                        e.kind_name()
                    )
                })
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    /// All tensor infos, in file order.
    pub fn tensors(&self) -> &[GgufTensorInfo] {
        &self.tensors
    }

    /// The info of the tensor called `name`.
    pub fn tensor_info(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.by_name.get(name).and_then(|&i| self.tensors.get(i))
    }

    fn info_or_err(&self, name: &str) -> Result<&GgufTensorInfo> {
        self.tensor_info(name)
            .ok_or_else(|| anyhow!("{}: no tensor named `{name}`", self.path.display()))
    }

    /// The raw (possibly quantised) bytes of tensor `name`, borrowed from the map.
    pub fn tensor_bytes(&self, name: &str) -> Result<&[u8]> {
        let t = self.info_or_err(name)?;
        let range = self
            .data_start
            .checked_add(t.offset)
            .and_then(|s| Some((s, s.checked_add(t.n_bytes())?)))
            .and_then(|(s, e)| Some(usize::try_from(s).ok()?..usize::try_from(e).ok()?));
        range.and_then(|r| self.mmap.get(r)).ok_or_else(|| {
            anyhow!(
                "{}: tensor `{name}` data is out of range (file size {})",
                self.path.display(),
                self.mmap.len()
            )
        })
    }

    /// Tensor `name` dequantised to f32 in ggml memory order (`dims[0]` fastest).
    pub fn dequantize(&self, name: &str) -> Result<Vec<f32>> {
        let t = self.info_or_err(name)?;
        let bytes = self.tensor_bytes(name)?;
        let n = usize::try_from(t.n_elements()).map_err(|_| {
            anyhow!(
                "{}: tensor `{name}` is too large for this platform",
                self.path.display()
            )
        })?;
        dequant::dequantize(t.dtype, bytes, n).map_err(|e| anyhow!("{}: tensor `{name}`: {e:#}", self.path.display()))
    }

    /// Rows `rows` of tensor `name` dequantised to f32, a row being `dims[0]` elements
    /// (whole blocks, as `open` checked): only those rows' bytes are read.
    pub fn dequantize_rows(&self, name: &str, rows: Range<usize>) -> Result<Vec<f32>> {
        let t = self.info_or_err(name)?;
        let bytes = self.tensor_bytes(name)?;
        let width = t.dims.first().copied().unwrap_or(1);
        let row_bytes = (width / t.dtype.block_elems() * t.dtype.block_bytes()) as usize;
        let total = bytes.len().checked_div(row_bytes).unwrap_or(0);
        if rows.start > rows.end || rows.end > total {
            bail!(
                "{}: tensor `{name}` has {total} rows of {width} elements: rows {rows:?} are outside it",
                self.path.display()
            );
        }
        let part = &bytes[rows.start * row_bytes..rows.end * row_bytes];
        dequant::dequantize(t.dtype, part, rows.len() * width as usize)
            .map_err(|e| anyhow!("{}: tensor `{name}`: {e:#}", self.path.display()))
    }
}

/// The validated header of a GGUF file.
struct Header {
    version: u32,
    metadata: BTreeMap<String, GgufValue>,
    tensors: Vec<GgufTensorInfo>,
    alignment: u64,
    data_start: u64,
}

/// A bounds-checked little-endian cursor. Invariant: `pos <= buf.len()`.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn len(&self) -> u64 {
        self.buf.len() as u64
    }

    fn remaining(&self) -> u64 {
        (self.buf.len() - self.pos) as u64
    }

    fn take(&mut self, n: u64, what: impl Display) -> Result<&'a [u8]> {
        let end = usize::try_from(n).ok().and_then(|n| self.pos.checked_add(n));
        match end.and_then(|end| Some((end, self.buf.get(self.pos..end)?))) {
            Some((end, s)) => {
                self.pos = end;
                Ok(s)
            }
            None => bail!(
                "unexpected end of file (truncated?): {what} needs {n} bytes at offset {}, but the file is {} bytes",
                self.pos,
                self.len()
            ),
        }
    }

    fn array<const N: usize>(&mut self, what: impl Display) -> Result<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N as u64, what)?);
        Ok(a)
    }

    fn u32(&mut self, what: impl Display) -> Result<u32> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: impl Display) -> Result<u64> {
        self.array(what).map(u64::from_le_bytes)
    }

    fn string(&mut self, what: impl Display) -> Result<String> {
        let at = self.pos;
        let len = self.u64(format_args!("the length of {what}"))?;
        if len > self.remaining() {
            bail!(
                "{what}: string length {len} at offset {at} runs past the end of the file (size {})",
                self.len()
            );
        }
        let bytes = self.take(len, &what)?;
        match std::str::from_utf8(bytes) {
            Ok(s) => Ok(s.to_string()),
            Err(e) => bail!("{what}: string at offset {at} is not valid UTF-8 ({e})"),
        }
    }

    /// Reads a value of GGUF value type `ty`; `depth` counts enclosing arrays.
    fn value(&mut self, ty: u32, depth: u32) -> Result<GgufValue> {
        const V: &str = "value";
        Ok(match ty {
            0 => GgufValue::U8(u8::from_le_bytes(self.array(V)?)),
            1 => GgufValue::I8(i8::from_le_bytes(self.array(V)?)),
            2 => GgufValue::U16(u16::from_le_bytes(self.array(V)?)),
            3 => GgufValue::I16(i16::from_le_bytes(self.array(V)?)),
            4 => GgufValue::U32(u32::from_le_bytes(self.array(V)?)),
            5 => GgufValue::I32(i32::from_le_bytes(self.array(V)?)),
            6 => GgufValue::F32(f32::from_le_bytes(self.array(V)?)),
            7 => match self.array::<1>(V)?[0] {
                0 => GgufValue::Bool(false),
                1 => GgufValue::Bool(true),
                b => bail!("invalid bool byte {b} at offset {} (expected 0 or 1)", self.pos - 1),
            },
            8 => GgufValue::String(self.string(V)?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    bail!("arrays are nested deeper than {MAX_ARRAY_DEPTH} levels");
                }
                let elem_ty = self.u32("array element type")?;
                let at = self.pos;
                let count = self.u64("array length")?;
                let min = min_value_bytes(elem_ty)?;
                if count.checked_mul(min).is_none_or(|need| need > self.remaining()) {
                    bail!(
                        "array length {count} at offset {at} cannot fit in the {} bytes left in the file",
                        self.remaining()
                    );
                }
                let mut items = Vec::with_capacity(count.min(1 << 16) as usize);
                for i in 0..count {
                    items.push(
                        self.value(elem_ty, depth + 1)
                            .with_context(|| format!("array element {i}"))?,
                    );
                }
                GgufValue::Array(items)
            }
            10 => GgufValue::U64(u64::from_le_bytes(self.array(V)?)),
            11 => GgufValue::I64(i64::from_le_bytes(self.array(V)?)),
            12 => GgufValue::F64(f64::from_le_bytes(self.array(V)?)),
            t => bail!("unknown metadata value type id {t}"),
        })
    }
}

/// Smallest possible encoding of a value of type `ty`.
fn min_value_bytes(ty: u32) -> Result<u64> {
    Ok(match ty {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        8 | 10..=12 => 8,
        9 => 12,
        t => bail!("unknown metadata value type id {t}"),
    })
}

/// `x` rounded up to a multiple of `align` (a power of two), if that fits in u64.
fn align_up(x: u64, align: u64) -> Option<u64> {
    Some(x.checked_add(align - 1)? & !(align - 1))
}

fn parse(buf: &[u8]) -> Result<Header> {
    let mut c = Cursor { buf, pos: 0 };
    let magic: [u8; 4] = c.array("the magic")?;
    if magic != GGUF_MAGIC {
        bail!("bad magic {magic:02x?} (expected \"GGUF\"): not a GGUF file");
    }
    let version = c.u32("the version")?;
    match version {
        2 | 3 => {}
        1 => bail!("GGUF version 1 is not supported (it predates 64-bit counts); re-convert the model"),
        v if (1..=3).contains(&v.swap_bytes()) => {
            bail!("big-endian GGUF files are not supported (version field {v:#x})")
        }
        v => bail!("unsupported GGUF version {v} (expected 3 or 2)"),
    }
    let n_tensors = c.u64("the tensor count")?;
    let n_kv = c.u64("the metadata count")?;
    let need = n_kv
        .checked_mul(MIN_KV_BYTES)
        .and_then(|a| a.checked_add(n_tensors.checked_mul(MIN_TENSOR_INFO_BYTES)?));
    if need.is_none_or(|need| need > c.remaining()) {
        bail!(
            "header claims {n_tensors} tensors and {n_kv} metadata entries, which cannot fit in the {} bytes left in the file",
            c.remaining()
        );
    }

    let mut metadata = BTreeMap::new();
    for i in 0..n_kv {
        let key = c.string(format_args!("metadata entry {i} key"))?;
        let ty = c.u32(format_args!("the value type of metadata key `{key}`"))?;
        let value = c.value(ty, 0).with_context(|| format!("metadata key `{key}`"))?;
        if metadata.insert(key.clone(), value).is_some() {
            bail!("duplicate metadata key `{key}`");
        }
    }
    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(v) => match v.as_u64() {
            Some(a) if a.is_power_of_two() => a,
            Some(a) => bail!("general.alignment {a} is not a power of two"),
            None => bail!("general.alignment must be an unsigned integer, found {}", v.kind_name()),
        },
    };

    let mut tensors: Vec<GgufTensorInfo> = Vec::with_capacity(n_tensors.min(1 << 16) as usize);
    let mut names = HashMap::new();
    for i in 0..n_tensors {
        let name = c.string(format_args!("tensor info {i} name"))?;
        if names.insert(name.clone(), i).is_some() {
            bail!("duplicate tensor name `{name}`");
        }
        tensors.push(tensor_info(&mut c, name, alignment)?);
    }

    let data_start = align_up(c.pos as u64, alignment)
        .ok_or_else(|| anyhow!("data section offset overflows with alignment {alignment}"))?;
    for t in &tensors {
        let start = data_start.checked_add(t.offset);
        let end = start.and_then(|s| s.checked_add(t.n_bytes()));
        match (start, end) {
            (Some(_), Some(e)) if e <= c.len() => {}
            (s, e) => {
                let s = s.map_or("overflow".to_string(), |s| s.to_string());
                let e = e.map_or("overflow".to_string(), |e| e.to_string());
                bail!(
                    "tensor `{}` data [{s}..{e}) runs past the end of the file (size {})",
                    t.name,
                    c.len()
                );
            }
        }
    }
    Ok(Header {
        version,
        metadata,
        tensors,
        alignment,
        data_start,
    })
}

/// Reads and validates the rest of a tensor info after its name.
fn tensor_info(c: &mut Cursor, name: String, alignment: u64) -> Result<GgufTensorInfo> {
    let n_dims = c.u32(format_args!("the dimension count of tensor `{name}`"))?;
    if n_dims > MAX_DIMS {
        bail!("tensor `{name}` has {n_dims} dimensions (at most {MAX_DIMS} are supported)");
    }
    let mut dims = Vec::with_capacity(n_dims as usize);
    for d in 0..n_dims {
        dims.push(c.u64(format_args!("dimension {d} of tensor `{name}`"))?);
    }
    if dims.contains(&0) {
        bail!("tensor `{name}` has a zero dimension (dims {dims:?})");
    }
    let type_id = c.u32(format_args!("the type of tensor `{name}`"))?;
    let offset = c.u64(format_args!("the data offset of tensor `{name}`"))?;
    let dtype = GgmlType::from_id(type_id).map_err(|e| anyhow!("{e} for tensor `{name}`"))?;
    let n = dims.iter().try_fold(1u64, |a, &d| a.checked_mul(d));
    let Some(n) = n.filter(|&n| n <= i64::MAX as u64) else {
        bail!("tensor `{name}`: element count of dims {dims:?} overflows");
    };
    let ne0 = dims.first().copied().unwrap_or(1);
    if ne0 % dtype.block_elems() != 0 {
        bail!(
            "tensor `{name}`: dims[0] = {ne0} is not a multiple of the {} block size {}",
            dtype.name(),
            dtype.block_elems()
        );
    }
    if (n / dtype.block_elems()).checked_mul(dtype.block_bytes()).is_none() {
        bail!("tensor `{name}`: byte size of dims {dims:?} overflows");
    }
    if offset % alignment != 0 {
        bail!("tensor `{name}` data offset {offset} is not a multiple of the alignment {alignment} (misaligned)");
    }
    Ok(GgufTensorInfo {
        name,
        dims,
        dtype,
        offset,
    })
}
