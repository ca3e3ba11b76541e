//! Causal flash attention for prefill chunks (kernels/flash_prefill.cu).
//!
//! Each sequence of a [`KvTable`] brings `q_rows[b]` new query rows, consecutive in
//! `q`; its cache already holds them (`len_b` tokens, this chunk included), so query
//! `i` sits at position `len_b − q_rows[b] + i` and attends to keys `0..=position`,
//! earlier chunks included. The work is cut into tiles of up to [`PrefillConfig::rows`]
//! query rows of one sequence; a block runs one tile for one query head, tensor cores
//! for both products and an online softmax in registers (FlashAttention-2). The tile
//! table is built on the host, longest tiles first so that the short ones fill the
//! tail of the launch, and uploaded with [`PrefillTiles::new`]; [`CudaOps::flash_prefill`]
//! does both per call, [`CudaOps::flash_prefill_tiles`] reuses one table (every layer
//! of a forward pass has the same one).

use super::attention::KvTable;
use super::ops::CudaOps;
use crate::cpu::attention::AttnShape;
use anyhow::{ensure, Context, Result};
use cudarc::driver::sys::CUfunction_attribute_enum;
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};
use half::bf16;

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
}

impl PrefillConfig {
    /// The configuration for head dimension `d` (64 or 128).
    pub fn for_head_dim(d: usize) -> Option<PrefillConfig> {
        match d {
            64 => Some(PrefillConfig {
                rows: 128,
                keys: 64,
                stages: 3,
                threads: 128,
            }),
            128 => Some(PrefillConfig {
                rows: 128,
                keys: 32,
                stages: 3,
                threads: 128,
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

/// A tile table on the device for one set of sequences and chunk sizes, reusable by
/// every layer's [`CudaOps::flash_prefill_tiles`].
pub struct PrefillTiles {
    tiles: CudaSlice<i32>,
    count: usize,
    lens: Vec<usize>,
    q_rows: Vec<usize>,
    rows: usize,
    head_dim: usize,
}

impl PrefillTiles {
    /// Checks `q_rows` against the sequences of `kv` (one count per sequence, none
    /// above its cache length) and uploads the tiles for head dimension `head_dim`.
    pub fn new(ops: &CudaOps, kv: &KvTable, q_rows: &[usize], head_dim: usize) -> Result<PrefillTiles> {
        let cfg = PrefillConfig::for_head_dim(head_dim)
            .with_context(|| format!("head dimension {head_dim} (64 or 128 supported)"))?;
        let lens = kv.lens_host();
        let tiles = prefill_tiles(lens, q_rows, cfg.rows)?;
        ensure!(
            tiles.len() <= 65_535,
            "{} tiles of {} query rows exceed one launch (65535): split the chunk",
            tiles.len(),
            cfg.rows
        );
        let flat: Vec<i32> = tiles.iter().flatten().copied().collect();
        let dev = if flat.is_empty() {
            ops.device().zeros::<i32>(4)?
        } else {
            ops.device().upload(&flat)?
        };
        Ok(PrefillTiles {
            tiles: dev,
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

    /// Tiles (blocks per query head).
    pub fn count(&self) -> usize {
        self.count
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
        let cfg = PrefillConfig::for_head_dim(d).expect("checked head dimension");
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
        if tiles.count == 0 {
            return Ok(());
        }
        let s = self.device().stream();
        let (qp, _g1) = q.device_ptr(s);
        let (outp, _g2) = out.device_ptr_mut(s);
        ensure!(
            qp % 16 == 0 && outp % 4 == 0,
            "q (address {qp:#x}) must be 16-byte and out ({outp:#x}) 4-byte aligned"
        );
        let (k_ptrs, v_ptrs, lens) = kv.device_arrays()?;
        let (kp, _g3) = k_ptrs.device_ptr(s);
        let (vp, _g4) = v_ptrs.device_ptr(s);
        let (lp, _g5) = lens.device_ptr(s);
        let (tp, _g6) = tiles.tiles.device_ptr(s);
        let f = if d == 64 {
            &self.k.flash_prefill_d64
        } else {
            &self.k.flash_prefill_d128
        };
        // Sharing multiprocessors with decoding: more shared memory than half of one
        // holds keeps one block on each (within what one block may have).
        let smem = if self.prefill_half_sm.load(std::sync::atomic::Ordering::Relaxed) {
            use cudarc::driver::sys::CUdevice_attribute_enum as A;
            let ctx = self.device().context();
            let per_sm = ctx.attribute(A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR)? as usize;
            let per_block = ctx.attribute(A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)? as usize;
            cfg.shared_bytes(d).max((per_sm / 2 + 1024).min(per_block))
        } else {
            cfg.shared_bytes(d)
        };
        self.device().context().bind_to_thread()?;
        f.set_attribute(
            CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            smem as i32,
        )
        .with_context(|| format!("flash_prefill: allowing {smem} bytes of shared memory per block"))?;
        let scale_log2 = std::f32::consts::LOG2_E / (d as f32).sqrt();
        let (nh, nkv) = (heads as i32, kv_heads as i32);
        let launch = LaunchConfig {
            grid_dim: (heads as u32, tiles.count as u32, 1),
            block_dim: (cfg.threads, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        // SAFETY: q and out hold rows·heads·d values (checked) and every tile's rows lie
        // within them; each tile's keys lie within its sequence's cache (q_rows ≤ len,
        // checked against the same lengths the table's caches were checked with, and the
        // caches are borrowed for the table's life); grid, block and shared memory match
        // the kernel's configuration.
        unsafe {
            s.launch_builder(f)
                .arg(&outp)
                .arg(&qp)
                .arg(&kp)
                .arg(&vp)
                .arg(&lp)
                .arg(&tp)
                .arg(&nh)
                .arg(&nkv)
                .arg(&scale_log2)
                .launch(launch)
        }?;
        Ok(())
    }
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
    }
}
