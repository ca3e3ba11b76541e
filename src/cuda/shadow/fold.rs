//! Folding the oldest recent chunk into the sparse region (kernels/fold.cu; reference
//! [`crate::shadow::ShadowSeq`]'s fold), so that generation runs to the context limit.

use super::buffers::ShadowTable;
use super::layout::DevicePool;
use crate::cuda::ops::{check_len, i32_of, kernel_params, CudaOps};
use anyhow::{ensure, Result};
use cudarc::driver::LaunchConfig;

const FOLD_THREADS: u32 = 256;
/// Basis rows a block of `shadow_fold_project` computes (a warp each).
const FOLD_WARPS: usize = FOLD_THREADS as usize / 32;

/// Whether any sequence of `t` has a full recent window, i.e. whether
/// [`CudaOps::shadow_fold`] has work.
pub(crate) fn any_window_full(t: &ShadowTable) -> bool {
    let full = t.layout().recent_rows() as i32;
    t.counts().iter().any(|c| c.recent == full)
}

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
    /// With a host-written pool (a file the device cannot address: `pool.host` is 0)
    /// the values of sequences in host slots go to `outbox` instead, (device address,
    /// bytes) of `batch · kv_heads` chunks ([`super::layout::ShadowLayout::value_chunk_bytes`] each),
    /// entry `b · kv_heads + h` for head `h` of the table's sequence `b`, for the host to
    /// copy into the pool.
    ///
    /// # Safety
    /// `pool.host` must be the device-mapped address of a live allocation of
    /// `pool.shape` (or 0 with an outbox), not accessed by the host while the kernels
    /// run, `pool.dev` the address of a live device allocation of `pool.dev_shape()`,
    /// and `outbox` device-writable memory of its length that nothing else touches
    /// meanwhile.
    pub unsafe fn shadow_fold(
        &self,
        t: &ShadowTable,
        pool: &DevicePool,
        layer: usize,
        outbox: Option<(u64, usize)>,
    ) -> Result<()> {
        let l = t.layout();
        let out = match outbox {
            Some((addr, len)) => {
                check_len("fold: outbox", len, t.batch() * l.kv_heads * l.value_chunk_bytes())?;
                ensure!(addr % 16 == 0, "fold: outbox address {addr:#x} is not 16-byte aligned");
                addr
            }
            None => 0,
        };
        // With an outbox the kernel writes no host slot: check the rest as if there.
        let checked = match (pool.host, out) {
            (0, o) if o != 0 => DevicePool { host: o, ..*pool },
            _ => *pool,
        };
        checked.check(l, layer, t.counts())?;
        let full = l.recent_rows() as i32;
        for (i, c) in t.counts().iter().enumerate() {
            ensure!(
                c.recent != full || (c.chunks as usize) < l.chunk_cap,
                "fold: sequence {i} already holds {} chunks, the most it can",
                c.chunks
            );
        }
        if !any_window_full(t) {
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
                &mut kernel_params![&addrs, &counts, &dims, &kp, &li, &out],
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
