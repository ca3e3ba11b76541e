//! The GPU ShadowKV layout, defined once: the buffers of one sequence and layer, the
//! rows of its attention buffers, the per-sequence tables the batched kernels read, and
//! the host value pool. `kernels/shadow.cuh` mirrors the `#[repr(C)]` types.
//!
//! Per sequence and layer, with `kvh` KV heads of dimension `d`, chunks of `c` tokens,
//! rank `r`, `S` slots (selected chunks per head), `O` outlier chunks per head and `L`
//! local chunks:
//! - `marks` `[kvh, chunk_cap, d]` i8 and `mark_scales` `[kvh, chunk_cap]` f32: the landmark
//!   of each chunk in 8 bits, `code · scale` ([`crate::shadow::landmarks::Marks8`]),
//!   head-major, so that the scores stream each head's landmarks from contiguous memory;
//! - `outlier` `[kvh, chunk_cap]` u8: 1 = an outlier chunk of that head (never selected);
//! - `u` `[chunk_cap·c, r]` i8 and `u_scales` `[chunk_cap·c]` f32: low-rank coefficients of
//!   the sparse tokens in 8 bits, a scale per token (`code · scale`, as
//!   [`crate::shadow::factor::LowRank::project`] rounds them); `sv` `[r, kvh·d]` f32: the
//!   basis (pre-RoPE keys ≈ `u · sv`); `fold_u` `[c, r]` f32: the coefficients of the chunk a
//!   step folds, before they are rounded into `u`;
//! - `slots` `[kvh, S]` i32: the chunk each slot holds, -1 = empty;
//! - `ak`, `av` `[kvh, rows_cap, d]` bf16, `rows_cap = R + (O + S)·c`, per head one region
//!   after another: the recent window `[0, R)`, `R = (L + 2)·c`, stored newest-first so
//!   that `n` recent tokens fill rows `[R - n, R)` (the newest at `R - n`, the oldest at
//!   `R - 1`); the sequence's `O' ≤ O` outlier chunks at `[R, R + O'·c)`; slot `s` at
//!   `R + (O' + s)·c`. Slots are occupied from slot 0 up (the selection never shrinks),
//!   so a query attends ONE contiguous range of rows, [`ShadowLayout::attended_rows`].
//!   (With `O' = O`, the usual case, slot `s` starts at `R + O·c + s·c`.) A slot's
//!   values are its chunk in the pools' 8-bit format
//!   ([`ShadowLayout::value_chunk_bytes`]), in place at the first bytes of its `c` rows of
//!   `av`; the attention reads them so ([`crate::cuda::KvTable::with_value_chunks`]),
//!   about half the bytes of bf16 rows.
//! - `kpre` `[R, kvh·d]` bf16: the pre-RoPE keys of the recent window, same rows.
//! - with a GPU value tier of `T > 0` entries per head (a FIFO cache of chunks' values in
//!   device memory: a missed chunk found there is copied from HBM, not read over PCIe):
//!   `tier` `[kvh, T]` chunks of [`ShadowLayout::value_chunk_bytes`] (the values of the
//!   chunk each entry holds, in the pool's 8-bit format), `tier_map`
//!   `[kvh, chunk_cap]` i32 (the entry holding each chunk, -1 = none), `tier_owner`
//!   `[kvh, T]` i32 (the chunk each entry holds, -1 = empty) and `tier_next` `[kvh]` i32
//!   (the entry the next fetched chunk replaces).
//!
//! The host value pool is `[layer][pool_seq][kvh][chunk]`, each chunk its values in 8 bits
//! (codes, then a scale per token), the CPU pool's layout ([`crate::pool::PoolShape`]), read (and written, when a chunk folds) by the
//! kernels through its device-mapped address; GPU value slots, where there are any, are a
//! second pool of the same layout in device memory, their slots numbered after the host
//! pool's ([`DevicePool`]).

use crate::cuda::attention::MAX_PENDING_SLOTS;
use crate::model::config::ModelConfig;
use crate::pool::{PoolShape, ValueFormat};
use crate::shadow::ShadowParams;
use anyhow::{ensure, Result};

/// Largest GQA group the selection kernel serves (as flash-decoding).
pub const MAX_GROUP: usize = 8;
/// Largest chunk the key rebuild serves.
pub const MAX_CHUNK: usize = 16;
/// Largest `kv_heads · head_dim` (the fold's projection holds a key row in shared memory).
pub const MAX_KV_WIDTH: usize = 1024;
/// Chunks a tile of the selection's logits holds, each tile with its own softmax
/// statistics (`SELECT_TILE` of kernels/select.cu).
pub const SELECT_TILE: usize = 256;

/// The shape of the ShadowKV state of every sequence of a batch (one model, one set of
/// settings).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShadowLayout {
    /// KV heads.
    pub kv_heads: usize,
    /// Head dimension (64 or 128).
    pub head_dim: usize,
    /// Query heads per KV head (1..=8).
    pub group: usize,
    /// Tokens per chunk (1..=16).
    pub chunk: usize,
    /// Rank of the low-rank keys.
    pub rank: usize,
    /// Selected chunks per head (`S`).
    pub slots: usize,
    /// Outlier chunks per head (`O`, the most a sequence has).
    pub outliers: usize,
    /// Local chunks (`L`).
    pub local: usize,
    /// Chunks a sequence holds at most.
    pub chunk_cap: usize,
    /// Entries of the GPU value tier per (layer, KV head): chunks whose values stay in
    /// device memory besides the selected ones (`T`; 0 = no tier).
    pub tier: usize,
}

impl ShadowLayout {
    /// The layout for `cfg` with settings `p` and sequences of up to `context` tokens:
    /// `S` = the budget's chunks and `O` the outlier chunks (each at most the context's),
    /// `L` as set.
    pub fn new(cfg: &ModelConfig, p: &ShadowParams, context: usize) -> Result<Self> {
        p.validate(cfg)?;
        let chunk_cap = context.div_ceil(p.chunk_size);
        let l = ShadowLayout {
            kv_heads: cfg.num_kv_heads,
            head_dim: cfg.head_dim,
            group: cfg.num_heads / cfg.num_kv_heads.max(1),
            chunk: p.chunk_size,
            rank: p.rank,
            slots: p.selected_chunks().min(chunk_cap),
            outliers: p.outlier_chunks.min(chunk_cap),
            local: p.local_chunks,
            chunk_cap,
            tier: 0,
        };
        l.validate()?;
        Ok(l)
    }

    /// Rejects a shape the kernels do not serve, naming the value.
    pub fn validate(&self) -> Result<()> {
        ensure!(self.kv_heads > 0, "ShadowKV on the GPU: no KV heads");
        ensure!(
            self.head_dim == 64 || self.head_dim == 128,
            "ShadowKV on the GPU: head dimension {} (64 or 128 supported)",
            self.head_dim
        );
        ensure!(
            (1..=MAX_GROUP).contains(&self.group),
            "ShadowKV on the GPU: GQA group of {} query heads (1..={MAX_GROUP})",
            self.group
        );
        ensure!(
            (1..=MAX_CHUNK).contains(&self.chunk),
            "ShadowKV on the GPU: chunk size {} (1..={MAX_CHUNK})",
            self.chunk
        );
        ensure!(
            self.kv_width() <= MAX_KV_WIDTH,
            "ShadowKV on the GPU: kv_heads · head_dim = {} (at most {MAX_KV_WIDTH})",
            self.kv_width()
        );
        ensure!(
            (1..=self.kv_width()).contains(&self.rank),
            "ShadowKV on the GPU: rank {} must be in 1..={}",
            self.rank,
            self.kv_width()
        );
        ensure!(self.slots > 0, "ShadowKV on the GPU: no slots (budget below one chunk)");
        ensure!(
            self.slots <= MAX_PENDING_SLOTS,
            "ShadowKV on the GPU: {} slots per head (the two-pass attention takes at most {MAX_PENDING_SLOTS}: \
             a smaller sparse budget)",
            self.slots
        );
        ensure!(
            self.tier <= self.chunk_cap,
            "ShadowKV on the GPU: a value tier of {} chunks per head, more than the {} a sequence holds",
            self.tier,
            self.chunk_cap
        );
        // Every element count, including a batch's scratch, stays well inside an i32.
        let big = [
            self.rows_cap() * self.head_dim * self.kv_heads,
            self.token_cap() * self.rank,
            self.chunk_cap * self.kv_width(),
            self.tier_len(),
        ];
        ensure!(
            big.iter().all(|&n| n < (1 << 30)),
            "ShadowKV on the GPU: {} chunks of context are too many for one sequence's buffers",
            self.chunk_cap
        );
        Ok(())
    }

    /// `kv_heads · head_dim`.
    pub fn kv_width(&self) -> usize {
        self.kv_heads * self.head_dim
    }

    /// Rows of the recent window, `R = (L + 2)·c`.
    pub fn recent_rows(&self) -> usize {
        (self.local + 2) * self.chunk
    }

    /// Rows of each head's attention buffer, `R + (O + S)·c`.
    pub fn rows_cap(&self) -> usize {
        self.recent_rows() + (self.outliers + self.slots) * self.chunk
    }

    /// Tiles of [`SELECT_TILE`] chunks a sequence's selection is scored in, at most.
    pub fn score_tiles(&self) -> usize {
        self.chunk_cap.div_ceil(SELECT_TILE)
    }

    /// Tokens the sparse region holds at most (rows of `u`).
    pub fn token_cap(&self) -> usize {
        self.chunk_cap * self.chunk
    }

    /// Attention row of the `t`-th oldest (from 0) of `n` recent tokens.
    pub fn recent_row(&self, n: usize, t: usize) -> usize {
        debug_assert!(t < n && n <= self.recent_rows());
        self.recent_rows() - 1 - t
    }

    /// First attention row of outlier chunk `o`.
    pub fn outlier_row(&self, o: usize) -> usize {
        self.recent_rows() + o * self.chunk
    }

    /// First attention row of slot `s` of a sequence with `outliers` outlier chunks.
    pub fn slot_row(&self, outliers: usize, s: usize) -> usize {
        self.recent_rows() + (outliers + s) * self.chunk
    }

    /// Chunks a sequence selects per head each step: `S`, or fewer when it has fewer
    /// candidates (its non-outlier chunks).
    pub fn selected_for(&self, c: &SeqCounts) -> usize {
        self.slots.min(c.chunks.saturating_sub(c.outliers) as usize)
    }

    /// The rows `(first, len)` of each head's attention buffers that a query of a
    /// sequence attends once its selection is in place: the recent window, the
    /// outliers and the occupied slots, one contiguous range.
    pub fn attended_rows(&self, c: &SeqCounts) -> (usize, usize) {
        let n = c.recent as usize;
        let first = self.recent_rows() - n;
        (first, n + (c.outliers as usize + self.selected_for(c)) * self.chunk)
    }

    /// Elements of `marks`.
    pub fn marks_len(&self) -> usize {
        self.chunk_cap * self.kv_width()
    }

    /// Elements of `mark_scales`.
    pub fn mark_scales_len(&self) -> usize {
        self.kv_heads * self.chunk_cap
    }

    /// Elements of `outlier`.
    pub fn outlier_len(&self) -> usize {
        self.kv_heads * self.chunk_cap
    }

    /// Elements of `u` (bytes: 8-bit codes).
    pub fn u_len(&self) -> usize {
        self.token_cap() * self.rank
    }

    /// Elements of `u_scales`.
    pub fn u_scales_len(&self) -> usize {
        self.token_cap()
    }

    /// Elements of `fold_u`.
    pub fn fold_u_len(&self) -> usize {
        self.chunk * self.rank
    }

    /// Elements of `sv`.
    pub fn sv_len(&self) -> usize {
        self.rank * self.kv_width()
    }

    /// Elements of `slots`.
    pub fn slots_len(&self) -> usize {
        self.kv_heads * self.slots
    }

    /// Elements of `ak` (and of `av`).
    pub fn attn_len(&self) -> usize {
        self.kv_heads * self.rows_cap() * self.head_dim
    }

    /// Elements of `kpre`.
    pub fn kpre_len(&self) -> usize {
        self.recent_rows() * self.kv_width()
    }

    /// The layout with a GPU value tier of `chunks` entries per (layer, KV head).
    pub fn with_tier(self, chunks: usize) -> Result<Self> {
        let l = ShadowLayout { tier: chunks, ..self };
        l.validate()?;
        Ok(l)
    }

    /// Bytes of one chunk of one head's values in the pools and the tier (8-bit codes
    /// and a scale per token: [`PoolShape::chunk_bytes`]).
    pub fn value_chunk_bytes(&self) -> usize {
        PoolShape {
            layers: 1,
            seqs: 1,
            kv_heads: 1,
            chunks: 1,
            chunk: self.chunk,
            head_dim: self.head_dim,
            format: ValueFormat::Int8,
        }
        .chunk_bytes()
    }

    /// Bytes of `tier` (0 without a tier).
    pub fn tier_len(&self) -> usize {
        self.kv_heads * self.tier * self.value_chunk_bytes()
    }

    /// Elements of `tier_map` (0 without a tier).
    pub fn tier_map_len(&self) -> usize {
        if self.tier == 0 {
            0
        } else {
            self.kv_heads * self.chunk_cap
        }
    }

    /// Elements of `tier_owner` (0 without a tier).
    pub fn tier_owner_len(&self) -> usize {
        self.kv_heads * self.tier
    }

    /// Elements of `tier_next` (0 without a tier).
    pub fn tier_next_len(&self) -> usize {
        if self.tier == 0 {
            0
        } else {
            self.kv_heads
        }
    }

    /// Device bytes of one layer's tier of one sequence.
    pub fn tier_bytes(&self) -> usize {
        self.tier_len() + 4 * (self.tier_map_len() + self.tier_owner_len() + self.tier_next_len())
    }

    /// Chunks in the sparse region after a prefill of `tokens` tokens: the whole chunks
    /// less the local window (as [`crate::shadow::ShadowSeq::from_prefill`]); the tokens
    /// after them form the recent window.
    pub fn prefill_chunks(&self, tokens: usize) -> usize {
        (tokens / self.chunk).saturating_sub(self.local)
    }

    /// A sequence's counts right after a prefill of `tokens` tokens.
    pub fn prefill_counts(&self, tokens: usize, pool_seq: usize) -> SeqCounts {
        let chunks = self.prefill_chunks(tokens);
        SeqCounts {
            chunks: chunks as i32,
            recent: (tokens - chunks * self.chunk) as i32,
            outliers: self.outliers.min(chunks) as i32,
            pool_seq: pool_seq as i32,
        }
    }

    /// Checks that a prefill of `tokens` tokens fits the layout.
    pub fn check_prefill(&self, tokens: usize) -> Result<()> {
        let chunks = self.prefill_chunks(tokens);
        ensure!(
            chunks <= self.chunk_cap,
            "a prompt of {tokens} tokens needs {chunks} chunks, the layout holds {}",
            self.chunk_cap
        );
        // Fewer than L + 1 whole chunks stay in the window, below its R = (L + 2)·c rows.
        Ok(())
    }

    /// Checks one sequence's counts against the layout, naming sequence `i`.
    pub fn check_counts(&self, i: usize, c: &SeqCounts) -> Result<()> {
        ensure!(
            c.chunks >= 0 && c.chunks as usize <= self.chunk_cap,
            "sequence {i}: {} chunks (capacity {})",
            c.chunks,
            self.chunk_cap
        );
        ensure!(
            c.recent >= 0 && c.recent as usize <= self.recent_rows(),
            "sequence {i}: {} recent tokens (window of {})",
            c.recent,
            self.recent_rows()
        );
        ensure!(
            c.outliers >= 0 && c.outliers as usize <= self.outliers.min(c.chunks as usize),
            "sequence {i}: {} outlier chunks (at most {} of its {} chunks)",
            c.outliers,
            self.outliers,
            c.chunks
        );
        ensure!(c.pool_seq >= 0, "sequence {i}: pool slot {}", c.pool_seq);
        Ok(())
    }

    /// The kernels' view of the layout.
    pub(crate) fn dims(&self) -> ShadowDims {
        let i = |v: usize| v as i32; // validate() keeps every value far below i32::MAX
        ShadowDims {
            kv_heads: i(self.kv_heads),
            head_dim: i(self.head_dim),
            group: i(self.group),
            chunk: i(self.chunk),
            rank: i(self.rank),
            slots: i(self.slots),
            outliers: i(self.outliers),
            recent: i(self.recent_rows()),
            rows_cap: i(self.rows_cap()),
            chunk_cap: i(self.chunk_cap),
            tier: i(self.tier),
        }
    }
}

/// [`ShadowLayout`] as the kernels take it (`ShadowDims` in kernels/shadow.cuh), by value.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct ShadowDims {
    kv_heads: i32,
    head_dim: i32,
    group: i32,
    chunk: i32,
    rank: i32,
    slots: i32,
    outliers: i32,
    recent: i32,
    rows_cap: i32,
    chunk_cap: i32,
    tier: i32,
}

/// Device addresses of one sequence's buffers for one layer (`ShadowSeqBufs` in
/// kernels/shadow.cuh); see the module documentation for each buffer's layout.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SeqAddrs {
    /// `marks`.
    pub marks: u64,
    /// `mark_scales`.
    pub mark_scales: u64,
    /// `outlier`.
    pub outlier: u64,
    /// `u`.
    pub u: u64,
    /// `u_scales`.
    pub u_scales: u64,
    /// `fold_u`.
    pub fold_u: u64,
    /// `sv`.
    pub sv: u64,
    /// `slots`.
    pub slots: u64,
    /// `ak`.
    pub ak: u64,
    /// `av`.
    pub av: u64,
    /// `kpre`.
    pub kpre: u64,
    /// `tier` (0 without a tier).
    pub tier: u64,
    /// `tier_map` (0 without a tier).
    pub tier_map: u64,
    /// `tier_owner` (0 without a tier).
    pub tier_owner: u64,
    /// `tier_next` (0 without a tier).
    pub tier_next: u64,
}

/// Where one sequence stands (`ShadowSeqCounts` in kernels/shadow.cuh); the same for
/// every layer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SeqCounts {
    /// Chunks in the sparse region.
    pub chunks: i32,
    /// Tokens in the recent window (`n`).
    pub recent: i32,
    /// Outlier chunks of each head (`O'`, at most `O`).
    pub outliers: i32,
    /// The sequence's slot in the value pools (global: host slots first, then device
    /// slots; see [`DevicePool`]).
    pub pool_seq: i32,
}

const _: () = assert!(std::mem::size_of::<ShadowDims>() == 44);
const _: () = assert!(std::mem::size_of::<SeqAddrs>() == 120);
const _: () = assert!(std::mem::size_of::<SeqCounts>() == 16);

// SAFETY: plain #[repr(C)] structs of integers, valid for any bit pattern, copied to the
// device as they are.
unsafe impl cudarc::driver::DeviceRepr for SeqAddrs {}
// SAFETY: as above.
unsafe impl cudarc::driver::DeviceRepr for SeqCounts {}

/// The bf16 value pools seen from the device: the host pool (device-mapped) and,
/// where there are GPU value slots, a pool in device memory of the same layout after
/// it. Slot indices are global: `0..shape.seqs` are host slots, `shape.seqs..`
/// `shape.seqs + dev_seqs` device slots (device slot `i` is global `shape.seqs + i`).
#[derive(Clone, Copy, Debug)]
pub struct DevicePool {
    /// Device address of the host pool's first byte (host memory registered with the
    /// driver; 0 when the host pool holds no slot).
    pub host: u64,
    /// Device address of the device pool's first byte (0 without device slots).
    pub dev: u64,
    /// The host pool's shape (`seqs` = its slots); the device pool has the same but
    /// `dev_seqs` slots.
    pub shape: PoolShape,
    /// Slots in device memory.
    pub dev_seqs: usize,
}

impl DevicePool {
    /// Slots of both pools.
    pub fn slots(&self) -> usize {
        self.shape.seqs + self.dev_seqs
    }

    /// Whether the host pool holds slots the device cannot address (a file-backed pool,
    /// written and read by the host; its address is 0).
    pub fn host_written(&self) -> bool {
        self.host == 0 && self.shape.seqs > 0
    }

    /// Whether global slot `seq` lies in device memory.
    pub fn on_device(&self, seq: usize) -> bool {
        seq >= self.shape.seqs
    }

    /// The device pool's shape.
    pub fn dev_shape(&self) -> PoolShape {
        PoolShape {
            seqs: self.dev_seqs,
            ..self.shape
        }
    }

    /// Byte offset of a chunk of global slot `seq` in the pool holding that slot
    /// ([`DevicePool::on_device`]): `(((layer·seqs + s)·kv_heads + head)·chunks +
    /// chunk)·chunk_bytes`, with `seqs` and `s` that pool's slots and the slot's index in it.
    pub fn chunk_offset(&self, layer: usize, seq: usize, head: usize, chunk: usize) -> usize {
        let (seqs, s) = if self.on_device(seq) {
            (self.dev_seqs, seq - self.shape.seqs)
        } else {
            (self.shape.seqs, seq)
        };
        PoolShape { seqs, ..self.shape }.offset(layer, s, head, chunk)
    }

    /// Checks that the pools serve `layout` at `layer` for sequences with `counts`: the
    /// same heads and chunk size, room for every chunk a sequence can hold, each
    /// sequence's pool slot inside one of the pools.
    pub(crate) fn check(&self, layout: &ShadowLayout, layer: usize, counts: &[SeqCounts]) -> Result<()> {
        let s = &self.shape;
        ensure!(
            s.kv_heads == layout.kv_heads
                && s.chunk == layout.chunk
                && s.head_dim == layout.head_dim
                && s.format == ValueFormat::Int8,
            "value pool of {} heads × chunks of {} tokens of {} values ({:?}), the layout needs {} × {} of {} (Int8)",
            s.kv_heads,
            s.chunk,
            s.head_dim,
            s.format,
            layout.kv_heads,
            layout.chunk,
            layout.head_dim
        );
        ensure!(
            s.chunks >= layout.chunk_cap,
            "value pool of {} chunks per sequence, the layout holds {}",
            s.chunks,
            layout.chunk_cap
        );
        ensure!(layer < s.layers, "layer {layer} outside the value pool's {}", s.layers);
        ensure!(
            self.slots() <= i32::MAX as usize && s.chunks <= i32::MAX as usize,
            "value pools of {} + {} sequences × {} chunks: too large for the kernels' indices",
            s.seqs,
            self.dev_seqs,
            s.chunks
        );
        ensure!(
            self.host % 16 == 0 && self.dev % 16 == 0,
            "value pool addresses {:#x} (host) and {:#x} (device) are not both 16-byte aligned",
            self.host,
            self.dev
        );
        ensure!(
            s.seqs == 0 || self.host != 0,
            "the host value pool ({} slots) is not mapped for the device: a file-backed pool is written and read \
             by the host (fetch by cpu-gather)",
            s.seqs
        );
        ensure!(
            self.dev_seqs == 0 || self.dev != 0,
            "{} GPU value slots without an address",
            self.dev_seqs
        );
        for (i, c) in counts.iter().enumerate() {
            ensure!(
                (c.pool_seq as usize) < self.slots(),
                "sequence {i}: pool slot {} outside the pools' {} ({} host, {} device)",
                c.pool_seq,
                self.slots(),
                s.seqs,
                self.dev_seqs
            );
        }
        Ok(())
    }

    /// The pools as the kernels take them, by value (`ShadowPool` in kernels/shadow.cuh).
    pub(crate) fn kernel(&self) -> ShadowPool {
        // check() keeps the counts within an i32.
        ShadowPool {
            host: self.host,
            dev: self.dev,
            host_seqs: self.shape.seqs as i32,
            dev_seqs: self.dev_seqs as i32,
            chunks: self.shape.chunks as i32,
            pad: 0,
        }
    }
}

/// [`DevicePool`] as the kernels take it (`ShadowPool` in kernels/shadow.cuh), by value.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct ShadowPool {
    host: u64,
    dev: u64,
    host_seqs: i32,
    dev_seqs: i32,
    chunks: i32,
    pad: i32,
}

const _: () = assert!(std::mem::size_of::<ShadowPool>() == 32);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::synthetic::preset;

    #[test]
    fn regions_follow_one_another_and_the_attended_rows_are_contiguous() {
        let cfg = preset("llama-3.1-8b").unwrap();
        let p = ShadowParams::defaults(&cfg, 131_072);
        let l = ShadowLayout::new(&cfg, &p, 131_072).unwrap();
        assert_eq!((l.kv_heads, l.head_dim, l.group, l.chunk), (8, 128, 4, 8));
        assert_eq!((l.slots, l.outliers, l.local), (256, 48, 4));
        assert_eq!(l.recent_rows(), 48);
        assert_eq!(l.rows_cap(), 48 + (48 + 256) * 8);
        assert_eq!(l.outlier_row(0), 48);
        assert_eq!(l.slot_row(48, 0), 48 + 48 * 8);
        assert_eq!(l.slot_row(48, 255) + 8, l.rows_cap());
        // Newest-first: the newest of 5 tokens at R - 5, the oldest at R - 1.
        assert_eq!(l.recent_row(5, 4), 43);
        assert_eq!(l.recent_row(5, 0), 47);
        let c = SeqCounts {
            chunks: 1000,
            recent: 13,
            outliers: 48,
            pool_seq: 0,
        };
        assert_eq!(l.attended_rows(&c), (35, 13 + (48 + 256) * 8));
        // A short sequence: fewer outliers and fewer candidates than slots; the slots
        // follow its own outliers.
        let c = SeqCounts {
            chunks: 10,
            recent: 40,
            outliers: 10,
            pool_seq: 0,
        };
        assert_eq!(l.selected_for(&c), 0);
        assert_eq!(l.attended_rows(&c), (8, 40 + 80));
        let c = SeqCounts { outliers: 4, ..c };
        assert_eq!(l.selected_for(&c), 6);
        assert_eq!(l.slot_row(4, 0), 48 + 32);
        assert_eq!(l.attended_rows(&c).1, 40 + 32 + 48);
        l.check_counts(0, &c).unwrap();
    }

    #[test]
    fn slots_and_outliers_are_at_most_the_context_s_chunks() {
        let cfg = preset("smollm2-135m").unwrap();
        let p = ShadowParams {
            outlier_chunks: 100_000,
            ..ShadowParams::defaults(&cfg, 1024)
        };
        let l = ShadowLayout::new(&cfg, &p, 1024).unwrap();
        assert_eq!((l.outliers, l.chunk_cap), (128, 128));
        assert!(l.slots <= 128);
    }

    #[test]
    fn device_slots_are_numbered_after_the_host_slots() {
        let cfg = preset("smollm2-135m").unwrap();
        let p = ShadowParams::defaults(&cfg, 8192);
        let l = ShadowLayout::new(&cfg, &p, 8192).unwrap();
        let (kvh, chunks, ce) = (l.kv_heads, l.chunk_cap, l.value_chunk_bytes());
        let shape = PoolShape {
            layers: 2,
            seqs: 3,
            kv_heads: kvh,
            chunks,
            chunk: l.chunk,
            head_dim: l.head_dim,
            format: ValueFormat::Int8,
        };
        assert_eq!(ce, l.chunk * (l.head_dim + 4));
        let pool = DevicePool {
            host: 4096,
            dev: 8192,
            shape,
            dev_seqs: 2,
        };
        assert_eq!(pool.slots(), 5);
        assert!(!pool.on_device(2) && pool.on_device(3));
        assert_eq!(pool.dev_shape().seqs, 2);
        // Layer 1, head 1, chunk 5 of host slot 2, and of device slot 1 (global 4).
        assert_eq!(pool.chunk_offset(1, 2, 1, 5), (((3 + 2) * kvh + 1) * chunks + 5) * ce);
        assert_eq!(pool.chunk_offset(1, 4, 1, 5), (((2 + 1) * kvh + 1) * chunks + 5) * ce);
        // The last chunk of each pool ends at that pool's end.
        assert_eq!(
            pool.chunk_offset(1, 2, kvh - 1, chunks - 1) + ce,
            shape.bytes().unwrap()
        );
        assert_eq!(
            pool.chunk_offset(1, 4, kvh - 1, chunks - 1) + ce,
            pool.dev_shape().bytes().unwrap()
        );
        let seq = |s: i32| SeqCounts {
            pool_seq: s,
            ..Default::default()
        };
        pool.check(&l, 1, &[seq(0), seq(4)]).unwrap();
        let e = pool.check(&l, 1, &[seq(0), seq(5)]).unwrap_err().to_string();
        assert!(
            e.contains("sequence 1: pool slot 5 outside the pools' 5 (3 host, 2 device)"),
            "{e}"
        );
        let e = DevicePool { dev: 0, ..pool }.check(&l, 0, &[]).unwrap_err().to_string();
        assert!(e.contains("2 GPU value slots without an address"), "{e}");
        // A host pool the device cannot address (file-backed, written by the host).
        let e = DevicePool { host: 0, ..pool }
            .check(&l, 0, &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("not mapped for the device") && e.contains("cpu-gather"),
            "{e}"
        );
        let e = DevicePool { dev: 8200, ..pool }
            .check(&l, 0, &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("16-byte aligned"), "{e}");
        // Device slots alone: no host address needed.
        let only = DevicePool {
            host: 0,
            shape: PoolShape { seqs: 0, ..shape },
            ..pool
        };
        only.check(&l, 1, &[seq(1)]).unwrap();
        assert_eq!(only.chunk_offset(0, 1, 0, 0), kvh * chunks * ce);
    }

    #[test]
    fn shapes_the_kernels_do_not_serve_are_named() {
        let cfg = preset("smollm2-135m").unwrap();
        let p = ShadowParams::defaults(&cfg, 8192);
        let l = ShadowLayout::new(&cfg, &p, 8192).unwrap();
        assert_eq!((l.kv_heads, l.head_dim, l.group), (3, 64, 3));
        let bad = [
            (ShadowLayout { head_dim: 96, ..l }, "head dimension 96"),
            (ShadowLayout { group: 9, ..l }, "group of 9"),
            (ShadowLayout { chunk: 17, ..l }, "chunk size 17"),
            (ShadowLayout { rank: 193, ..l }, "rank 193"),
            (ShadowLayout { slots: 0, ..l }, "no slots"),
            (
                ShadowLayout {
                    kv_heads: 9,
                    head_dim: 128,
                    ..l
                },
                "1152",
            ),
        ];
        for (b, msg) in bad {
            let e = b.validate().unwrap_err().to_string();
            assert!(e.contains(msg), "{e}");
        }
        let c = SeqCounts {
            chunks: 10,
            recent: 49,
            outliers: 2,
            pool_seq: 0,
        };
        let e = l.check_counts(3, &c).unwrap_err().to_string();
        assert!(e.contains("sequence 3") && e.contains("49 recent"), "{e}");
        let e = l
            .check_counts(
                0,
                &SeqCounts {
                    recent: 0,
                    outliers: 11,
                    ..c
                },
            )
            .unwrap_err()
            .to_string();
        assert!(e.contains("11 outlier"), "{e}");
    }
}
