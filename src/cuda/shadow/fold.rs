//! Folding the oldest recent chunk into the sparse region (kernels/fold.cu; reference
//! [`crate::shadow::ShadowSeq`]'s fold), so that generation runs to the context limit.

use super::buffers::ShadowTable;
use super::layout::DevicePool;
use crate::cuda::ops::{i32_of, kernel_params, CudaOps};
use anyhow::{ensure, Result};
use cudarc::driver::LaunchConfig;

const FOLD_THREADS: u32 = 256;
/// Basis rows a block of `shadow_fold_project` computes (a warp each).
const FOLD_WARPS: usize = FOLD_THREADS as usize / 32;

impl CudaOps {
    /// Folds every sequence of `t` whose recent window is full (`n = R` tokens; the
    /// others are left alone, and nothing is launched where none is full): its oldest chunk becomes sparse chunk `chunks` — the
    /// landmark of its post-RoPE keys joins `marks`, its values go to layer `layer` of
    /// the value pool holding its slot (the host pool, written by the device through its
    /// mapped address, or the GPU value slots' pool),
    /// its pre-RoPE keys' coefficients on the basis join `u`, and it is no outlier —
    /// then the other recent rows move down by one chunk. The caller then counts
    /// `n = R - c` and `chunks + 1` for those sequences ([`ShadowTable::set_counts`]).
    ///
    /// # Safety
    /// `pool.host` must be the device-mapped address of a live allocation of
    /// `pool.shape`, not accessed by the host while the kernels run, and `pool.dev` the
    /// address of a live device allocation of `pool.dev_shape()`.
    pub unsafe fn shadow_fold(&self, t: &ShadowTable, pool: &DevicePool, layer: usize) -> Result<()> {
        let l = t.layout();
        pool.check(l, layer, t.counts())?;
        let full = l.recent_rows() as i32;
        for (i, c) in t.counts().iter().enumerate() {
            ensure!(
                c.recent != full || (c.chunks as usize) < l.chunk_cap,
                "fold: sequence {i} already holds {} chunks, the most it can",
                c.chunks
            );
        }
        if t.counts().iter().all(|c| c.recent != full) {
            return Ok(());
        }
        let (addrs, counts) = t.device_arrays();
        let dims = l.dims();
        let (kp, li) = (pool.kernel(), i32_of("layer", layer)?);
        let heads = LaunchConfig {
            grid_dim: t.head_grid(),
            block_dim: (FOLD_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let basis_rows = LaunchConfig {
            grid_dim: (l.rank.div_ceil(FOLD_WARPS) as u32, t.batch() as u32, 1),
            ..heads
        };
        // SAFETY: the folding sequences have room for one more chunk in their buffers
        // (checked here) and in the pool (which serves the layout, layer and their pool
        // slots: checked); the buffers match the layout (checked when the table was
        // made); the pools' addresses are the caller's contract. The three kernels run in
        // stream order, the shift last.
        unsafe {
            self.launch_pdl(
                &self.k.shadow_fold_chunk,
                heads,
                &mut kernel_params![&addrs, &counts, &dims, &kp, &li],
            )?;
            self.launch_pdl(
                &self.k.shadow_fold_project,
                basis_rows,
                &mut kernel_params![&addrs, &counts, &dims],
            )?;
            self.launch_pdl(
                &self.k.shadow_fold_shift,
                heads,
                &mut kernel_params![&addrs, &counts, &dims],
            )
        }
    }
}
