//! Value pools: the host-memory home of ShadowKV's values, chunk-major, laid out
//! `[layer][seq][kv_head][chunk]`, each chunk of one head its `c` token rows in one of two
//! formats ([`ValueFormat`]): in 8 bits ([`crate::cpu::codes8`]: the `c·d` codes in
//! token order, then the `c` fp32 scales, padded to whole 16-byte words for the GPU's
//! loads; 1056 bytes at c = 8, d = 128, about half of bf16's 2048), what every pool holds
//! by default and the only format the GPU reads; or exact, as f32 (the CPU reference's
//! checks against full attention). Backed by an anonymous or a file-backed memory map
//! whose room is made sure of when it is created ([`space`]). The CPU reference reads and
//! writes chunks as f32 rows (quantized on the way in, scaled on the way out); the GPU
//! registers the pool with the driver and reads and writes the same bytes through a
//! mapped address. Sequences lease a `seq` slot for their lifetime.

pub mod numa;
pub mod space;

use crate::cpu::codes8;
use anyhow::{bail, ensure, Context, Result};
use space::PoolMemory;
use std::path::Path;
use std::sync::{Arc, Mutex};

/// How a pool stores a chunk's values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueFormat {
    /// 8-bit codes and a scale per token row (the default; what the GPU reads).
    Int8,
    /// f32, exact (the CPU reference's checks against full attention; a CPU ShadowKV
    /// cache over such a pool keeps its low-rank coefficients exact too).
    F32,
}

/// The shape of a pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolShape {
    /// Transformer layers.
    pub layers: usize,
    /// Sequences that can hold a lease at once.
    pub seqs: usize,
    /// Key/value heads per layer.
    pub kv_heads: usize,
    /// Chunks per sequence (the longest context divided by the chunk size, rounded up).
    pub chunks: usize,
    /// Tokens per chunk (`c`).
    pub chunk: usize,
    /// Values per token and head (`d`).
    pub head_dim: usize,
    /// How the values are stored.
    pub format: ValueFormat,
}

impl PoolShape {
    /// Values of one chunk of one head: `c·d`.
    pub fn chunk_values(&self) -> usize {
        self.chunk * self.head_dim
    }

    /// Bytes of one chunk of one head: in 8 bits `c·d` codes and `c` fp32 scales,
    /// padded to a multiple of 16; as f32 `4·c·d`.
    pub fn chunk_bytes(&self) -> usize {
        match self.format {
            ValueFormat::Int8 => (self.chunk * (self.head_dim + 4)).next_multiple_of(16),
            ValueFormat::F32 => 4 * self.chunk_values(),
        }
    }

    /// Chunks of one head in the whole pool.
    fn chunk_count(&self) -> Result<usize> {
        [self.layers, self.seqs, self.kv_heads, self.chunks]
            .iter()
            .try_fold(1usize, |acc, &x| acc.checked_mul(x))
            .context("pool size overflows")
    }

    /// Total bytes.
    pub fn bytes(&self) -> Result<usize> {
        self.chunk_count()?
            .checked_mul(self.chunk_bytes())
            .context("pool size overflows")
    }

    /// Bytes of one sequence's slot.
    pub fn seq_bytes(&self) -> usize {
        self.layers * self.kv_heads * self.chunks * self.chunk_bytes()
    }

    /// Byte offset of chunk `chunk` of head `head` of slot `seq` at layer `layer`.
    pub fn offset(&self, layer: usize, seq: usize, head: usize, chunk: usize) -> usize {
        (((layer * self.seqs + seq) * self.kv_heads + head) * self.chunks + chunk) * self.chunk_bytes()
    }
}

struct PoolInner {
    shape: PoolShape,
    /// Start of the map, taken once through `&mut` so leases may write through it.
    base: *mut u8,
    /// Keeps the mapping alive; accessed through `base`, except to bind it to a NUMA
    /// node before the pool is shared.
    memory: PoolMemory,
    free: Mutex<Vec<usize>>,
}

// SAFETY: `base` points into `memory`, which lives as long as `PoolInner`; every access
// goes through a `PoolLease`, and leases own disjoint `seq` slots.
unsafe impl Send for PoolInner {}
// SAFETY: as above; the free list is behind a mutex.
unsafe impl Sync for PoolInner {}

/// A value pool shared by all sequences.
#[derive(Clone)]
pub struct ValuePool {
    inner: Arc<PoolInner>,
}

/// A sequence's exclusive slot in a pool; returned to the pool when dropped.
pub struct PoolLease {
    inner: Arc<PoolInner>,
    seq: usize,
}

impl ValuePool {
    /// An anonymous (RAM, lazily committed) pool; refused (a [`space::SpaceError`]) when
    /// the machine has less memory available.
    pub fn anonymous(shape: PoolShape) -> Result<Self> {
        Self::check(&shape)?;
        Ok(Self::from_memory(shape, space::anonymous(shape.bytes()?)?))
    }

    /// A pool backed by the file at `path`, created or emptied, with its blocks reserved
    /// and locked against other processes; refused (a [`space::SpaceError`]) when its
    /// filesystem has too little room.
    pub fn file_backed(shape: PoolShape, path: &Path) -> Result<Self> {
        Self::check(&shape)?;
        Ok(Self::from_memory(shape, space::file_backed(path, shape.bytes()?)?))
    }

    fn check(shape: &PoolShape) -> Result<()> {
        ensure!(
            shape.chunk > 0 && shape.head_dim > 0,
            "a value pool needs chunks of at least one token of at least one value"
        );
        Ok(())
    }

    fn from_memory(shape: PoolShape, mut memory: PoolMemory) -> Self {
        let free = Mutex::new((0..shape.seqs).rev().collect());
        let base = memory.as_mut_ptr();
        ValuePool {
            inner: Arc::new(PoolInner {
                shape,
                base,
                memory,
                free,
            }),
        }
    }

    /// The pool's shape.
    pub fn shape(&self) -> PoolShape {
        self.inner.shape
    }

    /// Bytes the pool holds.
    pub fn bytes(&self) -> usize {
        self.inner.shape.bytes().expect("checked at creation")
    }

    /// The start of the pool's memory, for registering it with a device (which then
    /// reads and writes leased slots through its own mapping).
    ///
    /// # Safety
    /// The memory is the leases' to access: whoever writes through this pointer must
    /// only touch slots whose leases it holds, and never while the host reads them.
    pub unsafe fn base_ptr(&self) -> *mut u8 {
        self.inner.base
    }

    /// Places the pool's memory on NUMA node `node`, as a preference (see
    /// [`numa::bind_area`]), before it is shared: refused once a lease or a clone of the
    /// pool exists, and for a file-backed pool (the page cache's placement is the
    /// kernel's to choose).
    pub fn bind_to_node(&mut self, node: u32) -> Result<()> {
        let inner = Arc::get_mut(&mut self.inner).context("a value pool is bound to a node before it is shared")?;
        if inner.memory.is_file_backed() {
            bail!("a file-backed value pool is not bound to a NUMA node (its pages are the page cache's)");
        }
        numa::bind_area(inner.memory.as_slice(), node)
    }

    /// Whether a file backs the pool (its pages are the page cache's).
    pub fn is_file_backed(&self) -> bool {
        self.inner.memory.is_file_backed()
    }

    /// Tells the kernel that a file-backed pool is read at random, a chunk here and
    /// there: a page fault reads its page, not the read-ahead window around it (which
    /// multiplies the disk's reads once the pool outgrows the page cache). Nothing for an
    /// anonymous pool.
    pub fn advise_random(&self) -> Result<()> {
        if self.is_file_backed() {
            self.inner
                .memory
                .advise_random()
                .context("advising random reads of the value pool file")?;
        }
        Ok(())
    }

    /// Takes a free sequence slot.
    pub fn lease(&self) -> Result<PoolLease> {
        let seq = self.inner.free.lock().expect("pool lock").pop();
        match seq {
            Some(seq) => Ok(PoolLease {
                inner: self.inner.clone(),
                seq,
            }),
            None => bail!("the value pool is full ({} sequences)", self.inner.shape.seqs),
        }
    }

    /// Sequence slots currently leased.
    pub fn leased(&self) -> usize {
        self.inner.shape.seqs - self.inner.free.lock().expect("pool lock").len()
    }
}

impl PoolLease {
    /// Chunks per head the lease can hold.
    pub fn chunks(&self) -> usize {
        self.inner.shape.chunks
    }

    /// The pool's shape.
    pub fn shape(&self) -> PoolShape {
        self.inner.shape
    }

    /// The leased sequence index.
    pub fn seq(&self) -> usize {
        self.seq
    }

    /// Start of one chunk of one head, bounds-checked.
    fn chunk_ptr(&self, layer: usize, head: usize, chunk: usize) -> *mut u8 {
        let s = &self.inner.shape;
        assert!(
            layer < s.layers && head < s.kv_heads && chunk < s.chunks,
            "pool index out of range"
        );
        // SAFETY: the offset of an in-range index plus one chunk stays inside the map.
        unsafe { self.inner.base.add(s.offset(layer, self.seq, head, chunk)) }
    }

    /// Reads one chunk of one head as f32 rows (`c·d` values, token order): each code
    /// times its row's scale (or the values as they are, in an f32 pool).
    pub fn read(&self, layer: usize, head: usize, chunk: usize, out: &mut [f32]) {
        let s = self.inner.shape;
        assert_eq!(out.len(), s.chunk_values(), "a chunk's values");
        let bytes = self.chunk_bytes(layer, head, chunk);
        if s.format == ValueFormat::F32 {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes(b.try_into().expect("4 bytes"));
            }
            return;
        }
        let (codes, scales) = bytes.split_at(s.chunk_values());
        for (r, row) in out.chunks_exact_mut(s.head_dim).enumerate() {
            let scale = f32::from_le_bytes(scales[4 * r..4 * r + 4].try_into().expect("4 bytes"));
            codes8::dequantize(
                bytemuck::cast_slice(&codes[r * s.head_dim..(r + 1) * s.head_dim]),
                scale,
                row,
            );
        }
    }

    /// Writes one chunk of one head from f32 rows (`c·d` values, token order), each row
    /// quantized to codes and a scale (or as they are, in an f32 pool).
    pub fn write(&mut self, layer: usize, head: usize, chunk: usize, data: &[f32]) {
        let s = self.inner.shape;
        assert_eq!(data.len(), s.chunk_values(), "a chunk's values");
        // SAFETY: the chunk lies inside the map and the lease is borrowed exclusively.
        let dst = unsafe { std::slice::from_raw_parts_mut(self.chunk_ptr(layer, head, chunk), s.chunk_bytes()) };
        if s.format == ValueFormat::F32 {
            for (b, v) in dst.chunks_exact_mut(4).zip(data) {
                b.copy_from_slice(&v.to_le_bytes());
            }
            return;
        }
        let (codes, scales) = dst.split_at_mut(s.chunk_values());
        for (r, row) in data.chunks_exact(s.head_dim).enumerate() {
            let q: &mut [i8] = bytemuck::cast_slice_mut(&mut codes[r * s.head_dim..(r + 1) * s.head_dim]);
            let scale = codes8::quantize(row, q);
            scales[4 * r..4 * r + 4].copy_from_slice(&scale.to_le_bytes());
        }
    }

    /// The bytes of one layer of the slot, every head's chunks in a row
    /// (`[kv_head][chunk]`, as the pool lays them out).
    pub fn layer_bytes(&self, layer: usize) -> &[u8] {
        let s = self.inner.shape;
        // SAFETY: the layer's chunks of this slot lie in a row inside the map
        // (chunk_ptr checks the layer), and only this lease (borrowed shared here)
        // touches slot `self.seq` from the host.
        unsafe { std::slice::from_raw_parts(self.chunk_ptr(layer, 0, 0), s.kv_heads * s.chunks * s.chunk_bytes()) }
    }

    /// Writes `data` at byte `at` of one layer of the slot (as [`PoolLease::layer_bytes`]
    /// lays it out): into a file-backed pool with `pwrite`, so that whole pages are
    /// overwritten without being read from the disk first.
    pub fn write_layer(&mut self, layer: usize, at: usize, data: &[u8]) -> Result<()> {
        let s = self.inner.shape;
        let n = s.kv_heads * s.chunks * s.chunk_bytes();
        ensure!(
            at.checked_add(data.len()).is_some_and(|e| e <= n),
            "{} bytes at {at} of a slot's layer of {n}",
            data.len()
        );
        let start = s.offset(layer, self.seq, 0, 0) + at;
        // chunk_ptr checks the layer.
        let dst = self.chunk_ptr(layer, 0, 0);
        match self.inner.memory.write_file_at(start, data) {
            Some(r) => r.context("writing the value pool file"),
            None => {
                // SAFETY: the range lies in this slot's layer (checked above), which the
                // lease, borrowed exclusively, alone touches.
                unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), dst.add(at), data.len()) };
                Ok(())
            }
        }
    }

    /// Asks the kernel to start reading in `len` bytes at byte `at` of one layer of the
    /// slot (a file-backed pool's pages the page cache does not hold), before they are
    /// read in a row.
    pub fn will_need(&self, layer: usize, at: usize, len: usize) -> Result<()> {
        let _ = self.chunk_ptr(layer, 0, 0);
        let start = self.inner.shape.offset(layer, self.seq, 0, 0) + at;
        self.inner
            .memory
            .will_need(start, len)
            .context("advising the kernel to read the value pool in")
    }

    /// The bytes of one chunk of one head (codes, then scales).
    pub fn chunk_bytes(&self, layer: usize, head: usize, chunk: usize) -> &[u8] {
        let n = self.inner.shape.chunk_bytes();
        // SAFETY: the chunk lies inside the map, and only this lease (borrowed shared
        // here) touches slot `self.seq` from the host.
        unsafe { std::slice::from_raw_parts(self.chunk_ptr(layer, head, chunk), n) }
    }
}

impl Drop for PoolLease {
    fn drop(&mut self) {
        if let Ok(mut f) = self.inner.free.lock() {
            f.push(self.seq);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn round_trip(pool: &ValuePool) {
        let exact = pool.shape().format == ValueFormat::F32;
        let s = pool.shape();
        let mut rng = rand::rngs::StdRng::seed_from_u64(rand::random());
        let mut a = pool.lease().unwrap();
        let mut b = pool.lease().unwrap();
        assert_ne!(a.seq(), b.seq());
        let mut want = Vec::new();
        for l in 0..s.layers {
            for h in 0..s.kv_heads {
                for c in 0..s.chunks {
                    let x: Vec<f32> = (0..s.chunk_values()).map(|_| rng.random_range(-1.0..1.0)).collect();
                    let y: Vec<f32> = x.iter().map(|v| -v).collect();
                    a.write(l, h, c, &x);
                    b.write(l, h, c, &y);
                    want.push((l, h, c, x, y));
                }
            }
        }
        // Each row back within half a step of its scale (max |x| / 127); exactly as f32.
        let close = |got: &[f32], x: &[f32]| {
            if exact {
                assert_eq!(got, x);
                return;
            }
            for (g, w) in got.chunks(s.head_dim).zip(x.chunks(s.head_dim)) {
                let step = w.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
                for (a, b) in g.iter().zip(w) {
                    assert!((a - b).abs() <= step / 2.0 + 1e-7, "{a} vs {b}");
                }
            }
        };
        let mut got = vec![f32::NAN; s.chunk_values()];
        for (l, h, c, x, y) in want {
            a.read(l, h, c, &mut got);
            close(&got, &x);
            b.read(l, h, c, &mut got);
            close(&got, &y);
        }
        assert!(pool.lease().is_err(), "two seqs only");
        drop(a);
        assert_eq!(pool.leased(), 1);
        pool.lease().unwrap();
    }

    /// 3 layers, 2 slots and 2 heads of 5 chunks of 4 tokens of 6 values, in 8 bits.
    fn small_shape() -> PoolShape {
        PoolShape {
            layers: 3,
            seqs: 2,
            kv_heads: 2,
            chunks: 5,
            chunk: 4,
            head_dim: 6,
            format: ValueFormat::Int8,
        }
    }

    #[test]
    fn anonymous_and_file_backed_round_trip() {
        let shape = small_shape();
        let exact = PoolShape {
            format: ValueFormat::F32,
            ..shape
        };
        let anon = ValuePool::anonymous(shape).unwrap();
        round_trip(&anon);
        assert!(!anon.is_file_backed());
        round_trip(&ValuePool::anonymous(exact).unwrap());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("values.pool");
        let file = ValuePool::file_backed(shape, &path).unwrap();
        round_trip(&file);
        assert!(file.is_file_backed());
        // 4 · (6 + 4) = 40 bytes a chunk, padded to 48.
        assert_eq!(std::fs::metadata(&path).unwrap().len(), (3 * 2 * 2 * 5 * 48) as u64);
    }

    #[test]
    fn a_layer_is_written_in_place_in_either_pool() {
        let shape = small_shape();
        let dir = tempfile::tempdir().unwrap();
        let pools = [
            ValuePool::anonymous(shape).unwrap(),
            ValuePool::file_backed(shape, &dir.path().join("values.pool")).unwrap(),
        ];
        for pool in &pools {
            let _first = pool.lease().unwrap();
            let mut lease = pool.lease().unwrap();
            let n = shape.chunk_bytes();
            assert_eq!(lease.layer_bytes(1).len(), 2 * 5 * n);
            let bytes: Vec<u8> = (0..2 * 5 * n).map(|i| (i / n) as u8 + 1).collect();
            // In two writes, the second starting inside a chunk.
            lease.write_layer(1, 0, &bytes[..n + 3]).unwrap();
            lease.write_layer(1, n + 3, &bytes[n + 3..]).unwrap();
            assert_eq!(lease.layer_bytes(1), &bytes[..]);
            assert!(lease.write_layer(1, 1, &bytes).is_err(), "past the layer");
            for (h, c) in (0..2).flat_map(|h| (0..5).map(move |c| (h, c))) {
                assert!(lease.chunk_bytes(1, h, c).iter().all(|&b| b as usize == h * 5 + c + 1));
                assert!(lease.chunk_bytes(0, h, c).iter().all(|&b| b == 0));
                assert!(lease.chunk_bytes(2, h, c).iter().all(|&b| b == 0));
            }
            lease.will_need(1, 0, 2 * 5 * n).unwrap();
            pool.advise_random().unwrap();
        }
    }

    #[test]
    fn impossible_sizes_are_errors() {
        let shape = PoolShape {
            layers: usize::MAX,
            seqs: 2,
            kv_heads: 2,
            chunks: 5,
            chunk: 4,
            head_dim: 6,
            format: ValueFormat::Int8,
        };
        assert!(ValuePool::anonymous(shape).is_err());
    }
}
