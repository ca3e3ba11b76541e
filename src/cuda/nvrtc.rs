//! Run-time compilation of `kernels/*.cu` with NVRTC, for the device's own
//! architecture, with an on-disk cache of the machine code.
//!
//! The kernel sources are embedded in the binary (`include_str!`), so a built binary
//! needs no source tree. Each file is compiled to CUBIN for `sm_XY` (from the device's
//! compute capability; `sm_XYa` for files that need architecture-specific
//! instructions, on devices that have them) with the CUDA headers from
//! `$CUDA_HOME/include` (or `$CUDA_PATH`, default `/usr/local/cuda`). The CUBIN is
//! cached under `$SHADOWKV_KERNEL_CACHE`, else `$XDG_CACHE_HOME/shadowkv/kernels`, else
//! `~/.cache/shadowkv/kernels`, named by file, architecture, NVRTC version and a hash of
//! the source and options, so a changed kernel or toolkit never reuses stale code.

use anyhow::{anyhow, bail, Context, Result};
use cudarc::nvrtc::sys;
use std::ffi::{CStr, CString};
use std::path::{Path, PathBuf};

/// Headers the kernel files include by name (`#include "pdl.cuh"`), handed to NVRTC
/// in memory.
pub const KERNEL_HEADERS: &[(&str, &str)] = &[
    ("common.cuh", include_str!("../../kernels/common.cuh")),
    ("pdl.cuh", include_str!("../../kernels/pdl.cuh")),
    ("shadow.cuh", include_str!("../../kernels/shadow.cuh")),
];

/// One kernel source file.
#[derive(Clone, Copy, Debug)]
pub struct KernelFile {
    /// Path relative to the repository root, e.g. `kernels/rmsnorm.cu` (shown in errors).
    pub path: &'static str,
    /// The source text.
    pub source: &'static str,
    /// Needs the architecture-specific target (`sm_90a`: wgmma, setmaxnreg).
    pub arch_specific: bool,
}

/// NVRTC options shared by every kernel; tools/nvrtc-check uses the same ones.
fn compile_options(arch: &str, include: &Path) -> Vec<String> {
    vec![
        format!("--gpu-architecture={arch}"),
        "-std=c++17".into(),
        format!("--include-path={}", include.display()),
    ]
}

/// The CUDA toolkit root: `$CUDA_HOME`, `$CUDA_PATH`, or `/usr/local/cuda`.
pub fn cuda_home() -> PathBuf {
    ["CUDA_HOME", "CUDA_PATH"]
        .iter()
        .filter_map(std::env::var_os)
        .find(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/local/cuda"))
}

/// The kernel cache folder, or `None` when no home folder is known.
pub fn cache_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("SHADOWKV_KERNEL_CACHE").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(d));
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("shadowkv").join("kernels"))
}

/// 64-bit FNV-1a, stable across builds and platforms (the cache key).
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for p in parts {
        for &b in p.iter().chain(&(p.len() as u64).to_le_bytes()) {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

/// The NVRTC library, checked to be loadable.
pub struct Nvrtc {
    version: (i32, i32),
    include: PathBuf,
}

impl Nvrtc {
    /// Loads NVRTC (libnvrtc.so from the library path).
    pub fn new() -> Result<Self> {
        // SAFETY: only tries to dlopen the library by its usual names.
        if !unsafe { sys::is_culib_present() } {
            bail!(
                "NVRTC (libnvrtc.so) was not found: add the CUDA toolkit's library folder to the \
                 library path, e.g. LD_LIBRARY_PATH={}/lib64",
                cuda_home().display()
            );
        }
        let (mut major, mut minor) = (0, 0);
        // SAFETY: writes two ints.
        unsafe { sys::nvrtcVersion(&mut major, &mut minor) }
            .result()
            .map_err(|e| anyhow!("nvrtcVersion: {e}"))?;
        let include = cuda_home().join("include");
        Ok(Nvrtc {
            version: (major, minor),
            include,
        })
    }

    /// NVRTC's (major, minor) version.
    pub fn version(&self) -> (i32, i32) {
        self.version
    }

    /// The target for `file` on a device of compute capability `cc`.
    pub fn target(file: &KernelFile, cc: (i32, i32)) -> String {
        // The "a" targets exist for 9.0 and later (sm_90a, sm_100a, ...).
        let a = if file.arch_specific && cc.0 >= 9 { "a" } else { "" };
        format!("sm_{}{}{a}", cc.0, cc.1)
    }

    /// CUBIN of `file` for compute capability `cc`, from the cache when present.
    pub fn cubin(&self, file: &KernelFile, cc: (i32, i32)) -> Result<Vec<u8>> {
        let arch = Self::target(file, cc);
        let opts = compile_options(&arch, &self.include);
        let headers: Vec<&[u8]> = KERNEL_HEADERS.iter().map(|(_, h)| h.as_bytes()).collect();
        let key = fnv1a(&[
            file.source.as_bytes(),
            &headers.concat(),
            file.path.as_bytes(),
            opts.join("\n").as_bytes(),
            format!("{}.{}", self.version.0, self.version.1).as_bytes(),
        ]);
        let stem = Path::new(file.path)
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("kernel");
        let name = format!(
            "{stem}-{arch}-nvrtc{}.{}-{key:016x}.cubin",
            self.version.0, self.version.1
        );
        let cached = cache_dir().map(|d| d.join(&name));
        if let Some(p) = &cached {
            if let Ok(bytes) = std::fs::read(p) {
                if !bytes.is_empty() {
                    return Ok(bytes);
                }
            }
        }
        let cubin = self.compile(file, &arch, &opts)?;
        if let Some(p) = &cached {
            // A cache that cannot be written only costs a recompile next time.
            let _ = write_atomically(p, &cubin);
        }
        Ok(cubin)
    }

    fn compile(&self, file: &KernelFile, arch: &str, opts: &[String]) -> Result<Vec<u8>> {
        let src = CString::new(file.source).with_context(|| format!("{} contains a NUL byte", file.path))?;
        let name = CString::new(file.path)?;
        let mut prog: sys::nvrtcProgram = std::ptr::null_mut();
        let h_src: Vec<CString> = KERNEL_HEADERS.iter().map(|(_, t)| CString::new(*t).unwrap()).collect();
        let h_name: Vec<CString> = KERNEL_HEADERS.iter().map(|(n, _)| CString::new(*n).unwrap()).collect();
        let h_src_p: Vec<*const std::ffi::c_char> = h_src.iter().map(|c| c.as_ptr()).collect();
        let h_name_p: Vec<*const std::ffi::c_char> = h_name.iter().map(|c| c.as_ptr()).collect();
        // SAFETY: src, name and the headers outlive the program, which is destroyed below.
        unsafe {
            sys::nvrtcCreateProgram(
                &mut prog,
                src.as_ptr(),
                name.as_ptr(),
                h_src_p.len() as i32,
                h_src_p.as_ptr(),
                h_name_p.as_ptr(),
            )
        }
        .result()
        .map_err(|e| anyhow!("nvrtcCreateProgram for {}: {e}", file.path))?;
        let result = (|| {
            let c_opts: Vec<CString> = opts.iter().map(|o| CString::new(o.as_str()).unwrap()).collect();
            let ptrs: Vec<*const std::ffi::c_char> = c_opts.iter().map(|o| o.as_ptr()).collect();
            // SAFETY: prog is live; the option strings outlive the call.
            let rc = unsafe { sys::nvrtcCompileProgram(prog, ptrs.len() as i32, ptrs.as_ptr()) };
            if rc != sys::nvrtcResult::NVRTC_SUCCESS {
                let log = program_log(prog);
                bail!(
                    "NVRTC {}.{} failed to compile {} for {arch} ({rc:?}); include path {}:\n{}",
                    self.version.0,
                    self.version.1,
                    file.path,
                    self.include.display(),
                    log.trim_end()
                );
            }
            let mut size = 0usize;
            // SAFETY: prog compiled successfully; the buffer has the size NVRTC reports.
            unsafe { sys::nvrtcGetCUBINSize(prog, &mut size) }
                .result()
                .map_err(|e| anyhow!("nvrtcGetCUBINSize for {}: {e}", file.path))?;
            if size == 0 {
                bail!("NVRTC produced no machine code for {} ({arch})", file.path);
            }
            let mut cubin = vec![0u8; size];
            unsafe { sys::nvrtcGetCUBIN(prog, cubin.as_mut_ptr().cast()) }
                .result()
                .map_err(|e| anyhow!("nvrtcGetCUBIN for {}: {e}", file.path))?;
            Ok(cubin)
        })();
        // SAFETY: prog was created above and is not used after this.
        unsafe { sys::nvrtcDestroyProgram(&mut prog) };
        result
    }
}

fn program_log(prog: sys::nvrtcProgram) -> String {
    let mut size = 0usize;
    // SAFETY: prog is a live program; the buffer has the size NVRTC reports.
    unsafe {
        if sys::nvrtcGetProgramLogSize(prog, &mut size) != sys::nvrtcResult::NVRTC_SUCCESS || size == 0 {
            return "(no log)".into();
        }
        let mut buf = vec![0u8; size];
        if sys::nvrtcGetProgramLog(prog, buf.as_mut_ptr().cast()) != sys::nvrtcResult::NVRTC_SUCCESS {
            return "(no log)".into();
        }
        CStr::from_bytes_until_nul(&buf)
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default()
    }
}

fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        path.file_name().and_then(|s| s.to_str()).unwrap_or("kernel"),
        std::process::id()
    ));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_key_depends_on_every_part() {
        let a = fnv1a(&[b"src", b"sm_90"]);
        assert_ne!(a, fnv1a(&[b"src", b"sm_80"]));
        assert_ne!(a, fnv1a(&[b"srd", b"sm_90"]));
        // Part boundaries count: ("ab", "c") differs from ("a", "bc").
        assert_ne!(fnv1a(&[b"ab", b"c"]), fnv1a(&[b"a", b"bc"]));
        assert_eq!(a, fnv1a(&[b"src", b"sm_90"]));
    }

    #[test]
    fn arch_specific_target_only_on_hopper_and_later() {
        let f = KernelFile {
            path: "kernels/x.cu",
            source: "",
            arch_specific: true,
        };
        assert_eq!(Nvrtc::target(&f, (9, 0)), "sm_90a");
        assert_eq!(Nvrtc::target(&f, (8, 0)), "sm_80");
        let g = KernelFile {
            arch_specific: false,
            ..f
        };
        assert_eq!(Nvrtc::target(&g, (9, 0)), "sm_90");
    }
}
