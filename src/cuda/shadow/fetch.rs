//! Stage 3b of the decode step, the value fetch of the missed chunks
//! (kernels/fetch.cu): `zero-copy` (a kernel reads the host pool through its
//! device-mapped address) and the last step of `cpu-gather` (the host gathered the
//! chunks into a staging buffer, now on the device; a kernel scatters them to the
//! slots). Both give the same bytes in the same places, and with a GPU value tier both
//! also leave each fetched chunk in the tier entry the reuse diff gave it.

use super::buffers::ShadowTable;
use super::layout::DevicePool;
use crate::cuda::ops::{check_len, i32_of, kernel_params, CudaOps};
use anyhow::{ensure, Result};
use cudarc::driver::{CudaSlice, DevicePtr, LaunchConfig};

/// Threads of a fetch block.
const FETCH_THREADS: u32 = 256;
/// Blocks of the zero-copy fetch that keep PCIe busy without holding the SMs other
/// kernels need. On the H200, 16 blocks of 256 threads move 50 GB/s and leave a
/// concurrent HBM-bound kernel 3.46 TB/s of its 4.24. With values in 8 bits the largest
/// batch doubled (57 × 61440 tokens) and so did a layer's fetch: with two micro-batches
/// 16 / 24 / 32 / 48 / 64 / 96 blocks decoded 1790 / 2041 / 2075 / 2142 / 2090 / 1989
/// tok/s, and with 48 one micro-batch hides 94 % of the fetch, as fast as two
/// (docs/perf/gpu.md, session 19; 24 at 29 sequences in session 15). Since the fetch
/// also runs beside the attention's first pass (session 33), 24 blocks leave the key
/// rebuild its speed alone and still hide the fetch: 57 × 61440 decoded 2742 / 2728 /
/// 2703 tok/s with 24 / 32 / 48 blocks, where 48 blocks slowed the rebuild beside them
/// by a third.
pub const FETCH_BLOCKS: usize = 24;

impl CudaOps {
    /// Zero-copy fetch: copies the `c·d` values of every miss to fetch (the first
    /// `fetch_count` of each head's list, as [`CudaOps::shadow_reuse`] writes them) from
    /// layer `layer` of the value pool holding its sequence's slot (the host pool over
    /// PCIe, or the GPU value slots' pool in device memory) into its slot of `av`, on
    /// `blocks` blocks of 256 threads striding over all misses of the batch. With a GPU
    /// value tier, `tier_base` (the reuse diff's) places each in its tier entry too.
    ///
    /// # Safety
    /// `pool.host` must be the device-mapped address of a live allocation of
    /// `pool.shape` (host memory registered with the driver, e.g. [`HostMapping`]),
    /// not written by the host while the copy runs, and `pool.dev` the address of a live
    /// device allocation of `pool.dev_shape()`.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn shadow_fetch_values(
        &self,
        t: &ShadowTable,
        misses: &CudaSlice<i32>,
        fetch_count: &CudaSlice<i32>,
        tier_base: Option<&CudaSlice<i32>>,
        pool: &DevicePool,
        layer: usize,
        blocks: usize,
    ) -> Result<()> {
        let l = t.layout();
        pool.check(l, layer, t.counts())?;
        let (mp, cp, cfg) = self.miss_launch(t, misses, fetch_count, blocks)?;
        let tb = self.tier_base_addr(t, tier_base)?;
        let (addrs, counts) = t.device_arrays();
        let dims = l.dims();
        let batch = t.batch() as i32;
        let (kp, li) = (pool.kernel(), i32_of("layer", layer)?);
        // SAFETY: the miss lists hold what the batch needs (checked; the kernel skips
        // entries naming a slot or chunk out of range); the pools' shape serves the
        // layout and every sequence's pool slot (checked), their addresses the caller's
        // contract.
        unsafe {
            self.launch_pdl(
                &self.k.shadow_fetch,
                cfg,
                &mut kernel_params![&mp, &cp, &tb, &addrs, &counts, &dims, &batch, &kp, &li],
            )
        }
    }

    /// The cpu-gather path's last step: copies the fetched misses' values from `staging`
    /// (on the device: `n` chunks as the pool holds them, [`super::layout::ShadowLayout::value_chunk_bytes`]
    /// each), chunk `i` for the `i`-th miss of the batch in list
    /// order (sequence, then KV head, then the miss's place among the first
    /// `fetch_count` of its head's list), into their slots of `av` (and, with a GPU
    /// value tier, their tier entries), on `blocks` blocks. `staging` must hold a chunk
    /// for every miss the batch can have (`batch · kv_heads · S`).
    pub fn shadow_scatter_values(
        &self,
        t: &ShadowTable,
        misses: &CudaSlice<i32>,
        fetch_count: &CudaSlice<i32>,
        tier_base: Option<&CudaSlice<i32>>,
        staging: &impl DevicePtr<u8>,
        blocks: usize,
    ) -> Result<()> {
        let (sp, _g) = staging.device_ptr(self.device().stream());
        // SAFETY: a device buffer of staging.len() bytes, borrowed for the launch.
        unsafe { self.shadow_scatter_values_at(t, misses, fetch_count, tier_base, (sp, staging.len()), blocks) }
    }

    /// [`CudaOps::shadow_scatter_values`] from `staging` = (device address, bytes): the
    /// cpu-gather actor's mapped host staging.
    ///
    /// # Safety
    /// The address must be readable by the device for that many bytes until the
    /// kernel is done (device memory, or pinned host memory mapped for the device).
    pub unsafe fn shadow_scatter_values_at(
        &self,
        t: &ShadowTable,
        misses: &CudaSlice<i32>,
        fetch_count: &CudaSlice<i32>,
        tier_base: Option<&CudaSlice<i32>>,
        (sp, len): (u64, usize),
        blocks: usize,
    ) -> Result<()> {
        let l = t.layout();
        let rows = t.batch() * l.kv_heads * l.slots;
        check_len("scatter: staging", len, rows * l.value_chunk_bytes())?;
        let (mp, cp, cfg) = self.miss_launch(t, misses, fetch_count, blocks)?;
        let tb = self.tier_base_addr(t, tier_base)?;
        ensure!(sp % 16 == 0, "scatter: staging address {sp:#x} is not 16-byte aligned");
        let (addrs, counts) = t.device_arrays();
        let dims = l.dims();
        let batch = t.batch() as i32;
        // SAFETY: staging holds a row per possible miss (checked; readable: the caller's
        // contract), the miss lists what the batch needs (checked; out-of-range entries
        // are skipped).
        unsafe {
            self.launch_pdl(
                &self.k.shadow_scatter,
                cfg,
                &mut kernel_params![&mp, &cp, &tb, &addrs, &counts, &dims, &batch, &sp],
            )
        }
    }

    /// The address of the reuse diff's tier bases, which a batch with a GPU value tier
    /// needs (0 without a tier: the kernels do not read it then).
    fn tier_base_addr(&self, t: &ShadowTable, tier_base: Option<&CudaSlice<i32>>) -> Result<u64> {
        let l = t.layout();
        match tier_base {
            _ if l.tier == 0 => Ok(0),
            None => anyhow::bail!("fetch: a batch with a GPU value tier needs the reuse diff's tier bases"),
            Some(b) => {
                check_len("fetch: tier bases", b.len(), t.batch() * l.kv_heads)?;
                Ok(b.device_ptr(self.device().stream()).0)
            }
        }
    }

    /// Checks the miss lists of a fetch or scatter and returns their addresses and the
    /// launch configuration.
    pub(super) fn miss_launch(
        &self,
        t: &ShadowTable,
        misses: &CudaSlice<i32>,
        miss_count: &CudaSlice<i32>,
        blocks: usize,
    ) -> Result<(u64, u64, LaunchConfig)> {
        let l = t.layout();
        let heads = t.batch() * l.kv_heads;
        check_len("fetch: misses", misses.len(), heads * l.slots * 2)?;
        check_len("fetch: miss counts", miss_count.len(), heads)?;
        ensure!((1..=65_535).contains(&blocks), "fetch: {blocks} blocks (1..=65535)");
        let s = self.device().stream();
        Ok((
            misses.device_ptr(s).0,
            miss_count.device_ptr(s).0,
            LaunchConfig {
                grid_dim: (blocks as u32, 1, 1),
                block_dim: (FETCH_THREADS, 1, 1),
                // ShadowTable::new keeps batch · kv_heads ≤ 12000.
                shared_mem_bytes: ((heads + 1) * 4) as u32,
            },
        ))
    }
}

/// Host memory registered with the driver and mapped into the device's address space,
/// so that kernels read and write it over PCIe (the value pool of the zero-copy path).
/// Unregistered when dropped; borrows the memory so that it outlives the mapping.
pub struct HostMapping<'a, T> {
    ptr: *mut T,
    len: usize,
    dev_addr: u64,
    ctx: std::sync::Arc<cudarc::driver::CudaContext>,
    _mem: std::marker::PhantomData<&'a mut [T]>,
}

// SAFETY: the mapping holds the memory's registration and an exclusive borrow of it;
// a registration belongs to the context, not to a thread, so the mapping may move to
// another thread (the engine thread) with its borrow.
unsafe impl<T: Send> Send for HostMapping<'_, T> {}
// SAFETY: through `&HostMapping` the host only reads the memory (`host`, after the
// device is idle) or its addresses; the micro-batches of a step share one pool this way
// from their threads, each sequence's kernels touching only its own leased slot.
unsafe impl<T: Sync> Sync for HostMapping<'_, T> {}

impl<'a, T: Copy> HostMapping<'a, T> {
    /// Registers `mem` (page-locks it) and maps it for the device of `ops`.
    pub fn new(ops: &CudaOps, mem: &'a mut [T]) -> Result<Self> {
        use cudarc::driver::sys;
        ensure!(!mem.is_empty(), "cannot register an empty host buffer");
        let ctx = ops.device().context().clone();
        ctx.bind_to_thread()?;
        let bytes = std::mem::size_of_val(mem);
        let ptr = mem.as_mut_ptr();
        // SAFETY: `mem` is exclusively borrowed; fault_in writes no byte's value.
        fault_in(unsafe { std::slice::from_raw_parts_mut(ptr.cast::<u8>(), bytes) });
        // SAFETY: ptr..ptr+bytes is a live allocation borrowed for 'a; the mapping
        // unregisters it on drop, before the borrow ends.
        unsafe { sys::cuMemHostRegister_v2(ptr.cast(), bytes, sys::CU_MEMHOSTREGISTER_DEVICEMAP) }
            .result()
            .map_err(|e| anyhow::anyhow!("registering {bytes} bytes of host memory with the driver: {e}"))?;
        let mut dev_addr: sys::CUdeviceptr = 0;
        // SAFETY: ptr is registered (above) with DEVICEMAP.
        if let Err(e) = unsafe { sys::cuMemHostGetDevicePointer_v2(&mut dev_addr, ptr.cast(), 0) }.result() {
            // SAFETY: registered above, not yet handed out.
            unsafe { sys::cuMemHostUnregister(ptr.cast()) };
            anyhow::bail!("mapping registered host memory for the device: {e}");
        }
        Ok(HostMapping {
            ptr,
            len: mem.len(),
            dev_addr,
            ctx,
            _mem: std::marker::PhantomData,
        })
    }

    /// The memory's device address.
    pub fn device_addr(&self) -> u64 {
        self.dev_addr
    }

    /// The memory, after waiting for all work on the device (kernels may write it).
    pub fn host(&self) -> Result<&[T]> {
        self.ctx.synchronize()?;
        // SAFETY: the borrowed allocation of len elements, with no device work pending;
        // the kernels that write it are launched through unsafe functions whose
        // contract forbids host access while they run.
        Ok(unsafe { std::slice::from_raw_parts(self.ptr, self.len) })
    }
}

/// Brings every page of `mem` into memory for writing before the driver pins it, from
/// threads of its own on every core (asking for transparent huge pages where the kernel
/// offers them), keeping its bytes. Pinning pages that are not there yet makes the
/// driver allocate and clear them one by one on a single thread: ~1.9 GB/s for a fresh
/// pool on the H200 hosts, minutes for a pool of a few hundred GB.
fn fault_in(mem: &mut [u8]) {
    const PAGE: usize = 4096;
    const CHUNK: usize = 64 << 20;
    if mem.is_empty() {
        return;
    }
    // The pages the range touches, from the first one's start.
    let first = mem.as_ptr() as usize & !(PAGE - 1);
    let end = (mem.as_ptr() as usize + mem.len()).next_multiple_of(PAGE);
    // Huge pages are advice: where the kernel does not offer them this fails and the
    // pages stay small.
    // SAFETY: madvise only advises on the pages this live, exclusively borrowed range
    // lies in.
    unsafe { libc::madvise(first as *mut libc::c_void, end - first, libc::MADV_HUGEPAGE) };
    let chunks: Vec<(usize, usize)> = (first..end).step_by(CHUNK).map(|c| (c, (c + CHUNK).min(end))).collect();
    // Addresses only from here on: the threads write through them, not through `mem`.
    let range = (mem.as_mut_ptr() as usize, mem.as_ptr() as usize + mem.len());
    let next = std::sync::atomic::AtomicUsize::new(0);
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(chunks.len());
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                while let Some(&(from, to)) = chunks.get(next.fetch_add(1, std::sync::atomic::Ordering::Relaxed)) {
                    // SAFETY: populating pages for writing keeps their contents; these
                    // are pages of the exclusively borrowed range.
                    let populated =
                        unsafe { libc::madvise(from as *mut libc::c_void, to - from, libc::MADV_POPULATE_WRITE) };
                    // EINVAL: a kernel without the advice (before Linux 5.14). Other
                    // failures (no memory) are left to the driver's pinning to report.
                    if populated != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
                        // SAFETY: `range` is the exclusively borrowed range.
                        unsafe { write_pages(from, to, range) };
                    }
                }
            });
        }
    });
}

/// Writes each page from `from` to `to` (before Linux 5.14, which has no
/// MADV_POPULATE_WRITE): one byte of it inside `range` is read and written back, so its
/// bytes stay.
///
/// # Safety
/// `range` (start and end addresses) is memory the caller may write, with no other
/// access meanwhile.
unsafe fn write_pages(from: usize, to: usize, range: (usize, usize)) {
    const PAGE: usize = 4096;
    for page in (from..to).step_by(PAGE) {
        let at = page.max(range.0);
        if at < range.1 {
            let b = at as *mut u8;
            // SAFETY: `b` is a byte of `range`, written back unchanged (volatile: an
            // atomic add of zero would be compiled to a load).
            unsafe { std::ptr::write_volatile(b, std::ptr::read_volatile(b)) };
        }
    }
}

impl<T> Drop for HostMapping<'_, T> {
    fn drop(&mut self) {
        // Work still queued may use the memory: wait for it before unpinning.
        let _ = self.ctx.synchronize();
        // SAFETY: registered in new(), unregistered once.
        unsafe { cudarc::driver::sys::cuMemHostUnregister(self.ptr.cast()) };
    }
}

#[cfg(test)]
mod tests {
    use super::fault_in;

    /// Pages of `mem` the kernel reports resident.
    fn resident(mem: &[u8]) -> usize {
        let pages = mem.len().div_ceil(4096);
        let mut vec = vec![0u8; pages];
        // SAFETY: `mem` is a live page-aligned mapping of `mem.len()` bytes and `vec` has a
        // byte per page.
        let rc = unsafe { libc::mincore(mem.as_ptr() as *mut libc::c_void, mem.len(), vec.as_mut_ptr()) };
        assert_eq!(rc, 0, "mincore: {}", std::io::Error::last_os_error());
        vec.iter().filter(|&&v| v & 1 == 1).count()
    }

    #[test]
    fn writing_the_pages_brings_them_in_and_keeps_the_bytes() {
        // The path for kernels without MADV_POPULATE_WRITE, on a range that starts and
        // ends inside pages.
        let len = 9 << 20;
        let mut map = memmap2::MmapMut::map_anon(len).unwrap();
        map[5000] = 7;
        map[len - 1] = 9;
        let (lo, hi) = (map.as_ptr() as usize + 100, map.as_ptr() as usize + len);
        // SAFETY: the range is inside the mapping, which nothing else touches meanwhile.
        unsafe { super::write_pages(lo & !4095, hi.next_multiple_of(4096), (lo, hi)) };
        assert_eq!(resident(&map), len / 4096);
        assert_eq!((map[5000], map[len - 1]), (7, 9));
        assert_eq!(map.iter().map(|&b| b as usize).sum::<usize>(), 16);
    }

    #[test]
    fn fault_in_brings_every_page_in_and_keeps_the_bytes() {
        let len = (96 << 20) + 12345;
        let mut map = memmap2::MmapMut::map_anon(len).unwrap();
        // A fresh anonymous mapping: nothing resident yet but the pages written below.
        let marks: Vec<usize> = (0..len).step_by(7_919_993).collect();
        for (k, &i) in marks.iter().enumerate() {
            map[i] = (k as u8).wrapping_mul(31).wrapping_add(1);
        }
        let before = resident(&map);
        assert!(before < len / 4096 / 2, "{before} pages resident before");
        // An unaligned view, as a caller's slice may be.
        fault_in(&mut map[3..]);
        assert_eq!(resident(&map), len.div_ceil(4096));
        for (k, &i) in marks.iter().enumerate() {
            assert_eq!(map[i], (k as u8).wrapping_mul(31).wrapping_add(1), "byte {i}");
        }
        assert!(map.iter().enumerate().all(|(i, &b)| b == 0 || marks.contains(&i)));
    }
}
