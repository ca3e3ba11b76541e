//! Finding `libnccl.so.2` where `dlopen` would, with an error that names every place
//! looked, and keeping NVLink multicast off before NCCL starts.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

/// The NCCL library the CUDA bindings load.
pub const LIBRARY: &str = "libnccl.so.2";

/// The toolkit's library directory, searched last.
const CUDA_LIB64: &str = "/usr/local/cuda/lib64";

/// A library that is in none of the directories searched.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{library} not found (install NCCL or add its directory to LD_LIBRARY_PATH); looked in: {}",
    searched.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", ")
)]
pub struct NotFound {
    /// The library's file name.
    pub library: String,
    /// Every directory searched, in order.
    pub searched: Vec<PathBuf>,
}

/// The directories `dlopen` searches for a bare library name, in its order, then the
/// CUDA toolkit's: the entries of `ld_library_path` (`LD_LIBRARY_PATH`), the
/// directories `ld_so_conf` lists (what `ldconfig` caches; `include` lines followed),
/// the system's default directories, and `/usr/local/cuda/lib64`. Each directory once.
pub fn search_dirs(ld_library_path: Option<&OsStr>, ld_so_conf: &Path) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Some(p) = ld_library_path {
        // An empty entry would mean the working directory; dlopen's callers rarely mean it.
        dirs.extend(std::env::split_paths(p).filter(|d| !d.as_os_str().is_empty()));
    }
    conf_dirs(ld_so_conf, 0, &mut dirs);
    let multiarch = format!("{}-linux-gnu", std::env::consts::ARCH);
    for d in [
        format!("/lib/{multiarch}"),
        format!("/usr/lib/{multiarch}"),
        "/lib64".into(),
        "/usr/lib64".into(),
        "/lib".into(),
        "/usr/lib".into(),
        CUDA_LIB64.into(),
    ] {
        dirs.push(d.into());
    }
    let mut seen = std::collections::HashSet::new();
    dirs.retain(|d| seen.insert(d.clone()));
    dirs
}

/// Appends the directories of an `ld.so.conf`-style file, following `include` lines
/// (a `*` in the file name matches any run of characters); a missing file adds none.
fn conf_dirs(file: &Path, depth: usize, out: &mut Vec<PathBuf>) {
    let Ok(text) = std::fs::read_to_string(file) else {
        return;
    };
    // ldconfig reads included files relative to the including file's directory.
    let base = file.parent().unwrap_or(Path::new("/"));
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        if let Some(pattern) = line
            .strip_prefix("include")
            .filter(|r| r.starts_with(char::is_whitespace))
        {
            if depth < 8 {
                for pat in pattern.split_whitespace() {
                    for f in expand(&base.join(pat)) {
                        conf_dirs(&f, depth + 1, out);
                    }
                }
            }
        } else if !line.is_empty() && !line.starts_with("hwcap") {
            out.extend(
                line.split(|c: char| c == ':' || c == ',' || c.is_whitespace())
                    .filter(|d| d.starts_with('/'))
                    .map(PathBuf::from),
            );
        }
    }
}

/// The files a pattern names, sorted: itself when it has no `*`, else the entries of
/// its directory whose names match the `*` pattern of its last component.
fn expand(pattern: &Path) -> Vec<PathBuf> {
    let name = pattern.file_name().and_then(OsStr::to_str).unwrap_or("");
    if !name.contains('*') {
        return vec![pattern.to_path_buf()];
    }
    let dir = pattern.parent().unwrap_or(Path::new("/"));
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_str().is_some_and(|n| wildcard(name, n)))
        .map(|e| e.path())
        .collect();
    files.sort();
    files
}

/// Whether `name` matches `pattern`, where `*` matches any run of characters.
fn wildcard(pattern: &str, name: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if parts.len() == 1 {
        return pattern == name;
    }
    if !name.starts_with(first) || name.len() < first.len() + last.len() || !name.ends_with(last) {
        return false;
    }
    let mut rest = &name[first.len()..name.len() - last.len()];
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(i) => rest = &rest[i + mid.len()..],
            None => return false,
        }
    }
    true
}

/// The first `dir/library` among `dirs` that is a file (or a link to one).
pub fn find_in(library: &str, dirs: &[PathBuf]) -> Result<PathBuf, NotFound> {
    dirs.iter()
        .map(|d| d.join(library))
        .find(|p| p.is_file())
        .ok_or_else(|| NotFound {
            library: library.into(),
            searched: dirs.to_vec(),
        })
}

/// Finds `libnccl.so.2` where `dlopen` would from this process's `LD_LIBRARY_PATH` and
/// `/etc/ld.so.conf`, or in `/usr/local/cuda/lib64`.
pub fn find_nccl() -> Result<PathBuf, NotFound> {
    let ld = std::env::var_os("LD_LIBRARY_PATH");
    find_in(LIBRARY, &search_dirs(ld.as_deref(), Path::new("/etc/ld.so.conf")))
}

/// Sets `NCCL_NVLS_ENABLE=0` in this process's environment, whatever the caller's
/// environment says, so that NCCL never uses NVLink SHARP multicast: on the shared GPU
/// hosts a multicast object left behind can put every GPU of the host out of service,
/// for every user, until it is reset. NCCL reads the variable when a communicator is
/// created, so the binary calls this first thing, before any thread starts (changing
/// the environment while other threads read it is not safe).
pub fn disable_nvlink_multicast() {
    std::env::set_var("NCCL_NVLS_ENABLE", "0");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_library_in_the_first_directory_that_holds_it() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b, c) = (tmp.path().join("a"), tmp.path().join("b"), tmp.path().join("c"));
        for d in [&a, &b, &c] {
            std::fs::create_dir(d).unwrap();
        }
        std::fs::write(b.join(LIBRARY), b"not a real library").unwrap();
        std::fs::write(c.join(LIBRARY), b"not a real library").unwrap();
        let dirs = vec![a.clone(), b.clone(), c.clone()];
        assert_eq!(find_in(LIBRARY, &dirs).unwrap(), b.join(LIBRARY));
        // A directory of that name is not the library.
        std::fs::create_dir(a.join(LIBRARY)).unwrap();
        assert_eq!(find_in(LIBRARY, &dirs).unwrap(), b.join(LIBRARY));
    }

    #[test]
    fn not_found_names_the_library_and_every_place_looked() {
        let tmp = tempfile::tempdir().unwrap();
        let conf = tmp.path().join("ld.so.conf");
        let dirs = search_dirs(Some(OsStr::new("/opt/x/lib::/opt/y/lib")), &conf);
        let e = find_in(LIBRARY, &dirs).unwrap_err();
        assert_eq!(e.searched, dirs);
        let msg = e.to_string();
        assert!(msg.starts_with("libnccl.so.2 not found"), "{msg}");
        for d in ["/opt/x/lib", "/opt/y/lib", "/usr/lib", "/usr/local/cuda/lib64"] {
            assert!(msg.contains(d), "{msg} lacks {d}");
        }
    }

    #[test]
    fn search_order_is_ld_library_path_then_ld_so_conf_then_system_then_cuda() {
        let tmp = tempfile::tempdir().unwrap();
        let confd = tmp.path().join("ld.so.conf.d");
        std::fs::create_dir(&confd).unwrap();
        std::fs::write(confd.join("b-nccl.conf"), "/opt/nccl/lib\n").unwrap();
        std::fs::write(confd.join("a-cuda.conf"), "# CUDA\n/usr/local/cuda-13.0/targets/lib\n").unwrap();
        std::fs::write(confd.join("skipped.txt"), "/never\n").unwrap();
        let conf = tmp.path().join("ld.so.conf");
        std::fs::write(&conf, "include ld.so.conf.d/*.conf\n/opt/extra:/usr/lib\n").unwrap();
        let dirs = search_dirs(Some(OsStr::new("/home/u/lib:/usr/lib64")), &conf);
        let at = |d: &str| {
            dirs.iter()
                .position(|x| x == Path::new(d))
                .unwrap_or_else(|| panic!("{d} in {dirs:?}"))
        };
        assert_eq!(at("/home/u/lib"), 0);
        assert_eq!(at("/usr/lib64"), 1);
        assert_eq!(at("/usr/local/cuda-13.0/targets/lib"), 2);
        assert_eq!(at("/opt/nccl/lib"), 3);
        assert_eq!(at("/opt/extra"), 4);
        assert_eq!(at("/usr/lib"), 5);
        assert_eq!(dirs.last().unwrap(), Path::new("/usr/local/cuda/lib64"));
        assert!(!dirs.iter().any(|d| d == Path::new("/never")));
        // Each directory once.
        let unique: std::collections::HashSet<_> = dirs.iter().collect();
        assert_eq!(unique.len(), dirs.len());
        // Through a conf-listed directory the fake library is found.
        let lib = tmp.path().join("lib");
        std::fs::create_dir(&lib).unwrap();
        std::fs::write(lib.join(LIBRARY), b"").unwrap();
        std::fs::write(confd.join("c-local.conf"), format!("{}\n", lib.display())).unwrap();
        let dirs = search_dirs(None, &conf);
        assert_eq!(find_in(LIBRARY, &dirs).unwrap(), lib.join(LIBRARY));
    }

    #[test]
    fn wildcards_match_runs_of_characters() {
        assert!(wildcard("*.conf", "cuda.conf"));
        assert!(wildcard("*.conf", ".conf"));
        assert!(!wildcard("*.conf", "cuda.conf.bak"));
        assert!(wildcard("x*-*.conf", "x86_64-linux-gnu.conf"));
        assert!(!wildcard("x*-*.conf", "x.conf"));
        assert!(wildcard("libc.conf", "libc.conf"));
        assert!(!wildcard("libc.conf", "libc.confx"));
    }
}
