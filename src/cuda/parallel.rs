//! One GPU's place in a tensor-parallel group (Megatron-style, as
//! [`crate::model::shard`] plans it) and what its forward pass adds to the one-GPU
//! pass: the all-reduces that sum the row-parallel products (and the vocabulary-split
//! embedding) into the residual stream every device keeps whole, and the all-gather
//! that puts the logits of the vocabulary split back in order
//! (`kernels/parallel.cu`), so that every device samples the same tokens from the same
//! logits with the same seeds.
//!
//! Collectives on one NCCL communicator must be queued in one order on every rank and
//! never from two streams at once, so each scratch (one per stream: the model's own
//! and each lane's) joins a communicator of its own at its first collective step, and
//! gives it back to its device's [`TpShard`] when it is dropped (once its stream is
//! done), for the next scratch to join: a backend rebuilt with new settings (new lanes)
//! reuses the communicators of the one it replaces instead of making new ones.
//!
//! Every rank must pick the same communicator at each join. The bootstrap ids are made
//! up front and shared by the ranks; every rank runs the same commands in the same
//! order (the same steps, the same scratches made and dropped), so at each join every
//! rank's free list holds the same ids: a join takes the free one of lowest index
//! (whatever order they came back in), or, with none free, initialises the next id,
//! the same one everywhere.
//!
//! Teardown follows two rules that NCCL's own teardown needs (its `src/init.cc`):
//! - A CUDA graph that captured collectives holds a reference on the communicator, and
//!   the rank of this process that destroys (or aborts) a communicator last waits
//!   until every such graph, on every device, has been destroyed
//!   (`commReclaim` → `commDestroySync`). So a rank drops every graph that captured a
//!   communicator before it gives that communicator up ([`crate::cuda::Lane`]'s drop,
//!   [`crate::cuda::CudaModel::abort_collectives`]); otherwise the last rank waits for
//!   its own graph.
//! - The free list is dropped lowest index first, whatever order the communicators
//!   came back in, so every rank destroys them in the same order: where a destroy
//!   waits for the other ranks' destroy of the same communicator (ranks in other
//!   processes: the proxy thread is joined once every peer has closed), no two ranks
//!   wait for each other on different communicators.

use super::nccl::{Comm, Nccl, UniqueId};
use super::ops::{grid_1d, CudaOps};
use crate::model::config::ModelConfig;
use crate::model::shard::{DeviceShard, ShardPlan};
use anyhow::{bail, ensure, Result};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut, PushKernelArg};
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

/// Communicators a group prepares ids for: the model's own stream, two lanes and one
/// to spare (a benchmark's lane). Streams that run at the same time each hold one;
/// a dropped stream's goes back to its device for the next.
pub const COMMUNICATORS: usize = 4;

/// Communicators given back by dropped scratches, with the index of their bootstrap id.
type FreeComms = Arc<Mutex<FreeList<Comm>>>;

/// A device's shard of the model and its communicators.
pub struct TpShard {
    shard: DeviceShard,
    world: usize,
    vocab: usize,
    vocab_per: usize,
    nccl: Arc<Nccl>,
    ids: Vec<UniqueId>,
    /// Index of the next id to initialise.
    next: AtomicUsize,
    free: FreeComms,
}

impl TpShard {
    /// Rank `rank` of `plan`'s group, with the communicators bootstrapped at `ids`
    /// (the same list on every rank).
    pub fn new(plan: &ShardPlan, rank: usize, nccl: Arc<Nccl>, ids: Vec<UniqueId>) -> Result<Self> {
        let shard = plan.shard(rank)?;
        let whole = plan.device_config(0)?;
        let last = plan.shard(plan.devices() - 1)?;
        Ok(TpShard {
            world: plan.devices(),
            vocab: last.vocab.end,
            vocab_per: whole.vocab_size,
            shard,
            nccl,
            ids,
            next: AtomicUsize::new(0),
            free: FreeComms::default(),
        })
    }

    /// This device's rank.
    pub fn rank(&self) -> usize {
        self.shard.rank
    }

    /// Devices in the group.
    pub fn world(&self) -> usize {
        self.world
    }

    /// What this device holds.
    pub fn shard(&self) -> &DeviceShard {
        &self.shard
    }

    /// Token ids whose embedding rows and output-head rows this device holds.
    pub fn vocab_rows(&self) -> Range<usize> {
        self.shard.vocab.clone()
    }

    /// The config this device's kernels run: its heads, KV heads and MLP units, and
    /// the whole vocabulary (token ids and logits are the model's).
    pub fn device_config(&self, plan: &ShardPlan) -> Result<ModelConfig> {
        Ok(ModelConfig {
            vocab_size: self.vocab,
            ..plan.device_config(self.rank())?
        })
    }

    /// A communicator for a scratch running on `ops`'s stream: the free one of lowest
    /// index, or else the next id's, joined (blocking until every rank has joined it)
    /// with `ops`'s device current on this thread. Every rank asks in the same order
    /// and holds the same free list when it does (see the module's documentation).
    pub(crate) fn communicator(&self, ops: &CudaOps) -> Result<Joined> {
        let stream = ops.device().stream().clone();
        let reused = self.free.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some((index, comm)) = reused {
            return Ok(Joined {
                index,
                comm: Some(comm),
                stream,
                free: self.free.clone(),
            });
        }
        let index = self.next.fetch_add(1, Ordering::Relaxed);
        let Some(id) = self.ids.get(index) else {
            bail!(
                "more than {} streams run tensor-parallel steps on one model at once",
                self.ids.len()
            );
        };
        ops.device().context().bind_to_thread()?;
        Ok(Joined {
            index,
            comm: Some(Comm::init(&self.nccl, id, self.world, self.rank())?),
            stream,
            free: self.free.clone(),
        })
    }

    /// Values each device contributes to the logits all-gather per row.
    pub(crate) fn vocab_per(&self) -> usize {
        self.vocab_per
    }
}

/// Items by index, taken (and dropped, with the list) lowest index first whatever
/// order they were put in.
#[derive(Debug)]
struct FreeList<T>(Vec<(usize, T)>);

impl<T> Default for FreeList<T> {
    fn default() -> Self {
        FreeList(Vec::new())
    }
}

impl<T> FreeList<T> {
    fn put(&mut self, index: usize, item: T) {
        self.0.push((index, item));
    }

    fn take(&mut self) -> Option<(usize, T)> {
        let at = (0..self.0.len()).min_by_key(|&i| self.0[i].0)?;
        Some(self.0.swap_remove(at))
    }
}

impl<T> Drop for FreeList<T> {
    fn drop(&mut self) {
        // A Vec would drop its items in the order they were put back, which differs
        // between ranks: communicators are destroyed in index order on every rank
        // instead (see the module's documentation).
        while self.take().is_some() {}
    }
}

/// A communicator a scratch has joined, and the stream it runs on. Dropped, it goes
/// back to its device's free list once that stream's work is done (so no two streams
/// ever queue collectives on it at once).
pub(crate) struct Joined {
    index: usize,
    /// `None` once aborted.
    comm: Option<Comm>,
    stream: Arc<CudaStream>,
    free: FreeComms,
}

impl Joined {
    fn comm(&mut self) -> &mut Comm {
        self.comm.as_mut().expect("only `abort` takes it")
    }

    /// Stops the communicator at once (see [`Comm::abort`]); it is not given back.
    pub fn abort(mut self) {
        if let Some(c) = self.comm.take() {
            c.abort();
        }
    }
}

impl Drop for Joined {
    fn drop(&mut self) {
        let Some(comm) = self.comm.take() else { return };
        // A stream that cannot finish its work (a failed step) leaves its device
        // unusable: its communicator is destroyed, not handed to another stream.
        if self.stream.synchronize().is_ok() {
            self.free
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .put(self.index, comm);
        }
    }
}

/// The collective buffers of one scratch: its communicator, and the logits of this
/// device's ids and of every device's, grown on demand.
#[derive(Default)]
pub(crate) struct TpScratch {
    pub comm: Option<Joined>,
    pub local: Option<CudaSlice<f32>>,
    pub gathered: Option<CudaSlice<f32>>,
}

impl TpScratch {
    /// Joins a communicator if this scratch has none yet.
    pub fn join(&mut self, tp: &TpShard, ops: &CudaOps) -> Result<&mut Comm> {
        if self.comm.is_none() {
            self.comm = Some(tp.communicator(ops)?);
        }
        Ok(self.comm.as_mut().expect("joined above").comm())
    }

    /// Sums `buf`'s first `n` values over the group, in place, on `ops`'s stream.
    pub fn all_reduce(&mut self, ops: &CudaOps, buf: &mut CudaSlice<half::bf16>, n: usize) -> Result<()> {
        ensure!(buf.len() >= n, "all-reduce of {n} values in a buffer of {}", buf.len());
        let s = ops.device().stream();
        let (p, _g) = buf.device_ptr_mut(s);
        let comm = self.comm.as_mut().expect("joined before the step").comm();
        // SAFETY: `buf` holds n bf16 values on this device and outlives the queued work
        // (a scratch buffer); every rank queues the same step's collectives in order.
        unsafe { comm.all_reduce_sum_bf16(p, n, s.cu_stream()) }
    }
}

impl TpScratch {
    /// Gathers every device's `count` logits (`local`) into `gathered`, rank by rank.
    pub fn all_gather_logits(&mut self, ops: &CudaOps, count: usize) -> Result<()> {
        let (local, gathered) = (
            self.local.as_ref().expect("reserved"),
            self.gathered.as_mut().expect("reserved"),
        );
        let comm = self.comm.as_mut().expect("joined before the step").comm();
        ensure!(
            local.len() >= count && gathered.len() >= comm.world() * count,
            "logits buffers too small"
        );
        let s = ops.device().stream();
        let (l, _g1) = local.device_ptr(s);
        let (g, _g2) = gathered.device_ptr_mut(s);
        // SAFETY: both buffers hold what the gather reads and writes (checked) and are
        // scratch buffers that outlive the queued work.
        unsafe { comm.all_gather_f32(l, g, count, s.cu_stream()) }
    }
}

/// `out[rows, vocab]` = the logits of every device in vocabulary order, from the
/// all-gathered blocks `gathered` (`world · rows · per` values, as
/// `kernels/parallel.cu` describes).
pub fn vocab_concat(
    ops: &CudaOps,
    out: &mut CudaSlice<f32>,
    gathered: &CudaSlice<f32>,
    rows: usize,
    per: usize,
    vocab: usize,
) -> Result<()> {
    ensure!(
        out.len() >= rows * vocab,
        "logits buffer of {} for {rows} × {vocab}",
        out.len()
    );
    ensure!(
        gathered.len() >= rows * per * vocab.div_ceil(per),
        "gathered logits of {} for {rows} rows",
        gathered.len()
    );
    if rows == 0 {
        return Ok(());
    }
    let s = ops.device().stream();
    let (o, _g1) = out.device_ptr_mut(s);
    let (i, _g2) = gathered.device_ptr(s);
    let (r, p, v) = (rows as i32, per as i32, vocab as i32);
    let (gx, _, _) = grid_1d(vocab, 256);
    let cfg = cudarc::driver::LaunchConfig {
        grid_dim: (gx.min(256), rows as u32, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: reads world·rows·per and writes rows·vocab values (checked above).
    unsafe {
        s.launch_builder(&ops.k.vocab_concat)
            .arg(&o)
            .arg(&i)
            .arg(&r)
            .arg(&p)
            .arg(&v)
            .launch(cfg)
    }?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::FreeList;
    use std::sync::{Arc, Mutex};

    #[test]
    fn the_free_list_gives_the_lowest_index_whatever_the_order_of_return() {
        // Two ranks that get the same communicators back in different orders still
        // take the same one next.
        let (mut a, mut b) = (FreeList::default(), FreeList::default());
        for i in [2, 0, 3] {
            a.put(i, format!("a{i}"));
        }
        for i in [3, 2, 0] {
            b.put(i, format!("b{i}"));
        }
        let order = |l: &mut FreeList<String>| std::iter::from_fn(|| l.take().map(|(i, _)| i)).collect::<Vec<_>>();
        assert_eq!(order(&mut a), [0, 2, 3]);
        assert_eq!(order(&mut b), [0, 2, 3]);
        assert!(a.take().is_none());
        a.put(5, "x".into());
        assert_eq!(a.take(), Some((5, "x".to_string())));
    }

    /// Records its index in a shared log when dropped.
    struct Logged(usize, Arc<Mutex<Vec<usize>>>);

    impl Drop for Logged {
        fn drop(&mut self) {
            self.1.lock().unwrap().push(self.0);
        }
    }

    #[test]
    fn the_free_list_drops_its_items_lowest_index_first_whatever_the_order_of_return() {
        // Two ranks that got their communicators back in different orders destroy them
        // in the same order when their lists go.
        for returned in [[3, 0, 2, 1], [1, 2, 0, 3], [0, 1, 2, 3]] {
            let log = Arc::new(Mutex::new(Vec::new()));
            let mut list = FreeList::default();
            for i in returned {
                list.put(i, Logged(i, log.clone()));
            }
            drop(list);
            assert_eq!(*log.lock().unwrap(), [0, 1, 2, 3], "returned in the order {returned:?}");
        }
    }
}
