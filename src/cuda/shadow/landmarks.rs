//! The ShadowKV compression of a prefill, per layer and sequence, on the layer's dense
//! keys and values (kernels/landmarks.cu; references [`crate::shadow::landmarks`] and
//! [`crate::shadow::ShadowSeq::from_prefill`]): landmarks, outlier chunks, the exact
//! rows of the outliers and the recent window, and the values to the value pool. (The
//! factorisation of the pre-RoPE keys, `u` and `sv`, is [`super::factor`].)
//!
//! Order: [`CudaOps::shadow_landmarks`] → [`CudaOps::shadow_outliers`] →
//! [`CudaOps::shadow_place_prefill`]; [`CudaOps::shadow_pool_write`] at any point.

use super::buffers::LayerBuffers;
use super::layout::{DevicePool, ShadowLayout};
use crate::cuda::ops::{check_len, i32_of, kernel_params, CudaOps};
use anyhow::{ensure, Result};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, LaunchConfig};
use half::bf16;

const FLAG_THREADS: u32 = 256;
const POOL_WRITE_THREADS: u32 = 128;

/// Checks a dense `[tokens, kv_heads·d]` input of a prefill.
fn check_dense(what: &str, l: &ShadowLayout, x: &impl DevicePtr<bf16>, tokens: usize) -> Result<()> {
    check_len(what, x.len(), tokens * l.kv_width())
}

impl CudaOps {
    /// The landmarks of the sparse chunks of a prefill of `tokens` tokens (the chunk
    /// means of `k`, post-RoPE `[tokens, kv_heads·d]`) into `bufs.marks`, and for each
    /// head and chunk the minimum cosine similarity of the chunk's keys to its landmark,
    /// negated, into `neg_cos` `[kv_heads, chunk_cap]`
    /// ([`crate::shadow::landmarks::min_cosines`]).
    pub fn shadow_landmarks(
        &self,
        bufs: &LayerBuffers,
        k: &impl DevicePtr<bf16>,
        tokens: usize,
        neg_cos: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let l = bufs.layout();
        bufs.check()?;
        l.check_prefill(tokens)?;
        check_dense("landmarks: keys", l, k, tokens)?;
        check_len("landmarks: cosines", neg_cos.len(), l.kv_heads * l.chunk_cap)?;
        let chunks = l.prefill_chunks(tokens);
        if chunks == 0 {
            return Ok(());
        }
        let s = self.device().stream();
        let (kp, _g1) = k.device_ptr(s);
        let (np, _g2) = neg_cos.device_ptr_mut(s);
        let (addrs, dims) = (bufs.addrs(self), l.dims());
        let cfg = LaunchConfig {
            grid_dim: (chunks as u32, l.kv_heads as u32, 1),
            block_dim: (l.head_dim as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: k holds the tokens (checked), the chunks fit the layout (checked), the
        // buffers match the layout (checked).
        unsafe {
            self.launch_pdl(
                &self.k.shadow_landmarks,
                cfg,
                &mut kernel_params![&np, &kp, &addrs, &dims],
            )
        }
    }

    /// The outlier chunks of each head: the `O` chunks with the lowest minimum cosine
    /// (the largest of `neg_cos` from [`CudaOps::shadow_landmarks`]), ties to the lower
    /// id, ascending into `ids` `[kv_heads, O]` (-1 after the last when the prefill has
    /// fewer chunks), and the `bufs.outlier` flags set to match
    /// ([`crate::shadow::landmarks::outlier_chunks`]).
    pub fn shadow_outliers(
        &self,
        bufs: &LayerBuffers,
        neg_cos: &CudaSlice<f32>,
        tokens: usize,
        ids: &mut CudaSlice<i32>,
    ) -> Result<()> {
        let l = bufs.layout();
        bufs.check()?;
        l.check_prefill(tokens)?;
        check_len("outliers: ids", ids.len(), l.kv_heads * l.outliers)?;
        let chunks = l.prefill_chunks(tokens);
        self.top_k_rows(ids, neg_cos, l.kv_heads, (chunks, l.chunk_cap), l.outliers)?;
        let s = self.device().stream();
        let (ip, _g) = ids.device_ptr(s);
        let (addrs, dims) = (bufs.addrs(self), l.dims());
        let cfg = LaunchConfig {
            grid_dim: (l.kv_heads as u32, 1, 1),
            block_dim: (FLAG_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: ids holds kv_heads·O ints (checked); out-of-range ids are skipped.
        unsafe {
            self.launch_pdl(
                &self.k.shadow_outlier_flags,
                cfg,
                &mut kernel_params![&ip, &addrs, &dims],
            )
        }
    }

    /// Copies the exact rows a prefill keeps into the attention buffers: the outlier
    /// chunks `ids` (from [`CudaOps::shadow_outliers`]) of `k` and `v` to each head's
    /// outlier region, and the recent window (the tokens after the sparse chunks) of
    /// `k`, `v` and `kpre` (pre-RoPE keys) newest-first to its rows; all three are
    /// `[tokens, kv_heads·d]`.
    pub fn shadow_place_prefill(
        &self,
        bufs: &LayerBuffers,
        (k, v, kpre): (&impl DevicePtr<bf16>, &impl DevicePtr<bf16>, &impl DevicePtr<bf16>),
        tokens: usize,
        ids: &CudaSlice<i32>,
    ) -> Result<()> {
        let l = bufs.layout();
        bufs.check()?;
        l.check_prefill(tokens)?;
        check_dense("prefill placement: keys", l, k, tokens)?;
        check_dense("prefill placement: values", l, v, tokens)?;
        check_dense("prefill placement: pre-RoPE keys", l, kpre, tokens)?;
        check_len("prefill placement: outlier ids", ids.len(), l.kv_heads * l.outliers)?;
        let chunks = l.prefill_chunks(tokens);
        let rows = l.outliers * l.chunk + (tokens - chunks * l.chunk);
        if rows == 0 {
            return Ok(());
        }
        ensure!(rows <= i32::MAX as usize, "prefill placement: {rows} rows");
        let s = self.device().stream();
        let (kp, _g1) = k.device_ptr(s);
        let (vp, _g2) = v.device_ptr(s);
        let (pp, _g3) = kpre.device_ptr(s);
        let (ip, _g4) = ids.device_ptr(s);
        let ci = i32_of("chunks", chunks)?;
        let (addrs, dims) = (bufs.addrs(self), l.dims());
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, l.kv_heads as u32, 1),
            block_dim: (l.head_dim as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the inputs hold the tokens (checked), ids kv_heads·O ints (checked,
        // ids outside the sparse chunks skipped); the recent window fits its rows
        // (check_prefill) and the buffers match the layout (checked).
        unsafe {
            self.launch_pdl(
                &self.k.shadow_place_prefill,
                cfg,
                &mut kernel_params![&kp, &vp, &pp, &ip, &ci, &addrs, &dims],
            )
        }
    }

    /// Writes the values `v` `[tokens, kv_heads·d]` of the sparse chunks of a prefill to
    /// layer `layer`, global slot `pool_seq` of the value pools, chunk-major, in 8 bits (the device
    /// writes the host pool through its mapped address, a GPU value slot in its own
    /// memory).
    ///
    /// # Safety
    /// `pool.host` must be the device-mapped address of a live allocation of
    /// `pool.shape`, not accessed by the host while the copy runs, and `pool.dev` the
    /// address of a live device allocation of `pool.dev_shape()`.
    pub unsafe fn shadow_pool_write(
        &self,
        layout: &ShadowLayout,
        pool: &DevicePool,
        (layer, pool_seq): (usize, usize),
        v: &impl DevicePtr<bf16>,
        tokens: usize,
    ) -> Result<()> {
        layout.check_prefill(tokens)?;
        check_dense("pool write: values", layout, v, tokens)?;
        let counts = layout.prefill_counts(tokens, pool_seq);
        pool.check(layout, layer, &[counts])?;
        let chunks = layout.prefill_chunks(tokens);
        if chunks == 0 {
            return Ok(());
        }
        let s = self.device().stream();
        let (vp, _g) = v.device_ptr(s);
        ensure!(
            vp % 16 == 0,
            "pool write: values address {vp:#x} is not 16-byte aligned"
        );
        let (kp, li, si) = (pool.kernel(), i32_of("layer", layer)?, i32_of("pool slot", pool_seq)?);
        let dims = layout.dims();
        let cfg = LaunchConfig {
            grid_dim: (chunks as u32, layout.kv_heads as u32, 1),
            block_dim: (POOL_WRITE_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: v holds the tokens (checked); the pools serve the layout, layer and slot
        // (checked), their addresses are the caller's contract.
        unsafe {
            self.launch_pdl(
                &self.k.shadow_pool_write,
                cfg,
                &mut kernel_params![&kp, &vp, &li, &si, &dims],
            )
        }
    }
}
