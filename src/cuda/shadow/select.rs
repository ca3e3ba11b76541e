//! Stage 1 of the decode step, chunk selection (kernels/select.cu; reference
//! [`crate::shadow::select`]): landmark scores, then the top-k chunks per KV head.

use super::buffers::ShadowTable;
use crate::cuda::ops::{check_len, i32_of, kernel_params, CudaOps};
use anyhow::{ensure, Result};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, LaunchConfig};
use half::bf16;

const SCORE_THREADS: u32 = 256;
const TOPK_THREADS: u32 = 1024;

impl CudaOps {
    /// Landmark scores of every KV head of every sequence of `t`: for each query head
    /// of the head's group, the softmax over the sequence's chunks of `q · landmark /
    /// √d`, then the max over the group; outlier chunks score `-inf`
    /// ([`crate::shadow::select::chunk_scores`]). `q` is `[batch, heads·d]` (post-RoPE);
    /// `scores` `[batch, kv_heads, chunk_cap]` receives each sequence's `chunks` scores
    /// (the rest of each row is left as it was).
    pub fn shadow_scores(&self, t: &ShadowTable, q: &impl DevicePtr<bf16>, scores: &mut CudaSlice<f32>) -> Result<()> {
        let l = t.layout();
        let b = t.batch();
        check_len("select: queries", q.len(), b * l.kv_heads * l.group * l.head_dim)?;
        check_len("select: scores", scores.len(), b * l.kv_heads * l.chunk_cap)?;
        let s = self.device().stream();
        let (qp, _g1) = q.device_ptr(s);
        let (sp, _g2) = scores.device_ptr_mut(s);
        let (addrs, counts) = t.device_arrays(self);
        let dims = l.dims();
        let scale = 1.0 / (l.head_dim as f32).sqrt();
        let cfg = LaunchConfig {
            grid_dim: t.head_grid(),
            block_dim: (SCORE_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: q and scores hold what the batch needs (checked); the table's buffers
        // match its layout (checked when it was made, borrowed for its life).
        unsafe {
            self.launch_pdl(
                &self.k.shadow_scores,
                cfg,
                &mut kernel_params![&sp, &qp, &addrs, &counts, &dims, &scale],
            )
        }
    }

    /// The `S` best non-outlier chunks of each KV head by `scores` (as written by
    /// [`CudaOps::shadow_scores`]), ties to the lower id, ascending into `selected`
    /// `[batch, kv_heads, S]`, -1 after the last when a head has fewer candidates
    /// (exactly [`crate::shadow::select::top_k`]).
    pub fn shadow_top_k(&self, t: &ShadowTable, scores: &CudaSlice<f32>, selected: &mut CudaSlice<i32>) -> Result<()> {
        let l = t.layout();
        let b = t.batch();
        check_len("top-k: scores", scores.len(), b * l.kv_heads * l.chunk_cap)?;
        check_len("top-k: selection", selected.len(), b * l.kv_heads * l.slots)?;
        let s = self.device().stream();
        let (sp, _g1) = scores.device_ptr(s);
        let (op, _g2) = selected.device_ptr_mut(s);
        let (addrs, counts) = t.device_arrays(self);
        let dims = l.dims();
        let cfg = LaunchConfig {
            grid_dim: t.head_grid(),
            block_dim: (TOPK_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: as in shadow_scores.
        unsafe {
            self.launch_pdl(
                &self.k.shadow_top_k,
                cfg,
                &mut kernel_params![&op, &sp, &addrs, &counts, &dims],
            )
        }
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
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (TOPK_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: values holds rows rows of stride values (the last one n), out rows·k
        // ints (checked).
        unsafe { self.launch_pdl(&self.k.topk_rows, cfg, &mut kernel_params![&op, &vp, &ni, &ki, &si]) }
    }
}
