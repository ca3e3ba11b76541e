//! One sequence decoding with ShadowKV on the GPU ([`GpuShadowSeq`]): its buffers of
//! every layer, its counts and its slot in the host value pool; made from a finished
//! dense prefill that kept its keys before RoPE ([`CudaModel::compress_shadow`], the GPU
//! form of [`crate::shadow::ShadowSeq::from_prefill`]).

use super::buffers::LayerBuffers;
use super::factor::{FactorStep, FactorWorkspace};
use super::layout::{SeqCounts, ShadowLayout};
use super::pool::GpuValuePool;
use crate::cuda::device::StreamPriority;
use crate::cuda::{CudaModel, CudaOps, GpuCache};
use crate::pool::PoolLease;
use anyhow::{ensure, Result};
use cudarc::driver::{CudaEvent, CudaSlice};
use std::time::Duration;

/// A sequence's ShadowKV state on the GPU.
pub struct GpuShadowSeq {
    layers: Vec<LayerBuffers>,
    counts: SeqCounts,
    len: usize,
    lease: PoolLease,
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

    /// Adds a GPU value tier of `chunks` entries per layer and KV head to a sequence
    /// compressed without one, filled with its newest chunks from its slot of `pool`
    /// (the pool it was compressed into).
    pub fn add_tier(&mut self, ops: &CudaOps, chunks: usize, pool: &GpuValuePool) -> Result<()> {
        let dev_pool = pool.device();
        let slot = self.lease.seq();
        for (l, bufs) in self.layers.iter_mut().enumerate() {
            bufs.add_tier(ops, chunks)?;
            // SAFETY: the pool is registered for the device and this sequence's slot is
            // its own; the host does not write it.
            unsafe { ops.shadow_tier_fill_pool(bufs, &dev_pool, (l, slot), self.counts.chunks as usize)? };
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
    /// Stage timing, when on: each compression's marks, read by `take_times`.
    timing: Option<Vec<TimedCompression>>,
    /// The stream of the stages beside the factorisation (made on first use).
    side: Option<CudaOps>,
}

/// A stage of [`CudaModel::compress_shadow`], per layer, as
/// [`CompressWorkspace::time_stages`] times it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompressStage {
    /// Opens a stream's timeline (not a stage).
    Begin,
    /// The layer's buffers allocated and cleared ([`LayerBuffers::new`]).
    Alloc,
    /// The Gram matrix of the pre-RoPE keys ([`FactorStep::Gram`]).
    Gram,
    /// Its top eigenvectors ([`FactorStep::Eigenvectors`]; the host's own part is
    /// [`CompressTimes::eigen_host_ms`]).
    Eigenvectors,
    /// `sv` and `u` ([`FactorStep::Coefficients`]).
    Coefficients,
    /// Landmarks and minimum cosines.
    Landmarks,
    /// The outlier chunks.
    Outliers,
    /// The exact rows of the outliers and the recent window.
    Place,
    /// The values to the host pool (and, with a GPU value tier, its fill).
    PoolWrite,
    /// The side stream waiting for a layer's buffers (the landmarks, outliers, exact
    /// rows and pool write run on a stream of their own, beside the factorisation).
    SideIdle,
    /// The compression's stream waiting, at the end, for the side stream to finish.
    SideTail,
}

impl CompressStage {
    /// The stage's name (benchmark labels).
    pub fn name(self) -> &'static str {
        match self {
            CompressStage::Begin => "begin",
            CompressStage::Alloc => "alloc",
            CompressStage::Gram => "gram",
            CompressStage::Eigenvectors => "eigenvectors",
            CompressStage::Coefficients => "coefficients",
            CompressStage::Landmarks => "landmarks",
            CompressStage::Outliers => "outliers",
            CompressStage::Place => "place",
            CompressStage::PoolWrite => "pool-write",
            CompressStage::SideIdle => "side-idle",
            CompressStage::SideTail => "side-tail",
        }
    }
}

impl From<FactorStep> for CompressStage {
    fn from(s: FactorStep) -> Self {
        match s {
            FactorStep::Gram => CompressStage::Gram,
            FactorStep::Eigenvectors => CompressStage::Eigenvectors,
            FactorStep::Coefficients => CompressStage::Coefficients,
        }
    }
}

/// Where compressions spent their time, summed over layers and compressions.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CompressTimes {
    /// Compressions summed.
    pub compressions: usize,
    /// Milliseconds of each stage on its stream's timeline, from the previous mark on
    /// that stream to its own (so the time the device waits for the host lands on the
    /// stage that kept it waiting), in the order the stages first ran.
    pub stage_ms: Vec<(CompressStage, f64)>,
    /// Milliseconds of the host's own work on the eigenvectors (the subspace iteration's
    /// small factorisations, or the exact eigendecomposition): part of
    /// [`CompressStage::Eigenvectors`].
    pub eigen_host_ms: f64,
}

impl CompressTimes {
    /// Adds `other`'s compressions.
    pub fn add(&mut self, other: &CompressTimes) {
        self.compressions += other.compressions;
        self.eigen_host_ms += other.eigen_host_ms;
        for &(stage, ms) in &other.stage_ms {
            self.add_stage(stage, ms);
        }
    }

    fn add_stage(&mut self, stage: CompressStage, ms: f64) {
        match self.stage_ms.iter_mut().find(|(s, _)| *s == stage) {
            Some((_, t)) => *t += ms,
            None => self.stage_ms.push((stage, ms)),
        }
    }

    /// Milliseconds per compression by stage name, the host's part of the eigenvectors
    /// as `eigenvectors-host` after them.
    pub fn per_compression(&self) -> Vec<(&'static str, f64)> {
        let n = self.compressions.max(1) as f64;
        let mut out: Vec<(&'static str, f64)> = Vec::with_capacity(self.stage_ms.len() + 1);
        for &(stage, ms) in &self.stage_ms {
            out.push((stage.name(), ms / n));
            if stage == CompressStage::Eigenvectors {
                out.push(("eigenvectors-host", self.eigen_host_ms / n));
            }
        }
        out
    }
}

/// One compression's marks: per stream, events in order (each list opens with
/// [`CompressStage::Begin`]), and the host's time on the eigenvectors.
struct TimedCompression {
    streams: Vec<Vec<(CompressStage, CudaEvent)>>,
    eigen_host: Duration,
}

impl TimedCompression {
    /// Its stages' times (the events must be recorded; reading them waits for them).
    fn times(&self) -> Result<CompressTimes> {
        let mut t = CompressTimes {
            compressions: 1,
            eigen_host_ms: self.eigen_host.as_secs_f64() * 1e3,
            ..CompressTimes::default()
        };
        for marks in &self.streams {
            for w in marks.windows(2) {
                let ((_, a), (stage, b)) = (&w[0], &w[1]);
                t.add_stage(*stage, a.elapsed_ms(b)? as f64);
            }
        }
        Ok(t)
    }
}

/// With timing on, records the end of `stage` on `ops`'s stream into `marks`.
fn mark(marks: &mut Option<Vec<(CompressStage, CudaEvent)>>, ops: &CudaOps, stage: CompressStage) -> Result<()> {
    if let Some(m) = marks {
        let e = ops.device().event(true)?;
        e.record(ops.device().stream())?;
        m.push((stage, e));
    }
    Ok(())
}

impl CompressWorkspace {
    /// Turns stage timing on (events between the stages and a host timer around the
    /// eigenvectors' host work: nothing waits, `bench` turns it on) or off (and drops
    /// what was timed).
    pub fn time_stages(&mut self, on: bool) {
        self.timing = on.then(Vec::new);
        self.factor.time_steps(on);
    }

    /// The stage times of the compressions since the last call (none with timing off),
    /// waiting for their last events.
    pub fn take_times(&mut self) -> Result<CompressTimes> {
        let mut total = CompressTimes::default();
        for c in self.timing.as_mut().map(std::mem::take).unwrap_or_default() {
            total.add(&c.times()?);
        }
        Ok(total)
    }
}

impl CudaModel {
    /// Compresses a finished prefill in `dense` (a cache that kept its keys before
    /// RoPE) into ShadowKV state, ordered after the work queued on `ops`'s stream: per
    /// layer the rank-r factorisation of the pre-RoPE keys, the landmarks and outlier
    /// chunks, the exact rows of the outliers and the recent window, and the values of
    /// the sparse chunks to a newly leased slot of `pool` (and, with a GPU value tier,
    /// the newest of them to the tier).
    ///
    /// The factorisation runs on `ops`'s stream, and its host waits for that stream at
    /// every round trip of the subspace iteration; the rest of each layer (landmarks,
    /// outliers, exact rows, the pool write) runs beside it on the workspace's side
    /// stream, once the layer's buffers are cleared. Before it returns, `ops`'s stream
    /// waits for the side stream: work queued on `ops`'s stream afterwards (or an event
    /// recorded there) sees the whole sequence, and so does dropping its buffers.
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
        if ws.side.is_none() {
            // Below the caller's priority: its small products go first.
            ws.side = Some(ops.fork(StreamPriority::Normal)?);
        }
        let CompressWorkspace {
            neg_cos,
            ids,
            factor,
            timing,
            side,
        } = ws;
        let (neg_cos, ids) = (neg_cos.as_mut().expect("grown"), ids.as_mut().expect("grown"));
        let side = side.as_ref().expect("made above");
        let sparse_tokens = counts.chunks as usize * layout.chunk;
        // Marks a failed compression left behind are not this one's.
        factor.take_timing();
        let (mut marks, mut side_marks) = (timing.is_some().then(Vec::new), timing.is_some().then(Vec::new));
        mark(&mut marks, ops, CompressStage::Begin)?;
        mark(&mut side_marks, side, CompressStage::Begin)?;
        let mut eigen_host = Duration::ZERO;
        // Every layer's buffers stay here until the side stream is joined below, even
        // when a layer fails: the side stream may still be writing them.
        let mut layers = Vec::with_capacity(self.config().num_layers);
        let mut compress_layers = || -> Result<()> {
            for l in 0..self.config().num_layers {
                layers.push(LayerBuffers::new(ops, *layout)?);
                let bufs = layers.last_mut().expect("pushed above");
                mark(&mut marks, ops, CompressStage::Alloc)?;
                let (k, v, pre) = dense.layer(self, l);
                let pre = pre.expect("checked above");
                side.device().stream().join(ops.device().stream())?;
                mark(&mut side_marks, side, CompressStage::SideIdle)?;
                side.shadow_landmarks(bufs, &k, tokens, neg_cos)?;
                mark(&mut side_marks, side, CompressStage::Landmarks)?;
                side.shadow_outliers(bufs, neg_cos, tokens, ids)?;
                mark(&mut side_marks, side, CompressStage::Outliers)?;
                side.shadow_place_prefill(bufs, (&k, &v, &pre), tokens, ids)?;
                mark(&mut side_marks, side, CompressStage::Place)?;
                // SAFETY: the pool is registered for the device (GpuValuePool) and slot
                // `lease.seq()` is this sequence's alone; the host does not touch it.
                unsafe { side.shadow_pool_write(layout, &dev_pool, (l, lease.seq()), &v, tokens)? };
                side.shadow_tier_fill(bufs, &v, tokens, counts.chunks as usize)?;
                mark(&mut side_marks, side, CompressStage::PoolWrite)?;
                ops.shadow_factorize(
                    &pre,
                    tokens,
                    layout.kv_width(),
                    layout.rank,
                    sparse_tokens,
                    &mut bufs.sv,
                    &mut bufs.u,
                    factor,
                )?;
                if let Some(m) = &mut marks {
                    let t = factor.take_timing();
                    m.extend(t.marks.into_iter().map(|(s, e)| (s.into(), e)));
                    eigen_host += t.host;
                }
            }
            Ok(())
        };
        let done = compress_layers();
        ops.device().stream().join(side.device().stream())?;
        done?;
        mark(&mut marks, ops, CompressStage::SideTail)?;
        if let (Some(m), Some(s), Some(timed)) = (marks, side_marks, timing) {
            timed.push(TimedCompression {
                streams: vec![m, s],
                eigen_host,
            });
        }
        Ok(GpuShadowSeq {
            layers,
            counts,
            len: tokens,
            lease,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stage_times_add_up_and_divide_per_compression() {
        use CompressStage::*;
        let one = |gram: f64, pool: f64| CompressTimes {
            compressions: 1,
            stage_ms: vec![(Alloc, 1.0), (Gram, gram), (Eigenvectors, 8.0), (PoolWrite, pool)],
            eigen_host_ms: 5.0,
        };
        let mut t = one(2.0, 3.0);
        t.add(&one(4.0, 1.0));
        // A stage the first compressions did not have joins at the end.
        t.add(&CompressTimes {
            compressions: 0,
            stage_ms: vec![(Place, 2.0), (Gram, 0.0)],
            eigen_host_ms: 0.0,
        });
        assert_eq!(t.compressions, 2);
        assert_eq!(
            t.per_compression(),
            vec![
                ("alloc", 1.0),
                ("gram", 3.0),
                ("eigenvectors", 8.0),
                ("eigenvectors-host", 5.0),
                ("pool-write", 2.0),
                ("place", 1.0),
            ]
        );
        assert!(CompressTimes::default().per_compression().is_empty());
    }
}
