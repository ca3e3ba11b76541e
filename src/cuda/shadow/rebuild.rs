//! Stage 3a of the decode step, the key rebuild of the missed chunks
//! (kernels/rebuild.cu; reference [`crate::shadow::factor::LowRank::rebuild`] then
//! [`crate::cpu::ops::Rope`]).

use super::buffers::ShadowTable;
use super::layout::MAX_CHUNK;
use crate::cuda::ops::{check_len, kernel_params, CudaOps};
use anyhow::{ensure, Context, Result};
use cudarc::driver::sys::{CUdevice_attribute_enum, CUfunction_attribute_enum};
use cudarc::driver::{CudaSlice, DevicePtr, LaunchConfig};

/// Rows of a rebuild tile (`REBUILD_ROWS` of kernels/rebuild.cu): the rows of
/// `REBUILD_ROWS / chunk` misses.
const REBUILD_ROWS: usize = 256;
/// Threads of a rebuild block (`REBUILD_THREADS`: 16 warps).
const REBUILD_THREADS: u32 = 512;
/// Ranks of u a pipeline stage holds (`REBUILD_K_CHUNK`).
const REBUILD_K_CHUNK: usize = 32;
/// Ranks × columns of a head's sv a block keeps in shared memory
/// (`REBUILD_SV_RANK_COLS`: rank 160 at d = 128).
const REBUILD_SV_RANK_COLS: usize = 160 * 128;
/// u stages of the rebuild's ring (`REBUILD_STAGES`), where a block may have the shared
/// memory; `REBUILD_STAGES_SMALL` otherwise (the A100's 163 KB).
const REBUILD_STAGES: usize = 5;
/// See [`REBUILD_STAGES`].
const REBUILD_STAGES_SMALL: usize = 3;
/// Shared memory of a u stage (`REBUILD_STAGE_BYTES`: rows of 40 bf16).
const REBUILD_STAGE_BYTES: usize = REBUILD_ROWS * (REBUILD_K_CHUNK + 8) * 2;
/// Shared memory of a tile's row table (`REBUILD_TABLE_BYTES`: tok and arow).
const REBUILD_TABLE_BYTES: usize = 2 * REBUILD_ROWS * 4;
const _: () = assert!(REBUILD_ROWS >= MAX_CHUNK, "a tile holds the rows of one miss at least");

/// Dynamic shared memory of a rebuild block of `stages` u stages, as `rb_smem` of
/// kernels/rebuild.cu lays it out: the u ring, a panel of sv's hi and lo terms (the whole
/// rank up to `REBUILD_SV_RANK_COLS / d`), `stages + 1` row tables, each sequence's u and
/// ak addresses and `lists + 1` tile offsets.
fn rebuild_smem(head_dim: usize, rank: usize, batch: usize, lists: usize, stages: usize) -> usize {
    let panel = rank
        .next_multiple_of(REBUILD_K_CHUNK)
        .min(REBUILD_SV_RANK_COLS / head_dim);
    stages * REBUILD_STAGE_BYTES
        + 2 * panel * (head_dim + 8) * 2
        + (stages + 1) * REBUILD_TABLE_BYTES
        + batch * 16
        + (lists + 1) * 4
}

impl CudaOps {
    /// Rebuilds the keys of every miss (as [`CudaOps::shadow_reuse`] lists them) into its
    /// slot of `ak`: the chunk's rows of `u · sv` for the head, rotated at the tokens'
    /// positions with `inv_freq` (`d/2` values, [`crate::cuda::rope_inv_freq`]), on
    /// [`CudaOps::shadow_rebuild_blocks`] blocks.
    pub fn shadow_rebuild(
        &self,
        t: &ShadowTable,
        misses: &CudaSlice<i32>,
        miss_count: &CudaSlice<i32>,
        inv_freq: &impl DevicePtr<f32>,
    ) -> Result<()> {
        let blocks = self.shadow_rebuild_blocks(t)?;
        self.shadow_rebuild_on(t, misses, miss_count, inv_freq, blocks)
    }

    /// Blocks [`CudaOps::shadow_rebuild`] launches for the batch: as many as the device
    /// holds at once at the kernel's shared memory, fewer where the heads' largest miss
    /// lists make fewer tiles.
    pub fn shadow_rebuild_blocks(&self, t: &ShadowTable) -> Result<usize> {
        let l = t.layout();
        let (smem, _) = self.rebuild_allow_smem(t)?;
        let per_sm = self
            .k
            .shadow_rebuild
            .occupancy_max_active_blocks_per_multiprocessor(REBUILD_THREADS, smem, None)
            .context("rebuild: occupancy")?;
        let resident = self.device().info().sm_count as usize * per_sm.max(1) as usize;
        let most_tiles = t.batch() * l.kv_heads * l.slots.div_ceil(REBUILD_ROWS / l.chunk);
        Ok(resident.min(most_tiles).clamp(1, 65_535))
    }

    /// [`CudaOps::shadow_rebuild`] on `blocks` blocks (1..=65535): the batch's tiles of
    /// `256 / chunk` misses, in list order, are shared evenly among them.
    pub fn shadow_rebuild_on(
        &self,
        t: &ShadowTable,
        misses: &CudaSlice<i32>,
        miss_count: &CudaSlice<i32>,
        inv_freq: &impl DevicePtr<f32>,
        blocks: usize,
    ) -> Result<()> {
        let l = t.layout();
        let heads = t.batch() * l.kv_heads;
        check_len("rebuild: misses", misses.len(), heads * l.slots * 2)?;
        check_len("rebuild: miss counts", miss_count.len(), heads)?;
        check_len("rebuild: inv_freq", inv_freq.len(), l.head_dim / 2)?;
        ensure!((1..=65_535).contains(&blocks), "rebuild: {blocks} blocks (1..=65535)");
        let (smem, stages) = self.rebuild_allow_smem(t)?;
        let stages = stages as i32;
        let s = self.device().stream();
        let (mp, _g1) = misses.device_ptr(s);
        let (cp, _g2) = miss_count.device_ptr(s);
        let (fp, _g3) = inv_freq.device_ptr(s);
        let (addrs, counts) = t.device_arrays();
        let dims = l.dims();
        let batch = t.batch() as i32;
        let cfg = LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (REBUILD_THREADS, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        // SAFETY: the miss lists and inv_freq hold what the batch needs (checked); the
        // table's buffers match its layout (checked when it was made) and hold `batch`
        // sequences; the miss lists name slots below S and chunks whose rows of u are
        // inside the buffer, as shadow_reuse writes them from shadow_top_k's selection
        // (the kernel skips any other entry); the shared memory is what the kernel lays
        // out for this layout and batch (allowed above).
        unsafe {
            self.launch_pdl(
                &self.k.shadow_rebuild,
                cfg,
                &mut kernel_params![&mp, &cp, &addrs, &counts, &fp, &dims, &batch, &stages],
            )
        }
    }

    /// Picks the u stages of the rebuild for `t` (`REBUILD_STAGES` where a block may have
    /// the shared memory, else `REBUILD_STAGES_SMALL`) and lets the kernel use the dynamic
    /// shared memory they take (over the default 48 KiB), preferring shared memory to L1
    /// (one block an SM). Returns (bytes, stages).
    fn rebuild_allow_smem(&self, t: &ShadowTable) -> Result<(usize, usize)> {
        let l = t.layout();
        let lists = t.batch() * l.kv_heads;
        let f = &self.k.shadow_rebuild;
        self.device().context().bind_to_thread()?;
        let most = self
            .device()
            .context()
            .attribute(CUdevice_attribute_enum::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
            .context("rebuild: reading the shared memory a block may have")?;
        let fixed = f
            .shared_size_bytes()
            .context("rebuild: reading the kernel's shared memory")?;
        let room = (most - fixed).max(0) as usize;
        let smem_of = |stages| rebuild_smem(l.head_dim, l.rank, t.batch(), lists, stages);
        let stages = if smem_of(REBUILD_STAGES) <= room {
            REBUILD_STAGES
        } else {
            REBUILD_STAGES_SMALL
        };
        let smem = smem_of(stages);
        f.set_attribute(
            CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            smem as i32,
        )
        .with_context(|| format!("rebuild: allowing {smem} bytes of shared memory per block"))?;
        f.set_attribute(
            CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT,
            100,
        )
        .context("rebuild: preferring shared memory to L1")?;
        Ok((smem, stages))
    }
}
