//! The NCCL entry points tensor parallelism calls, loaded from the library file
//! [`super::find_nccl`] found: a unique id made by one thread and shared, one
//! communicator per rank, and the two collectives of a step (all-reduce of the residual
//! stream, all-gather of the logits), queued on a CUDA stream like kernels.

use super::find::find_nccl;
use anyhow::{bail, Context, Result};
use cudarc::driver::sys::CUstream;
use std::ffi::{c_char, c_int, c_void, CStr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// `ncclUniqueId`: the bootstrap address every rank of one communicator is given.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct UniqueId {
    internal: [c_char; 128],
}

type RawComm = *mut c_void;
type Status = c_int;

/// `ncclDataType_t` values used here.
const UINT8: c_int = 1;
const FLOAT32: c_int = 7;
const BFLOAT16: c_int = 9;
/// `ncclRedOp_t::ncclSum`.
const SUM: c_int = 0;

type GetVersion = unsafe extern "C" fn(*mut c_int) -> Status;
type GetUniqueId = unsafe extern "C" fn(*mut UniqueId) -> Status;
type CommInitRank = unsafe extern "C" fn(*mut RawComm, c_int, UniqueId, c_int) -> Status;
type CommFinish = unsafe extern "C" fn(RawComm) -> Status;
type GetErrorString = unsafe extern "C" fn(Status) -> *const c_char;
type GetLastError = unsafe extern "C" fn(RawComm) -> *const c_char;
type AllReduce = unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, c_int, RawComm, CUstream) -> Status;
type AllGather = unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, RawComm, CUstream) -> Status;

/// The loaded library and the entry points the engine calls.
pub struct Nccl {
    path: PathBuf,
    version: (u32, u32, u32),
    get_unique_id: GetUniqueId,
    comm_init_rank: CommInitRank,
    comm_destroy: CommFinish,
    comm_abort: CommFinish,
    get_error_string: GetErrorString,
    get_last_error: GetLastError,
    all_reduce: AllReduce,
    all_gather: AllGather,
    // Keeps the entry points above valid: dropped last.
    _lib: libloading::Library,
}

impl std::fmt::Debug for Nccl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (a, b, c) = self.version;
        write!(f, "NCCL {a}.{b}.{c} ({})", self.path.display())
    }
}

impl Nccl {
    /// Loads NCCL from where [`find_nccl`] finds it; the error says which library and
    /// every directory looked in.
    pub fn load() -> Result<Arc<Nccl>> {
        let path = find_nccl().context("tensor parallelism needs NCCL")?;
        Self::load_from(&path)
    }

    /// Loads NCCL from the library file `path`.
    pub fn load_from(path: &Path) -> Result<Arc<Nccl>> {
        // SAFETY: loading NCCL runs its initialisers, which only set up its own state.
        let lib = unsafe { libloading::Library::new(path) }
            .with_context(|| format!("loading NCCL from {}", path.display()))?;
        // SAFETY: each symbol is NCCL's C function of that name, with the signature of
        // nccl.h (stable across NCCL 2.x) written in its type.
        unsafe fn sym<T: Copy>(lib: &libloading::Library, path: &Path, name: &str) -> Result<T> {
            let s: libloading::Symbol<T> = unsafe { lib.get(name.as_bytes()) }
                .with_context(|| format!("{} has no `{name}`: not an NCCL 2 library", path.display()))?;
            Ok(*s)
        }
        // SAFETY: as above.
        let nccl = unsafe {
            let get_version: GetVersion = sym(&lib, path, "ncclGetVersion")?;
            let mut v: c_int = 0;
            let st = get_version(&mut v);
            if st != 0 {
                bail!("{}: ncclGetVersion failed ({st})", path.display());
            }
            // NCCL ≥ 2.9 encodes the version as major·10000 + minor·100 + patch.
            let v = v as u32;
            let version = if v >= 10000 {
                (v / 10000, v / 100 % 100, v % 100)
            } else {
                (v / 1000, v / 100 % 10, v % 100)
            };
            if version < (2, 12, 0) {
                bail!(
                    "{} is NCCL {}.{}.{}: tensor parallelism needs NCCL 2.12 or newer",
                    path.display(),
                    version.0,
                    version.1,
                    version.2
                );
            }
            Nccl {
                path: path.to_path_buf(),
                version,
                get_unique_id: sym(&lib, path, "ncclGetUniqueId")?,
                comm_init_rank: sym(&lib, path, "ncclCommInitRank")?,
                comm_destroy: sym(&lib, path, "ncclCommDestroy")?,
                comm_abort: sym(&lib, path, "ncclCommAbort")?,
                get_error_string: sym(&lib, path, "ncclGetErrorString")?,
                get_last_error: sym(&lib, path, "ncclGetLastError")?,
                all_reduce: sym(&lib, path, "ncclAllReduce")?,
                all_gather: sym(&lib, path, "ncclAllGather")?,
                _lib: lib,
            }
        };
        Ok(Arc::new(nccl))
    }

    /// `(major, minor, patch)`.
    pub fn version(&self) -> (u32, u32, u32) {
        self.version
    }

    /// The library file loaded.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A new bootstrap id: made once, given to every rank of one communicator.
    pub fn unique_id(&self) -> Result<UniqueId> {
        let mut id = UniqueId { internal: [0; 128] };
        // SAFETY: writes the 128-byte id.
        let st = unsafe { (self.get_unique_id)(&mut id) };
        self.check(st, std::ptr::null_mut(), "ncclGetUniqueId")?;
        Ok(id)
    }

    /// An error for status `st` of `what` (with the communicator's last error where
    /// there is one).
    fn check(&self, st: Status, comm: RawComm, what: &str) -> Result<()> {
        if st == 0 {
            return Ok(());
        }
        // SAFETY: NCCL returns static strings (its last-error buffer for a communicator).
        let text = |p: *const c_char| {
            if p.is_null() {
                String::new()
            } else {
                unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
            }
        };
        let name = text(unsafe { (self.get_error_string)(st) });
        let last = text(unsafe { (self.get_last_error)(comm) });
        if last.is_empty() {
            bail!("{what} failed: {name} (NCCL error {st})")
        }
        bail!("{what} failed: {name} (NCCL error {st}): {last}")
    }
}

/// One rank's communicator. Collectives on one communicator must be queued in the same
/// order on every rank and never from two streams at once: the engine gives each
/// stream that runs collectives a communicator of its own.
pub struct Comm {
    nccl: Arc<Nccl>,
    raw: RawComm,
    rank: usize,
    world: usize,
}

// SAFETY: an NCCL communicator may move between threads; `&mut self` or ownership keeps
// one thread at a time on it (NCCL's rule: no concurrent calls on one communicator).
unsafe impl Send for Comm {}

impl Comm {
    /// Joins rank `rank` of the `world`-rank communicator bootstrapped at `id`. Blocks
    /// until every rank has joined, so each rank calls it from its own thread, with its
    /// GPU's context current.
    pub fn init(nccl: &Arc<Nccl>, id: &UniqueId, world: usize, rank: usize) -> Result<Comm> {
        if rank >= world {
            bail!("rank {rank} of a communicator of {world}");
        }
        let mut raw: RawComm = std::ptr::null_mut();
        // SAFETY: `raw` receives the new communicator; `id` is a valid bootstrap id.
        let st = unsafe { (nccl.comm_init_rank)(&mut raw, world as c_int, *id, rank as c_int) };
        nccl.check(st, raw, &format!("ncclCommInitRank (rank {rank} of {world})"))?;
        Ok(Comm {
            nccl: nccl.clone(),
            raw,
            rank,
            world,
        })
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Ranks in the communicator.
    pub fn world(&self) -> usize {
        self.world
    }

    /// Queues `buf[i] = Σ_ranks buf[i]` over `count` bf16 values on `stream`.
    ///
    /// # Safety
    /// `buf` must hold `count` bf16 values on this rank's device and stay alive until the
    /// queued work is done; every rank must queue the same collective next.
    pub unsafe fn all_reduce_sum_bf16(&mut self, buf: u64, count: usize, stream: CUstream) -> Result<()> {
        let p = buf as *mut c_void;
        // SAFETY: the caller's contract.
        let st = unsafe { (self.nccl.all_reduce)(p, p, count, BFLOAT16, SUM, self.raw, stream) };
        self.nccl.check(st, self.raw, "ncclAllReduce")
    }

    /// Queues `recv[r·count..(r+1)·count] = send of rank r` for every rank on `stream`
    /// (`count` f32 values each).
    ///
    /// # Safety
    /// `send` must hold `count` f32 values and `recv` `world · count`, on this rank's
    /// device, alive until the queued work is done; every rank must queue the same
    /// collective next.
    pub unsafe fn all_gather_f32(&mut self, send: u64, recv: u64, count: usize, stream: CUstream) -> Result<()> {
        // SAFETY: the caller's contract.
        let st = unsafe {
            (self.nccl.all_gather)(
                send as *const c_void,
                recv as *mut c_void,
                count,
                FLOAT32,
                self.raw,
                stream,
            )
        };
        self.nccl.check(st, self.raw, "ncclAllGather")
    }

    /// Queues an all-reduce of `bytes` bytes (summed as bytes; for timing the link,
    /// not for numbers).
    ///
    /// # Safety
    /// As [`Comm::all_reduce_sum_bf16`], with `buf` holding `bytes` bytes.
    pub unsafe fn all_reduce_bytes(&mut self, buf: u64, bytes: usize, stream: CUstream) -> Result<()> {
        let p = buf as *mut c_void;
        // SAFETY: the caller's contract.
        let st = unsafe { (self.nccl.all_reduce)(p, p, bytes, UINT8, SUM, self.raw, stream) };
        self.nccl.check(st, self.raw, "ncclAllReduce")
    }

    /// Stops the communicator at once, ending collectives stuck waiting for a rank that
    /// failed (a plain drop would wait for them).
    pub fn abort(mut self) {
        let raw = std::mem::replace(&mut self.raw, std::ptr::null_mut());
        // SAFETY: the communicator is ours and used no more.
        unsafe { (self.nccl.comm_abort)(raw) };
    }
}

impl Drop for Comm {
    fn drop(&mut self) {
        if !self.raw.is_null() {
            // SAFETY: the communicator is ours and used no more; destroying waits for
            // the collectives queued on it.
            unsafe { (self.nccl.comm_destroy)(self.raw) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_that_is_not_a_library_is_named_in_the_error() {
        let tmp = tempfile::tempdir().unwrap();
        let fake = tmp.path().join("libnccl.so.2");
        std::fs::write(&fake, b"not a real library").unwrap();
        let e = format!("{:#}", Nccl::load_from(&fake).unwrap_err());
        assert!(
            e.contains("loading NCCL from") && e.contains(&fake.display().to_string()),
            "{e}"
        );
    }

    #[test]
    fn a_library_without_nccl_symbols_is_refused_by_name() {
        // Any shared library of the system that is not NCCL.
        let Some(libm) = [
            "/lib/x86_64-linux-gnu/libm.so.6",
            "/usr/lib/x86_64-linux-gnu/libm.so.6",
            "/lib64/libm.so.6",
        ]
        .iter()
        .map(Path::new)
        .find(|p| p.is_file()) else {
            eprintln!("skipped: no libm.so.6 in the usual places");
            return;
        };
        let e = format!("{:#}", Nccl::load_from(libm).unwrap_err());
        assert!(e.contains("has no `ncclGetVersion`"), "{e}");
    }
}
