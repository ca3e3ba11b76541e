//! The GPU value tier (kernels/tier.cu): per sequence, layer and KV head a FIFO cache of
//! `T` chunks' values in free device memory, so that a missed chunk found there is
//! copied from HBM instead of read over PCIe. The reuse diff looks misses up in it and
//! keeps its table ([`CudaOps::shadow_reuse`]); the fetch writes each chunk it brings
//! from the host into it ([`CudaOps::shadow_fetch_values`]); the key rebuild copies the
//! tier hits into their slots beside their keys ([`CudaOps::shadow_rebuild`]);
//! [`CudaOps::shadow_tier_fill`] fills it with the
//! newest chunks at the end of a prefill, [`CudaOps::shadow_tier_fill_pool`] from the
//! value pools for a tier added later ([`crate::cuda::shadow::GpuShadowSeq::add_tier`]). The values are the pool's bytes: a step gives
//! the same outputs with a tier of any size or none.

use super::buffers::LayerBuffers;
use super::layout::{DevicePool, ShadowLayout};
use crate::cuda::ops::{check_len, i32_of, kernel_params, CudaOps};
use anyhow::{ensure, Result};
use cudarc::driver::{DevicePtr, LaunchConfig};
use half::bf16;

/// Threads of `shadow_tier_fill`.
const TIER_FILL_THREADS: u32 = 128;

/// How large the GPU value tier is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TierSize {
    /// No tier.
    Off,
    /// As many entries per (layer, KV head) as the free device memory holds.
    Auto,
    /// This many entries per (layer, KV head).
    Chunks(usize),
}

impl std::fmt::Display for TierSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TierSize::Off => f.write_str("off"),
            TierSize::Auto => f.write_str("auto"),
            TierSize::Chunks(n) => write!(f, "{n}"),
        }
    }
}

impl std::str::FromStr for TierSize {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "off" | "0" => Ok(TierSize::Off),
            "auto" => Ok(TierSize::Auto),
            n => n
                .parse::<usize>()
                .map(TierSize::Chunks)
                .map_err(|_| format!("`{n}`: the GPU value tier is `off`, `auto` or a number of chunks per KV head")),
        }
    }
}

/// Tier entries per (layer, KV head) that `bytes` of device memory hold for `seqs`
/// sequences of `layout` over `layers` layers, at most every chunk a sequence holds.
pub fn tier_chunks_for(layout: &ShadowLayout, layers: usize, seqs: usize, bytes: usize) -> usize {
    let one = layout.with_tier(1).map(|l| l.tier_bytes()).unwrap_or(usize::MAX);
    // The map is paid once per layer and head whatever T is; each entry costs its
    // values and its owner.
    let per_entry = one - 4 * (layout.kv_heads * layout.chunk_cap + layout.kv_heads);
    let fixed = layers * seqs * (one - per_entry);
    let per = layers * seqs * per_entry;
    if per == 0 || bytes <= fixed {
        return 0;
    }
    ((bytes - fixed) / per).min(layout.chunk_cap)
}

impl CudaOps {
    /// Fills one sequence's tier of one layer, at the end of its prefill of `tokens`
    /// tokens, with the newest of its `chunks` sparse chunks (as many as the tier holds),
    /// their values taken from the dense prefill's `v` `[tokens, kv_heads·d]`.
    pub fn shadow_tier_fill(
        &self,
        bufs: &LayerBuffers,
        v: &impl DevicePtr<bf16>,
        tokens: usize,
        chunks: usize,
    ) -> Result<()> {
        let l = bufs.layout();
        if l.tier == 0 || chunks == 0 {
            return Ok(());
        }
        bufs.check()?;
        ensure!(
            chunks * l.chunk <= tokens && chunks <= l.chunk_cap,
            "tier fill: {chunks} chunks of {} tokens from a prefill of {tokens}",
            l.chunk
        );
        check_len("tier fill: values", v.len(), tokens * l.kv_width())?;
        let n = chunks.min(l.tier);
        let first = i32_of("tier fill: first chunk", chunks - n)?;
        let st = self.device().stream();
        let (vp, _g) = v.device_ptr(st);
        ensure!(vp % 16 == 0, "tier fill: values address {vp:#x} is not 16-byte aligned");
        let addrs = bufs.addrs(self);
        let dims = l.dims();
        let cfg = fill_grid(n, l.kv_heads);
        // SAFETY: the buffers hold the layout's tier (checked), v the prefill's values
        // (checked); entries [0, n) of each head take chunks [first, chunks).
        unsafe {
            self.launch_pdl(
                &self.k.shadow_tier_fill,
                cfg,
                &mut kernel_params![&addrs, &vp, &first, &dims],
            )
        }
    }

    /// Fills one sequence's tier of layer `layer` with the newest of its `chunks` sparse
    /// chunks (as many as the tier holds), read from its global slot `pool_seq` of the
    /// value pools: the fill of a tier added after the prefill's dense cache is gone.
    ///
    /// # Safety
    /// As [`CudaOps::shadow_fetch_values`]: `pool.host` must be the device-mapped address
    /// of a live allocation of `pool.shape`, not written by the host while the copy
    /// runs, and `pool.dev` the address of a live device allocation of
    /// `pool.dev_shape()`.
    pub unsafe fn shadow_tier_fill_pool(
        &self,
        bufs: &LayerBuffers,
        pool: &DevicePool,
        (layer, pool_seq): (usize, usize),
        chunks: usize,
    ) -> Result<()> {
        let l = bufs.layout();
        if l.tier == 0 || chunks == 0 {
            return Ok(());
        }
        bufs.check()?;
        ensure!(
            chunks <= l.chunk_cap,
            "tier fill: {chunks} chunks, a sequence holds {}",
            l.chunk_cap
        );
        let counts = super::layout::SeqCounts {
            chunks: i32_of("tier fill: chunks", chunks)?,
            pool_seq: i32_of("tier fill: pool slot", pool_seq)?,
            ..Default::default()
        };
        pool.check(l, layer, &[counts])?;
        let n = chunks.min(l.tier);
        let (first, li, si, kp) = (
            i32_of("tier fill: first chunk", chunks - n)?,
            i32_of("layer", layer)?,
            counts.pool_seq,
            pool.kernel(),
        );
        let addrs = bufs.addrs(self);
        let dims = l.dims();
        let cfg = fill_grid(n, l.kv_heads);
        // SAFETY: the buffers hold the layout's tier (checked); the pools serve the
        // layout, layer and slot (checked), their addresses are the caller's contract.
        unsafe {
            self.launch_pdl(
                &self.k.shadow_tier_fill_pool,
                cfg,
                &mut kernel_params![&addrs, &kp, &li, &si, &first, &dims],
            )
        }
    }
}

/// The grid of the tier fills: a block per entry filled (`n`) and KV head.
fn fill_grid(n: usize, kv_heads: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n as u32, kv_heads as u32, 1),
        block_dim: (TIER_FILL_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}
