//! The decode step's append to the recent window (the ShadowKV mode of
//! kernels/qkv_append.cu): the qkv split and RoPE of [`CudaOps::qkv_rope_append`],
//! with the new token's key and value written to the recent rows of the attention
//! buffers and its pre-RoPE key to `kpre` (reference: the append at the start of
//! [`crate::shadow::ShadowSeq`]'s
//! [`crate::cpu::kv_cache::CompressedSeq::attend_layer`]).

use super::buffers::ShadowTable;
use crate::cuda::ops::{check_len, i32_of, kernel_params, CudaOps};
use crate::cuda::step::QKV_APPEND_THREADS;
use anyhow::{ensure, Result};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, LaunchConfig};
use half::bf16;

impl CudaOps {
    /// Splits the fused rows `qkv` `[batch, (heads + 2·kv_heads)·d]` of one new token per
    /// sequence of `t`: adds `bias` when given, rotates q and k at `positions[b]` with
    /// `inv_freq`, writes q to `q_out` `[batch, heads·d]`, and, for a sequence whose
    /// counts (already including this token) hold `n ≥ 1` recent tokens, k and v to row
    /// `R - n` of each head of its attention buffers and the pre-RoPE k to row `R - n`
    /// of its `kpre`: the counts of the whole step (select, attend, fold) serve the
    /// append too.
    #[allow(clippy::too_many_arguments)]
    pub fn shadow_qkv_append(
        &self,
        q_out: &mut impl DevicePtrMut<bf16>,
        qkv: &impl DevicePtr<bf16>,
        bias: Option<&CudaSlice<bf16>>,
        positions: &impl DevicePtr<i32>,
        inv_freq: &impl DevicePtr<f32>,
        t: &ShadowTable,
        heads: usize,
    ) -> Result<()> {
        let l = t.layout();
        let b = t.batch();
        let d = l.head_dim;
        ensure!(
            heads == l.kv_heads * l.group,
            "qkv append: {heads} query heads, the layout has {} × {}",
            l.kv_heads,
            l.group
        );
        let width = (heads + 2 * l.kv_heads) * d;
        check_len("qkv append: input", qkv.len(), b * width)?;
        check_len("qkv append: q output", q_out.len(), b * heads * d)?;
        check_len("qkv append: positions", positions.len(), b)?;
        check_len("qkv append: inv_freq", inv_freq.len(), d / 2)?;
        if let Some(bias) = bias {
            check_len("qkv append: bias", bias.len(), width)?;
        }
        for (i, c) in t.counts().iter().enumerate() {
            ensure!(
                c.recent >= 1,
                "qkv append: sequence {i}'s counts must include the new token (recent window of 0)"
            );
        }
        let s = self.device().stream();
        let (qp, _g1) = q_out.device_ptr_mut(s);
        let (xp, _g2) = qkv.device_ptr(s);
        let bp = bias.map_or(0, |b| b.device_ptr(s).0);
        let (pp, _g3) = positions.device_ptr(s);
        let (fp, _g4) = inv_freq.device_ptr(s);
        let (addrs, counts) = t.device_arrays();
        let nh = i32_of("heads", heads)?;
        let dims = l.dims();
        let cfg = LaunchConfig {
            grid_dim: (b as u32, 1, 1),
            block_dim: (QKV_APPEND_THREADS, 1, 1),
            shared_mem_bytes: (d * 4) as u32,
        };
        // SAFETY: the inputs and outputs hold the batch's rows (checked); every target
        // row R - n is inside the buffers (1 ≤ n checked here, n ≤ R when the table was
        // made), which match the layout (checked then too).
        unsafe {
            self.launch_pdl(
                &self.k.qkv_rope_append_shadow,
                cfg,
                &mut kernel_params![&qp, &xp, &bp, &pp, &addrs, &counts, &fp, &nh, &dims],
            )
        }
    }
}
