//! The compression of a finished dense prefill into ShadowKV state on the GPU
//! ([`CudaModel::compress_shadow`], the GPU form of
//! [`crate::shadow::ShadowSeq::from_prefill`]), its scratch ([`CompressWorkspace`]) and
//! its stage timing ([`CompressTimes`]).

use super::buffers::LayerBuffers;
use super::factor::{FactorStep, FactorWorkspace};
use super::layout::ShadowLayout;
use super::pool::{GpuValuePool, SlotStage};
use super::seq::GpuShadowSeq;
use crate::cuda::device::StreamPriority;
use crate::cuda::{CudaModel, CudaOps, GpuCache};
use crate::shadow::subspace::OVERSAMPLING;
use anyhow::{ensure, Result};
use cudarc::driver::{CudaEvent, CudaSlice, CudaView};
use half::bf16;
use rand::{Rng, SeedableRng};
use std::time::Duration;

/// Layers factorised at once, each by a host thread of its own on a stream and cuBLAS
/// handle of its own (fewer where the host has fewer cores). The factorisation's host
/// work (the subspace iteration's small factorisations and round trips: about 12 ms a
/// layer at Llama-3.1-8B's width, 92 % of a compression at 61440 tokens on one thread)
/// is independent from layer to layer.
pub const FACTOR_WORKERS: usize = 4;

/// Scratch of the compression, kept between prefills.
#[derive(Default)]
pub struct CompressWorkspace {
    neg_cos: Option<CudaSlice<f32>>,
    ids: Option<CudaSlice<i32>>,
    /// The factorisation's workers (made on first use, or by [`CompressWorkspace::prepare`]).
    workers: Vec<FactorWorker>,
    /// Stage timing, when on: each compression's marks, read by `take_times`.
    timing: Option<Vec<TimedCompression>>,
    /// The stream of the stages beside the factorisation (made on first use).
    side: Option<CudaOps>,
    /// The priority of the side stream and the workers' streams (Normal unless set).
    priority: StreamPriority,
    /// Where a host-written value pool's layer is written before its copy to the host
    /// (made on first use).
    pool_stage: Option<SlotStage>,
}

/// A stream, cuBLAS handle and scratch that factorise one layer at a time.
struct FactorWorker {
    ops: CudaOps,
    ws: FactorWorkspace,
}

/// A stage of [`CudaModel::compress_shadow`], per layer, as
/// [`CompressWorkspace::time_stages`] times it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompressStage {
    /// Opens a stream's timeline (not a stage).
    Begin,
    /// The layer's buffers allocated and cleared ([`LayerBuffers::new`]).
    Alloc,
    /// The Gram matrix of the pre-RoPE keys ([`FactorStep::Gram`]; this stage and the
    /// next two run on the factorisation workers' streams).
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
    /// The compression's stream waiting, at the end, for the side stream and the
    /// factorisation's workers to finish.
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
        for w in &mut self.workers {
            w.ws.time_steps(on);
        }
    }

    /// A workspace whose side stream and workers' streams run at `priority` (for
    /// compressions that must not queue behind other work: the daemon's, which block
    /// its engine thread).
    pub fn at_priority(priority: StreamPriority) -> Self {
        CompressWorkspace {
            priority,
            ..Default::default()
        }
    }

    /// Makes the side stream and the factorisation's workers for compressions on `ops`'s
    /// device and runs one small factorisation of `layout`'s width and rank on each, so
    /// that their scratch is allocated and cuBLAS has loaded its kernels before the first
    /// prompt (about 0.3 s otherwise spent by the first compression). Waits for the
    /// device.
    pub fn prepare(&mut self, ops: &CudaOps, layout: &ShadowLayout) -> Result<()> {
        self.grow(ops)?;
        let (kvd, rank) = (layout.kv_width(), layout.rank);
        // Keys of full rank: random, as the subspace iteration needs a definite G.
        let rows = (rank + OVERSAMPLING).max(kvd.min(1024));
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x5EED);
        let keys: Vec<bf16> = (0..rows * kvd)
            .map(|_| bf16::from_f32(rng.random_range(-1.0..1.0)))
            .collect();
        for w in &mut self.workers {
            let dev = w.ops.device();
            let keys = dev.upload(&keys)?;
            let mut sv = dev.zeros::<f32>(rank * kvd)?;
            let (mut u, mut u_scales) = (dev.zeros::<i8>(rows * rank)?, dev.zeros::<f32>(rows)?);
            let u = (&mut u, &mut u_scales);
            w.ops
                .shadow_factorize(&keys, rows, kvd, rank, rows, &mut sv, u, &mut w.ws)?;
            w.ws.take_timing();
            // The scratch of a whole sequence's `u`, not just the warm-up's.
            w.ws.reserve_coefficients(dev, rank, layout.chunk_cap * layout.chunk)?;
            dev.synchronize()?;
        }
        Ok(())
    }

    /// The side stream and [`FACTOR_WORKERS`] workers (at most the host's cores), forked
    /// from `ops` where missing.
    fn grow(&mut self, ops: &CudaOps) -> Result<()> {
        if self.side.is_none() {
            // At most the caller's priority (set it below): its small products go first.
            self.side = Some(ops.fork(self.priority)?);
        }
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        while self.workers.len() < FACTOR_WORKERS.min(cores) {
            let mut ws = FactorWorkspace::new();
            ws.time_steps(self.timing.is_some());
            self.workers.push(FactorWorker {
                ops: ops.fork(self.priority)?,
                ws,
            });
        }
        Ok(())
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
    /// the sparse chunks to a newly leased slot of `pool` (a GPU value slot while one is
    /// free, else a host slot; and, with a GPU value tier, the newest of them to the
    /// tier).
    ///
    /// Each layer's buffers are allocated and cleared on `ops`'s stream; the landmarks,
    /// outliers, exact rows and pool write of each layer then run on the workspace's
    /// side stream, and the factorisations on its workers ([`FACTOR_WORKERS`] host
    /// threads, each on a stream of its own, taking the next layer when done; each
    /// waits for its stream at every round trip of the subspace iteration). The caller's
    /// thread waits for the workers' host work. Before it returns, `ops`'s stream waits
    /// for the side stream and the workers: work queued on `ops`'s stream afterwards (or
    /// an event recorded there) sees the whole sequence, and so does dropping its
    /// buffers.
    pub fn compress_shadow(
        &self,
        ops: &CudaOps,
        dense: &GpuCache,
        layout: &ShadowLayout,
        pool: &GpuValuePool,
        ws: &mut CompressWorkspace,
    ) -> Result<GpuShadowSeq> {
        compress_prefill(self.config().num_layers, ops, dense, layout, pool, ws)
    }
}

/// [`CudaModel::compress_shadow`] of a model of `layer_count` layers (all a compression
/// needs of the model besides `layout`), for a thread that does not hold the model.
pub fn compress_prefill(
    layer_count: usize,
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
    let mut lease = pool.lease()?;
    let counts = layout.prefill_counts(tokens, lease.seq());
    let kvh = layout.kv_heads;
    let dev = ops.device();
    if ws.neg_cos.as_ref().is_none_or(|b| b.len() < kvh * layout.chunk_cap) {
        ws.neg_cos = Some(dev.zeros(kvh * layout.chunk_cap)?);
    }
    if ws.ids.as_ref().is_none_or(|b| b.len() < (kvh * layout.outliers).max(1)) {
        ws.ids = Some(dev.zeros((kvh * layout.outliers).max(1))?);
    }
    ws.grow(ops)?;
    let CompressWorkspace {
        neg_cos,
        ids,
        workers,
        timing,
        side,
        pool_stage,
        ..
    } = ws;
    let (neg_cos, ids) = (neg_cos.as_mut().expect("grown"), ids.as_mut().expect("grown"));
    let side = side.as_ref().expect("made by grow");
    let sparse_tokens = counts.chunks as usize * layout.chunk;
    // Marks a failed compression left behind are not this one's.
    for w in workers.iter_mut() {
        w.ws.take_timing();
    }
    let (mut marks, mut side_marks) = (timing.is_some().then(Vec::new), timing.is_some().then(Vec::new));
    mark(&mut marks, ops, CompressStage::Begin)?;
    mark(&mut side_marks, side, CompressStage::Begin)?;
    // Every layer's buffers stay here until the side stream and the workers are
    // joined below, even when a layer fails: they may still be writing them.
    let mut layers = Vec::with_capacity(layer_count);
    let mut place_layers = || -> Result<()> {
        for l in 0..layer_count {
            layers.push(LayerBuffers::new(ops, *layout)?);
            let bufs = layers.last_mut().expect("pushed above");
            mark(&mut marks, ops, CompressStage::Alloc)?;
            let (k, v, pre) = dense.layer_of_width(layout.kv_width(), l);
            let pre = pre.expect("checked above");
            side.device().stream().join(ops.device().stream())?;
            mark(&mut side_marks, side, CompressStage::SideIdle)?;
            side.shadow_landmarks(bufs, &k, tokens, neg_cos)?;
            mark(&mut side_marks, side, CompressStage::Landmarks)?;
            side.shadow_outliers(bufs, neg_cos, tokens, ids)?;
            mark(&mut side_marks, side, CompressStage::Outliers)?;
            side.shadow_place_prefill(bufs, (&k, &v, &pre), tokens, ids)?;
            mark(&mut side_marks, side, CompressStage::Place)?;
            pool.write_prefill(side, layout, (l, &mut lease), &v, tokens, pool_stage)?;
            side.shadow_tier_fill(bufs, &v, tokens, counts.chunks as usize)?;
            mark(&mut side_marks, side, CompressStage::PoolWrite)?;
        }
        Ok(())
    };
    let placed = place_layers();
    // The factorisations, once every layer's buffers are allocated and cleared.
    let mut worker_marks = Vec::with_capacity(workers.len());
    let mut eigen_host = Duration::ZERO;
    let factored = placed.and_then(|()| {
        for w in workers.iter() {
            w.ops.device().stream().join(ops.device().stream())?;
        }
        let pres: Vec<_> = (0..layer_count)
            .map(|l| dense.layer_of_width(layout.kv_width(), l).2.expect("checked above"))
            .collect();
        let dims = (tokens, layout.kv_width(), layout.rank, sparse_tokens);
        let timed = timing.is_some();
        let jobs = std::sync::Mutex::new(layers.iter_mut().zip(&pres));
        let failed = std::sync::atomic::AtomicBool::new(false);
        let results: Vec<Result<WorkerTimes>> = std::thread::scope(|scope| {
            let handles: Vec<_> = workers
                .iter_mut()
                .map(|w| scope.spawn(|| factor_layers(w, &jobs, &failed, dims, timed)))
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("a factorisation thread panicked")))
                })
                .collect()
        });
        let mut first_err = None;
        for r in results {
            match r {
                Ok(t) => {
                    eigen_host += t.host;
                    worker_marks.extend(t.marks);
                }
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    });
    let joined = (|| -> Result<()> {
        ops.device().stream().join(side.device().stream())?;
        for w in workers.iter() {
            ops.device().stream().join(w.ops.device().stream())?;
        }
        Ok(())
    })();
    if joined.is_err() {
        // The buffers are freed on `ops`'s stream when this returns: without the
        // joins, wait from the host until nothing writes them.
        let _ = side.device().stream().synchronize();
        for w in workers.iter() {
            let _ = w.ops.device().stream().synchronize();
        }
    }
    factored?;
    joined?;
    mark(&mut marks, ops, CompressStage::SideTail)?;
    if let (Some(m), Some(s), Some(timed)) = (marks, side_marks, timing) {
        let mut streams = vec![m, s];
        streams.extend(worker_marks);
        timed.push(TimedCompression { streams, eigen_host });
    }
    Ok(GpuShadowSeq::new(layers, counts, tokens, lease))
}

/// What one worker timed over a compression: its stream's marks (opening with
/// [`CompressStage::Begin`]; empty with timing off) and its host time on the
/// eigenvectors.
#[derive(Default)]
struct WorkerTimes {
    marks: Option<Vec<(CompressStage, CudaEvent)>>,
    host: Duration,
}

/// Factorises layers taken from `jobs` on `w`'s stream until none is left or another
/// worker failed; `dims` = (prompt tokens, key width, rank, rows of `u`).
fn factor_layers<'a, I>(
    w: &mut FactorWorker,
    jobs: &std::sync::Mutex<I>,
    failed: &std::sync::atomic::AtomicBool,
    (tokens, kvd, rank, u_rows): (usize, usize, usize, usize),
    timed: bool,
) -> Result<WorkerTimes>
where
    I: Iterator<Item = (&'a mut LayerBuffers, &'a CudaView<'a, bf16>)>,
{
    use std::sync::atomic::Ordering;
    w.ops.device().context().bind_to_thread()?;
    let mut out = WorkerTimes::default();
    if timed {
        let mut m = Some(Vec::new());
        mark(&mut m, &w.ops, CompressStage::Begin)?;
        out.marks = m;
    }
    loop {
        if failed.load(Ordering::Relaxed) {
            return Ok(out);
        }
        let Some((bufs, pre)) = jobs.lock().unwrap_or_else(|e| e.into_inner()).next() else {
            return Ok(out);
        };
        let u = (&mut bufs.u, &mut bufs.u_scales);
        let done = w
            .ops
            .shadow_factorize(pre, tokens, kvd, rank, u_rows, &mut bufs.sv, u, &mut w.ws);
        if done.is_err() {
            failed.store(true, Ordering::Relaxed);
        }
        done?;
        let t = w.ws.take_timing();
        if let Some(m) = &mut out.marks {
            m.extend(t.marks.into_iter().map(|(s, e)| (s.into(), e)));
        }
        out.host += t.host;
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
