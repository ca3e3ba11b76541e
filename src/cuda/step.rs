//! The two per-step kernels of the whole-model forward pass that work on the rows of a
//! batch: splitting the fused qkv projection into the KV caches
//! (kernels/qkv_append.cu) and sampling the next tokens (kernels/sample.cu); and the
//! layout of a step's staged inputs ([`StepLayout`]).

use super::ops::{kernel_params, CudaOps};
use anyhow::{ensure, Result};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, LaunchConfig};
use half::bf16;
use std::ops::Range;

/// Threads of a `qkv_rope_append` block (one block a row, dense or ShadowKV). Each thread
/// walks its share of the row's rotated pairs and values one dependent load at a time:
/// at Llama-3.1-8B's 2560 pairs and 1024 values a row, 256 threads took 14 such rounds,
/// 1024 take 4.
pub(crate) const QKV_APPEND_THREADS: u32 = 1024;

/// Where each row of a step goes: device arrays of `rows` entries.
#[derive(Clone, Copy, Debug)]
pub struct RowTargets {
    /// Rows in the step.
    pub rows: usize,
    /// `i32` position of each row in its sequence.
    pub positions: u64,
    /// `u64` device address of each row's sequence cache.
    pub cache_base: u64,
    /// `i32` capacity (tokens) of each row's sequence cache.
    pub cache_cap: u64,
}

/// The layer of a sequence cache laid out `[layer][k | v][cap][kv_width]` (the layout
/// [`crate::cuda::model::GpuCache`] allocates): element offsets of its keys and values.
pub fn cache_offsets(layer: usize, cap: usize, kv_width: usize) -> (usize, usize) {
    (2 * layer * cap * kv_width, (2 * layer + 1) * cap * kv_width)
}

/// Where one step's inputs sit in the scratch buffers they are staged into, defined
/// once: `ids` (u32) holds the rows' token ids, then the indices of the rows whose
/// logits are wanted; `ints` (i32) the rows' positions, their caches' capacities, the
/// sequences' lengths after the step, then each row's index into the previous step's
/// sampled tokens (-1: the id in `ids`); `addrs` (u64) each row's cache address, the
/// key-cache table `[layer][seq]`, the value-cache table `[layer][seq]`, then the
/// sampling table `[picked][5]`. Staging writes by these ranges and the kernels read by
/// them, so a captured step replays with the same offsets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepLayout {
    /// Rows (new tokens) of the step.
    pub rows: usize,
    /// Sequences.
    pub batch: usize,
    /// Rows whose logits are wanted.
    pub picked: usize,
    /// Transformer layers.
    pub layers: usize,
}

impl StepLayout {
    /// `ids`: token ids.
    pub fn ids(&self) -> Range<usize> {
        0..self.rows
    }
    /// `ids`: the picked rows.
    pub fn picked(&self) -> Range<usize> {
        self.rows..self.rows + self.picked
    }
    /// Elements of `ids`.
    pub fn ids_len(&self) -> usize {
        self.rows + self.picked
    }
    /// `ints`: positions.
    pub fn positions(&self) -> Range<usize> {
        0..self.rows
    }
    /// `ints`: cache capacities.
    pub fn caps(&self) -> Range<usize> {
        self.rows..2 * self.rows
    }
    /// `ints`: sequence lengths after the step.
    pub fn lens(&self) -> Range<usize> {
        2 * self.rows..2 * self.rows + self.batch
    }
    /// `ints`: previous-step token indices.
    pub fn prev_map(&self) -> Range<usize> {
        2 * self.rows + self.batch..3 * self.rows + self.batch
    }
    /// Elements of `ints`.
    pub fn ints_len(&self) -> usize {
        3 * self.rows + self.batch
    }
    /// `addrs`: cache addresses of the rows.
    pub fn cache_base(&self) -> Range<usize> {
        0..self.rows
    }
    /// `addrs`: key-cache addresses of layer `l`.
    pub fn k_table(&self, l: usize) -> Range<usize> {
        let at = self.rows + l * self.batch;
        at..at + self.batch
    }
    /// `addrs`: value-cache addresses of layer `l`.
    pub fn v_table(&self, l: usize) -> Range<usize> {
        let at = self.rows + (self.layers + l) * self.batch;
        at..at + self.batch
    }
    /// `addrs`: the sampling table.
    pub fn sampling(&self) -> Range<usize> {
        let at = self.rows + 2 * self.layers * self.batch;
        at..at + 5 * self.picked
    }
    /// Elements of `addrs`.
    pub fn addrs_len(&self) -> usize {
        self.sampling().end
    }
}

impl CudaOps {
    /// Splits `rows` fused rows `[q | k | v]` of `qkv` (width `(heads + 2·kv_heads)·d`):
    /// adds `bias` when given, rotates q and k at each row's position with `inv_freq`,
    /// writes q to `q_out` `[rows, heads·d]`, and k and v to layer `layer` of each row's
    /// sequence cache at its position; `k_pre_out` `[rows, kv_heads·d]` receives the
    /// un-rotated keys when given.
    ///
    /// # Safety
    /// `t`'s arrays must hold `t.rows` entries, and every row's cache must be a live
    /// allocation of `[layers][2][cap][kv_heads·d]` bf16 with `layer` below its layer
    /// count and the row's position below `cap`.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn qkv_rope_append(
        &self,
        q_out: &mut impl DevicePtrMut<bf16>,
        k_pre_out: Option<&mut CudaSlice<bf16>>,
        qkv: &impl DevicePtr<bf16>,
        bias: Option<&CudaSlice<bf16>>,
        t: &RowTargets,
        inv_freq: &impl DevicePtr<f32>,
        layer: usize,
        (heads, kv_heads, d): (usize, usize, usize),
    ) -> Result<()> {
        ensure!(d % 2 == 0, "qkv split: odd head dimension {d}");
        let width = (heads + 2 * kv_heads) * d;
        let rows = t.rows;
        ensure!(qkv.len() >= rows * width, "qkv split: input of {} values", qkv.len());
        ensure!(
            q_out.len() >= rows * heads * d,
            "qkv split: q output of {} values",
            q_out.len()
        );
        ensure!(
            inv_freq.len() >= d / 2,
            "qkv split: {} inverse frequencies",
            inv_freq.len()
        );
        if let Some(b) = bias {
            ensure!(
                b.len() >= width,
                "qkv split: bias of {} values, {width} needed",
                b.len()
            );
        }
        if let Some(k) = &k_pre_out {
            ensure!(
                k.len() >= rows * kv_heads * d,
                "qkv split: pre-RoPE output of {} values",
                k.len()
            );
        }
        if rows == 0 {
            return Ok(());
        }
        let s = self.device().stream();
        let (qp, _g1) = q_out.device_ptr_mut(s);
        let kp = k_pre_out.map(|k| k.device_ptr_mut(s).0).unwrap_or(0);
        let (xp, _g2) = qkv.device_ptr(s);
        let bp = bias.map(|b| b.device_ptr(s).0).unwrap_or(0);
        let (fp, _g3) = inv_freq.device_ptr(s);
        let (l, nh, nkv, half) = (layer as i32, heads as i32, kv_heads as i32, (d / 2) as i32);
        let cfg = LaunchConfig {
            grid_dim: (u32::try_from(rows)?, 1, 1),
            block_dim: (QKV_APPEND_THREADS, 1, 1),
            shared_mem_bytes: (d * 4) as u32,
        };
        // SAFETY: sizes checked above; the targets are the caller's contract.
        unsafe {
            self.launch_pdl(
                &self.k.qkv_rope_append,
                cfg,
                &mut kernel_params![
                    &qp,
                    &kp,
                    &xp,
                    &bp,
                    &t.positions,
                    &t.cache_base,
                    &t.cache_cap,
                    &fp,
                    &l,
                    &nh,
                    &nkv,
                    &half
                ],
            )
        }?;
        Ok(())
    }

    /// Picks one token per row of fp32 `logits` `[rows, vocab]` into `out`, each row
    /// with its own sampling row in `params` `[rows, 5]` (the bits of the f32
    /// temperature, top-k with 0 for all, the bits of the f32 top-p, a seed and a
    /// counter): greedy (the first largest
    /// logit) at temperature 0 or top-k 1, else a draw from the softmax of
    /// `logits / temperature` restricted to the top-k, then top-p, tokens, determined by
    /// the row's seed and counter.
    pub fn sample(
        &self,
        out: &mut impl DevicePtrMut<u32>,
        logits: &impl DevicePtr<f32>,
        params: &impl DevicePtr<u64>,
        rows: usize,
        vocab: usize,
    ) -> Result<()> {
        ensure!(vocab > 0, "sampling: empty vocabulary");
        ensure!(logits.len() >= rows * vocab, "sampling: {} logits", logits.len());
        ensure!(params.len() >= rows * 5, "sampling: {} parameters", params.len());
        ensure!(out.len() >= rows, "sampling: output of {}", out.len());
        if rows == 0 {
            return Ok(());
        }
        let s = self.device().stream();
        let (op, _g1) = out.device_ptr_mut(s);
        let (lp, _g2) = logits.device_ptr(s);
        let (pp, _g3) = params.device_ptr(s);
        let v = i32::try_from(vocab)?;
        let cfg = LaunchConfig {
            grid_dim: (u32::try_from(rows)?, 1, 1),
            block_dim: (1024, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: sizes checked above.
        unsafe { self.launch_pdl(&self.k.sample_rows, cfg, &mut kernel_params![&op, &lp, &v, &pp]) }?;
        Ok(())
    }
}
