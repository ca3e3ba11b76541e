//! GGUF value kinds, ggml tensor types and tensor descriptors.

use anyhow::{bail, Result};

/// One metadata value. Arrays hold values of a single kind (GGUF arrays are typed).
#[derive(Clone, Debug, PartialEq)]
pub enum GgufValue {
    /// `GGUF_TYPE_UINT8` (id 0).
    U8(u8),
    /// `GGUF_TYPE_INT8` (id 1).
    I8(i8),
    /// `GGUF_TYPE_UINT16` (id 2).
    U16(u16),
    /// `GGUF_TYPE_INT16` (id 3).
    I16(i16),
    /// `GGUF_TYPE_UINT32` (id 4).
    U32(u32),
    /// `GGUF_TYPE_INT32` (id 5).
    I32(i32),
    /// `GGUF_TYPE_UINT64` (id 10).
    U64(u64),
    /// `GGUF_TYPE_INT64` (id 11).
    I64(i64),
    /// `GGUF_TYPE_FLOAT32` (id 6).
    F32(f32),
    /// `GGUF_TYPE_FLOAT64` (id 12).
    F64(f64),
    /// `GGUF_TYPE_BOOL` (id 7), one byte holding 0 or 1.
    Bool(bool),
    /// `GGUF_TYPE_STRING` (id 8): u64 length + UTF-8 bytes, no terminator.
    String(String),
    /// `GGUF_TYPE_ARRAY` (id 9): u32 element kind, u64 count, elements.
    Array(Vec<GgufValue>),
}

impl GgufValue {
    /// Any integer kind holding a non-negative value, widened to u64.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(v) => Some(v.into()),
            GgufValue::U16(v) => Some(v.into()),
            GgufValue::U32(v) => Some(v.into()),
            GgufValue::U64(v) => Some(v),
            GgufValue::I8(v) => u64::try_from(v).ok(),
            GgufValue::I16(v) => u64::try_from(v).ok(),
            GgufValue::I32(v) => u64::try_from(v).ok(),
            GgufValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// Any numeric kind (float or integer) as f64; 64-bit integers may round.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(v) => Some(v.into()),
            GgufValue::F64(v) => Some(v),
            GgufValue::U8(v) => Some(v.into()),
            GgufValue::I8(v) => Some(v.into()),
            GgufValue::U16(v) => Some(v.into()),
            GgufValue::I16(v) => Some(v.into()),
            GgufValue::U32(v) => Some(v.into()),
            GgufValue::I32(v) => Some(v.into()),
            GgufValue::U64(v) => Some(v as f64),
            GgufValue::I64(v) => Some(v as f64),
            _ => None,
        }
    }

    /// The string, if this is a string value.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// The elements, if this is an array value.
    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(a) => Some(a),
            _ => None,
        }
    }

    /// The flag, if this is a bool value.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            GgufValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// The GGUF value-type id this value is written with.
    pub fn type_id(&self) -> u32 {
        match self {
            GgufValue::U8(_) => 0,
            GgufValue::I8(_) => 1,
            GgufValue::U16(_) => 2,
            GgufValue::I16(_) => 3,
            GgufValue::U32(_) => 4,
            GgufValue::I32(_) => 5,
            GgufValue::F32(_) => 6,
            GgufValue::Bool(_) => 7,
            GgufValue::String(_) => 8,
            GgufValue::Array(_) => 9,
            GgufValue::U64(_) => 10,
            GgufValue::I64(_) => 11,
            GgufValue::F64(_) => 12,
        }
    }

    /// A short name of the value kind, for error messages.
    pub fn kind_name(&self) -> &'static str {
        match self {
            GgufValue::U8(_) => "u8",
            GgufValue::I8(_) => "i8",
            GgufValue::U16(_) => "u16",
            GgufValue::I16(_) => "i16",
            GgufValue::U32(_) => "u32",
            GgufValue::I32(_) => "i32",
            GgufValue::U64(_) => "u64",
            GgufValue::I64(_) => "i64",
            GgufValue::F32(_) => "f32",
            GgufValue::F64(_) => "f64",
            GgufValue::Bool(_) => "bool",
            GgufValue::String(_) => "string",
            GgufValue::Array(_) => "array",
        }
    }
}

/// The ggml tensor element types this crate can dequantise.
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub enum GgmlType {
    /// 32-bit IEEE float.
    F32,
    /// 16-bit IEEE half float.
    F16,
    /// bfloat16 (the top half of an f32).
    BF16,
    /// 32 elements: f16 scale `d`, 16 bytes of 4-bit quants; `x = (q - 8) * d`.
    Q4_0,
    /// 32 elements: f16 `d`, f16 `m`, 16 bytes of 4-bit quants; `x = q * d + m`.
    Q4_1,
    /// 32 elements: f16 `d`, 32 signed bytes; `x = q * d`.
    Q8_0,
    /// 256-element super-block with 8 sub-blocks of 6-bit scales/mins and 4-bit quants.
    Q4_K,
    /// 256-element super-block with 16 i8 scales and 6-bit quants.
    Q6_K,
}

/// Names of every ggml type id known to ggml (index = id); `""` marks removed ids.
const GGML_TYPE_NAMES: [&str; 42] = [
    "F32", "F16", "Q4_0", "Q4_1", "", "", "Q5_0", "Q5_1", "Q8_0", "Q8_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
    "Q8_K", "IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ4_NL", "IQ3_S", "IQ2_S", "IQ4_XS", "I8", "I16", "I32", "I64",
    "F64", "IQ1_M", "BF16", "", "", "", "TQ1_0", "TQ2_0", "", "", "", "MXFP4", "NVFP4", "Q1_0",
];

impl GgmlType {
    /// Every supported type.
    pub const ALL: [GgmlType; 8] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q8_0,
        GgmlType::Q4_K,
        GgmlType::Q6_K,
    ];

    /// ggml's name for the type (e.g. `"Q4_K"`).
    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::BF16 => "BF16",
            GgmlType::Q4_0 => "Q4_0",
            GgmlType::Q4_1 => "Q4_1",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Q4_K => "Q4_K",
            GgmlType::Q6_K => "Q6_K",
        }
    }

    /// The numeric id used in GGUF tensor infos (`enum ggml_type`).
    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q8_0 => 8,
            GgmlType::Q4_K => 12,
            GgmlType::Q6_K => 14,
            GgmlType::BF16 => 30,
        }
    }

    /// Elements per block (1 for the float types).
    pub fn block_elems(self) -> u64 {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 1,
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0 => 32,
            GgmlType::Q4_K | GgmlType::Q6_K => 256,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> u64 {
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::BF16 => 2,
            GgmlType::Q4_0 => 18,
            GgmlType::Q4_1 => 20,
            GgmlType::Q8_0 => 34,
            GgmlType::Q4_K => 144,
            GgmlType::Q6_K => 210,
        }
    }

    /// The type for a GGUF type id; errors name the id, or the ggml type if it is
    /// known to ggml but not supported here.
    pub fn from_id(id: u32) -> Result<GgmlType> {
        if let Some(t) = GgmlType::ALL.into_iter().find(|t| t.id() == id) {
            return Ok(t);
        }
        match GGML_TYPE_NAMES.get(id as usize) {
            Some(name) if !name.is_empty() => {
                bail!("ggml type {name} (id {id}) is not supported")
            }
            _ => bail!("unsupported ggml type id {id}"),
        }
    }
}

/// One tensor's descriptor from the GGUF header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GgufTensorInfo {
    /// The tensor name, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    /// Dimensions in ggml order: `dims[0]` is the contiguous (fastest-varying) one.
    pub dims: Vec<u64>,
    /// Element type.
    pub dtype: GgmlType,
    /// Offset of the tensor data, relative to the start of the data section.
    pub offset: u64,
}

impl GgufTensorInfo {
    /// Number of elements (product of `dims`; saturates at `u64::MAX`, which the
    /// reader never lets through).
    pub fn n_elements(&self) -> u64 {
        self.dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .unwrap_or(u64::MAX)
    }

    /// Size of the tensor data in bytes (saturating, like [`Self::n_elements`]).
    pub fn n_bytes(&self) -> u64 {
        (self.n_elements() / self.dtype.block_elems()).saturating_mul(self.dtype.block_bytes())
    }
}
