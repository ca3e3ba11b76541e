//! The host value pool of GPU ShadowKV: a bf16 [`ValuePool`] registered with the driver
//! and mapped into the device's address space, so that the kernels write a prefill's
//! values and read the missed chunks straight from host memory.

use super::fetch::HostMapping;
use super::layout::{DevicePool, ShadowLayout};
use crate::cuda::CudaOps;
use crate::pool::{PoolLease, PoolShape, ValuePool, ValueType};
use anyhow::{ensure, Context, Result};
use half::bf16;

/// A bf16 value pool the device reads and writes.
pub struct GpuValuePool {
    // Declared first: unregistered (dropped) before the pool's memory goes.
    mapping: HostMapping<'static, bf16>,
    pool: ValuePool,
}

impl GpuValuePool {
    /// Registers `pool` (bf16 values) with the device of `ops`.
    pub fn new(ops: &CudaOps, pool: ValuePool) -> Result<Self> {
        ensure!(
            pool.value_type() == ValueType::Bf16,
            "the GPU reads bf16 value pools, this one holds {:?}",
            pool.value_type()
        );
        let n = pool.bytes() / 2;
        // SAFETY: the pool's memory holds n bf16 values (page-aligned) and lives as long
        // as `pool`, which this struct keeps and drops after the mapping; the host only
        // touches it through leases, which the device's users coordinate with.
        let mem: &'static mut [bf16] = unsafe { std::slice::from_raw_parts_mut(pool.base_ptr().cast(), n) };
        let mapping = HostMapping::new(ops, mem).with_context(|| {
            format!(
                "pinning the value pool ({:.1} GiB) for the GPU",
                pool.bytes() as f64 / (1u64 << 30) as f64
            )
        })?;
        Ok(GpuValuePool { mapping, pool })
    }

    /// The pool.
    pub fn pool(&self) -> &ValuePool {
        &self.pool
    }

    /// Takes a free sequence slot.
    pub fn lease(&self) -> Result<PoolLease> {
        self.pool.lease()
    }

    /// The pool as the kernels see it.
    pub fn device(&self) -> DevicePool {
        DevicePool {
            addr: self.mapping.device_addr(),
            shape: self.pool.shape(),
        }
    }

    /// The shape of a pool for `seqs` sequences of `layout` over `layers` layers.
    pub fn shape_for(layout: &ShadowLayout, layers: usize, seqs: usize) -> PoolShape {
        PoolShape {
            layers,
            seqs,
            kv_heads: layout.kv_heads,
            chunks: layout.chunk_cap,
            chunk_elems: layout.chunk * layout.head_dim,
        }
    }
}
