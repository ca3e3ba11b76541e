//! GGUF reader tests: malformed files (built with `GgufWriter`, then byte-patched),
//! metadata/tensor round trips, and dequantisation checked bit-for-bit against the
//! `gguf` Python package (`tools/reference/gguf_dequant.py`).

mod common;

use half::{bf16, f16};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use shadowkv::model::gguf::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Once;

// ---------------------------------------------------------------- helpers

/// A seeded RNG; the seed comes from `SHADOWKV_TEST_SEED` or the clock and is printed.
fn rng(test: &str) -> StdRng {
    let seed = std::env::var("SHADOWKV_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    println!("{test}: seed {seed} (rerun with SHADOWKV_TEST_SEED={seed})");
    StdRng::seed_from_u64(seed)
}

/// Random raw bytes for `n_blocks` blocks of `t`, with every f16 scale field finite and
/// in ±2, and every f16/bf16 element finite.
fn random_blocks(rng: &mut StdRng, t: GgmlType, n_blocks: usize) -> Vec<u8> {
    let bb = t.block_bytes() as usize;
    let mut b = vec![0u8; n_blocks * bb];
    rng.fill(&mut b[..]);
    let scale = |rng: &mut StdRng| f16::from_f32(rng.random_range(-2.0f32..2.0)).to_le_bytes();
    for blk in b.chunks_exact_mut(bb) {
        match t {
            GgmlType::F32 => blk.copy_from_slice(&rng.random_range(-1e3f32..1e3).to_le_bytes()),
            GgmlType::F16 => {
                while !f16::from_le_bytes([blk[0], blk[1]]).is_finite() {
                    rng.fill(&mut blk[..]);
                }
            }
            GgmlType::BF16 => {
                while !bf16::from_le_bytes([blk[0], blk[1]]).is_finite() {
                    rng.fill(&mut blk[..]);
                }
            }
            GgmlType::Q4_0 | GgmlType::Q8_0 => blk[0..2].copy_from_slice(&scale(rng)),
            GgmlType::Q4_1 | GgmlType::Q4_K => {
                blk[0..2].copy_from_slice(&scale(rng));
                blk[2..4].copy_from_slice(&scale(rng));
            }
            GgmlType::Q6_K => blk[208..210].copy_from_slice(&scale(rng)),
        }
    }
    b
}

fn f32s(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn read_f32s(path: &Path) -> Vec<f32> {
    let b = std::fs::read(path).unwrap();
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn reference_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/reference/gguf_dequant.py")
}

/// Fails (does not skip) when Python or the gguf module is missing.
fn require_python() {
    static CHECK: Once = Once::new();
    CHECK.call_once(|| {
        let py = common::python();
        let out = Command::new(&py).args(["-c", "import gguf, numpy"]).output();
        match out {
            Ok(o) if o.status.success() => {}
            Ok(o) => panic!(
                "{py} cannot import gguf/numpy: {}\n{}",
                common::PYTHON_HINT,
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => panic!("cannot run {py} ({e}): {}", common::PYTHON_HINT),
        }
    });
}

fn run_reference(args: &[&str]) -> Command {
    let mut cmd = Command::new(common::python());
    cmd.arg(reference_script()).args(args);
    cmd
}

fn check_status(cmd: &str, out: std::process::Output) {
    assert!(
        out.status.success(),
        "{cmd} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Asserts `got` and `want` are identical bit patterns, reporting the first mismatch.
fn assert_bit_exact(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = (0..got.len()).find(|&i| got[i].to_bits() != want[i].to_bits()) {
        panic!(
            "{what}: element {i}: rust {} ({:#x}) vs python {} ({:#x})",
            got[i],
            got[i].to_bits(),
            want[i],
            want[i].to_bits()
        );
    }
}

/// A small valid file: metadata (with a long token list so that cuts inside the
/// metadata and tensor infos still pass the count sanity check) and three tensors.
fn sample() -> GgufWriter {
    let tokens: Vec<GgufValue> = (0..40).map(|i| GgufValue::String(format!("tok{i}"))).collect();
    let mut rng = StdRng::seed_from_u64(7);
    let mut w = GgufWriter::new();
    w.add_metadata("general.architecture", GgufValue::String("llama".into()))
        .add_metadata("tokenizer.ggml.tokens", GgufValue::Array(tokens))
        .add_metadata("general.flag", GgufValue::Bool(true))
        .add_metadata("general.name", GgufValue::String("MARKER-name".into()))
        .add_tensor(
            "tensor_a",
            &[4, 2],
            GgmlType::F32,
            f32s(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]),
        )
        .add_tensor(
            "tensor_q",
            &[64, 2],
            GgmlType::Q4_0,
            random_blocks(&mut rng, GgmlType::Q4_0, 4),
        )
        .add_tensor(
            "tensor_c",
            &[32],
            GgmlType::Q8_0,
            random_blocks(&mut rng, GgmlType::Q8_0, 1),
        );
    w
}

fn find(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len())
        .position(|w| w == needle)
        .expect("needle not found")
}

/// Position just past the length-prefixed string `s` (a key or tensor name).
fn after_str(bytes: &[u8], s: &str) -> usize {
    let mut needle = (s.len() as u64).to_le_bytes().to_vec();
    needle.extend(s.as_bytes());
    find(bytes, &needle) + needle.len()
}

/// Byte positions of a tensor info's (n_dims, dims, type, offset) fields.
fn tensor_fields(bytes: &[u8], name: &str) -> (usize, usize, usize, usize) {
    let p = after_str(bytes, name);
    let n_dims = u32::from_le_bytes(bytes[p..p + 4].try_into().unwrap()) as usize;
    (p, p + 4, p + 4 + 8 * n_dims, p + 8 + 8 * n_dims)
}

fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// Writes `bytes` as `bad.gguf` and returns `open`'s error text (which must name it).
fn open_err(bytes: &[u8]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.gguf");
    std::fs::write(&path, bytes).unwrap();
    let msg = match GgufFile::open(&path) {
        Ok(_) => panic!("open should fail"),
        Err(e) => format!("{e:#}"),
    };
    assert!(msg.contains("bad.gguf"), "error does not name the file: {msg}");
    msg
}

fn assert_err(bytes: &[u8], needles: &[&str]) {
    let msg = open_err(bytes);
    for n in needles {
        assert!(msg.contains(n), "error `{msg}` lacks `{n}`");
    }
}

// ---------------------------------------------------------------- malformed files

#[test]
fn sample_is_valid() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ok.gguf");
    sample().write(&path).unwrap();
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.tensors().len(), 3);
    assert_eq!(
        f.dequantize("tensor_a").unwrap(),
        [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]
    );
}

#[test]
fn truncated_everywhere() {
    let bytes = sample().to_bytes().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cut.gguf");
    std::fs::write(&path, &bytes).unwrap();
    let f = GgufFile::open(&path).unwrap();
    let c = f.tensor_info("tensor_c").unwrap();
    let data_end = (f.data_start() + c.offset + c.n_bytes()) as usize;

    // Every cut that loses meaningful bytes must fail with a truncation message.
    for cut in 0..data_end {
        let msg = open_err(&bytes[..cut]);
        let ok = [
            "unexpected end of file",
            "runs past the end of the file",
            "cannot fit",
            "empty",
        ];
        assert!(ok.iter().any(|s| msg.contains(s)), "cut at {cut}: {msg}");
    }
    // Specific cut points and their specific reasons.
    assert_err(&bytes[..3], &["unexpected end of file", "the magic"]);
    assert_err(&bytes[..6], &["unexpected end of file", "the version"]);
    assert_err(&bytes[..12], &["unexpected end of file", "the tensor count"]);
    assert_err(&bytes[..20], &["unexpected end of file", "the metadata count"]);
    let p = after_str(&bytes, "general.name") + 4 + 8 + 3; // inside the value's bytes
    assert_err(&bytes[..p], &["general.name", "runs past the end of the file"]);
    let (_, dims, _, _) = tensor_fields(&bytes, "tensor_q");
    assert_err(
        &bytes[..dims + 12],
        &["unexpected end of file", "dimension 1 of tensor `tensor_q`"],
    );
    assert_err(
        &bytes[..data_end - 1],
        &["tensor `tensor_c` data", "runs past the end of the file"],
    );
    assert_err(&[], &["empty"]);
}

#[test]
fn bad_magic_and_version() {
    let good = sample().to_bytes().unwrap();
    let mut b = good.clone();
    b[3] = b'G';
    assert_err(&b, &["bad magic", "not a GGUF file"]);
    let mut b = good.clone();
    put_u32(&mut b, 4, 1);
    assert_err(&b, &["GGUF version 1 is not supported"]);
    put_u32(&mut b, 4, 4);
    assert_err(&b, &["unsupported GGUF version 4"]);
    put_u32(&mut b, 4, 3u32.swap_bytes());
    assert_err(&b, &["big-endian"]);
    // Version 2 has the same layout and is accepted.
    put_u32(&mut b, 4, 2);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v2.gguf");
    std::fs::write(&path, &b).unwrap();
    assert_eq!(GgufFile::open(&path).unwrap().version(), 2);
}

#[test]
fn bad_tensor_offsets() {
    let good = sample().to_bytes().unwrap();
    let (_, _, _, off) = tensor_fields(&good, "tensor_c");
    let mut b = good.clone();
    put_u64(&mut b, off, 1 << 40);
    assert_err(&b, &["tensor `tensor_c` data [", "runs past the end of the file (size"]);
    put_u64(&mut b, off, u64::MAX - 31); // aligned, but start + size overflows
    assert_err(&b, &["tensor `tensor_c` data", "runs past the end of the file"]);
    let old = u64::from_le_bytes(good[off..off + 8].try_into().unwrap());
    put_u64(&mut b, off, old + 4);
    assert_err(&b, &["tensor `tensor_c`", "misaligned", "alignment 32"]);
    // Overlapping tensors are allowed: point tensor_c at tensor_a's data.
    put_u64(&mut b, off, 0);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("overlap.gguf");
    std::fs::write(&path, &b).unwrap();
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.tensor_bytes("tensor_c").unwrap().len(), 34);
}

#[test]
fn bad_tensor_types_and_dims() {
    let good = sample().to_bytes().unwrap();
    let (nd, dims, ty, _) = tensor_fields(&good, "tensor_c");
    let mut b = good.clone();
    put_u32(&mut b, ty, 99);
    assert_err(&b, &["unsupported ggml type id 99 for tensor `tensor_c`"]);
    put_u32(&mut b, ty, 13);
    assert_err(&b, &["Q5_K", "is not supported", "tensor_c"]);
    put_u32(&mut b, ty, 4); // a removed id
    assert_err(&b, &["unsupported ggml type id 4"]);

    let mut b = good.clone();
    put_u64(&mut b, dims, 0);
    assert_err(&b, &["tensor `tensor_c` has a zero dimension"]);
    put_u64(&mut b, dims, 48);
    assert_err(
        &b,
        &[
            "tensor `tensor_c`",
            "dims[0] = 48 is not a multiple of the Q8_0 block size 32",
        ],
    );
    let mut b = good.clone();
    put_u32(&mut b, nd, 5);
    assert_err(&b, &["tensor `tensor_c` has 5 dimensions"]);

    let (_, dims, _, _) = tensor_fields(&good, "tensor_a");
    let mut b = good.clone();
    put_u64(&mut b, dims, 1 << 32);
    put_u64(&mut b, dims + 8, 1 << 32);
    assert_err(&b, &["tensor `tensor_a`", "element count", "overflows"]);
    put_u64(&mut b, dims + 8, 1 << 20); // fits in u64 but not in the file
    assert_err(&b, &["tensor `tensor_a` data", "runs past the end of the file"]);
}

#[test]
fn huge_counts_and_lengths() {
    let good = sample().to_bytes().unwrap();
    let mut b = good.clone();
    put_u64(&mut b, 8, u64::MAX);
    assert_err(&b, &["cannot fit"]);
    let mut b = good.clone();
    put_u64(&mut b, 16, 1 << 40);
    assert_err(&b, &["1099511627776 metadata entries", "cannot fit"]);
    // The first key's length.
    let mut b = good.clone();
    put_u64(&mut b, 24, u64::MAX / 2);
    assert_err(
        &b,
        &["metadata entry 0 key", "string length", "runs past the end of the file"],
    );
    // A string value's length.
    let mut b = good.clone();
    put_u64(&mut b, after_str(&good, "general.architecture") + 4, 1 << 50);
    assert_err(&b, &["general.architecture", "string length 1125899906842624"]);
    // The token array's length.
    let mut b = good.clone();
    put_u64(&mut b, after_str(&good, "tokenizer.ggml.tokens") + 8, 1 << 60);
    assert_err(&b, &["tokenizer.ggml.tokens", "array length", "cannot fit"]);
    // A tensor name's length.
    let mut b = good.clone();
    let p = after_str(&good, "tensor_a") - "tensor_a".len() - 8;
    put_u64(&mut b, p, u64::MAX);
    assert_err(&b, &["tensor info 0 name", "string length"]);
}

#[test]
fn bad_strings_and_values() {
    let good = sample().to_bytes().unwrap();
    let mut b = good.clone();
    let p = find(&good, b"MARKER");
    b[p] = 0xFF;
    assert_err(&b, &["metadata key `general.name`", "not valid UTF-8"]);
    let mut b = good.clone();
    let p = find(&good, b"tensor_q");
    b[p + 1] = 0xC3; // a lone UTF-8 lead byte
    assert_err(&b, &["tensor info 1 name", "not valid UTF-8"]);
    let mut b = good.clone();
    let p = find(&good, b"general.flag");
    b[p] = 0x80;
    assert_err(&b, &["metadata entry 2 key", "not valid UTF-8"]);

    let mut b = good.clone();
    let p = after_str(&good, "general.flag");
    put_u32(&mut b, p, 77);
    assert_err(&b, &["general.flag", "unknown metadata value type id 77"]);
    let mut b = good.clone();
    b[p + 4] = 2;
    assert_err(&b, &["general.flag", "invalid bool byte 2"]);
    let mut b = good.clone();
    put_u32(&mut b, after_str(&good, "tokenizer.ggml.tokens") + 4, 13);
    assert_err(&b, &["tokenizer.ggml.tokens", "unknown metadata value type id 13"]);

    // Deeply nested arrays.
    let mut v = GgufValue::U8(1);
    for _ in 0..MAX_ARRAY_DEPTH + 2 {
        v = GgufValue::Array(vec![v]);
    }
    let mut w = GgufWriter::new();
    w.add_metadata("deep", v);
    assert_err(&w.to_bytes().unwrap(), &["metadata key `deep`", "nested deeper"]);
    // Exactly MAX_ARRAY_DEPTH levels are fine.
    let mut v = GgufValue::U8(1);
    for _ in 0..MAX_ARRAY_DEPTH {
        v = GgufValue::Array(vec![v]);
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("deep.gguf");
    GgufWriter::new().add_metadata("deep", v.clone()).write(&path).unwrap();
    assert_eq!(GgufFile::open(&path).unwrap().get("deep"), Some(&v));

    // Duplicates.
    let mut w = sample();
    w.add_metadata("general.name", GgufValue::U32(1));
    assert_err(&w.to_bytes().unwrap(), &["duplicate metadata key `general.name`"]);
    let mut w = sample();
    w.add_tensor("tensor_a", &[1], GgmlType::F32, f32s(&[0.0]));
    assert_err(&w.to_bytes().unwrap(), &["duplicate tensor name `tensor_a`"]);

    // Alignment that is not a power of two.
    let mut w = sample();
    w.add_metadata("general.alignment", GgufValue::U32(32));
    let mut b = w.to_bytes().unwrap();
    let p = after_str(&b, "general.alignment") + 4;
    put_u32(&mut b, p, 24);
    assert_err(&b, &["general.alignment 24 is not a power of two"]);
}

#[test]
fn random_corruption_never_panics() {
    let good = sample().to_bytes().unwrap();
    let mut rng = rng("random_corruption_never_panics");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fuzz.gguf");
    for _ in 0..3000 {
        let mut b = good.clone();
        for _ in 0..rng.random_range(1..4) {
            let i = rng.random_range(0..b.len());
            b[i] = if rng.random() {
                rng.random()
            } else {
                b[i] ^ (1 << rng.random_range(0..8))
            };
        }
        if rng.random_range(0..4) == 0 {
            b.truncate(rng.random_range(0..b.len()));
        }
        std::fs::write(&path, &b).unwrap();
        match GgufFile::open(&path) {
            Ok(f) => {
                for t in f.tensors() {
                    let _ = f.dequantize(&t.name);
                }
            }
            Err(e) => assert!(format!("{e:#}").contains("fuzz.gguf")),
        }
    }
}

#[test]
fn accessor_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("acc.gguf");
    sample().write(&path).unwrap();
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.get_u64("missing").unwrap(), None);
    let e = format!("{:#}", f.get_u64("general.architecture").unwrap_err());
    assert!(
        e.contains("acc.gguf") && e.contains("`general.architecture`") && e.contains("\"llama\""),
        "{e}"
    );
    let e = format!("{:#}", f.get_str("general.flag").unwrap_err());
    assert!(e.contains("`general.flag`") && e.contains("should be a string"), "{e}");
    let e = format!("{:#}", f.get_str_array("general.name").unwrap_err());
    assert!(e.contains("`general.name`"), "{e}");
    assert!(f.get_f64("tokenizer.ggml.tokens").is_err());
    assert_eq!(f.get_str_array("tokenizer.ggml.tokens").unwrap().unwrap()[3], "tok3");
    let e = format!("{:#}", f.tensor_bytes("nope").unwrap_err());
    assert!(e.contains("no tensor named `nope`"), "{e}");
    assert!(f.dequantize("nope").is_err());

    let e = format!("{:#}", GgufFile::open(&dir.path().join("absent.gguf")).unwrap_err());
    assert!(e.contains("absent.gguf: cannot open"), "{e}");
    let e = format!("{:#}", GgufFile::open(dir.path()).unwrap_err());
    assert!(e.contains(&dir.path().display().to_string()), "{e}");
}

// ---------------------------------------------------------------- round trip

#[test]
fn round_trip() {
    let mut rng = rng("round_trip");
    let mut meta: Vec<(&str, GgufValue)> = vec![
        ("k.u8", GgufValue::U8(250)),
        ("k.i8", GgufValue::I8(-7)),
        ("k.u16", GgufValue::U16(65000)),
        ("k.i16", GgufValue::I16(-30000)),
        ("k.u32", GgufValue::U32(4_000_000_000)),
        ("k.i32", GgufValue::I32(-2_000_000_000)),
        ("k.u64", GgufValue::U64(u64::MAX)),
        ("k.i64", GgufValue::I64(i64::MIN)),
        ("k.f32", GgufValue::F32(-1.5e-7)),
        ("k.f64", GgufValue::F64(std::f64::consts::PI)),
        ("k.true", GgufValue::Bool(true)),
        ("k.false", GgufValue::Bool(false)),
        ("k.str", GgufValue::String("héllo ✓ 🦀".into())),
        ("k.empty_str", GgufValue::String(String::new())),
        ("k.arr_u32", GgufValue::Array((0..100).map(GgufValue::U32).collect())),
        (
            "k.arr_f32",
            GgufValue::Array(vec![GgufValue::F32(0.5), GgufValue::F32(-0.25)]),
        ),
        (
            "k.arr_str",
            GgufValue::Array(vec![GgufValue::String("a".into()), GgufValue::String("".into())]),
        ),
        (
            "k.arr_bool",
            GgufValue::Array(vec![GgufValue::Bool(false), GgufValue::Bool(true)]),
        ),
        ("k.arr_empty", GgufValue::Array(vec![])),
        (
            "k.arr_nested",
            GgufValue::Array(vec![
                GgufValue::Array(vec![GgufValue::I64(-1), GgufValue::I64(2)]),
                GgufValue::Array(vec![GgufValue::String("x".into())]),
            ]),
        ),
    ];
    for align in [None, Some(64u32), Some(8)] {
        let mut w = GgufWriter::new();
        if let Some(a) = align {
            meta.push(("general.alignment", GgufValue::U32(a)));
        }
        for (k, v) in &meta {
            w.add_metadata(*k, v.clone());
        }
        let shapes: [&[u64]; 4] = [&[256], &[512, 3], &[256, 2, 3], &[256, 1, 2, 2]];
        let mut want = Vec::new();
        for (i, t) in GgmlType::ALL.into_iter().enumerate() {
            let dims = shapes[i % 4];
            let n: u64 = dims.iter().product();
            let data = random_blocks(&mut rng, t, (n / t.block_elems()) as usize);
            let name = format!("blk.{i}.{}", t.name());
            w.add_tensor(name.as_str(), dims, t, data.clone());
            want.push((name, dims.to_vec(), t, data));
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rt.gguf");
        w.write(&path).unwrap();
        let f = GgufFile::open(&path).unwrap();

        assert_eq!(f.version(), 3);
        let expect: BTreeMap<String, GgufValue> = meta.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
        assert_eq!(f.metadata(), &expect);
        assert_eq!(f.get_u64("k.u64").unwrap(), Some(u64::MAX));
        assert!(f.get_u64("k.i8").is_err());
        assert_eq!(f.get_f64("k.f32").unwrap(), Some(-1.5e-7f32 as f64));
        assert_eq!(f.get_str("k.str").unwrap(), Some("héllo ✓ 🦀"));
        assert_eq!(f.get_str_array("k.arr_str").unwrap(), Some(vec!["a", ""]));
        assert_eq!(f.get("k.true").and_then(GgufValue::as_bool), Some(true));
        let a = align.unwrap_or(32) as u64;
        assert_eq!(f.alignment(), a);
        assert_eq!(f.data_start() % a, 0);

        assert_eq!(f.tensors().len(), want.len());
        for ((name, dims, t, data), info) in want.iter().zip(f.tensors()) {
            assert_eq!(&info.name, name);
            assert_eq!(&info.dims, dims);
            assert_eq!(info.dtype, *t);
            assert_eq!(info.offset % a, 0);
            assert_eq!(info.n_bytes(), data.len() as u64);
            assert_eq!(f.tensor_bytes(name).unwrap(), &data[..]);
            let x = f.dequantize(name).unwrap();
            assert_eq!(x.len() as u64, info.n_elements());
            assert_eq!(x, dequantize(*t, data, x.len()).unwrap());
        }
        meta.retain(|(k, _)| *k != "general.alignment");
    }
}

#[test]
fn type_ids() {
    for t in GgmlType::ALL {
        assert_eq!(GgmlType::from_id(t.id()).unwrap(), t);
    }
    let e = GgmlType::from_id(14).unwrap();
    assert_eq!((e.name(), e.block_elems(), e.block_bytes()), ("Q6_K", 256, 210));
    assert!(GgmlType::from_id(10).unwrap_err().to_string().contains("Q2_K"));
    assert!(GgmlType::from_id(1000)
        .unwrap_err()
        .to_string()
        .contains("unsupported ggml type id 1000"));
}

// ---------------------------------------------------------------- vs Python

#[test]
fn dequant_matches_python_reference() {
    require_python();
    let mut rng = rng("dequant_matches_python_reference");
    let dir = tempfile::tempdir().unwrap();
    for t in GgmlType::ALL {
        let be = t.block_elems() as usize;
        // A few blocks (serial path) and > 64 Ki elements (rayon path, ragged last chunk).
        for n_blocks in [rng.random_range(1..5), (1 << 16) / be + rng.random_range(1..300)] {
            let raw = random_blocks(&mut rng, t, n_blocks);
            let n = n_blocks * be;
            let got = dequantize(t, &raw, n).unwrap();
            assert!(got.iter().all(|x| x.is_finite()), "{}: non-finite output", t.name());
            assert!(got.iter().any(|&x| x != 0.0), "{}: all zeros", t.name());

            let inp = dir.path().join(format!("{}.raw", t.name()));
            let out = dir.path().join(format!("{}.f32", t.name()));
            std::fs::write(&inp, &raw).unwrap();
            let n_str = n.to_string();
            let args = ["raw", t.name(), inp.to_str().unwrap(), out.to_str().unwrap(), &n_str];
            check_status("gguf_dequant.py raw", run_reference(&args).output().unwrap());
            let want = read_f32s(&out);
            assert_bit_exact(&format!("{} x {n_blocks} blocks", t.name()), &got, &want);
        }
    }
}

fn test_model_path() -> PathBuf {
    if let Some(p) = std::env::var_os("SHADOWKV_TEST_MODEL") {
        return PathBuf::from(p);
    }
    let home = std::env::var_os("HOME").expect("HOME is not set");
    Path::new(&home).join(".cache/shadowkv/models/SmolLM2-135M-Instruct.Q4_1.gguf")
}

#[test]
fn real_model_matches_python_reference() {
    let path = test_model_path();
    assert!(
        path.exists(),
        "test model {} is missing: run `tools/fetch-model` (or set SHADOWKV_TEST_MODEL)",
        path.display()
    );
    require_python();
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.get_str("general.architecture").unwrap(), Some("llama"));
    assert_eq!(f.get_u64("llama.block_count").unwrap(), Some(30));
    assert!(f.get_str_array("tokenizer.ggml.tokens").unwrap().unwrap().len() > 1000);
    for t in f.tensors() {
        assert_eq!(f.tensor_bytes(&t.name).unwrap().len() as u64, t.n_bytes());
    }

    let cases = [
        ("token_embd.weight", GgmlType::Q8_0),
        ("blk.0.attn_q.weight", GgmlType::Q4_1),
        ("blk.29.ffn_down.weight", GgmlType::Q4_1),
        ("output_norm.weight", GgmlType::F32),
    ];
    let dir = tempfile::tempdir().unwrap();
    // Start all reference runs first; they run while Rust dequantises.
    let children: Vec<_> = cases
        .iter()
        .enumerate()
        .map(|(i, (name, _))| {
            let out = dir.path().join(format!("{i}.f32"));
            let child = run_reference(&["tensor", path.to_str().unwrap(), *name, out.to_str().unwrap()])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            (child, out)
        })
        .collect();
    for ((name, dtype), (child, out)) in cases.iter().zip(children) {
        let info = f.tensor_info(name).unwrap_or_else(|| panic!("no tensor {name}"));
        assert_eq!(info.dtype, *dtype, "{name}");
        let got = f.dequantize(name).unwrap();
        assert_eq!(got.len() as u64, info.n_elements());
        check_status("gguf_dequant.py tensor", child.wait_with_output().unwrap());
        assert_bit_exact(name, &got, &read_f32s(&out));
    }
}

/// `dequantize_rows` of every supported type equals the same rows of `dequantize`, bit
/// for bit, and a range past the last row names the tensor, its rows and the range.
#[test]
fn row_ranges_dequantise_like_the_whole_tensor() {
    let mut rng = StdRng::seed_from_u64(13);
    let mut w = GgufWriter::new();
    let (width, rows) = (512u64, 7u64);
    for t in GgmlType::ALL {
        let data = random_blocks(&mut rng, t, (width * rows / t.block_elems()) as usize);
        w.add_tensor(format!("m.{}", t.name()), &[width, rows], t, data);
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rows.gguf");
    w.write(&path).unwrap();
    let f = GgufFile::open(&path).unwrap();
    let w = width as usize;
    for t in GgmlType::ALL {
        let name = format!("m.{}", t.name());
        let whole: Vec<u32> = f.dequantize(&name).unwrap().iter().map(|x| x.to_bits()).collect();
        for r in [0..7, 0..1, 2..5, 6..7, 3..3] {
            let got: Vec<u32> = f
                .dequantize_rows(&name, r.clone())
                .unwrap()
                .iter()
                .map(|x| x.to_bits())
                .collect();
            assert_eq!(got, whole[r.start * w..r.end * w], "{name} rows {r:?}");
        }
        let e = f.dequantize_rows(&name, 5..8).unwrap_err().to_string();
        assert!(
            e.contains(&format!(
                "tensor `{name}` has 7 rows of 512 elements: rows 5..8 are outside it"
            )),
            "{e}"
        );
    }
}
