//! Stage 3a of the decode step, the key rebuild of the missed chunks
//! (kernels/rebuild.cu; reference [`crate::shadow::factor::LowRank::rebuild`] then
//! [`crate::cpu::ops::Rope`]).

use super::buffers::{ShadowTable, StepScratch};
use super::layout::{ShadowLayout, MAX_CHUNK};
use crate::cuda::ops::{check_len, kernel_params, CudaOps};
use anyhow::{ensure, Context, Result};
use cudarc::driver::sys::CUfunction_attribute_enum;
use cudarc::driver::{CudaSlice, DevicePtr, LaunchConfig};

/// Rows of a rebuild tile (`REBUILD_ROWS` of kernels/rebuild.cu): the rows of
/// `REBUILD_ROWS / chunk` misses.
const REBUILD_ROWS: usize = 128;
/// Threads of a rebuild block (`REBUILD_THREADS`: 8 warps).
const REBUILD_THREADS: u32 = 256;
/// A panel's ranks are a multiple of this (`REBUILD_K_CHUNK`).
const REBUILD_K_CHUNK: usize = 32;
/// Ranks of sv and of a tile's codes a block keeps in shared memory at most
/// (`REBUILD_PANEL_RANKS`).
const REBUILD_PANEL_RANKS: usize = 320;
/// Shared memory of two tiles' row tables and a ring of three tiles
/// (`REBUILD_META_BYTES`: tokens, attention rows, tier entries and coefficient scales; 32
/// bytes a tile).
const REBUILD_META_BYTES: usize = 8 * REBUILD_ROWS * 4 + 96;
const _: () = assert!(REBUILD_ROWS >= MAX_CHUNK, "a tile holds the rows of one miss at least");

/// Dynamic shared memory of a rebuild block, as `rb_smem` of kernels/rebuild.cu lays it
/// out: two tiles' 8-bit codes of a panel of ranks (rows of `panel + 16` bytes), the
/// panel of sv in fp16 (the whole rank up to `REBUILD_PANEL_RANKS`), with a GPU value
/// tier a tile's tier hits (the chunks of `REBUILD_ROWS / chunk` misses), the row tables
/// and `lists + 1` tile offsets.
fn rebuild_smem(l: &ShadowLayout, lists: usize) -> usize {
    let panel = l.rank.next_multiple_of(REBUILD_K_CHUNK).min(REBUILD_PANEL_RANKS);
    let tier = if l.tier > 0 {
        REBUILD_ROWS / l.chunk * l.value_chunk_bytes()
    } else {
        0
    };
    2 * REBUILD_ROWS * (panel + 16) + panel * (l.head_dim + 8) * 2 + tier + REBUILD_META_BYTES + (lists + 1) * 4
}

/// The misses a rebuild works on: each list's `(slot, chunk)` entries and count (as
/// [`CudaOps::shadow_reuse`] writes them), and, where the layout has a GPU value tier and
/// the tier hits' values are to be copied beside the keys, each list's fetch count (the
/// tier hits follow the fetched misses) and each hit's tier entry.
#[derive(Clone, Copy)]
pub struct RebuildLists<'a> {
    /// `[batch, kv_heads, S]` pairs `(slot, chunk)`.
    pub misses: &'a CudaSlice<i32>,
    /// `[batch, kv_heads]` entries of each list.
    pub miss_count: &'a CudaSlice<i32>,
    /// `(fetch_count, tier_src)`, `[batch, kv_heads]` and `[batch, kv_heads, S]`: copy
    /// the tier hits' values to their slots of `av`; `None`, keys only.
    pub tier_hits: Option<(&'a CudaSlice<i32>, &'a CudaSlice<i32>)>,
}

impl<'a> RebuildLists<'a> {
    /// A step's lists from its scratch, the tier hits with them where the layout has a
    /// tier.
    pub fn of_step(s: &'a StepScratch) -> Self {
        Self {
            misses: &s.misses,
            miss_count: &s.miss_count,
            tier_hits: (s.layout().tier > 0).then_some((&s.fetch_count, &s.tier_src)),
        }
    }

    /// Keys only, for the given lists.
    pub fn keys(misses: &'a CudaSlice<i32>, miss_count: &'a CudaSlice<i32>) -> Self {
        Self {
            misses,
            miss_count,
            tier_hits: None,
        }
    }
}

impl CudaOps {
    /// Rebuilds the keys of every miss of `lists` into its slot of `ak`: the chunk's rows
    /// of `u · sv` for the head (each token's 8-bit coefficients times its scale), rotated at the tokens' positions with `inv_freq` (`d/2`
    /// values, [`crate::cuda::rope_inv_freq`]), on [`CudaOps::shadow_rebuild_blocks`]
    /// blocks; and, given tier hits, copies their values from the GPU value tier to their
    /// slots of `av`. May run beside the fetch of the same step: the reuse diff gave that
    /// fetch other slots and tier entries.
    pub fn shadow_rebuild(
        &self,
        t: &ShadowTable,
        lists: RebuildLists<'_>,
        inv_freq: &impl DevicePtr<f32>,
    ) -> Result<()> {
        let blocks = self.shadow_rebuild_blocks(t, 0)?;
        self.shadow_rebuild_on(t, lists, inv_freq, blocks)
    }

    /// Blocks [`CudaOps::shadow_rebuild`] launches for the batch: as many as the device
    /// holds at once at the kernel's shared memory less `room` (what a kernel running
    /// beside it needs: the rebuild's blocks stay resident until it is done), fewer where
    /// the heads' largest miss lists make fewer tiles; at least one.
    pub fn shadow_rebuild_blocks(&self, t: &ShadowTable, room: usize) -> Result<usize> {
        let l = t.layout();
        let lists = t.batch() * l.kv_heads;
        let smem = self.rebuild_allow_smem(rebuild_smem(l, lists))?;
        let per_sm = self
            .k
            .shadow_rebuild
            .occupancy_max_active_blocks_per_multiprocessor(REBUILD_THREADS, smem, None)
            .context("rebuild: occupancy")?;
        let resident = self.device().info().sm_count as usize * per_sm.max(1) as usize;
        let most_tiles = lists * l.slots.div_ceil(REBUILD_ROWS / l.chunk);
        Ok(resident.saturating_sub(room).min(most_tiles).clamp(1, 65_535))
    }

    /// [`CudaOps::shadow_rebuild`] on `blocks` blocks (1..=65535): the batch's tiles of
    /// `128 / chunk` misses, in list order, are shared evenly among them.
    pub fn shadow_rebuild_on(
        &self,
        t: &ShadowTable,
        lists: RebuildLists<'_>,
        inv_freq: &impl DevicePtr<f32>,
        blocks: usize,
    ) -> Result<()> {
        let l = t.layout();
        let heads = t.batch() * l.kv_heads;
        check_len("rebuild: misses", lists.misses.len(), heads * l.slots * 2)?;
        check_len("rebuild: miss counts", lists.miss_count.len(), heads)?;
        if let Some((fetch_count, tier_src)) = lists.tier_hits {
            ensure!(l.tier > 0, "rebuild: tier hits to copy without a GPU value tier");
            check_len("rebuild: fetch counts", fetch_count.len(), heads)?;
            check_len("rebuild: tier sources", tier_src.len(), heads * l.slots)?;
        }
        check_len("rebuild: inv_freq", inv_freq.len(), l.head_dim / 2)?;
        ensure!((1..=65_535).contains(&blocks), "rebuild: {blocks} blocks (1..=65535)");
        let smem = self.rebuild_allow_smem(rebuild_smem(l, heads))?;
        let s = self.device().stream();
        let (mp, _g1) = lists.misses.device_ptr(s);
        let (cp, _g2) = lists.miss_count.device_ptr(s);
        let (fp, _g3) = inv_freq.device_ptr(s);
        let tier = lists.tier_hits.map(|(f, src)| (f.device_ptr(s), src.device_ptr(s)));
        let (fcp, tsp) = tier.as_ref().map_or((0, 0), |((f, _), (src, _))| (*f, *src));
        let (addrs, counts) = t.device_arrays();
        let dims = l.dims();
        let batch = t.batch() as i32;
        let cfg = LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (REBUILD_THREADS, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        // SAFETY: the lists and inv_freq hold what the batch needs (checked); the table's
        // buffers match its layout (checked when it was made) and hold `batch` sequences;
        // the miss lists name slots below S and chunks whose rows of u are inside the
        // buffer, as shadow_reuse writes them from shadow_select's selection (the kernel
        // skips any other entry, and clamps tier entries to the tier); the shared memory
        // is what the kernel lays out for this layout and batch (allowed above).
        unsafe {
            self.launch_pdl(
                &self.k.shadow_rebuild,
                cfg,
                &mut kernel_params![&mp, &cp, &fcp, &tsp, &addrs, &counts, &fp, &dims, &batch],
            )
        }
    }

    /// Lets the rebuild kernel use `smem` bytes of dynamic shared memory (over the
    /// default 48 KiB), preferring shared memory to L1 so that two blocks fit an SM.
    fn rebuild_allow_smem(&self, smem: usize) -> Result<usize> {
        let f = &self.k.shadow_rebuild;
        self.device().context().bind_to_thread()?;
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
        Ok(smem)
    }
}
