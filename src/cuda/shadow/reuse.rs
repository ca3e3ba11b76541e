//! Stage 2 of the decode step, the reuse diff (kernels/reuse.cu; reference
//! [`crate::shadow::reuse::SlotTable::plan`]), on the device: no host round trip. With a
//! GPU value tier it also looks each miss up in the tier and keeps the tier's table.

use super::buffers::{ShadowTable, StepScratch};
use crate::cuda::ops::{check_len, kernel_params, CudaOps};
use anyhow::{ensure, Result};
use cudarc::driver::{DevicePtr, DevicePtrMut, LaunchConfig};

const REUSE_THREADS: u32 = 256;

impl CudaOps {
    /// Updates every head's slot table to hold exactly its selected chunks
    /// (`s.selected`, as [`CudaOps::shadow_select`] writes them): hits keep their slot,
    /// the misses (in ascending chunk order) take the freed slots in ascending order.
    /// Writes each head's misses to `s.misses` `[batch, kv_heads, S]` as (slot, chunk)
    /// pairs and their number to `s.miss_count`; of them the first `s.fetch_count` are
    /// to fetch from the host pool, the other `s.tier_count` are in the GPU value tier
    /// (their entries in `s.tier_src`; none without a tier). Adds the slot hits to
    /// `s.hits[0]` and the tier hits to `s.hits[1]`.
    pub fn shadow_reuse(&self, t: &ShadowTable, s: &mut StepScratch) -> Result<()> {
        let l = t.layout();
        ensure!(
            s.layout() == l && s.batch() >= t.batch(),
            "reuse: scratch for {} sequences of {:?}, the batch is {} of {l:?}",
            s.batch(),
            s.layout(),
            t.batch()
        );
        let heads = t.batch() * l.kv_heads;
        check_len("reuse: selection", s.selected.len(), heads * l.slots)?;
        check_len("reuse: hit counters", s.hits.len(), 2)?;
        let smem = 3 * l.slots * 4;
        ensure!(smem <= 48 * 1024, "reuse: {} slots per head (at most 4096)", l.slots);
        let st = self.device().stream();
        let (mp, _g1) = s.misses.device_ptr_mut(st);
        let (cp, _g2) = s.miss_count.device_ptr_mut(st);
        let (fp, _g3) = s.fetch_count.device_ptr_mut(st);
        let (tcp, _g4) = s.tier_count.device_ptr_mut(st);
        let (tsp, _g5) = s.tier_src.device_ptr_mut(st);
        let (tbp, _g6) = s.tier_base.device_ptr_mut(st);
        let (hp, _g7) = s.hits.device_ptr_mut(st);
        let (sp, _g8) = s.selected.device_ptr(st);
        let (addrs, _) = t.device_arrays();
        let dims = l.dims();
        let cfg = LaunchConfig {
            grid_dim: t.head_grid(),
            block_dim: (REUSE_THREADS, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        // SAFETY: the scratch was made for this layout and at least this batch (checked),
        // so every output holds what the batch needs; the table's slot tables and tiers
        // match its layout (checked when it was made).
        unsafe {
            self.launch_pdl(
                &self.k.shadow_reuse,
                cfg,
                &mut kernel_params![&mp, &cp, &fp, &tcp, &tsp, &tbp, &hp, &sp, &addrs, &dims],
            )
        }
    }
}
