//! The value pools of GPU ShadowKV: a host [`ValuePool`] (values in 8 bits) registered with the driver
//! and mapped into the device's address space, so that the kernels write a prefill's
//! values and read the missed chunks straight from host memory; and, optionally, GPU
//! value slots ([`GpuValuePool::with_device_slots`]): a second pool of the same layout
//! in device memory, so that the sequences leasing one keep their values in HBM and
//! never cross PCIe. Slot indices are global (host slots first, then device slots; see
//! [`DevicePool`]); a lease ([`ValueLease`]) takes a device slot while one is free, and
//! returns its slot when dropped.
//!
//! A file-backed host pool is not registered: the driver does not pin a file's pages, and
//! a pool larger than host memory could not be pinned anyway. Such a pool is *written by
//! the host* ([`GpuValuePool::host_written`]): the device never addresses it. The
//! cpu-gather actor reads its missed chunks through the page cache; a prefill's values
//! and a tier's fill pass through a [`SlotStage`] in device memory and a copy; the fold's
//! chunks go to an outbox the actor copies into the pool
//! ([`super::transfer::GatherTransfer`]).

use super::fetch::HostMapping;
use super::layout::{DevicePool, ShadowLayout};
use crate::cuda::CudaOps;
use crate::pool::{PoolLease, PoolShape, ValueFormat, ValuePool};
use anyhow::{anyhow, ensure, Context, Result};
use cudarc::driver::{CudaContext, CudaSlice, DevicePtr};
use half::bf16;
use std::ops::Range;
use std::sync::{Arc, Mutex};

/// A value pool the device reads and writes, with its GPU value slots.
pub struct GpuValuePool {
    // Declared first: unregistered (dropped) before the pool's memory goes. None when
    // the host pool holds no slot (every slot is a device slot) or is file-backed.
    mapping: Option<HostMapping<'static, u8>>,
    pool: ValuePool,
    dev: Option<DeviceSlots>,
    slots: SlotList,
}

/// The GPU value slots' memory: `[layer][dev_seq][kv_head][chunk]`, each chunk as the
/// host pool lays it out (codes, then scales), freed once the device is done with it.
struct DeviceSlots {
    mem: Option<CudaSlice<u8>>,
    addr: u64,
    ctx: Arc<CudaContext>,
}

impl Drop for DeviceSlots {
    fn drop(&mut self) {
        // Kernels queued on any stream may still read or write the slots (they take the
        // address, not the buffer): wait for them before the memory goes.
        let _ = self.ctx.synchronize();
        drop(self.mem.take());
    }
}

impl GpuValuePool {
    /// Registers `pool` with the device of `ops` (a file-backed pool is not: it is
    /// written by the host, see the module's documentation); no device slots. The GPU
    /// reads values in 8 bits only.
    pub fn new(ops: &CudaOps, pool: ValuePool) -> Result<Self> {
        ensure!(
            pool.shape().format == ValueFormat::Int8,
            "the GPU reads value pools in 8 bits, this one holds {:?} values",
            pool.shape().format
        );
        let n = pool.bytes();
        pool.advise_random()?;
        let mapping = if n == 0 || pool.is_file_backed() {
            None
        } else {
            // SAFETY: the pool's memory holds n bytes (page-aligned) and lives as
            // long as `pool`, which this struct keeps and drops after the mapping; the
            // host only touches it through leases, which the device's users coordinate
            // with.
            let mem: &'static mut [u8] = unsafe { std::slice::from_raw_parts_mut(pool.base_ptr(), n) };
            Some(HostMapping::new(ops, mem).with_context(|| {
                format!(
                    "pinning the value pool ({:.1} GiB) for the GPU",
                    pool.bytes() as f64 / (1u64 << 30) as f64
                )
            })?)
        };
        let slots = SlotList::new(pool.shape().seqs, 0);
        Ok(GpuValuePool {
            mapping,
            pool,
            dev: None,
            slots,
        })
    }

    /// Adds `n` GPU value slots (none when 0): one zeroed device allocation of the host
    /// pool's layout for `n` sequences, numbered after the host slots. Refused once a
    /// slot is leased, or when it already has device slots.
    pub fn with_device_slots(mut self, ops: &CudaOps, n: usize) -> Result<Self> {
        ensure!(self.dev.is_none(), "the value pool already has GPU value slots");
        ensure!(
            self.pool.leased() == 0,
            "GPU value slots are added before any slot is leased"
        );
        if n == 0 {
            return Ok(self);
        }
        let shape = PoolShape {
            seqs: n,
            ..self.pool.shape()
        };
        let bytes = shape.bytes()?;
        let dev = ops.device();
        let mem = dev.zeros::<u8>(bytes).with_context(|| {
            format!(
                "allocating {n} GPU value slots ({:.1} GiB)",
                bytes as f64 / (1u64 << 30) as f64
            )
        })?;
        let addr = mem.device_ptr(dev.stream()).0;
        // The zeroing is queued on the device's stream: done before another stream's
        // kernel writes the slots.
        dev.synchronize()?;
        self.dev = Some(DeviceSlots {
            mem: Some(mem),
            addr,
            ctx: dev.context().clone(),
        });
        self.slots = SlotList::new(self.pool.shape().seqs, n);
        Ok(self)
    }

    /// The host pool.
    pub fn pool(&self) -> &ValuePool {
        &self.pool
    }

    /// Whether the device cannot address the host pool, which holds slots (a file
    /// mapping): its chunks are written and read by the host only.
    pub fn host_written(&self) -> bool {
        self.mapping.is_none() && self.pool.shape().seqs > 0
    }

    /// Writes the values `v` `[tokens, kv_heads·d]` of a prefill's sparse chunks to
    /// layer `layer` of `lease`'s slot, in 8 bits, on `ops`'s stream
    /// ([`CudaOps::shadow_pool_write`]). For a host slot of a host-written pool the
    /// device writes them into `stage` (made here on first use) and the host copies
    /// them into the pool, waiting for the copy.
    pub fn write_prefill(
        &self,
        ops: &CudaOps,
        layout: &ShadowLayout,
        (layer, lease): (usize, &mut ValueLease),
        v: &impl DevicePtr<bf16>,
        tokens: usize,
        stage: &mut Option<SlotStage>,
    ) -> Result<()> {
        match lease {
            ValueLease::Host(host) if self.host_written() => {
                let st = SlotStage::reuse(stage, ops, self.pool.shape())?;
                // SAFETY: the stage is a live device allocation of its pool's shape (one
                // GPU value slot, no host slot), which nothing else uses meanwhile.
                unsafe { ops.shadow_pool_write(layout, &st.device(), (0, 0), v, tokens)? };
                st.to_host(ops, 0..layout.prefill_chunks(tokens), (host, layer))
            }
            // SAFETY: the pools are registered with (or allocated on) the device (host
            // written ones are served above) and the slot is the lease's alone; the host
            // does not touch it.
            _ => unsafe { ops.shadow_pool_write(layout, &self.device(), (layer, lease.seq()), v, tokens) },
        }
    }

    /// GPU value slots.
    pub fn device_slots(&self) -> usize {
        self.slots.dev_seqs
    }

    /// Bytes of the GPU value slots' allocation.
    pub fn device_bytes(&self) -> usize {
        self.device().dev_shape().bytes().unwrap_or(0)
    }

    /// Takes a free sequence slot: a GPU value slot while one is free, else a host slot.
    pub fn lease(&self) -> Result<ValueLease> {
        self.slots.lease(&self.pool)
    }

    /// The pools as the kernels see them.
    pub fn device(&self) -> DevicePool {
        DevicePool {
            host: self.mapping.as_ref().map_or(0, |m| m.device_addr()),
            dev: self.dev.as_ref().map_or(0, |d| d.addr),
            shape: self.pool.shape(),
            dev_seqs: self.slots.dev_seqs,
        }
    }

    /// The shape of a pool for `seqs` sequences of `layout` over `layers` layers.
    pub fn shape_for(layout: &ShadowLayout, layers: usize, seqs: usize) -> PoolShape {
        PoolShape {
            layers,
            seqs,
            kv_heads: layout.kv_heads,
            chunks: layout.chunk_cap,
            chunk: layout.chunk,
            head_dim: layout.head_dim,
            format: ValueFormat::Int8,
        }
    }
}

/// One slot's layer of a host-written pool in device memory (`[kv_head][chunk]`, laid
/// out as the pool lays a slot's layer out), which the kernels see as a pool of one GPU
/// value slot and one layer ([`SlotStage::device`]): where the device writes a prefill's
/// chunks or reads a tier's, the host copying them from or to the pool.
pub struct SlotStage {
    mem: CudaSlice<u8>,
    shape: PoolShape,
    /// Host memory a head's chunks pass through on their way to the pool.
    host: Vec<u8>,
}

impl SlotStage {
    /// `stage`, made for a layer of pool shape `pool` where it is not yet.
    pub fn reuse<'s>(stage: &'s mut Option<SlotStage>, ops: &CudaOps, pool: PoolShape) -> Result<&'s mut SlotStage> {
        let shape = PoolShape {
            layers: 1,
            seqs: 1,
            ..pool
        };
        if stage.as_ref().is_none_or(|s| s.shape != shape) {
            let bytes = shape.bytes()?;
            let mem = ops.device().zeros::<u8>(bytes).with_context(|| {
                format!(
                    "a device stage of {} MiB for a file-backed value pool's layer",
                    bytes >> 20
                )
            })?;
            *stage = Some(SlotStage {
                mem,
                shape,
                host: Vec::new(),
            });
        }
        Ok(stage.as_mut().expect("made above"))
    }

    /// The stage as the kernels see it: a pool of one layer and one GPU value slot
    /// (global slot 0, layer 0).
    pub fn device(&self) -> DevicePool {
        DevicePool {
            host: 0,
            dev: self.mem.device_ptr(self.mem.stream()).0,
            shape: PoolShape { seqs: 0, ..self.shape },
            dev_seqs: 1,
        }
    }

    /// Where chunks `chunks` of each head lie in the stage and in a slot's layer of the
    /// pool (the same bytes in both).
    fn head_ranges(&self, chunks: &Range<usize>) -> Result<Vec<Range<usize>>> {
        let s = &self.shape;
        ensure!(chunks.end <= s.chunks, "stage: chunks {chunks:?} of {}", s.chunks);
        let (hb, cb) = (s.chunks * s.chunk_bytes(), s.chunk_bytes());
        Ok((0..s.kv_heads)
            .map(|h| h * hb + chunks.start * cb..h * hb + chunks.end * cb)
            .collect())
    }

    /// Copies chunks `chunks` of every head to layer `layer` of `lease`'s slot once
    /// `ops`'s stream is done with the stage: through host memory of its own, then
    /// [`PoolLease::write_layer`] (so that a file's pages are overwritten, not read first).
    pub fn to_host(
        &mut self,
        ops: &CudaOps,
        chunks: Range<usize>,
        (lease, layer): (&mut PoolLease, usize),
    ) -> Result<()> {
        let n = chunks.len() * self.shape.chunk_bytes();
        self.host.resize(n, 0);
        let s = ops.device().stream();
        for r in self.head_ranges(&chunks)? {
            s.memcpy_dtoh(&self.mem.slice(r.clone()), &mut self.host[..])?;
            s.synchronize()?;
            lease.write_layer(layer, r.start, &self.host)?;
        }
        Ok(())
    }

    /// Copies chunks `chunks` of every head from layer `layer` of `lease`'s slot into
    /// the stage on `ops`'s stream (asking the kernel to read them all in first).
    pub fn from_host(
        &mut self,
        ops: &CudaOps,
        chunks: Range<usize>,
        (lease, layer): (&PoolLease, usize),
    ) -> Result<()> {
        let ranges = self.head_ranges(&chunks)?;
        for r in &ranges {
            lease.will_need(layer, r.start, r.len())?;
        }
        let bytes = lease.layer_bytes(layer);
        let s = ops.device().stream();
        for r in ranges {
            s.memcpy_htod(&bytes[r.clone()], &mut self.mem.slice_mut(r))?;
        }
        Ok(())
    }
}

/// How many GPU value slots (`bench --gpu-value-slots`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ValueSlots {
    /// None: every sequence's values in the host pool.
    Off,
    /// As many as the free GPU memory holds.
    Auto,
    /// This many.
    Count(usize),
}

impl std::fmt::Display for ValueSlots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ValueSlots::Off => f.write_str("off"),
            ValueSlots::Auto => f.write_str("auto"),
            ValueSlots::Count(n) => write!(f, "{n}"),
        }
    }
}

impl std::str::FromStr for ValueSlots {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "off" | "0" => Ok(ValueSlots::Off),
            "auto" => Ok(ValueSlots::Auto),
            n => n
                .parse::<usize>()
                .map(ValueSlots::Count)
                .map_err(|_| format!("`{n}`: GPU value slots are `off`, `auto` or a number of sequences")),
        }
    }
}

/// The free GPU value slots (global indices `host_seqs..host_seqs + dev_seqs`) beside a
/// host pool's own free list: the bookkeeping of [`GpuValuePool::lease`].
struct SlotList {
    host_seqs: usize,
    dev_seqs: usize,
    free: Arc<Mutex<Vec<usize>>>,
}

impl SlotList {
    /// `dev_seqs` free device slots after `host_seqs` host slots.
    fn new(host_seqs: usize, dev_seqs: usize) -> Self {
        SlotList {
            host_seqs,
            dev_seqs,
            // Popped from the end: the lowest slot first.
            free: Arc::new(Mutex::new((host_seqs..host_seqs + dev_seqs).rev().collect())),
        }
    }

    /// A device slot while one is free, else a slot of `host`.
    fn lease(&self, host: &ValuePool) -> Result<ValueLease> {
        if let Some(seq) = self.free.lock().unwrap_or_else(|p| p.into_inner()).pop() {
            return Ok(ValueLease::Device(DeviceLease {
                free: self.free.clone(),
                seq,
            }));
        }
        // The host pool refuses only when it is full.
        host.lease().map(ValueLease::Host).map_err(|_| {
            anyhow!(
                "the value pools are full: {} sequences hold their {} host and {} GPU value slots",
                self.host_seqs + self.dev_seqs,
                self.host_seqs,
                self.dev_seqs
            )
        })
    }
}

/// A sequence's slot in the value pools, returned when dropped.
pub enum ValueLease {
    /// A slot of the host pool (its index is global and local alike).
    Host(PoolLease),
    /// A GPU value slot.
    Device(DeviceLease),
}

impl ValueLease {
    /// The global slot index (the sequence's `pool_seq`).
    pub fn seq(&self) -> usize {
        match self {
            ValueLease::Host(l) => l.seq(),
            ValueLease::Device(l) => l.seq,
        }
    }

    /// Whether the slot lies in device memory.
    pub fn on_device(&self) -> bool {
        matches!(self, ValueLease::Device(_))
    }

    /// The host pool's lease (none for a GPU value slot).
    pub fn host(&self) -> Option<&PoolLease> {
        match self {
            ValueLease::Host(l) => Some(l),
            ValueLease::Device(_) => None,
        }
    }
}

/// A sequence's GPU value slot; returned to the free list when dropped.
pub struct DeviceLease {
    free: Arc<Mutex<Vec<usize>>>,
    seq: usize,
}

impl Drop for DeviceLease {
    fn drop(&mut self) {
        self.free.lock().unwrap_or_else(|p| p.into_inner()).push(self.seq);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host_pool(seqs: usize) -> ValuePool {
        let shape = PoolShape {
            layers: 1,
            seqs,
            kv_heads: 1,
            chunks: 2,
            chunk: 4,
            head_dim: 4,
            format: ValueFormat::Int8,
        };
        ValuePool::anonymous(shape).unwrap()
    }

    #[test]
    fn device_slots_are_leased_first_and_come_back_when_dropped() {
        let host = host_pool(2);
        let slots = SlotList::new(2, 3);
        // Device slots 2, 3, 4 (global: after the host's 0 and 1), lowest first.
        let d: Vec<ValueLease> = (0..3).map(|_| slots.lease(&host).unwrap()).collect();
        assert_eq!(d.iter().map(ValueLease::seq).collect::<Vec<_>>(), vec![2, 3, 4]);
        assert!(d.iter().all(ValueLease::on_device));
        assert_eq!(host.leased(), 0);
        // Then the host's.
        let h: Vec<ValueLease> = (0..2).map(|_| slots.lease(&host).unwrap()).collect();
        assert!(h.iter().all(|l| !l.on_device() && l.seq() < 2));
        assert_ne!(h[0].seq(), h[1].seq());
        assert_eq!(host.leased(), 2);
        let e = slots.lease(&host).err().expect("full").to_string();
        assert!(e.contains("full") && e.contains("2 host and 3 GPU value slots"), "{e}");
        // A device slot dropped is the next one leased, before any host slot.
        let mut d = d;
        let gone = d.remove(1).seq();
        let again = slots.lease(&host).unwrap();
        assert!(again.on_device() && again.seq() == gone);
        // A host slot dropped is leased again once the device slots are all taken.
        let mut h = h;
        let freed = h.pop().unwrap().seq();
        assert_eq!(host.leased(), 1);
        let next = slots.lease(&host).unwrap();
        assert!(!next.on_device() && next.seq() == freed);
    }

    #[test]
    fn without_device_slots_the_host_pool_serves_alone() {
        let host = host_pool(1);
        let slots = SlotList::new(1, 0);
        let a = slots.lease(&host).unwrap();
        assert!(!a.on_device() && a.seq() == 0);
        assert!(slots.lease(&host).is_err());
        drop(a);
        assert_eq!(slots.lease(&host).unwrap().seq(), 0);
        // Device slots alone (an empty host pool).
        let none = host_pool(0);
        let slots = SlotList::new(0, 1);
        let d = slots.lease(&none).unwrap();
        assert!(d.on_device() && d.seq() == 0);
        let e = slots.lease(&none).err().expect("full").to_string();
        assert!(e.contains("0 host and 1 GPU value slots"), "{e}");
    }
}
