//! Stage 3a of the decode step, the key rebuild of the missed chunks
//! (kernels/rebuild.cu; reference [`crate::shadow::factor::LowRank::rebuild`] then
//! [`crate::cpu::ops::Rope`]).

use super::buffers::ShadowTable;
use super::layout::MAX_CHUNK;
use crate::cuda::ops::{check_len, kernel_params, CudaOps};
use anyhow::Result;
use cudarc::driver::{CudaSlice, DevicePtr, LaunchConfig};

/// Rows one rebuild block computes (`REBUILD_ROWS` of kernels/rebuild.cu): the rows of
/// `REBUILD_ROWS / chunk` misses.
const REBUILD_ROWS: usize = 128;
/// Threads of a rebuild block (`REBUILD_THREADS`: 8 warps).
const REBUILD_THREADS: u32 = 256;
const _: () = assert!(REBUILD_ROWS >= MAX_CHUNK, "a block holds the rows of one miss at least");

impl CudaOps {
    /// Rebuilds the keys of every miss (as [`CudaOps::shadow_reuse`] lists them) into its
    /// slot of `ak`: the chunk's rows of `u · sv` for the head, rotated at the tokens'
    /// positions with `inv_freq` (`d/2` values, [`crate::cuda::rope_inv_freq`]).
    pub fn shadow_rebuild(
        &self,
        t: &ShadowTable,
        misses: &CudaSlice<i32>,
        miss_count: &CudaSlice<i32>,
        inv_freq: &impl DevicePtr<f32>,
    ) -> Result<()> {
        let l = t.layout();
        let heads = t.batch() * l.kv_heads;
        check_len("rebuild: misses", misses.len(), heads * l.slots * 2)?;
        check_len("rebuild: miss counts", miss_count.len(), heads)?;
        check_len("rebuild: inv_freq", inv_freq.len(), l.head_dim / 2)?;
        let s = self.device().stream();
        let (mp, _g1) = misses.device_ptr(s);
        let (cp, _g2) = miss_count.device_ptr(s);
        let (fp, _g3) = inv_freq.device_ptr(s);
        let (addrs, counts) = t.device_arrays(self);
        let dims = l.dims();
        let (kvh, batch, _) = t.head_grid();
        // A block per REBUILD_ROWS / chunk entries of each head's miss list (blocks past
        // a head's misses return at once); the layout keeps the chunk in 1..=MAX_CHUNK.
        let per_block = REBUILD_ROWS / l.chunk;
        let cfg = LaunchConfig {
            grid_dim: (l.slots.div_ceil(per_block) as u32, kvh, batch),
            block_dim: (REBUILD_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the miss lists and inv_freq hold what the batch needs (checked); the
        // table's buffers match its layout (checked when it was made); the miss lists
        // name slots below S and chunks whose rows of u are inside the buffer, as
        // shadow_reuse writes them from shadow_top_k's selection.
        unsafe {
            self.launch_pdl(
                &self.k.shadow_rebuild,
                cfg,
                &mut kernel_params![&mp, &cp, &addrs, &counts, &fp, &dims],
            )
        }
    }
}
