//! Value pools: the host-memory home of ShadowKV's values, chunk-major, laid out
//! `[layer][seq][kv_head][chunk][chunk_size·head_dim]`, backed by an anonymous or a
//! file-backed memory map whose room is made sure of when it is created ([`space`]).
//! Values are f32 (the CPU reference) or bf16 (the GPU, which registers the pool with
//! the driver and reads and writes it through a mapped address). Sequences lease a
//! `seq` slot for their lifetime.

pub mod numa;
pub mod space;

use anyhow::{bail, Context, Result};
use space::PoolMemory;
use std::path::Path;
use std::sync::{Arc, Mutex};

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
    /// Floats per chunk and head: `chunk_size · head_dim`.
    pub chunk_elems: usize,
}

impl PoolShape {
    /// Total floats.
    pub fn elems(&self) -> Result<usize> {
        [self.layers, self.seqs, self.kv_heads, self.chunks, self.chunk_elems]
            .iter()
            .try_fold(1usize, |acc, &x| acc.checked_mul(x))
            .context("pool size overflows")
    }

    /// Total bytes, at `elem_bytes` bytes per element.
    pub fn bytes(&self, elem_bytes: usize) -> Result<usize> {
        self.elems()?.checked_mul(elem_bytes).context("pool size overflows")
    }

    fn offset(&self, layer: usize, seq: usize, head: usize, chunk: usize) -> usize {
        (((layer * self.seqs + seq) * self.kv_heads + head) * self.chunks + chunk) * self.chunk_elems
    }
}

/// The element type of a pool's values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueType {
    /// 4-byte floats (the CPU reference).
    F32,
    /// bf16 (the GPU).
    Bf16,
}

impl ValueType {
    /// Bytes per value.
    pub fn bytes(self) -> usize {
        match self {
            ValueType::F32 => 4,
            ValueType::Bf16 => 2,
        }
    }
}

struct PoolInner {
    shape: PoolShape,
    ty: ValueType,
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
    /// An anonymous (RAM, lazily committed) f32 pool; refused (a [`space::SpaceError`])
    /// when the machine has less memory available.
    pub fn anonymous(shape: PoolShape) -> Result<Self> {
        Self::anonymous_of(shape, ValueType::F32)
    }

    /// An anonymous pool of `ty` values.
    pub fn anonymous_of(shape: PoolShape, ty: ValueType) -> Result<Self> {
        Ok(Self::from_memory(
            shape,
            ty,
            space::anonymous(shape.bytes(ty.bytes())?)?,
        ))
    }

    /// An f32 pool backed by the file at `path`, created or emptied, with its blocks
    /// reserved and locked against other processes; refused (a [`space::SpaceError`])
    /// when its filesystem has too little room.
    pub fn file_backed(shape: PoolShape, path: &Path) -> Result<Self> {
        Self::file_backed_of(shape, path, ValueType::F32)
    }

    /// A file-backed pool of `ty` values.
    pub fn file_backed_of(shape: PoolShape, path: &Path, ty: ValueType) -> Result<Self> {
        Ok(Self::from_memory(
            shape,
            ty,
            space::file_backed(path, shape.bytes(ty.bytes())?)?,
        ))
    }

    fn from_memory(shape: PoolShape, ty: ValueType, mut memory: PoolMemory) -> Self {
        let free = Mutex::new((0..shape.seqs).rev().collect());
        let base = memory.as_mut_ptr();
        ValuePool {
            inner: Arc::new(PoolInner {
                shape,
                ty,
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

    /// The pool's value type.
    pub fn value_type(&self) -> ValueType {
        self.inner.ty
    }

    /// Bytes the pool holds.
    pub fn bytes(&self) -> usize {
        self.inner.shape.elems().expect("checked at creation") * self.inner.ty.bytes()
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
        unsafe {
            self.inner
                .base
                .add(s.offset(layer, self.seq, head, chunk) * self.inner.ty.bytes())
        }
    }

    /// Reads one chunk of f32 values of one head.
    pub fn read(&self, layer: usize, head: usize, chunk: usize, out: &mut [f32]) {
        assert_eq!(
            self.inner.ty,
            ValueType::F32,
            "an f32 read of a {:?} pool",
            self.inner.ty
        );
        out.copy_from_slice(bytemuck::cast_slice(self.chunk_bytes(layer, head, chunk)));
    }

    /// Writes one chunk of f32 values of one head.
    pub fn write(&mut self, layer: usize, head: usize, chunk: usize, data: &[f32]) {
        assert_eq!(
            self.inner.ty,
            ValueType::F32,
            "an f32 write to a {:?} pool",
            self.inner.ty
        );
        let n = self.inner.shape.chunk_elems * 4;
        // SAFETY: the chunk lies inside the map, f32-aligned (the map is page-aligned
        // and offsets are whole values), and the lease is borrowed exclusively.
        let dst = unsafe { std::slice::from_raw_parts_mut(self.chunk_ptr(layer, head, chunk), n) };
        dst.copy_from_slice(bytemuck::cast_slice(data));
    }

    /// The bytes of one chunk of one head (`chunk_elems` values of the pool's type).
    pub fn chunk_bytes(&self, layer: usize, head: usize, chunk: usize) -> &[u8] {
        let n = self.inner.shape.chunk_elems * self.inner.ty.bytes();
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
        let s = pool.shape();
        let mut rng = rand::rngs::StdRng::seed_from_u64(rand::random());
        let mut a = pool.lease().unwrap();
        let mut b = pool.lease().unwrap();
        assert_ne!(a.seq(), b.seq());
        let mut want = Vec::new();
        for l in 0..s.layers {
            for h in 0..s.kv_heads {
                for c in 0..s.chunks {
                    let x: Vec<f32> = (0..s.chunk_elems).map(|_| rng.random_range(-1.0..1.0)).collect();
                    let y: Vec<f32> = x.iter().map(|v| -v).collect();
                    a.write(l, h, c, &x);
                    b.write(l, h, c, &y);
                    want.push((l, h, c, x, y));
                }
            }
        }
        let mut got = vec![f32::NAN; s.chunk_elems];
        for (l, h, c, x, y) in want {
            a.read(l, h, c, &mut got);
            assert_eq!(got, x);
            b.read(l, h, c, &mut got);
            assert_eq!(got, y);
        }
        assert!(pool.lease().is_err(), "two seqs only");
        drop(a);
        assert_eq!(pool.leased(), 1);
        pool.lease().unwrap();
    }

    #[test]
    fn anonymous_and_file_backed_round_trip() {
        let shape = PoolShape {
            layers: 3,
            seqs: 2,
            kv_heads: 2,
            chunks: 5,
            chunk_elems: 24,
        };
        round_trip(&ValuePool::anonymous(shape).unwrap());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("values.pool");
        round_trip(&ValuePool::file_backed(shape, &path).unwrap());
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            (shape.elems().unwrap() * 4) as u64
        );
    }

    #[test]
    fn impossible_sizes_are_errors() {
        let shape = PoolShape {
            layers: usize::MAX,
            seqs: 2,
            kv_heads: 2,
            chunks: 5,
            chunk_elems: 24,
        };
        assert!(ValuePool::anonymous(shape).is_err());
    }
}
