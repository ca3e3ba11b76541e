//! One sequence decoding with ShadowKV on the GPU ([`GpuShadowSeq`]): its buffers of
//! every layer, its counts and its slot in the value pools; made from a finished
//! dense prefill that kept its keys before RoPE
//! ([`crate::cuda::CudaModel::compress_shadow`], in [`super::compress`]).

use super::buffers::LayerBuffers;
use super::layout::{SeqCounts, ShadowLayout};
use super::pool::{GpuValuePool, SlotStage, ValueLease};
use crate::cuda::CudaOps;
use anyhow::Result;

/// A sequence's ShadowKV state on the GPU.
pub struct GpuShadowSeq {
    layers: Vec<LayerBuffers>,
    counts: SeqCounts,
    len: usize,
    lease: ValueLease,
}

impl GpuShadowSeq {
    /// A sequence of `len` tokens from its layers' buffers, its counts and its pool slot.
    pub(super) fn new(layers: Vec<LayerBuffers>, counts: SeqCounts, len: usize, lease: ValueLease) -> Self {
        GpuShadowSeq {
            layers,
            counts,
            len,
            lease,
        }
    }

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

    /// Whether its values lie in a GPU value slot (else in the host pool).
    pub fn values_on_device(&self) -> bool {
        self.lease.on_device()
    }

    /// Adds a GPU value tier of `chunks` entries per layer and KV head to a sequence
    /// compressed without one, filled with its newest chunks from its slot of `pool`
    /// (the pool it was compressed into).
    pub fn add_tier(&mut self, ops: &CudaOps, chunks: usize, pool: &GpuValuePool) -> Result<()> {
        for bufs in self.layers.iter_mut() {
            bufs.add_tier(ops, chunks)?;
        }
        self.fill_tier(ops, pool)
    }

    /// Empties its GPU value tier and fills it again with its newest chunks, as
    /// [`GpuShadowSeq::add_tier`] fills it (so that runs after one another start alike),
    /// on `ops`'s stream: no step may run on another stream until that is done.
    pub fn refill_tier(&mut self, ops: &CudaOps, pool: &GpuValuePool) -> Result<()> {
        for bufs in self.layers.iter_mut() {
            bufs.clear_tier(ops)?;
        }
        self.fill_tier(ops, pool)
    }

    /// Fills each layer's (empty) tier with the newest chunks from its slot of `pool`
    /// (for a host slot of a host-written pool, copied to a device stage first).
    fn fill_tier(&mut self, ops: &CudaOps, pool: &GpuValuePool) -> Result<()> {
        let chunks = self.counts.chunks as usize;
        let host = self.lease.host().filter(|_| pool.host_written());
        let mut stage = None;
        for (l, bufs) in self.layers.iter().enumerate() {
            let (dev_pool, at) = match host {
                Some(lease) => {
                    let st = SlotStage::reuse(&mut stage, ops, pool.pool().shape())?;
                    let n = chunks.min(bufs.layout().tier);
                    // Stream-ordered after the last layer's fill, which read the stage.
                    st.from_host(ops, chunks - n..chunks, (lease, l))?;
                    (st.device(), (0, 0))
                }
                None => (pool.device(), (l, self.lease.seq())),
            };
            // SAFETY: the pools are registered with (or allocated on) the device, or the
            // stage holds the slot's layer; this sequence's slot is its own and the host
            // does not write it.
            unsafe { ops.shadow_tier_fill_pool(bufs, &dev_pool, at, chunks)? };
        }
        Ok(())
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
    2 * (2 * l.attn_len() + l.kpre_len())
        + l.u_len()
        + l.marks_len()
        + l.outlier_len()
        + 4 * (l.u_scales_len() + l.fold_u_len() + l.mark_scales_len() + l.sv_len() + l.slots_len())
        + l.tier_bytes()
}

/// Device bytes of one sequence's ShadowKV state over `layers` layers of `layout`, and
/// bytes of its values (8-bit) in the value pool (one slot, host or GPU).
pub fn sequence_bytes(layout: &ShadowLayout, layers: usize) -> Result<(usize, usize)> {
    Ok((
        layer_bytes(layout) * layers,
        GpuValuePool::shape_for(layout, layers, 1).bytes()?,
    ))
}
