//! One sequence decoding with ShadowKV on the GPU ([`GpuShadowSeq`]): its buffers of
//! every layer, its counts and its slot in the host value pool; made from a finished
//! dense prefill that kept its keys before RoPE ([`CudaModel::compress_shadow`], the GPU
//! form of [`crate::shadow::ShadowSeq::from_prefill`]).

use super::buffers::LayerBuffers;
use super::factor::FactorWorkspace;
use super::layout::{SeqCounts, ShadowLayout};
use super::pool::GpuValuePool;
use crate::cuda::{CudaModel, CudaOps, GpuCache};
use crate::pool::PoolLease;
use anyhow::{ensure, Result};
use cudarc::driver::CudaSlice;

/// A sequence's ShadowKV state on the GPU.
pub struct GpuShadowSeq {
    layers: Vec<LayerBuffers>,
    counts: SeqCounts,
    len: usize,
    _lease: PoolLease,
}

impl GpuShadowSeq {
    /// Tokens in the sequence.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the sequence holds no token.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Where it stands (the same for every layer).
    pub fn counts(&self) -> SeqCounts {
        self.counts
    }

    /// Its buffers of layer `l`.
    pub fn layer(&self, l: usize) -> &LayerBuffers {
        &self.layers[l]
    }

    /// Layers.
    pub fn layers(&self) -> usize {
        self.layers.len()
    }

    /// Device bytes of its buffers.
    pub fn bytes(&self) -> usize {
        self.layers.first().map_or(0, |b| layer_bytes(b.layout())) * self.layers.len()
    }

    /// The counts once a step appends a token: the window grows by one.
    pub(crate) fn counts_with_token(&self) -> SeqCounts {
        SeqCounts {
            recent: self.counts.recent + 1,
            ..self.counts
        }
    }

    /// Records a decode step: its token joined the window and, when the window was
    /// then full, its oldest chunk folded into the sparse region (as the step's fold
    /// kernels did on the device).
    pub(crate) fn advance(&mut self, layout: &ShadowLayout) {
        let mut c = self.counts_with_token();
        if c.recent as usize == layout.recent_rows() {
            c.recent -= layout.chunk as i32;
            c.chunks += 1;
        }
        self.counts = c;
        self.len += 1;
    }
}

/// Device bytes of one layer's buffers of `layout`.
pub fn layer_bytes(l: &ShadowLayout) -> usize {
    2 * (l.marks_len() + l.u_len() + 2 * l.attn_len() + l.kpre_len())
        + l.outlier_len()
        + 4 * (l.sv_len() + l.slots_len())
        + l.tier_bytes()
}

/// Device bytes of one sequence's ShadowKV state over `layers` layers of `layout`, and
/// host bytes of its values (bf16) in the value pool.
pub fn sequence_bytes(layout: &ShadowLayout, layers: usize) -> Result<(usize, usize)> {
    Ok((
        layer_bytes(layout) * layers,
        GpuValuePool::shape_for(layout, layers, 1).bytes(2)?,
    ))
}

/// Scratch of the compression, kept between prefills.
#[derive(Default)]
pub struct CompressWorkspace {
    neg_cos: Option<CudaSlice<f32>>,
    ids: Option<CudaSlice<i32>>,
    factor: FactorWorkspace,
}

impl CudaModel {
    /// Compresses a finished prefill in `dense` (a cache that kept its keys before
    /// RoPE) into ShadowKV state, on `ops`'s stream: per layer the rank-r factorisation
    /// of the pre-RoPE keys, the landmarks and outlier chunks, the exact rows of the
    /// outliers and the recent window, and the values of the sparse chunks to a newly
    /// leased slot of `pool` (and, with a GPU value tier, the newest of them to the tier).
    pub fn compress_shadow(
        &self,
        ops: &CudaOps,
        dense: &GpuCache,
        layout: &ShadowLayout,
        pool: &GpuValuePool,
        ws: &mut CompressWorkspace,
    ) -> Result<GpuShadowSeq> {
        ensure!(
            dense.keeps_pre_rope(),
            "ShadowKV compresses a prefill whose cache kept the keys before RoPE"
        );
        let tokens = dense.len();
        layout.check_prefill(tokens)?;
        let lease = pool.lease()?;
        let dev_pool = pool.device();
        let counts = layout.prefill_counts(tokens, lease.seq());
        let kvh = layout.kv_heads;
        let dev = ops.device();
        if ws.neg_cos.as_ref().is_none_or(|b| b.len() < kvh * layout.chunk_cap) {
            ws.neg_cos = Some(dev.zeros(kvh * layout.chunk_cap)?);
        }
        if ws.ids.as_ref().is_none_or(|b| b.len() < (kvh * layout.outliers).max(1)) {
            ws.ids = Some(dev.zeros((kvh * layout.outliers).max(1))?);
        }
        let (neg_cos, ids) = (ws.neg_cos.as_mut().expect("grown"), ws.ids.as_mut().expect("grown"));
        let sparse_tokens = counts.chunks as usize * layout.chunk;
        let mut layers = Vec::with_capacity(self.config().num_layers);
        for l in 0..self.config().num_layers {
            let mut bufs = LayerBuffers::new(ops, *layout)?;
            let (k, v, pre) = dense.layer(self, l);
            let pre = pre.expect("checked above");
            ops.shadow_factorize(
                &pre,
                tokens,
                layout.kv_width(),
                layout.rank,
                sparse_tokens,
                &mut bufs.sv,
                &mut bufs.u,
                &mut ws.factor,
            )?;
            ops.shadow_landmarks(&bufs, &k, tokens, neg_cos)?;
            ops.shadow_outliers(&bufs, neg_cos, tokens, ids)?;
            ops.shadow_place_prefill(&bufs, (&k, &v, &pre), tokens, ids)?;
            // SAFETY: the pool is registered for the device (GpuValuePool) and slot
            // `lease.seq()` is this sequence's alone; the host does not touch it.
            unsafe { ops.shadow_pool_write(layout, &dev_pool, (l, lease.seq()), &v, tokens)? };
            ops.shadow_tier_fill(&bufs, &v, tokens, counts.chunks as usize)?;
            layers.push(bufs);
        }
        Ok(GpuShadowSeq {
            layers,
            counts,
            len: tokens,
            _lease: lease,
        })
    }
}
