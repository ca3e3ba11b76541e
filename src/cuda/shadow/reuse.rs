//! Stage 2 of the decode step, the reuse diff (kernels/reuse.cu; reference
//! [`crate::shadow::reuse::SlotTable::plan`]), on the device: no host round trip.

use super::buffers::ShadowTable;
use crate::cuda::ops::{check_len, kernel_params, CudaOps};
use anyhow::{ensure, Result};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, LaunchConfig};

const REUSE_THREADS: u32 = 256;

impl CudaOps {
    /// Updates every head's slot table to hold exactly its `selected` chunks (as
    /// [`CudaOps::shadow_top_k`] writes them): hits keep their slot, the misses (in
    /// ascending chunk order) take the freed slots in ascending order. Writes the
    /// misses to `misses` `[batch, kv_heads, S]` as (slot, chunk) pairs, their number
    /// to `miss_count` `[batch, kv_heads]`, and adds the hits to `hits[0]`.
    pub fn shadow_reuse(
        &self,
        t: &ShadowTable,
        selected: &CudaSlice<i32>,
        misses: &mut CudaSlice<i32>,
        miss_count: &mut CudaSlice<i32>,
        hits: &mut CudaSlice<u64>,
    ) -> Result<()> {
        let l = t.layout();
        let heads = t.batch() * l.kv_heads;
        check_len("reuse: selection", selected.len(), heads * l.slots)?;
        check_len("reuse: misses", misses.len(), heads * l.slots * 2)?;
        check_len("reuse: miss counts", miss_count.len(), heads)?;
        check_len("reuse: hit counter", hits.len(), 1)?;
        let smem = 3 * l.slots * 4;
        ensure!(smem <= 48 * 1024, "reuse: {} slots per head (at most 4096)", l.slots);
        let s = self.device().stream();
        let (mp, _g1) = misses.device_ptr_mut(s);
        let (cp, _g2) = miss_count.device_ptr_mut(s);
        let (hp, _g3) = hits.device_ptr_mut(s);
        let (sp, _g4) = selected.device_ptr(s);
        let (addrs, _) = t.device_arrays(self);
        let dims = l.dims();
        let cfg = LaunchConfig {
            grid_dim: t.head_grid(),
            block_dim: (REUSE_THREADS, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        // SAFETY: the outputs and the selection hold what the batch needs (checked); the
        // table's slot tables match its layout (checked when it was made).
        unsafe {
            self.launch_pdl(
                &self.k.shadow_reuse,
                cfg,
                &mut kernel_params![&mp, &cp, &hp, &sp, &addrs, &dims],
            )
        }
    }
}
