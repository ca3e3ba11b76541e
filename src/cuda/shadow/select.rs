//! Stage 1 of the decode step, chunk selection (kernels/select.cu; reference
//! [`crate::shadow::select`]): landmark scores, then the top-k chunks per KV head.

use super::buffers::{ShadowTable, StepScratch};
use crate::cuda::ops::{check_len, i32_of, kernel_params, CudaOps};
use anyhow::{ensure, Result};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, LaunchConfig};
use half::bf16;

/// Threads of a logits block (`SELECT_THREADS` of kernels/select.cu).
const SELECT_THREADS: u32 = 256;
/// Tiles of a logits block (`LOGITS_RUN`).
const LOGITS_RUN: usize = 4;
/// Threads of a top-k block.
const TOPK_THREADS: u32 = 1024;

/// Checks that `scratch` was made for `t`'s layout and holds its batch's logits,
/// statistics, scores and selection.
fn check_scratch(t: &ShadowTable, scratch: &StepScratch) -> Result<()> {
    let l = t.layout();
    let heads = t.batch() * l.kv_heads;
    ensure!(
        scratch.layout() == l,
        "select: the step scratch was made for another layout"
    );
    check_len("select: logits", scratch.logits.len(), heads * l.chunk_cap * l.group)?;
    check_len(
        "select: statistics",
        scratch.stats.len(),
        heads * l.score_tiles() * l.group * 2,
    )?;
    check_len("select: scores", scratch.scores.len(), heads * l.chunk_cap)?;
    check_len("select: selection", scratch.selected.len(), heads * l.slots)
}

impl CudaOps {
    /// Landmark logits of every KV head of every sequence of `t`, the first half of the
    /// selection ([`CudaOps::shadow_select`] is the second): `q · landmark / √d` for each
    /// query head of the head's group into `scratch.logits` (outlier chunks `-inf`), and
    /// the softmax statistics of each tile of [`super::layout::SELECT_TILE`] chunks into
    /// `scratch.stats`. `q` is `[batch, heads·d]` (post-RoPE).
    pub fn shadow_scores(&self, t: &ShadowTable, q: &impl DevicePtr<bf16>, scratch: &mut StepScratch) -> Result<()> {
        let l = t.layout();
        let b = t.batch();
        check_len("select: queries", q.len(), b * l.kv_heads * l.group * l.head_dim)?;
        check_scratch(t, scratch)?;
        let s = self.device().stream();
        let (qp, _g1) = q.device_ptr(s);
        let (lp, _g2) = scratch.logits.device_ptr_mut(s);
        let (tp, _g3) = scratch.stats.device_ptr_mut(s);
        let (addrs, counts) = t.device_arrays();
        let dims = l.dims();
        let scale = 1.0 / (l.head_dim as f32).sqrt();
        let (kvh, batch, _) = t.head_grid();
        // At most 2^30 chunks (ShadowLayout::validate), so the tile count fits a grid.
        let cfg = LaunchConfig {
            grid_dim: (l.score_tiles().div_ceil(LOGITS_RUN) as u32, kvh, batch),
            block_dim: (SELECT_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: q and the scratch hold what the batch needs (checked); the table's
        // buffers match its layout (checked when it was made, borrowed for its life) and
        // are whole allocations, so the landmark rows are 16-byte aligned (d is 64 or 128).
        unsafe {
            self.launch_pdl(
                &self.k.shadow_logits,
                cfg,
                &mut kernel_params![&lp, &tp, &qp, &addrs, &counts, &dims, &scale],
            )
        }
    }

    /// The `S` best non-outlier chunks of each KV head by landmark score, from the logits
    /// and statistics [`CudaOps::shadow_scores`] left in `scratch`: each score is the max
    /// over the head's group of the softmax over the sequence's chunks
    /// ([`crate::shadow::select::chunk_scores`], outliers `-inf`), computed as the
    /// selection reads it. Ties go to the lower id; ascending into `scratch.selected`
    /// `[batch, kv_heads, S]`, -1 after the last when a head has fewer candidates (exactly
    /// [`crate::shadow::select::top_k`]). With `keep_scores` the scores are also written
    /// to `scratch.scores` `[batch, kv_heads, chunk_cap]` (each sequence's `chunks`
    /// entries; the rest of each row left as it was).
    pub fn shadow_select(&self, t: &ShadowTable, scratch: &mut StepScratch, keep_scores: bool) -> Result<()> {
        check_scratch(t, scratch)?;
        let s = self.device().stream();
        let (lp, _g1) = scratch.logits.device_ptr(s);
        let (tp, _g2) = scratch.stats.device_ptr(s);
        let (op, _g3) = scratch.selected.device_ptr_mut(s);
        let (sp, _g4) = scratch.scores.device_ptr_mut(s);
        let sp = if keep_scores { sp } else { 0 };
        // SAFETY: the scratch holds what the batch needs (checked).
        unsafe { self.launch_top_k(t, op, sp, lp, tp) }
    }

    /// The `S` best non-outlier chunks of each KV head by the given `scores`
    /// `[batch, kv_heads, chunk_cap]` (each sequence's first `chunks` entries), ties to the
    /// lower id, ascending into `selected` `[batch, kv_heads, S]`, -1 after the last when a
    /// head has fewer candidates (exactly [`crate::shadow::select::top_k`]): the selection
    /// of [`CudaOps::shadow_select`] on scores from elsewhere.
    pub fn shadow_top_k(&self, t: &ShadowTable, scores: &CudaSlice<f32>, selected: &mut CudaSlice<i32>) -> Result<()> {
        let l = t.layout();
        let b = t.batch();
        check_len("top-k: scores", scores.len(), b * l.kv_heads * l.chunk_cap)?;
        check_len("top-k: selection", selected.len(), b * l.kv_heads * l.slots)?;
        let s = self.device().stream();
        let (sp, _g1) = scores.device_ptr(s);
        let (op, _g2) = selected.device_ptr_mut(s);
        // SAFETY: scores and selected hold what the batch needs (checked); the kernel
        // only reads the scores when given no statistics.
        unsafe { self.launch_top_k(t, op, sp, 0, 0) }
    }

    /// Launches `shadow_top_k` over `t`'s heads: selection `op`, scores `sp` (read where
    /// `tp` is null, else written unless null), logits `lp` and statistics `tp`.
    ///
    /// # Safety
    /// Each non-null pointer holds what the batch of `t` needs.
    unsafe fn launch_top_k(&self, t: &ShadowTable, op: u64, sp: u64, lp: u64, tp: u64) -> Result<()> {
        let (addrs, counts) = t.device_arrays();
        let dims = t.layout().dims();
        // Sized by the layout, not by this step's chunk counts, so a captured graph
        // stays valid.
        let (keys, bytes) = self.top_k_shared(t.layout().chunk_cap);
        let grid = t.head_grid();
        let (f, threads) = if self.top_k_half_blocks(grid.0 as usize * grid.1 as usize) {
            (&self.k.shadow_top_k_half, TOPK_THREADS / 2)
        } else {
            (&self.k.shadow_top_k, TOPK_THREADS)
        };
        let cfg = LaunchConfig {
            grid_dim: grid,
            block_dim: (threads, 1, 1),
            shared_mem_bytes: bytes,
        };
        // SAFETY: the table's buffers match its layout (checked when it was made,
        // borrowed for its life), the caller's pointers hold the batch; the dynamic shared
        // memory holds `keys` keys; either kernel takes blocks of the threads given.
        unsafe {
            self.launch_pdl(
                f,
                cfg,
                &mut kernel_params![&op, &sp, &lp, &tp, &addrs, &counts, &dims, &keys],
            )
        }
    }

    /// Whether [`CudaOps::shadow_top_k`] and [`CudaOps::shadow_select`] take `heads`
    /// heads in half-size blocks on this device: two 1024-thread blocks fit an SM, so
    /// with more heads than that, blocks of 512 (four an SM) take every head in one wave
    /// instead of two.
    pub fn top_k_half_blocks(&self, heads: usize) -> bool {
        heads > 2 * self.device().info().sm_count as usize
    }

    /// How many values a row may have for the top-k kernels ([`CudaOps::shadow_top_k`],
    /// [`CudaOps::top_k_rows`]) to keep it in shared memory on this device; longer rows
    /// are read from global memory at each of the selection's passes.
    pub fn top_k_shared_keys(&self) -> usize {
        self.k.topk_shared_keys
    }

    /// The keys (as the kernels' `shared_keys` argument) and bytes of dynamic shared
    /// memory of a top-k launch over rows of up to `n` values: all of them, or none.
    fn top_k_shared(&self, n: usize) -> (i32, u32) {
        let keys = if n <= self.k.topk_shared_keys { n } else { 0 };
        // keys <= topk_shared_keys, which came from an i32 byte count.
        (keys as i32, (keys * 4) as u32)
    }

    /// For each of `rows` rows of `values` (row stride `stride`), the `k` largest of its
    /// first `n` values, ties to the lower index, ascending into `out` `[rows, k]`
    /// (-1 after the last when `n < k`).
    pub fn top_k_rows(
        &self,
        out: &mut CudaSlice<i32>,
        values: &CudaSlice<f32>,
        rows: usize,
        (n, stride): (usize, usize),
        k: usize,
    ) -> Result<()> {
        ensure!(n <= stride, "top-k: {n} values in rows of {stride}");
        if rows == 0 || k == 0 {
            return Ok(());
        }
        check_len("top-k: values", values.len(), (rows - 1) * stride + n)?;
        check_len("top-k: output", out.len(), rows * k)?;
        ensure!(rows <= 65_535, "top-k: {rows} rows (at most 65535)");
        let s = self.device().stream();
        let (vp, _g1) = values.device_ptr(s);
        let (op, _g2) = out.device_ptr_mut(s);
        let (ni, ki, si) = (i32_of("n", n)?, i32_of("k", k)?, i32_of("stride", stride)?);
        let (keys, bytes) = self.top_k_shared(n);
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (TOPK_THREADS, 1, 1),
            shared_mem_bytes: bytes,
        };
        // SAFETY: values holds rows rows of stride values (the last one n), out rows·k
        // ints (checked); the dynamic shared memory holds `keys` keys.
        unsafe {
            self.launch_pdl(
                &self.k.topk_rows,
                cfg,
                &mut kernel_params![&op, &vp, &ni, &ki, &si, &keys],
            )
        }
    }
}
