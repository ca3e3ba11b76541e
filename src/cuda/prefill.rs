//! Causal flash attention for prefill chunks (kernels/flash_prefill.cu).
//!
//! Each sequence of a [`KvTable`] brings `q_rows[b]` new query rows, consecutive in
//! `q`; its cache already holds them (`len_b` tokens, this chunk included), so query
//! `i` sits at position `len_b − q_rows[b] + i` and attends to keys `0..=position`,
//! earlier chunks included. The work is cut into tiles of up to [`PrefillConfig::rows`]
//! query rows of one sequence, and each tile's keys into pieces of
//! [`PrefillSplit::keys`]; a block runs one piece for one query head, tensor cores for
//! both products and an online softmax in registers (FlashAttention-2).
//!
//! The split keeps every block short (about 110 µs on an H200 at head dimension 128,
//! where a whole 60K-key tile took about 3 ms), so that decode kernels on a
//! higher-priority stream get multiprocessors soon (issue 10). A tile of one piece
//! writes the output directly; the pieces of a longer tile write unnormalised partial
//! results with their row maxima and sums to a workspace, and a merge kernel combines
//! them (log-sum-exp). The workspace belongs to the [`CudaOps`] (one per stream), grows
//! on demand and is bounded: pieces launch in groups of at most
//! [`PrefillSplit::group_pieces`] workspace slots, a split launch and a merge per group.
//!
//! The plan ([`prefill_tiles`], then [`prefill_plan`]: tiles, pieces, groups) is built
//! on the host, longest pieces first within each launch so that the short ones fill
//! its tail, and uploaded with [`PrefillTiles::new`]; [`CudaOps::flash_prefill`] does
//! both per call, [`CudaOps::flash_prefill_tiles`] reuses one table (every layer of a
//! forward pass has the same one).

use super::attention::KvTable;
use super::ops::CudaOps;
use crate::cpu::attention::AttnShape;
use anyhow::{anyhow, ensure, Context, Result};
use cudarc::driver::sys::CUfunction_attribute_enum;
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};
use half::bf16;
use std::ops::Range;

/// The kernel configuration of one head dimension (`FP_KERNEL` in
/// kernels/flash_prefill.cu; keep the two in step).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrefillConfig {
    /// Query rows per block (tile).
    pub rows: usize,
    /// Keys per K/V tile in shared memory.
    pub keys: usize,
    /// K/V tiles in the shared-memory ring.
    pub stages: usize,
    /// Threads per block.
    pub threads: u32,
    /// How tiles' keys are split across blocks.
    pub split: PrefillSplit,
}

/// How the keys of a tile are split into pieces, one block each (see the module
/// documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrefillSplit {
    /// Keys per piece, a multiple of [`PrefillConfig::keys`]; a tile of at most this
    /// many keys is one piece and writes the output directly.
    pub keys: usize,
    /// Workspace slots (pieces of split tiles) of one launch; each slot holds a
    /// partial result of [`PrefillConfig::rows`] rows for every query head. A tile that
    /// would need more slots alone gets longer pieces.
    pub group_pieces: usize,
}

/// Most blocks a launch has along y (the pieces of one group).
const MAX_GRID_Y: usize = 65_535;
/// Threads of a merge block (`flash_prefill_merge` in kernels/flash_prefill.cu): a
/// block merges `MERGE_THREADS / (d / 4)` rows of one tile and head.
const MERGE_THREADS: usize = 256;

impl PrefillConfig {
    /// The configuration for head dimension `d` (64 or 128).
    pub fn for_head_dim(d: usize) -> Option<PrefillConfig> {
        match d {
            // Pieces of about 110 µs on an H200: at d = 128 the kernel runs 332 TFLOP/s
            // over 264 resident blocks, ~52 ns per key for a block of 128 rows; d = 64
            // does half the work per key. 128 slots of a group are 260 MiB of workspace
            // for 32 heads of 128 (16 waves of blocks per launch).
            64 => Some(PrefillConfig {
                rows: 128,
                keys: 64,
                stages: 3,
                threads: 128,
                split: PrefillSplit {
                    keys: 4096,
                    group_pieces: 128,
                },
            }),
            128 => Some(PrefillConfig {
                rows: 128,
                keys: 32,
                stages: 3,
                threads: 128,
                split: PrefillSplit {
                    keys: 2048,
                    group_pieces: 128,
                },
            }),
            _ => None,
        }
    }

    /// Dynamic shared memory of a block: the Q tile and the K and V rings, bf16.
    pub fn shared_bytes(&self, d: usize) -> usize {
        (self.rows + 2 * self.stages * self.keys) * d * 2
    }
}

/// The tiles of one call: `[sequence, first row in q, position of that row, rows]`,
/// at most `rows_per_tile` rows each, longest context first (ties keep the order of
/// the sequences). `lens` are the cache lengths, this chunk included.
pub fn prefill_tiles(lens: &[usize], q_rows: &[usize], rows_per_tile: usize) -> Result<Vec<[i32; 4]>> {
    ensure!(rows_per_tile > 0, "tile of 0 rows");
    ensure!(
        q_rows.len() == lens.len(),
        "{} query row counts for {} sequences",
        q_rows.len(),
        lens.len()
    );
    let mut tiles = Vec::new();
    let mut row = 0usize;
    for (b, (&n, &len)) in q_rows.iter().zip(lens).enumerate() {
        ensure!(
            n <= len,
            "sequence {b}: {n} query rows but its cache holds {len} tokens (the cache must already \
             include this chunk's keys and values)"
        );
        let start = len - n;
        for i0 in (0..n).step_by(rows_per_tile) {
            let r = rows_per_tile.min(n - i0);
            tiles.push([b, row + i0, start + i0, r].map(|v| v as i32));
        }
        row += n;
    }
    ensure!(
        row <= i32::MAX as usize && lens.iter().all(|&l| l <= i32::MAX as usize),
        "{row} query rows or a cache too long for 32-bit indices"
    );
    // Longest first: the last position of a tile bounds its keys.
    tiles.sort_by_key(|t| std::cmp::Reverse(t[2] + t[3]));
    Ok(tiles)
}

/// One launch of the split kernel, and of the merge where it has split tiles.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrefillGroup {
    /// Its pieces, a range of [`PrefillPlan::pieces`].
    pub pieces: Range<usize>,
    /// Its split tiles, a range of [`PrefillPlan::merges`].
    pub merges: Range<usize>,
    /// Workspace slots its pieces use (`0..slots`).
    pub slots: usize,
}

/// The blocks of one call (per query head), as the kernels read them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PrefillPlan {
    /// `[sequence, first row in q, position of that row, rows, first key, end key,
    /// workspace slot or -1, 0]`: a tile and the keys of one of its pieces. Slot -1:
    /// the tile is this one piece and writes the output directly.
    pub pieces: Vec<[i32; 8]>,
    /// `[first row in q, rows, first slot, pieces]` of each split tile: its pieces
    /// hold slots `first slot..first slot + pieces` of their group.
    pub merges: Vec<[i32; 4]>,
    /// The launches, in order.
    pub groups: Vec<PrefillGroup>,
}

impl PrefillPlan {
    /// The most workspace slots one group uses.
    pub fn slots(&self) -> usize {
        self.groups.iter().map(|g| g.slots).max().unwrap_or(0)
    }
}

/// Splits each tile of `tiles` (from [`prefill_tiles`]; keys `0..position + rows`) into
/// pieces of `split.keys` keys, longer where the tile would otherwise need more than
/// `split.group_pieces` slots, and gathers whole tiles, in order, into groups of at
/// most `split.group_pieces` slots (and [`MAX_GRID_Y`] pieces); within a group the
/// pieces run longest first, the same key ranges of its tiles together. `kv_tile` is
/// the kernel's K/V tile ([`PrefillConfig::keys`]): piece boundaries fall on its
/// multiples.
pub fn prefill_plan(tiles: &[[i32; 4]], split: PrefillSplit, kv_tile: usize) -> Result<PrefillPlan> {
    ensure!(
        kv_tile > 0 && split.keys > 0 && split.keys % kv_tile == 0,
        "pieces of {} keys: a positive multiple of the kernel's {kv_tile}-key tile needed",
        split.keys
    );
    ensure!(
        (1..=MAX_GRID_Y).contains(&split.group_pieces),
        "groups of {} pieces (1 to {MAX_GRID_Y})",
        split.group_pieces
    );
    let mut plan = PrefillPlan::default();
    let mut group: Vec<[i32; 8]> = Vec::new();
    let mut merges_start = 0;
    let mut slots = 0;
    // Ends the group being gathered: its pieces longest first (then by first key).
    let close = |plan: &mut PrefillPlan, group: &mut Vec<[i32; 8]>, slots: &mut usize, merges_start: &mut usize| {
        if group.is_empty() {
            return;
        }
        group.sort_by_key(|p| (std::cmp::Reverse(p[5] - p[4]), p[4]));
        let start = plan.pieces.len();
        plan.pieces.append(group);
        plan.groups.push(PrefillGroup {
            pieces: start..plan.pieces.len(),
            merges: *merges_start..plan.merges.len(),
            slots: *slots,
        });
        *merges_start = plan.merges.len();
        *slots = 0;
    };
    for &[b, row0, pos0, rows] in tiles {
        ensure!(rows > 0 && pos0 >= 0, "tile {:?} without rows", [b, row0, pos0, rows]);
        let keys = (pos0 + rows) as usize;
        let len = split
            .keys
            .max(keys.div_ceil(split.group_pieces).next_multiple_of(kv_tile));
        let n = keys.div_ceil(len);
        let need = if n > 1 { n } else { 0 };
        if slots + need > split.group_pieces || group.len() + n > MAX_GRID_Y {
            close(&mut plan, &mut group, &mut slots, &mut merges_start);
        }
        if n == 1 {
            group.push([b, row0, pos0, rows, 0, keys as i32, -1, 0]);
            continue;
        }
        plan.merges.push([row0, rows, slots as i32, n as i32]);
        for p in 0..n {
            let k0 = p * len;
            let k1 = keys.min(k0 + len);
            group.push([b, row0, pos0, rows, k0 as i32, k1 as i32, (slots + p) as i32, 0]);
        }
        slots += n;
    }
    close(&mut plan, &mut group, &mut slots, &mut merges_start);
    Ok(plan)
}

/// The split workspace of one stream: partial outputs `[slots, heads, rows, d]` and
/// their `(max, sum)` pairs `[slots, heads, rows, 2]`, fp32, grown on demand and reused
/// by every later call (launches on the stream run in order).
#[derive(Default)]
pub(crate) struct PrefillWorkspace {
    o: Option<CudaSlice<f32>>,
    ml: Option<CudaSlice<f32>>,
}

impl PrefillWorkspace {
    fn ensure(&mut self, ops: &CudaOps, o: usize, ml: usize) -> Result<()> {
        if self.o.as_ref().is_none_or(|b| b.len() < o) {
            self.o = None;
            self.o = Some(
                ops.device()
                    .zeros(o)
                    .with_context(|| format!("allocating {} MiB of prefill attention workspace", (o * 4) >> 20))?,
            );
        }
        if self.ml.as_ref().is_none_or(|b| b.len() < ml) {
            self.ml = None;
            self.ml = Some(ops.device().zeros(ml)?);
        }
        Ok(())
    }
}

/// A tile table on the device for one set of sequences and chunk sizes, reusable by
/// every layer's [`CudaOps::flash_prefill_tiles`].
pub struct PrefillTiles {
    /// The plan's pieces (8 ints each), then its merges (4 ints each).
    table: CudaSlice<i32>,
    groups: Vec<PrefillGroup>,
    pieces: usize,
    slots: usize,
    count: usize,
    lens: Vec<usize>,
    q_rows: Vec<usize>,
    rows: usize,
    head_dim: usize,
}

impl PrefillTiles {
    /// Checks `q_rows` against the sequences of `kv` (one count per sequence, none
    /// above its cache length) and uploads the tiles for head dimension `head_dim`,
    /// their keys split as [`PrefillConfig::split`] says.
    pub fn new(ops: &CudaOps, kv: &KvTable, q_rows: &[usize], head_dim: usize) -> Result<PrefillTiles> {
        let cfg = config(head_dim)?;
        Self::with_split(ops, kv, q_rows, head_dim, cfg.split)
    }

    /// [`PrefillTiles::new`] with the keys split as `split` says (tests split short
    /// contexts many times).
    pub fn with_split(
        ops: &CudaOps,
        kv: &KvTable,
        q_rows: &[usize],
        head_dim: usize,
        split: PrefillSplit,
    ) -> Result<PrefillTiles> {
        let cfg = config(head_dim)?;
        let lens = kv.lens_host();
        let tiles = prefill_tiles(lens, q_rows, cfg.rows)?;
        let plan = prefill_plan(&tiles, split, cfg.keys)?;
        let flat: Vec<i32> = plan
            .pieces
            .iter()
            .flatten()
            .chain(plan.merges.iter().flatten())
            .copied()
            .collect();
        let dev = if flat.is_empty() {
            ops.device().zeros::<i32>(8)?
        } else {
            ops.device().upload(&flat)?
        };
        Ok(PrefillTiles {
            table: dev,
            slots: plan.slots(),
            pieces: plan.pieces.len(),
            groups: plan.groups,
            count: tiles.len(),
            lens: lens.to_vec(),
            q_rows: q_rows.to_vec(),
            rows: q_rows.iter().sum(),
            head_dim,
        })
    }

    /// Query rows of all sequences together (the rows of `q` and `out`).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Tiles of query rows.
    pub fn count(&self) -> usize {
        self.count
    }

    /// Pieces of the tiles' keys (blocks per query head, over all launches).
    pub fn pieces(&self) -> usize {
        self.pieces
    }

    /// Launches of the split kernel (groups of pieces).
    pub fn launches(&self) -> usize {
        self.groups.len()
    }

    /// Each sequence's query rows.
    pub fn q_rows(&self) -> &[usize] {
        &self.q_rows
    }
}

impl CudaOps {
    /// Causal GQA flash attention over each sequence's KV cache, for prefill chunks:
    /// `out[r, h·d..] = softmax(q_r,h · K_b[..=p]ᵀ / √d) · V_b[..=p]` for query row `r`
    /// of sequence `b` at position `p` (see the module documentation); query head `h`
    /// reads KV head `h / (heads / kv_heads)`. `q` and `out` are `[rows, heads·d]` bf16
    /// (`rows = Σ q_rows`), 16-byte aligned, like the caches of `kv`. `q_rows[b]` may be
    /// 0 and must not exceed sequence `b`'s length.
    pub fn flash_prefill(
        &self,
        out: &mut impl DevicePtrMut<bf16>,
        q: &impl DevicePtr<bf16>,
        kv: &KvTable,
        q_rows: &[usize],
        shape: AttnShape,
    ) -> Result<()> {
        super::attention::check_head_shape(shape)?;
        let tiles = PrefillTiles::new(self, kv, q_rows, shape.head_dim)?;
        self.flash_prefill_tiles(out, q, kv, &tiles, shape)
    }

    /// [`CudaOps::flash_prefill`] with a tile table built beforehand for the same
    /// sequence lengths and chunk sizes.
    pub fn flash_prefill_tiles(
        &self,
        out: &mut impl DevicePtrMut<bf16>,
        q: &impl DevicePtr<bf16>,
        kv: &KvTable,
        tiles: &PrefillTiles,
        shape: AttnShape,
    ) -> Result<()> {
        super::attention::check_head_shape(shape)?;
        let AttnShape {
            heads,
            kv_heads,
            head_dim: d,
        } = shape;
        ensure!(
            tiles.head_dim == d,
            "tile table built for head dimension {}, attention has {d}",
            tiles.head_dim
        );
        ensure!(
            tiles.lens == kv.lens_host(),
            "tile table built for sequence lengths {:?}, the KV table has {:?}",
            tiles.lens,
            kv.lens_host()
        );
        let cfg = config(d)?;
        let need = tiles.rows * heads * d;
        ensure!(
            q.len() >= need,
            "q holds {} values, {need} needed ({} rows of {heads}·{d})",
            q.len(),
            tiles.rows
        );
        ensure!(
            out.len() >= need,
            "output holds {} values, {need} needed ({} rows of {heads}·{d})",
            out.len(),
            tiles.rows
        );
        if tiles.pieces == 0 {
            return Ok(());
        }
        let s = self.device().stream();
        let (qp, _g1) = q.device_ptr(s);
        let (outp, _g2) = out.device_ptr_mut(s);
        ensure!(
            qp % 16 == 0 && outp % 4 == 0,
            "q (address {qp:#x}) must be 16-byte and out ({outp:#x}) 4-byte aligned"
        );
        let (k_ptrs, v_ptrs, lens) = kv.device_arrays();
        let (kp, _g3) = k_ptrs.device_ptr(s);
        let (vp, _g4) = v_ptrs.device_ptr(s);
        let (lp, _g5) = lens.device_ptr(s);
        let (tp, _g6) = tiles.table.device_ptr(s);
        // The workspace: one slot holds `rows` rows of every head; kept locked until
        // every launch that uses it is queued.
        let mut ws = self
            .prefill_ws
            .lock()
            .map_err(|_| anyhow!("a thread panicked while it held the prefill attention workspace"))?;
        let slot_rows = tiles.slots * heads * cfg.rows;
        if slot_rows > 0 {
            ws.ensure(self, slot_rows * d, slot_rows * 2)?;
        }
        // Null where no tile is split: the kernel then never touches the workspace.
        let ws = &mut *ws;
        let (wo, _g7) =
            ws.o.as_mut()
                .filter(|_| slot_rows > 0)
                .map(|b| b.device_ptr_mut(s))
                .unzip();
        let (wml, _g8) = ws
            .ml
            .as_mut()
            .filter(|_| slot_rows > 0)
            .map(|b| b.device_ptr_mut(s))
            .unzip();
        let (wo, wml) = (wo.unwrap_or(0), wml.unwrap_or(0));
        let (split, merge) = if d == 64 {
            (&self.k.flash_prefill_d64, &self.k.flash_prefill_merge_d64)
        } else {
            (&self.k.flash_prefill_d128, &self.k.flash_prefill_merge_d128)
        };
        let smem = cfg.shared_bytes(d);
        self.device().context().bind_to_thread()?;
        split
            .set_attribute(
                CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                smem as i32,
            )
            .with_context(|| format!("flash_prefill: allowing {smem} bytes of shared memory per block"))?;
        let scale_log2 = std::f32::consts::LOG2_E / (d as f32).sqrt();
        let (nh, nkv) = (heads as i32, kv_heads as i32);
        let merge_rows = MERGE_THREADS / (d / 4);
        let merges_at = tp + (tiles.pieces * 8 * 4) as u64;
        for g in &tiles.groups {
            let pieces = tp + (g.pieces.start * 8 * 4) as u64;
            let launch = LaunchConfig {
                grid_dim: (heads as u32, g.pieces.len() as u32, 1),
                block_dim: (cfg.threads, 1, 1),
                shared_mem_bytes: smem as u32,
            };
            // SAFETY: q and out hold rows·heads·d values (checked) and every piece's rows
            // lie within them; each piece's keys lie within its sequence's cache (q_rows ≤
            // len, checked against the same lengths the table's caches were checked
            // with, and the caches are borrowed for the table's life); its slot, if any,
            // lies within the workspace (sized for the plan's largest group above);
            // grid, block and shared memory match the kernel's configuration.
            unsafe {
                s.launch_builder(split)
                    .arg(&outp)
                    .arg(&wo)
                    .arg(&wml)
                    .arg(&qp)
                    .arg(&kp)
                    .arg(&vp)
                    .arg(&lp)
                    .arg(&pieces)
                    .arg(&nh)
                    .arg(&nkv)
                    .arg(&scale_log2)
                    .launch(launch)
            }?;
            if g.merges.is_empty() {
                continue;
            }
            let merges = merges_at + (g.merges.start * 4 * 4) as u64;
            let launch = LaunchConfig {
                grid_dim: (heads as u32, g.merges.len() as u32, (cfg.rows / merge_rows) as u32),
                block_dim: (MERGE_THREADS as u32, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: each merge reads the slots its pieces wrote in the launch before
            // (same stream) and writes its tile's rows of out, within rows·heads·d.
            unsafe {
                s.launch_builder(merge)
                    .arg(&outp)
                    .arg(&wo)
                    .arg(&wml)
                    .arg(&merges)
                    .arg(&nh)
                    .launch(launch)
            }?;
        }
        Ok(())
    }

    /// Fills the prefill attention workspace (if any was allocated yet) with NaN, so
    /// that a test sees any partial result the merge reads without its piece having
    /// written it.
    pub fn poison_prefill_workspace(&self) -> Result<()> {
        let mut ws = self
            .prefill_ws
            .lock()
            .map_err(|_| anyhow!("a thread panicked while it held the prefill attention workspace"))?;
        if let Some(b) = ws.o.as_mut() {
            self.fill_nan_f32(b)?;
        }
        if let Some(b) = ws.ml.as_mut() {
            self.fill_nan_f32(b)?;
        }
        Ok(())
    }
}

fn config(head_dim: usize) -> Result<PrefillConfig> {
    PrefillConfig::for_head_dim(head_dim).with_context(|| format!("head dimension {head_dim} (64 or 128 supported)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_cover_every_row_once_longest_first() {
        let lens = [1usize, 37, 300, 1000, 50];
        let q_rows = [1usize, 37, 129, 64, 0];
        let tiles = prefill_tiles(&lens, &q_rows, 128).unwrap();
        // 1 + 1 + 2 + 1 tiles; sequence 4 has none.
        assert_eq!(tiles.len(), 5);
        let mut seen = vec![0u32; q_rows.iter().sum()];
        let firsts = [0usize, 1, 38, 167];
        for &[b, r0, p0, n] in &tiles {
            let b = b as usize;
            let start = lens[b] - q_rows[b];
            for i in 0..n as usize {
                let row = r0 as usize + i;
                seen[row] += 1;
                // Position of the row = start + its index in the sequence.
                assert_eq!(p0 as usize + i, start + row - firsts[b]);
            }
            assert!(n as usize <= 128 && n > 0);
        }
        assert!(seen.iter().all(|&c| c == 1), "{seen:?}");
        let ends: Vec<i32> = tiles.iter().map(|t| t[2] + t[3]).collect();
        assert!(ends.windows(2).all(|w| w[0] >= w[1]), "{ends:?}");
        assert_eq!(tiles[0], [3, 167, 936, 64]);
        assert_eq!(tiles[1], [2, 166, 299, 1]);
        assert_eq!(tiles[2], [2, 38, 171, 128]);
    }

    #[test]
    fn tiles_refuse_more_rows_than_the_cache() {
        let e = prefill_tiles(&[10, 5], &[3, 6], 128).unwrap_err().to_string();
        assert!(e.contains("sequence 1: 6 query rows"), "{e}");
        assert!(prefill_tiles(&[10], &[3, 6], 128).is_err());
    }

    /// Checks the invariants the kernels rely on: every tile's keys `0..pos + rows`
    /// covered once by its pieces, cut on K/V tile boundaries; a tile of one piece
    /// writes out directly; the slots of a group distinct and within it, each merge
    /// naming exactly its tile's pieces; groups within their budgets, longest pieces
    /// first. Returns the pieces per tile, in tile order.
    fn check_plan(tiles: &[[i32; 4]], split: PrefillSplit, kv_tile: usize) -> (PrefillPlan, Vec<usize>) {
        let plan = prefill_plan(tiles, split, kv_tile).unwrap();
        let mut per_tile = Vec::new();
        for t in tiles {
            let mut mine: Vec<_> = plan.pieces.iter().filter(|p| p[..4] == t[..]).collect();
            mine.sort_by_key(|p| p[4]);
            let keys = t[2] + t[3];
            assert_eq!(mine[0][4], 0, "{t:?}");
            assert_eq!(mine.last().unwrap()[5], keys, "{t:?}");
            for w in mine.windows(2) {
                assert_eq!(w[0][5], w[1][4], "{t:?}: gap or overlap");
            }
            for p in &mine {
                assert!(p[4] < p[5] && p[4] < keys, "{p:?}: no key of its tile");
                assert_eq!(p[4] as usize % kv_tile, 0, "{p:?}");
                assert_eq!(p[7], 0);
            }
            if mine.len() == 1 {
                assert_eq!(mine[0][6], -1, "{t:?}: one piece writes out");
                assert!(keys as usize <= split.keys || split.group_pieces == 1);
            } else {
                assert!(keys as usize > split.keys);
                assert!(mine.len() <= split.group_pieces);
                assert!(mine.iter().all(|p| p[6] >= 0));
            }
            per_tile.push(mine.len());
        }
        assert_eq!(plan.pieces.len(), per_tile.iter().sum::<usize>());
        let mut next = (0, 0);
        for g in &plan.groups {
            assert_eq!((g.pieces.start, g.merges.start), next, "groups in order, no gaps");
            next = (g.pieces.end, g.merges.end);
            assert!(!g.pieces.is_empty() && g.pieces.len() <= MAX_GRID_Y);
            assert!(g.slots <= split.group_pieces, "{g:?}");
            let pieces = &plan.pieces[g.pieces.clone()];
            let lens: Vec<i32> = pieces.iter().map(|p| p[5] - p[4]).collect();
            assert!(lens.windows(2).all(|w| w[0] >= w[1]), "{lens:?}");
            let mut slots: Vec<i32> = pieces.iter().map(|p| p[6]).filter(|&s| s >= 0).collect();
            slots.sort();
            assert_eq!(slots, (0..g.slots as i32).collect::<Vec<_>>(), "{g:?}");
            for m in &plan.merges[g.merges.clone()] {
                let mut of: Vec<i32> = pieces
                    .iter()
                    .filter(|p| p[1] == m[0] && p[3] == m[1] && p[6] >= 0)
                    .map(|p| p[6])
                    .collect();
                of.sort();
                assert_eq!(of, (m[2]..m[2] + m[3]).collect::<Vec<_>>(), "merge {m:?}");
            }
        }
        assert_eq!(next, (plan.pieces.len(), plan.merges.len()));
        (plan, per_tile)
    }

    #[test]
    fn short_tiles_are_one_piece_each() {
        let tiles = prefill_tiles(&[1, 37, 300, 1000, 50], &[1, 37, 129, 64, 0], 128).unwrap();
        let split = PrefillConfig::for_head_dim(128).unwrap().split;
        let (plan, per_tile) = check_plan(&tiles, split, 32);
        assert!(per_tile.iter().all(|&n| n == 1));
        assert!(plan.merges.is_empty());
        assert_eq!(plan.groups.len(), 1);
        assert_eq!(plan.slots(), 0);
        assert_eq!(plan.pieces[0], [3, 167, 936, 64, 0, 1000, -1, 0]);
    }

    #[test]
    fn long_tiles_split_on_key_tiles_and_group_by_slots() {
        // A chunk of 3001 rows ending at 24000 and a whole prompt of 5000, pieces of 1024
        // keys, groups of 60 slots.
        let tiles = prefill_tiles(&[24_001, 5000], &[3001, 5000], 128).unwrap();
        let split = PrefillSplit {
            keys: 1024,
            group_pieces: 60,
        };
        let (plan, per_tile) = check_plan(&tiles, split, 32);
        // The longest tile (rows 2944.., keys 0..24001) in 24 pieces, the last of 449.
        assert_eq!(tiles[0], [0, 2944, 23_944, 57]);
        assert_eq!(per_tile[0], 24);
        assert_eq!(plan.merges[0], [2944, 57, 0, 24]);
        // Tiles of 1024 keys or fewer are one piece: positions 0..=1023 of the prompt.
        let whole = tiles.iter().zip(&per_tile).filter(|(t, _)| t[2] + t[3] <= 1024);
        assert!(whole.clone().count() == 8 && whole.clone().all(|(_, &n)| n == 1));
        let slots: usize = per_tile.iter().filter(|&&n| n > 1).sum();
        assert!(plan.groups.len() >= slots.div_ceil(60) && plan.groups.len() > 10);
        // The first group: two tiles of 24 pieces, full pieces first, the same keys of
        // both tiles together; the last piece of each (449 and 392 keys) at the end.
        let g = &plan.pieces[plan.groups[0].pieces.clone()];
        assert_eq!((g.len(), plan.groups[0].slots), (48, 48));
        assert_eq!((g[0][4], g[0][5], g[1][4], g[1][5]), (0, 1024, 0, 1024));
        assert_ne!(g[0][1], g[1][1]);
        assert_eq!((g[46][5] - g[46][4], g[47][5] - g[47][4]), (449, 392));
    }

    #[test]
    fn tiles_too_long_for_a_group_get_longer_pieces() {
        // 100 000 keys in pieces of 2048 would need 49 slots; a group has 8.
        let tiles = [[0, 0, 99_990, 10]];
        let split = PrefillSplit {
            keys: 2048,
            group_pieces: 8,
        };
        let (plan, per_tile) = check_plan(&tiles, split, 32);
        assert_eq!(per_tile, [8]);
        // ceil(100000 / 8) = 12500, rounded up to 12512 (a multiple of 32).
        assert_eq!(plan.pieces[0][5] - plan.pieces[0][4], 12_512);
        assert_eq!(plan.groups.len(), 1);
        // A group of one slot cannot split: the tile is one piece.
        let one = PrefillSplit {
            keys: 2048,
            group_pieces: 1,
        };
        let (plan, per_tile) = check_plan(&tiles, one, 32);
        assert_eq!(per_tile, [1]);
        assert_eq!(plan.pieces[0][6], -1);
    }

    #[test]
    fn many_short_tiles_fill_launches_of_at_most_65535() {
        let n = 70_000;
        let tiles = vec![[0, 0, 0, 1]; n];
        let plan = prefill_plan(&tiles, PrefillConfig::for_head_dim(64).unwrap().split, 64).unwrap();
        assert_eq!(plan.groups.len(), 2);
        assert_eq!(plan.groups[0].pieces, 0..MAX_GRID_Y);
        assert_eq!(plan.groups[1].pieces, MAX_GRID_Y..n);
    }

    #[test]
    fn splits_refuse_pieces_off_the_key_tiles() {
        let tiles = [[0, 0, 0, 1]];
        let e = prefill_plan(
            &tiles,
            PrefillSplit {
                keys: 1000,
                group_pieces: 8,
            },
            32,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("pieces of 1000 keys") && e.contains("32-key tile"), "{e}");
        let e = prefill_plan(
            &tiles,
            PrefillSplit {
                keys: 1024,
                group_pieces: 0,
            },
            32,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("groups of 0 pieces"), "{e}");
    }

    #[test]
    fn configurations_fit_the_smaller_devices() {
        // sm_80 allows 163 KiB per block, sm_86/89 99 KiB.
        for d in [64, 128] {
            let c = PrefillConfig::for_head_dim(d).unwrap();
            assert!(c.shared_bytes(d) <= 99 * 1024, "d={d}: {}", c.shared_bytes(d));
            assert_eq!(c.rows % 16, 0);
        }
        assert_eq!(PrefillConfig::for_head_dim(128).unwrap().shared_bytes(128), 80 * 1024);
        assert!(PrefillConfig::for_head_dim(96).is_none());
        // Pieces on K/V tile boundaries; a merge block's rows divide a tile's.
        for d in [64, 128] {
            let c = PrefillConfig::for_head_dim(d).unwrap();
            assert_eq!(c.split.keys % c.keys, 0);
            assert_eq!(c.rows % (MERGE_THREADS / (d / 4)), 0);
        }
    }
}
