//! Dequantisation of ggml blocks into f32, bit-exact with ggml's reference
//! `dequantize_row_*` functions (same operations in the same order, no fused
//! multiply-add).

use super::types::GgmlType;
use anyhow::{bail, Result};
use half::{bf16, f16};
use rayon::prelude::*;

/// Tensors with at least this many elements are dequantised on the rayon pool.
const PAR_MIN_ELEMS: usize = 1 << 16;
/// Elements per parallel work item (a multiple of every block size).
const PAR_CHUNK_ELEMS: usize = 1 << 14;

/// Dequantises `n_elements` values of type `dtype` stored in `bytes` (which must be
/// exactly `n_elements / block_elems * block_bytes` long) into f32, in storage order.
pub fn dequantize(dtype: GgmlType, bytes: &[u8], n_elements: usize) -> Result<Vec<f32>> {
    let be = dtype.block_elems() as usize;
    let bb = dtype.block_bytes() as usize;
    let name = dtype.name();
    if n_elements % be != 0 {
        bail!("{name}: {n_elements} elements is not a multiple of the block size {be}");
    }
    let need = (n_elements / be).checked_mul(bb);
    if need != Some(bytes.len()) {
        match need {
            Some(need) => bail!("{name}: {n_elements} elements need {need} bytes, got {}", bytes.len()),
            None => bail!("{name}: byte size of {n_elements} elements overflows"),
        }
    }
    let mut out = vec![0f32; n_elements];
    if n_elements >= PAR_MIN_ELEMS {
        let chunk_blocks = PAR_CHUNK_ELEMS / be;
        out.par_chunks_mut(chunk_blocks * be)
            .zip(bytes.par_chunks(chunk_blocks * bb))
            .for_each(|(dst, src)| dequant_run(dtype, src, dst));
    } else {
        dequant_run(dtype, bytes, &mut out);
    }
    Ok(out)
}

/// Dequantises whole blocks from `src` into `dst` (lengths already validated).
fn dequant_run(dtype: GgmlType, src: &[u8], dst: &mut [f32]) {
    let bb = dtype.block_bytes() as usize;
    let be = dtype.block_elems() as usize;
    let block: fn(&[u8], &mut [f32]) = match dtype {
        GgmlType::F32 => |b, y| y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        GgmlType::F16 => |b, y| y[0] = f16_at(b, 0),
        GgmlType::BF16 => |b, y| y[0] = bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32(),
        GgmlType::Q4_0 => q4_0,
        GgmlType::Q4_1 => q4_1,
        GgmlType::Q8_0 => q8_0,
        GgmlType::Q4_K => q4_k,
        GgmlType::Q6_K => q6_k,
    };
    for (b, y) in src.chunks_exact(bb).zip(dst.chunks_exact_mut(be)) {
        block(b, y);
    }
}

/// The little-endian f16 at byte `i` of `b`, widened (exactly) to f32.
#[inline(always)]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

/// `block_q4_0 { f16 d; u8 qs[16]; }`: element j < 16 is the low nibble of qs[j],
/// element j + 16 the high nibble; `x = (q - 8) * d`.
fn q4_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for (j, &q) in b[2..18].iter().enumerate() {
        y[j] = ((q & 0x0F) as i32 - 8) as f32 * d;
        y[j + 16] = ((q >> 4) as i32 - 8) as f32 * d;
    }
}

/// `block_q4_1 { f16 d; f16 m; u8 qs[16]; }`: nibbles as in Q4_0; `x = q * d + m`.
fn q4_1(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    for (j, &q) in b[4..20].iter().enumerate() {
        y[j] = (q & 0x0F) as f32 * d + m;
        y[j + 16] = (q >> 4) as f32 * d + m;
    }
}

/// `block_q8_0 { f16 d; i8 qs[32]; }`: `x = q * d`.
fn q8_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for (y, &q) in y.iter_mut().zip(&b[2..34]) {
        *y = (q as i8) as f32 * d;
    }
}

/// ggml's `get_scale_min_k4`: the 6-bit scale and min of sub-block `j` (0..8) from
/// the 12 packed bytes `q`.
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// `block_q4_K { f16 d; f16 dmin; u8 scales[12]; u8 qs[128]; }`: four 64-element
/// groups; group g uses qs[32g..32g+32], low nibbles with sub-block 2g, high
/// nibbles with sub-block 2g+1; `x = (d * sc) * q - dmin * m`.
fn q4_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let scales = &b[4..16];
    for g in 0..4 {
        let (sc1, m1) = scale_min_k4(2 * g, scales);
        let (sc2, m2) = scale_min_k4(2 * g + 1, scales);
        let (d1, m1) = (d * sc1 as f32, dmin * m1 as f32);
        let (d2, m2) = (d * sc2 as f32, dmin * m2 as f32);
        let qs = &b[16 + 32 * g..16 + 32 * g + 32];
        let y = &mut y[64 * g..64 * g + 64];
        for (l, &q) in qs.iter().enumerate() {
            y[l] = d1 * (q & 0x0F) as f32 - m1;
            y[l + 32] = d2 * (q >> 4) as f32 - m2;
        }
    }
}

/// `block_q6_K { u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d; }`: two 128-element
/// halves; 6-bit quants from a nibble of `ql` and two bits of `qh`, minus 32;
/// one i8 scale per 16 elements; `x = (d * scale) * q`.
fn q6_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 208);
    for h in 0..2 {
        let ql = &b[64 * h..64 * h + 64];
        let qh = &b[128 + 32 * h..128 + 32 * h + 32];
        let sc = &b[192 + 8 * h..192 + 8 * h + 8];
        let y = &mut y[128 * h..128 * h + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            let s = |k: usize| d * (sc[k] as i8) as f32;
            y[l] = s(is) * q1 as f32;
            y[l + 32] = s(is + 2) * q2 as f32;
            y[l + 64] = s(is + 4) * q3 as f32;
            y[l + 96] = s(is + 6) * q4 as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(x: f32) -> [u8; 2] {
        f16::from_f32(x).to_le_bytes()
    }

    #[test]
    fn floats() {
        let mut b = Vec::new();
        b.extend(1.5f32.to_le_bytes());
        b.extend((-2.25f32).to_le_bytes());
        assert_eq!(dequantize(GgmlType::F32, &b, 2).unwrap(), [1.5, -2.25]);
        // f16 0x3C00 = 1.0, 0xC500 = -5.0; bf16 0x3FC0 = 1.5, 0xC040 = -3.0.
        let b = [0x00, 0x3C, 0x00, 0xC5];
        assert_eq!(dequantize(GgmlType::F16, &b, 2).unwrap(), [1.0, -5.0]);
        let b = [0xC0, 0x3F, 0x40, 0xC0];
        assert_eq!(dequantize(GgmlType::BF16, &b, 2).unwrap(), [1.5, -3.0]);
    }

    #[test]
    fn q4_0_block() {
        let mut b = h(0.5).to_vec();
        // qs[j] = low j, high 15 - j.
        b.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let y = dequantize(GgmlType::Q4_0, &b, 32).unwrap();
        assert_eq!(y[0], -4.0); // (0 - 8) * 0.5
        assert_eq!(y[15], 3.5); // (15 - 8) * 0.5
        assert_eq!(y[16], 3.5); // high nibble of qs[0] = 15
        assert_eq!(y[31], -4.0); // high nibble of qs[15] = 0
        assert_eq!(y[9], 0.5);
    }

    #[test]
    fn q4_1_block() {
        let mut b = h(0.25).to_vec();
        b.extend(h(-1.0));
        b.extend([0x3Fu8; 16]); // low 15, high 3
        let y = dequantize(GgmlType::Q4_1, &b, 32).unwrap();
        assert!(y[..16].iter().all(|&v| v == 2.75)); // 15 * 0.25 - 1
        assert!(y[16..].iter().all(|&v| v == -0.25)); // 3 * 0.25 - 1
    }

    #[test]
    fn q8_0_block() {
        let mut b = h(2.0).to_vec();
        b.extend((0..32u8).map(|j| (j as i8 - 16) as u8));
        let y = dequantize(GgmlType::Q8_0, &b, 32).unwrap();
        assert_eq!(y[0], -32.0);
        assert_eq!(y[16], 0.0);
        assert_eq!(y[31], 30.0);
    }

    #[test]
    fn q4_k_block() {
        let mut b = h(1.0).to_vec();
        b.extend(h(0.5));
        // Sub-block 0: sc = 3, m = 2 (bytes 0 and 4, low 6 bits).
        // Sub-block 5: sc = (scales[9] & 15) | (scales[1] >> 6) << 4 = 1 | 2 << 4 = 33,
        //              m = (scales[9] >> 4) | (scales[5] >> 6) << 4 = 2 | 1 << 4 = 18.
        let mut scales = [0u8; 12];
        scales[0] = 3;
        scales[4] = 2;
        scales[1] = 0b1000_0000;
        scales[5] = 0b0100_0000;
        scales[9] = 0x21;
        b.extend(scales);
        let mut qs = [0u8; 128];
        qs[0] = 0x07; // element 0 (sub-block 0): q = 7
        qs[64 + 1] = 0x90; // element 2*64 + 32 + 1 (sub-block 5): q = 9
        b.extend(qs);
        let y = dequantize(GgmlType::Q4_K, &b, 256).unwrap();
        assert_eq!(y[0], 3.0 * 7.0 - 1.0); // d*sc*q - dmin*m
        assert_eq!(y[1], -1.0);
        assert_eq!(y[161], 33.0 * 9.0 - 9.0);
        assert_eq!(y[160], -9.0);
        assert_eq!(y[255], 0.0); // sub-block 7: sc = m = 0
    }

    #[test]
    fn q6_k_block() {
        let mut b = vec![0u8; 210];
        b[0] = 0x21; // ql[0]: element 0 low nibble 1, element 64 high nibble 2
        b[128] = 0b1110_0111; // qh[0]: e0 +3<<4, e32 +1<<4, e64 +2<<4, e96 +3<<4
        for (k, s) in b[192..208].iter_mut().enumerate() {
            *s = (k as i8 - 8) as u8;
        }
        b[208..210].copy_from_slice(&h(0.5));
        let y = dequantize(GgmlType::Q6_K, &b, 256).unwrap();
        assert_eq!(y[0], 0.5 * -8.0 * (49.0 - 32.0)); // scale[0] = -8, q = 1 | 48
        assert_eq!(y[32], 0.5 * -6.0 * (16.0 - 32.0)); // scale[2] = -6, q = 16
        assert_eq!(y[64], 0.5 * -4.0 * (34.0 - 32.0)); // scale[4] = -4, q = 2 | 32
        assert_eq!(y[96], 0.5 * -2.0 * (48.0 - 32.0)); // scale[6] = -2, q = 48
        assert_eq!(y[255], 0.5 * 7.0 * -32.0); // scale[15] = 7, q = 0
    }

    #[test]
    fn size_errors() {
        let e = dequantize(GgmlType::Q4_0, &[0; 18], 31).unwrap_err().to_string();
        assert!(e.contains("not a multiple of the block size 32"), "{e}");
        let e = dequantize(GgmlType::Q4_0, &[0; 17], 32).unwrap_err().to_string();
        assert!(e.contains("need 18 bytes, got 17"), "{e}");
    }
}
