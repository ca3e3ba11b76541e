//! Flash-decoding: one new query per sequence over its whole bf16 KV cache
//! (kernels/flash_decode.cu).
//!
//! Each sequence's cache is `[len, kv_heads·head_dim]` bf16, keys post-RoPE, the new
//! token's key and value already appended (the query attends to all `len` rows), as
//! in the CPU backend. The context is split into partitions of `part_len` tokens that
//! run as separate blocks (all query heads of one KV head per block); a second kernel
//! merges the partitions' partial outputs with their log-sum-exp statistics.

use super::ops::CudaOps;
use crate::cpu::attention::AttnShape;
use anyhow::{ensure, Result};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};
use half::bf16;
use std::marker::PhantomData;

/// Query heads one block serves (the kernel pads the GQA group to this).
pub const MAX_GROUP: usize = 8;
const THREADS: u32 = 128;
const WARPS: usize = 4;

/// The sequences of one decode step: device arrays of cache addresses and lengths.
/// Borrows the caches so that they outlive every launch that uses the table.
pub struct KvTable<'a> {
    k_ptrs: CudaSlice<u64>,
    v_ptrs: CudaSlice<u64>,
    lens: CudaSlice<i32>,
    host_lens: Vec<usize>,
    _caches: PhantomData<&'a ()>,
}

impl<'a> KvTable<'a> {
    /// One entry per sequence: its key cache, value cache and length in tokens; each
    /// cache row holds `kv_width = kv_heads·head_dim` values.
    pub fn new<K, V>(ops: &CudaOps, seqs: &[(&'a K, &'a V, usize)], kv_width: usize) -> Result<Self>
    where
        K: DevicePtr<bf16>,
        V: DevicePtr<bf16>,
    {
        let s = ops.device().stream();
        let mut kp = Vec::with_capacity(seqs.len());
        let mut vp = Vec::with_capacity(seqs.len());
        let mut lens = Vec::with_capacity(seqs.len());
        for (i, (k, v, len)) in seqs.iter().enumerate() {
            ensure!(
                k.len() >= len * kv_width && v.len() >= len * kv_width,
                "sequence {i}: caches of {} and {} values hold fewer than {len} rows of {kv_width}",
                k.len(),
                v.len()
            );
            ensure!(*len <= i32::MAX as usize, "sequence {i}: {len} tokens");
            kp.push(k.device_ptr(s).0);
            vp.push(v.device_ptr(s).0);
            lens.push(*len as i32);
        }
        Ok(KvTable {
            k_ptrs: ops.device().upload(&kp)?,
            v_ptrs: ops.device().upload(&vp)?,
            lens: ops.device().upload(&lens)?,
            host_lens: seqs.iter().map(|s| s.2).collect(),
            _caches: PhantomData,
        })
    }

    /// Sequences.
    pub fn batch(&self) -> usize {
        self.host_lens.len()
    }

    /// The longest sequence.
    pub fn max_len(&self) -> usize {
        self.host_lens.iter().copied().max().unwrap_or(0)
    }
}

/// Scratch for the partial outputs, grown on demand and reused across steps.
#[derive(Default)]
pub struct DecodeWorkspace {
    o_part: Option<CudaSlice<f32>>,
    ml_part: Option<CudaSlice<f32>>,
}

impl DecodeWorkspace {
    /// An empty workspace (allocated by the first launch that needs it).
    pub fn new() -> Self {
        Self::default()
    }

    fn ensure(&mut self, ops: &CudaOps, o: usize, ml: usize) -> Result<()> {
        if self.o_part.as_ref().is_none_or(|b| b.len() < o) {
            self.o_part = Some(ops.device().zeros(o)?);
        }
        if self.ml_part.as_ref().is_none_or(|b| b.len() < ml) {
            self.ml_part = Some(ops.device().zeros(ml)?);
        }
        Ok(())
    }

    /// Fills the scratch with NaN, so that a test sees any partial result the kernels
    /// read without having written.
    pub fn poison(&mut self, ops: &CudaOps) -> Result<()> {
        if let Some(b) = self.o_part.as_mut() {
            ops.fill_nan_f32(b)?;
        }
        if let Some(b) = self.ml_part.as_mut() {
            ops.fill_nan_f32(b)?;
        }
        Ok(())
    }
}

/// Partition length for a step: 512 tokens, halved (down to 64) while the grid would
/// have fewer than two blocks per multiprocessor.
pub fn partition_len(batch: usize, kv_heads: usize, max_len: usize, sm_count: u32) -> usize {
    let mut p = 512;
    while p > 64 && batch * kv_heads * max_len.div_ceil(p) < 2 * sm_count as usize {
        p /= 2;
    }
    p
}

impl CudaOps {
    /// `out[b, h·d..] = softmax(q_b,h · K_bᵀ / √d) · V_b` for every sequence `b` of
    /// `kv` and query head `h` (GQA: head h reads KV head h / (heads / kv_heads)).
    /// `q` and `out` are `[batch, heads·head_dim]`.
    pub fn flash_decode(
        &self,
        out: &mut impl DevicePtrMut<bf16>,
        q: &impl DevicePtr<bf16>,
        kv: &KvTable,
        shape: AttnShape,
        ws: &mut DecodeWorkspace,
    ) -> Result<()> {
        let p = partition_len(kv.batch(), shape.kv_heads, kv.max_len(), self.device().info().sm_count);
        self.flash_decode_with_partition(out, q, kv, shape, ws, p)
    }

    /// [`CudaOps::flash_decode`] with a given partition length (a multiple of 16,
    /// 16..=1024).
    pub fn flash_decode_with_partition(
        &self,
        out: &mut impl DevicePtrMut<bf16>,
        q: &impl DevicePtr<bf16>,
        kv: &KvTable,
        shape: AttnShape,
        ws: &mut DecodeWorkspace,
        part_len: usize,
    ) -> Result<()> {
        let AttnShape {
            heads,
            kv_heads,
            head_dim: d,
        } = shape;
        ensure!(
            kv_heads > 0 && heads % kv_heads == 0,
            "{heads} query heads do not split into {kv_heads} KV heads"
        );
        let group = heads / kv_heads;
        ensure!(
            group <= MAX_GROUP,
            "GQA group of {group} query heads (at most {MAX_GROUP})"
        );
        ensure!(d == 64 || d == 128, "head dimension {d} (64 or 128 supported)");
        ensure!(
            part_len % 16 == 0 && (16..=1024).contains(&part_len),
            "partition length {part_len}"
        );
        let batch = kv.batch();
        ensure!(
            batch <= 65_535 && kv_heads <= 65_535,
            "batch {batch} or {kv_heads} KV heads too large"
        );
        ensure!(
            q.len() >= batch * heads * d,
            "q holds {} values, {} needed",
            q.len(),
            batch * heads * d
        );
        ensure!(
            out.len() >= batch * heads * d,
            "output holds {} values, {} needed",
            out.len(),
            batch * heads * d
        );
        if batch == 0 {
            return Ok(());
        }
        let max_parts = kv.max_len().div_ceil(part_len).max(1);
        ensure!(
            max_parts * 4 <= 48 * 1024,
            "{max_parts} partitions: use a longer partition"
        );
        ws.ensure(self, batch * heads * max_parts * d, batch * heads * max_parts * 2)?;
        let s = self.device().stream();
        let o_part = ws.o_part.as_mut().unwrap();
        let (op, _g1) = o_part.device_ptr_mut(s);
        let ml_part = ws.ml_part.as_mut().unwrap();
        let (mlp, _g2) = ml_part.device_ptr_mut(s);
        let (qp, _g3) = q.device_ptr(s);
        let (kp, _g4) = kv.k_ptrs.device_ptr(s);
        let (vp, _g5) = kv.v_ptrs.device_ptr(s);
        let (lp, _g6) = kv.lens.device_ptr(s);
        let (outp, _g7) = out.device_ptr_mut(s);
        let smem_floats = 2 * MAX_GROUP + (MAX_GROUP * (part_len + 4)).max(WARPS * MAX_GROUP * d);
        let scale_log2 = std::f32::consts::LOG2_E / (d as f32).sqrt();
        let (kvh, grp, pl, mp) = (kv_heads as i32, group as i32, part_len as i32, max_parts as i32);
        let split = if d == 64 {
            &self.k.flash_decode_split_d64
        } else {
            &self.k.flash_decode_split_d128
        };
        let cfg = LaunchConfig {
            grid_dim: (max_parts as u32, kv_heads as u32, batch as u32),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: (smem_floats * 4) as u32,
        };
        // SAFETY: q and out hold batch·heads·d values, the table's caches hold len rows
        // of kv_heads·d (checked at construction, borrowed for the table's life), the
        // workspace holds batch·heads·max_parts partials; grid and shared memory match
        // the kernel's layout.
        unsafe {
            s.launch_builder(split)
                .arg(&op)
                .arg(&mlp)
                .arg(&qp)
                .arg(&kp)
                .arg(&vp)
                .arg(&lp)
                .arg(&kvh)
                .arg(&grp)
                .arg(&pl)
                .arg(&mp)
                .arg(&scale_log2)
                .launch(cfg)
        }?;
        let (nh, hd) = (heads as i32, d as i32);
        let cfg = LaunchConfig {
            grid_dim: (heads as u32, batch as u32, 1),
            block_dim: (d as u32, 1, 1),
            shared_mem_bytes: (max_parts * 4) as u32,
        };
        // SAFETY: as above; the merge reads only the partitions each sequence has.
        unsafe {
            s.launch_builder(&self.k.flash_decode_reduce)
                .arg(&outp)
                .arg(&op)
                .arg(&mlp)
                .arg(&lp)
                .arg(&nh)
                .arg(&hd)
                .arg(&pl)
                .arg(&mp)
                .launch(cfg)
        }?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_fill_the_device_then_stay_at_512() {
        // Llama-3.1-8B, batch 8, 32K: plenty of blocks at 512.
        assert_eq!(partition_len(8, 8, 32_768, 132), 512);
        // One short sequence: as small as allowed.
        assert_eq!(partition_len(1, 8, 100, 132), 64);
        // Batch 2, 2 KV heads, 32K: 2·2·64 = 256 blocks < 264 at 512, so 256.
        assert_eq!(partition_len(2, 2, 32_768, 132), 256);
    }
}
