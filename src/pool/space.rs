//! Room for a pool, found before the pool is used: a file-backed pool's blocks are
//! reserved when it is created (`posix_fallocate`; a sparse file is no reservation and
//! its first write past the free space kills the process with SIGBUS), and an anonymous
//! pool is checked against the machine's memory. Sizes are bytes, whatever the pool's
//! element type, so every pool gets its memory through [`file_backed`] or [`anonymous`].

use memmap2::{Advice, MmapMut};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Where [`MachineMemory`] is read from.
const MEMINFO: &str = "/proc/meminfo";

/// Why a pool cannot be given its memory.
#[derive(Debug, thiserror::Error)]
pub enum SpaceError {
    /// The filesystem of a pool file has too little free space.
    #[error("needs {} for {}, the filesystem has {} free", human_size(*.needed), .path.display(), human_size(*.free))]
    Disk {
        /// The pool file.
        path: PathBuf,
        /// Bytes the pool needs.
        needed: u64,
        /// Bytes free to unprivileged users on its filesystem.
        free: u64,
    },
    /// The machine has too little memory for an anonymous pool.
    #[error("{}", memory_message(*.needed, .memory))]
    Memory {
        /// Bytes the pool needs.
        needed: u64,
        /// What the machine has.
        memory: MachineMemory,
    },
    /// Another process holds the pool file (and would be killed if it were resized).
    #[error("{} is in use by another process (another shadowkv with the same pools.path?)", .0.display())]
    InUse(PathBuf),
    /// Any other failure, with what was being done.
    #[error("{what}: {source}")]
    Io {
        /// What was being done, naming the file where there is one.
        what: String,
        /// The error.
        source: io::Error,
    },
}

fn memory_message(needed: u64, m: &MachineMemory) -> String {
    if needed > m.total {
        format!(
            "needs {}, more than the machine's {} of RAM and swap (MemTotal + SwapTotal in {MEMINFO}): it can never be backed",
            human_size(needed),
            human_size(m.total)
        )
    } else {
        format!(
            "needs {}, the machine has {} available (MemAvailable + SwapFree in {MEMINFO})",
            human_size(needed),
            human_size(m.available)
        )
    }
}

/// A byte count for people: `360.0 MiB`, `1.25 GiB`.
pub fn human_size(bytes: u64) -> String {
    const KIB: f64 = 1024.0;
    let b = bytes as f64;
    if b >= KIB * KIB * KIB {
        format!("{:.2} GiB", b / (KIB * KIB * KIB))
    } else if b >= KIB * KIB {
        format!("{:.1} MiB", b / (KIB * KIB))
    } else if b >= KIB {
        format!("{:.1} KiB", b / KIB)
    } else {
        format!("{bytes} bytes")
    }
}

/// The memory of a pool: a shared map, and the locked file behind it if any.
pub struct PoolMemory {
    map: MmapMut,
    /// The file behind the map, if any; holds the `flock` that keeps other processes
    /// from resizing it under us.
    file: Option<File>,
}

impl PoolMemory {
    /// Start of the map (page-aligned).
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.map.as_mut_ptr()
    }

    /// Whether a file backs the map (its pages live in the page cache).
    pub fn is_file_backed(&self) -> bool {
        self.file.is_some()
    }

    /// Tells the kernel the map is read at random: a fault reads its page and no
    /// read-ahead around it (a gather reads one chunk of a page here and there).
    pub fn advise_random(&self) -> io::Result<()> {
        self.map.advise(Advice::Random)
    }

    /// Asks the kernel to start reading in `len` bytes of the map from `offset`.
    pub fn will_need(&self, offset: usize, len: usize) -> io::Result<()> {
        self.map.advise_range(Advice::WillNeed, offset, len)
    }

    /// Writes `data` at byte `offset` of the file behind the map with `pwrite` (the map
    /// sees it: one page cache), where whole pages are overwritten without being read
    /// first; `None` for an anonymous map.
    pub fn write_file_at(&self, offset: usize, data: &[u8]) -> Option<io::Result<()>> {
        self.file.as_ref().map(|f| f.write_all_at(data, offset as u64))
    }

    /// The mapped bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.map
    }

    /// Mapped bytes (at least one).
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether nothing is mapped (never: a pool maps at least one byte).
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// Memory of the machine, from `/proc/meminfo`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MachineMemory {
    /// Bytes that can be had now without swapping others out: MemAvailable + SwapFree.
    pub available: u64,
    /// Bytes of RAM and swap in all: MemTotal + SwapTotal.
    pub total: u64,
}

impl MachineMemory {
    /// Reads `/proc/meminfo`.
    pub fn read() -> Result<Self, SpaceError> {
        let text = std::fs::read_to_string(MEMINFO).map_err(|source| SpaceError::Io {
            what: format!("reading {MEMINFO} to check the pool against the machine's memory"),
            source,
        })?;
        Self::parse(&text).ok_or_else(|| SpaceError::Io {
            what: format!("reading {MEMINFO}"),
            source: io::Error::new(
                io::ErrorKind::InvalidData,
                "no MemTotal, MemAvailable, SwapTotal and SwapFree lines",
            ),
        })
    }

    /// Parses the text of `/proc/meminfo` (`Key:   123 kB` lines).
    pub fn parse(text: &str) -> Option<Self> {
        let field = |name: &str| {
            text.lines().find_map(|l| {
                let rest = l.strip_prefix(name)?.strip_prefix(':')?;
                let kb: u64 = rest.trim().strip_suffix("kB")?.trim().parse().ok()?;
                kb.checked_mul(1024)
            })
        };
        Some(MachineMemory {
            available: field("MemAvailable")?.saturating_add(field("SwapFree")?),
            total: field("MemTotal")?.saturating_add(field("SwapTotal")?),
        })
    }

    /// Refuses `needed` bytes beyond what is available now (and so beyond RAM + swap).
    pub fn check(&self, needed: u64) -> Result<(), SpaceError> {
        if needed > self.available {
            return Err(SpaceError::Memory { needed, memory: *self });
        }
        Ok(())
    }
}

/// Bytes free to unprivileged users on the filesystem holding `path` (file or directory).
pub fn free_space(path: &Path) -> io::Result<u64> {
    free_space_of(&File::open(path)?)
}

fn free_space_of(file: &File) -> io::Result<u64> {
    // SAFETY: statvfs is plain data; all-zero is a valid value for fstatvfs to overwrite.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: the descriptor is open for the duration of the call and `st` is writable.
    if unsafe { libc::fstatvfs(file.as_raw_fd(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

/// Anonymous shared memory for `bytes` (lazily committed), refused when the machine does
/// not have that much available (see [`MachineMemory::check`]).
pub fn anonymous(bytes: usize) -> Result<PoolMemory, SpaceError> {
    let len = bytes.max(1);
    MachineMemory::read()?.check(len as u64)?;
    let map = MmapMut::map_anon(len).map_err(|source| SpaceError::Io {
        what: format!("mapping {} of anonymous memory", human_size(len as u64)),
        source,
    })?;
    Ok(PoolMemory { map, file: None })
}

/// The file at `path`, created if absent, locked against other processes, emptied and
/// given `bytes` of reserved blocks, then mapped. A filesystem without room is a
/// [`SpaceError::Disk`]; on any failure after the lock the file is removed.
pub fn file_backed(path: &Path, bytes: usize) -> Result<PoolMemory, SpaceError> {
    let len = bytes.max(1) as u64;
    let io_err = |what: &str| {
        let what = format!("{what} {}", path.display());
        move |source| SpaceError::Io { what, source }
    };
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(io_err("opening"))?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = io::Error::last_os_error();
        return Err(match e.raw_os_error() {
            Some(libc::EWOULDBLOCK) => SpaceError::InUse(path.to_path_buf()),
            _ => io_err("locking")(e),
        });
    }
    let mapped = reserve(&file, path, len).and_then(|()| {
        // SAFETY: we hold the file's lock, so no cooperating process resizes it while
        // mapped; another program truncating it anyway is beyond what a map can guard.
        unsafe { MmapMut::map_mut(&file) }.map_err(io_err("mapping"))
    });
    match mapped {
        Ok(map) => Ok(PoolMemory { map, file: Some(file) }),
        Err(e) => {
            let _ = std::fs::remove_file(path);
            Err(e)
        }
    }
}

/// Empties `file` and reserves `len` bytes of blocks for it.
fn reserve(file: &File, path: &Path, len: u64) -> Result<(), SpaceError> {
    let io_err = |what: String| move |source| SpaceError::Io { what, source };
    let disk = |free| SpaceError::Disk {
        path: path.to_path_buf(),
        needed: len,
        free,
    };
    file.set_len(0)
        .map_err(io_err(format!("emptying {}", path.display())))?;
    let free_of = || free_space_of(file).map_err(io_err(format!("reading the free space under {}", path.display())));
    let free = free_of()?;
    if len > free {
        return Err(disk(free));
    }
    let off = libc::off_t::try_from(len).map_err(|_| disk(free))?;
    loop {
        // SAFETY: posix_fallocate on a descriptor we own; it returns an error number.
        match unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, off) } {
            0 => return Ok(()),
            libc::EINTR => continue,
            libc::ENOSPC => {
                let _ = file.set_len(0);
                return Err(disk(free_of()?));
            }
            e => {
                return Err(io_err(format!(
                    "reserving {} of blocks for {}",
                    human_size(len),
                    path.display()
                ))(io::Error::from_raw_os_error(e)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn a_file_pool_owns_its_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pool");
        // A sparse leftover of the same name is emptied and reserved anew.
        File::create(&path).unwrap().set_len(1 << 30).unwrap();
        let len = 3 << 20;
        let mut m = file_backed(&path, len).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), len as u64);
        assert!(
            meta.blocks() * 512 >= len as u64,
            "{} blocks of 512 bytes do not cover {len} bytes",
            meta.blocks()
        );
        assert_eq!(m.len(), len);
        // SAFETY: the last byte of the map, written while we hold it.
        unsafe { *m.as_mut_ptr().add(len - 1) = 7 };
    }

    #[test]
    fn a_pool_file_in_use_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pool");
        let _held = file_backed(&path, 4096).unwrap();
        let e = file_backed(&path, 1 << 20)
            .err()
            .expect("a second pool on the same file");
        assert!(matches!(e, SpaceError::InUse(_)), "{e}");
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            4096,
            "the held file was resized"
        );
    }

    #[test]
    fn a_pool_larger_than_the_free_space_is_refused_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pool");
        let free = free_space(dir.path()).unwrap();
        let want = free.saturating_mul(2).max(1 << 40);
        let e = file_backed(&path, want as usize)
            .err()
            .expect("more than the free space");
        let SpaceError::Disk { needed, free: got, .. } = e else {
            panic!("{e}")
        };
        assert_eq!(needed, want);
        assert!(got < want);
        let msg = e.to_string();
        assert!(
            msg.contains(&human_size(want)) && msg.contains("the filesystem has"),
            "{msg}"
        );
        assert!(!path.exists(), "the refused pool file was left behind");
    }

    #[test]
    fn meminfo_is_read_and_checked() {
        let text = "MemTotal:       24684084 kB\nMemFree:          986180 kB\n\
            MemAvailable:   24056256 kB\nSwapTotal:       1048576 kB\nSwapFree:         524288 kB\n";
        let m = MachineMemory::parse(text).unwrap();
        assert_eq!(m.available, (24056256 + 524288) * 1024);
        assert_eq!(m.total, (24684084 + 1048576) * 1024);
        assert!(m.check(m.available).is_ok());
        let e = m.check(m.available + 1).unwrap_err().to_string();
        assert!(e.contains("available (MemAvailable + SwapFree"), "{e}");
        let e = m.check(m.total + 1).unwrap_err().to_string();
        assert!(e.contains("can never be backed"), "{e}");
        assert_eq!(MachineMemory::parse("MemTotal: 1 kB\n"), None);
        let here = MachineMemory::read().unwrap();
        assert!(here.available > 0 && here.available <= here.total, "{here:?}");
        assert!(matches!(anonymous(usize::MAX / 2), Err(SpaceError::Memory { .. })));
        assert_eq!(anonymous(0).unwrap().len(), 1);
    }

    #[test]
    fn sizes_read_well() {
        assert_eq!(human_size(512), "512 bytes");
        assert_eq!(human_size(2 << 20), "2.0 MiB");
        assert_eq!(human_size(377_487_360), "360.0 MiB");
        assert_eq!(human_size(3 << 30), "3.00 GiB");
    }
}
