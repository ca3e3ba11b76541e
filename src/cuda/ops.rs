//! The element-wise and row-wise operations of the forward pass, and the cuBLAS
//! matrix product, on bf16 device buffers (fp32 arithmetic inside every kernel).
//!
//! Every operation is queued on the device's compute stream and returns once queued;
//! sizes are checked against the buffers before launching.

use super::device::{CudaDevice, StreamPriority};
use super::kernels::Kernels;
use crate::model::config::ModelConfig;
use anyhow::{bail, ensure, Result};
use cudarc::cublas::{result as blas, sys as blas_sys, CudaBlas};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};
use half::bf16;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

/// The CUDA backend's operations on one stream: the device with that stream, the
/// compiled kernels (shared by every stream's handle, see [`CudaOps::fork`]) and a
/// cuBLAS handle bound to the stream, made by its first product ([`CudaOps::blas`]).
pub struct CudaOps {
    dev: CudaDevice,
    pub(crate) k: Arc<Kernels>,
    blas: OnceLock<Blas>,
    gemv: AtomicBool,
    pdl: AtomicBool,
    /// Prefill attention at one block a multiprocessor ([`CudaOps::share_sms_with_decoding`]).
    pub(crate) prefill_half_sm: AtomicBool,
    gemv_warps: usize,
    /// Flash-decoding split blocks resident at once, found by the flash-decoding
    /// launcher on first use.
    pub(crate) decode_slots: OnceLock<usize>,
}

/// Pointers to kernel arguments for [`CudaOps::launch_pdl`], from references to the
/// argument values.
macro_rules! kernel_params {
    ($($a:expr),* $(,)?) => {
        [$(std::ptr::from_ref($a) as *mut std::ffi::c_void),*]
    };
}
pub(crate) use kernel_params;

/// Most input rows the GEMV kernel takes (kernels/gemv.cu); more go to cuBLAS.
pub const GEMV_MAX_M: usize = 2;
const GEMV_WARPS: usize = 8;

/// How many warps share one output column of the GEMV (1, 2, 4 or 8): the split whose
/// grid of `n · splits` warps fills whole waves of the `resident` warps the device runs
/// at once best (time ∝ waves / splits; a split must gain 5 %), each warp keeping at
/// least 64 chunks of 8 values of its column.
pub fn gemv_splits(n: usize, k: usize, resident: usize) -> usize {
    let resident = resident.max(1);
    let mut best = (f64::MAX, 1);
    for s in [1usize, 2, 4, 8] {
        if s > 1 && k / 8 / s < 64 {
            break;
        }
        let cost = (n * s).div_ceil(resident) as f64 / s as f64;
        // Splitting has a cost of its own (shorter streams, a shared-memory merge):
        // only worth it for a clear gain.
        if cost < 0.95 * best.0 {
            best = (cost, s);
        }
    }
    best.1
}

/// Bytes of the cuBLAS workspace (what cuBLAS recommends for Hopper).
const BLAS_WORKSPACE: usize = 32 << 20;

/// A cuBLAS handle bound to a stream, with a workspace of its own so that cuBLAS never
/// allocates while a decode step is being captured into a CUDA graph.
struct Blas {
    handle: CudaBlas,
    _ws: CudaSlice<u8>,
}

impl Blas {
    fn new(dev: &CudaDevice) -> Result<Blas> {
        let handle = CudaBlas::new(dev.stream().clone())?;
        let ws: CudaSlice<u8> = dev.zeros(BLAS_WORKSPACE)?;
        {
            let (p, _g) = ws.device_ptr(dev.stream());
            // SAFETY: the buffer holds BLAS_WORKSPACE bytes and lives as long as the handle
            // (both are fields of Blas; the handle is dropped first).
            unsafe { blas_sys::cublasSetWorkspace_v2(*handle.handle(), p as *mut _, BLAS_WORKSPACE) }.result()?;
        }
        Ok(Blas { handle, _ws: ws })
    }
}

pub(crate) fn check_len(what: &str, have: usize, need: usize) -> Result<()> {
    ensure!(have >= need, "{what}: buffer of {have} elements, {need} needed");
    Ok(())
}

pub(crate) fn i32_of(what: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| anyhow::anyhow!("{what} = {v} does not fit a 32-bit int"))
}

pub(crate) fn grid_1d(n: usize, block: u32) -> (u32, u32, u32) {
    (n.div_ceil(block as usize).clamp(1, 65_535 * 16) as u32, 1, 1)
}

/// The RoPE inverse frequencies of `cfg` (llama3 scaling included), the CPU reference's.
pub fn rope_inv_freq(cfg: &ModelConfig) -> Vec<f32> {
    crate::cpu::ops::Rope::new(cfg).inv_freq().to_vec()
}

impl CudaOps {
    /// Compiles or loads the kernels for `dev` and creates the cuBLAS handle.
    pub fn new(dev: CudaDevice) -> Result<CudaOps> {
        let k = Arc::new(Kernels::load(&dev)?);
        let hopper = dev.info().compute_capability.0 >= 9;
        let gemv_blocks =
            k.gemv_bf16
                .occupancy_max_active_blocks_per_multiprocessor((GEMV_WARPS * 32) as u32, 0, None)?;
        let gemv_warps = dev.info().sm_count as usize * gemv_blocks.max(1) as usize * GEMV_WARPS;
        Self::on_device(dev, k, hopper, gemv_warps)
    }

    /// Has this stream's prefill attention run one block a multiprocessor (`true`)
    /// instead of as many as fit (two): it asks for more shared memory than half a
    /// multiprocessor holds, so the other half of each multiprocessor's registers stays
    /// free for kernels of other streams (the decode lane's) to start at once.
    pub fn share_sms_with_decoding(&self, on: bool) {
        self.prefill_half_sm.store(on, Ordering::Relaxed);
    }

    /// The same kernels and settings on a new stream of the same device, created at
    /// `priority`, with a cuBLAS handle of its own: another lane of work that the GPU
    /// runs beside this one.
    pub fn fork(&self, priority: StreamPriority) -> Result<CudaOps> {
        self.fork_on(self.dev.with_new_stream(priority)?)
    }

    /// As [`CudaOps::fork`], on a stream whose kernels run on at least `sms` of the
    /// GPU's multiprocessors only ([`CudaDevice::with_stream_on_sms`]).
    pub fn fork_on_sms(&self, priority: StreamPriority, sms: u32) -> Result<CudaOps> {
        self.fork_on(self.dev.with_stream_on_sms(priority, sms)?)
    }

    fn fork_on(&self, dev: CudaDevice) -> Result<CudaOps> {
        // The GEMV's split for the multiprocessors the new stream may use.
        let warps = self.gemv_warps * dev.info().sm_count as usize / self.dev.info().sm_count.max(1) as usize;
        let ops = Self::on_device(dev, self.k.clone(), self.pdl.load(Ordering::Relaxed), warps.max(1))?;
        ops.gemv.store(self.gemv.load(Ordering::Relaxed), Ordering::Relaxed);
        Ok(ops)
    }

    fn on_device(dev: CudaDevice, k: Arc<Kernels>, pdl: bool, gemv_warps: usize) -> Result<CudaOps> {
        // SAFETY: only tries to dlopen the library by its usual names.
        if !unsafe { blas_sys::is_culib_present() } {
            bail!(
                "cuBLAS (libcublas.so) was not found: add the CUDA toolkit's library folder to the \
                 library path, e.g. LD_LIBRARY_PATH={}/lib64",
                super::nvrtc::cuda_home().display()
            );
        }
        Ok(CudaOps {
            dev,
            k,
            blas: OnceLock::new(),
            gemv: AtomicBool::new(true),
            pdl: AtomicBool::new(pdl),
            prefill_half_sm: AtomicBool::new(false),
            gemv_warps,
            decode_slots: OnceLock::new(),
        })
    }

    /// The stream's cuBLAS handle, made (with its 32 MiB workspace) by the first call:
    /// streams that run no product (a fetch's, a micro-batch's) never hold one. A
    /// captured decode step always runs eagerly first, so the handle exists before
    /// any capture.
    pub(crate) fn blas(&self) -> Result<&CudaBlas> {
        if let Some(b) = self.blas.get() {
            return Ok(&b.handle);
        }
        let made = Blas::new(&self.dev)?;
        Ok(&self.blas.get_or_init(|| made).handle)
    }

    /// Whether products of at most [`GEMV_MAX_M`] rows use the GEMV kernel (on by
    /// default; benchmarks turn it off to compare with cuBLAS).
    pub fn set_gemv(&self, on: bool) {
        self.gemv.store(on, Ordering::Relaxed);
    }

    /// Whether decode-step kernels are launched with programmatic dependent launch
    /// (kernels/pdl.cuh; on by default on sm_90 and later, where it exists).
    pub fn set_pdl(&self, on: bool) {
        let ok = self.dev.info().compute_capability.0 >= 9;
        self.pdl.store(on && ok, Ordering::Relaxed);
    }

    /// Launches `f` on the compute stream, with programmatic dependent launch when it is
    /// on: the kernel may be scheduled while the stream's previous kernel finishes, so
    /// it must start with `pdl_wait()` (kernels/pdl.cuh).
    ///
    /// # Safety
    /// `params` must point to one value per kernel parameter, of the parameter's type,
    /// alive for the call; the launch must satisfy the kernel's contract.
    pub(crate) unsafe fn launch_pdl(
        &self,
        f: &cudarc::driver::CudaFunction,
        cfg: LaunchConfig,
        params: &mut [*mut std::ffi::c_void],
    ) -> Result<()> {
        // SAFETY: the caller's contract.
        unsafe { self.launch_early(f, cfg, params, true) }
    }

    /// [`CudaOps::launch_pdl`], or (`early` false) a plain launch: the kernel's blocks
    /// take no room on the device before the stream's previous kernel is done (where a
    /// kernel on another stream needs that room meanwhile).
    ///
    /// # Safety
    /// As [`CudaOps::launch_pdl`].
    pub(crate) unsafe fn launch_early(
        &self,
        f: &cudarc::driver::CudaFunction,
        cfg: LaunchConfig,
        params: &mut [*mut std::ffi::c_void],
        early: bool,
    ) -> Result<()> {
        use cudarc::driver::sys;
        let s = self.dev.stream();
        // SAFETY: a zeroed attribute is a valid "no attribute" value; id and value set below.
        let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
        attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        attr.value.programmaticStreamSerializationAllowed = 1;
        let pdl = early && self.pdl.load(Ordering::Relaxed);
        let conf = sys::CUlaunchConfig {
            gridDimX: cfg.grid_dim.0,
            gridDimY: cfg.grid_dim.1,
            gridDimZ: cfg.grid_dim.2,
            blockDimX: cfg.block_dim.0,
            blockDimY: cfg.block_dim.1,
            blockDimZ: cfg.block_dim.2,
            sharedMemBytes: cfg.shared_mem_bytes,
            hStream: s.cu_stream(),
            attrs: if pdl { &mut attr } else { std::ptr::null_mut() },
            numAttrs: pdl as u32,
        };
        self.dev.context().bind_to_thread()?;
        // SAFETY: the caller's contract; conf and attr outlive the call.
        unsafe { sys::cuLaunchKernelEx(&conf, f.cu_function(), params.as_mut_ptr(), std::ptr::null_mut()) }.result()?;
        Ok(())
    }

    /// The device.
    pub fn device(&self) -> &CudaDevice {
        &self.dev
    }

    fn launch_cfg(grid: (u32, u32, u32), block: u32, smem: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: grid,
            block_dim: (block, 1, 1),
            shared_mem_bytes: smem as u32,
        }
    }

    /// `out[r, :] = table[ids[r], :]` for `rows` ids; rows of `hidden` values, `vocab`
    /// rows in the table. An id outside the vocabulary gives a NaN row.
    pub fn embedding(
        &self,
        out: &mut impl DevicePtrMut<bf16>,
        table: &impl DevicePtr<bf16>,
        ids: &impl DevicePtr<u32>,
        rows: usize,
        hidden: usize,
        vocab: usize,
    ) -> Result<()> {
        self.embedding_rows(out, table, ids, (rows, hidden), (0..vocab, vocab))
    }

    /// [`CudaOps::embedding`] from a table holding the rows `held` of a vocabulary of
    /// `vocab` ids (a tensor-parallel device's share): ids held elsewhere give rows of
    /// zeros, ids past the vocabulary rows of NaN.
    pub fn embedding_rows(
        &self,
        out: &mut impl DevicePtrMut<bf16>,
        table: &impl DevicePtr<bf16>,
        ids: &impl DevicePtr<u32>,
        (rows, hidden): (usize, usize),
        (held, vocab): (std::ops::Range<usize>, usize),
    ) -> Result<()> {
        check_len("embedding ids", ids.len(), rows)?;
        let s = self.dev.stream();
        let (i, _g) = ids.device_ptr(s);
        // SAFETY: no previous-token map.
        unsafe { self.embedding_raw(out, table, (i, 0, 0), rows, hidden, (held, vocab)) }
    }

    /// [`CudaOps::embedding`] from raw device addresses `(ids, prev_map, prev_tokens)`:
    /// row `r` takes its id from `prev_tokens[prev_map[r]]` where `prev_map[r] >= 0`
    /// (`prev_map` may be 0: none), else from `ids[r]`. The table holds the rows
    /// `held` of a vocabulary of `vocab` ids; ids held elsewhere (another device of a
    /// tensor-parallel group) give rows of zeros, ids past the vocabulary rows of NaN.
    ///
    /// # Safety
    /// `ids` and (when not 0) `prev_map` must hold `rows` elements, and `prev_tokens`
    /// every index `prev_map` names.
    pub(crate) unsafe fn embedding_raw(
        &self,
        out: &mut impl DevicePtrMut<bf16>,
        table: &impl DevicePtr<bf16>,
        (i, pm, pt): (u64, u64, u64),
        rows: usize,
        hidden: usize,
        (held, vocab): (std::ops::Range<usize>, usize),
    ) -> Result<()> {
        check_len("embedding output", out.len(), rows * hidden)?;
        check_len("embedding table", table.len(), held.len() * hidden)?;
        ensure!(held.end <= vocab, "embedding rows {held:?} of a vocabulary of {vocab}");
        if rows == 0 {
            return Ok(());
        }
        let s = self.dev.stream();
        let (o, _g1) = out.device_ptr_mut(s);
        let (t, _g2) = table.device_ptr(s);
        let (h, v) = (i32_of("hidden", hidden)?, u32::try_from(vocab)?);
        let (lo, n) = (held.start as u32, held.len() as u32);
        let cfg = Self::launch_cfg((i32_of("rows", rows)? as u32, 1, 1), 128, 0);
        // SAFETY: out and table hold rows·hidden and vocab·hidden elements (checked); the
        // id arrays are the caller's contract.
        unsafe {
            self.launch_pdl(
                &self.k.embedding_gather,
                cfg,
                &mut kernel_params![&o, &t, &i, &pm, &pt, &h, &lo, &n, &v],
            )
        }?;
        Ok(())
    }

    /// RMSNorm fused with the residual add, per row of `hidden` values:
    /// with `r`, `x = bf16(x + r)` in place first; then `y = bf16(w · x / rms(x))`,
    /// the statistics taken over the stored (rounded) `x`.
    #[allow(clippy::too_many_arguments)]
    pub fn rmsnorm_residual(
        &self,
        y: &mut impl DevicePtrMut<bf16>,
        x: &mut impl DevicePtrMut<bf16>,
        r: Option<&dyn DevicePtrDyn>,
        w: &impl DevicePtr<bf16>,
        rows: usize,
        hidden: usize,
        eps: f32,
    ) -> Result<()> {
        check_len("rmsnorm output", y.len(), rows * hidden)?;
        check_len("rmsnorm input", x.len(), rows * hidden)?;
        check_len("rmsnorm weight", w.len(), hidden)?;
        if let Some(r) = r {
            check_len("rmsnorm residual", r.len_bf16(), rows * hidden)?;
        }
        if rows == 0 {
            return Ok(());
        }
        let s = self.dev.stream();
        let (yp, _g1) = y.device_ptr_mut(s);
        let (xp, _g2) = x.device_ptr_mut(s);
        let (wp, _g3) = w.device_ptr(s);
        let rp: u64 = r.map(|r| r.raw_ptr(s)).unwrap_or(0);
        let h = i32_of("hidden", hidden)?;
        let block = if hidden >= 4096 {
            512
        } else if hidden >= 1024 {
            256
        } else {
            128
        };
        let cfg = Self::launch_cfg((i32_of("rows", rows)? as u32, 1, 1), block, 0);
        // SAFETY: y and x hold rows·hidden elements, r (when not null) too, w hidden.
        unsafe {
            self.launch_pdl(
                &self.k.rmsnorm_residual,
                cfg,
                &mut kernel_params![&yp, &xp, &rp, &wp, &h, &eps],
            )
        }?;
        Ok(())
    }

    /// Rotates, in place, `heads` consecutive heads of width `head_dim` at the start of
    /// each of `rows` rows (row stride `row_stride` elements) at that row's position,
    /// Hugging Face rotate-half layout. `inv_freq` holds `head_dim / 2` values
    /// ([`rope_inv_freq`]). For a fused qkv row, `heads = num_heads + num_kv_heads`
    /// rotates q and k in one launch.
    #[allow(clippy::too_many_arguments)]
    pub fn rope(
        &self,
        x: &mut impl DevicePtrMut<bf16>,
        row_stride: usize,
        rows: usize,
        heads: usize,
        head_dim: usize,
        positions: &impl DevicePtr<i32>,
        inv_freq: &impl DevicePtr<f32>,
    ) -> Result<()> {
        ensure!(head_dim % 2 == 0, "rope: odd head dimension {head_dim}");
        ensure!(
            heads * head_dim <= row_stride,
            "rope: {heads} heads of {head_dim} exceed the row of {row_stride}"
        );
        if rows == 0 {
            return Ok(());
        }
        check_len("rope input", x.len(), (rows - 1) * row_stride + heads * head_dim)?;
        check_len("rope positions", positions.len(), rows)?;
        check_len("rope inv_freq", inv_freq.len(), head_dim / 2)?;
        let s = self.dev.stream();
        let (xp, _g1) = x.device_ptr_mut(s);
        let (pp, _g2) = positions.device_ptr(s);
        let (fp, _g3) = inv_freq.device_ptr(s);
        let (rs, nh, half) = (
            i32_of("row_stride", row_stride)?,
            i32_of("heads", heads)?,
            (head_dim / 2) as i32,
        );
        let cfg = Self::launch_cfg((i32_of("rows", rows)? as u32, 1, 1), 256, head_dim * 4);
        // SAFETY: x covers every rotated element of every row, positions rows ints,
        // inv_freq head_dim/2 floats (checked); shared memory holds cos and sin tables.
        unsafe {
            s.launch_builder(&self.k.rope_inplace)
                .arg(&xp)
                .arg(&rs)
                .arg(&nh)
                .arg(&half)
                .arg(&pp)
                .arg(&fp)
                .launch(cfg)
        }?;
        Ok(())
    }

    /// `out[r, i] = silu(gate[r, i]) · up[r, i]` from fused rows `[gate | up]` of
    /// width `2·inter`.
    pub fn swiglu(
        &self,
        out: &mut impl DevicePtrMut<bf16>,
        gate_up: &impl DevicePtr<bf16>,
        rows: usize,
        inter: usize,
    ) -> Result<()> {
        check_len("swiglu output", out.len(), rows * inter)?;
        check_len("swiglu input", gate_up.len(), rows * 2 * inter)?;
        if rows == 0 || inter == 0 {
            return Ok(());
        }
        ensure!(rows <= 65_535, "swiglu: {rows} rows exceed one launch (65535)");
        let s = self.dev.stream();
        let (op, _g1) = out.device_ptr_mut(s);
        let (gp, _g2) = gate_up.device_ptr(s);
        let block = 256u32;
        let per_block = if inter % 8 == 0 {
            block as usize * 8
        } else {
            block as usize
        };
        let cfg = Self::launch_cfg((inter.div_ceil(per_block) as u32, rows as u32, 1), block, 0);
        let n = i32_of("inter", inter)?;
        // SAFETY: out holds rows·inter and gate_up rows·2·inter elements (checked).
        unsafe { self.launch_pdl(&self.k.swiglu, cfg, &mut kernel_params![&op, &gp, &n]) }?;
        Ok(())
    }

    /// `out[m, n] (+)= x[m, k] · wᵀ` for a linear layer's weight `w[n, k]` (row-major,
    /// as [`crate::cpu::matmul::linear`]): bf16 operands, fp32 accumulation, bf16
    /// output; with `accumulate` the product is added to `out`. Up to [`GEMV_MAX_M`]
    /// rows (decode) run the streaming GEMV kernel, more run cuBLAS.
    #[allow(clippy::too_many_arguments)]
    pub fn linear(
        &self,
        out: &mut impl DevicePtrMut<bf16>,
        x: &impl DevicePtr<bf16>,
        w: &impl DevicePtr<bf16>,
        m: usize,
        k: usize,
        n: usize,
        accumulate: bool,
    ) -> Result<()> {
        check_len("linear output", out.len(), m * n)?;
        if m > 0 && n > 0 && k == 0 {
            if !accumulate {
                let (op, _g) = out.device_ptr_mut(self.dev.stream());
                self.fill_raw_u16(op, m * n, 0)?;
            }
            return Ok(());
        }
        let (op, _g) = out.device_ptr_mut(self.dev.stream());
        let out_type = blas_sys::cudaDataType_t::CUDA_R_16BF;
        self.gemm(op, out_type, x, w, (m, k, n), accumulate, None)
    }

    /// Whether a product of `m` rows of `k` values (addresses OR-ed in `addrs`) runs on
    /// the GEMV kernel.
    fn gemv_takes(&self, m: usize, k: usize, addrs: u64) -> bool {
        m <= GEMV_MAX_M && k % 8 == 0 && addrs % 16 == 0 && self.gemv.load(Ordering::Relaxed)
    }

    /// `out[m, n] = rms_norm(x)[m, k] · wᵀ` where the norm's weight is already folded
    /// into the columns of `w` (so the norm here has unit weight): one fused GEMV
    /// kernel for decode-sized `m`, otherwise the RMSNorm kernel into `xn` (with the
    /// unit weight `ones`, `k` values) and the product.
    #[allow(clippy::too_many_arguments)]
    pub fn linear_normed(
        &self,
        out: &mut impl DevicePtrMut<bf16>,
        x: &mut CudaSlice<bf16>,
        w: &impl DevicePtr<bf16>,
        (m, k, n): (usize, usize, usize),
        eps: f32,
        xn: &mut CudaSlice<bf16>,
        ones: &impl DevicePtr<bf16>,
    ) -> Result<()> {
        check_len("linear output", out.len(), m * n)?;
        let s = self.dev.stream();
        let addrs = x.device_ptr(s).0 | w.device_ptr(s).0;
        if self.gemv_takes(m, k, addrs) {
            let (op, _g) = out.device_ptr_mut(s);
            return self.gemm(
                op,
                blas_sys::cudaDataType_t::CUDA_R_16BF,
                x,
                w,
                (m, k, n),
                false,
                Some(eps),
            );
        }
        self.rmsnorm_residual(xn, x, None, ones, m, k, eps)?;
        self.linear(out, xn, w, m, k, n, false)
    }

    /// [`CudaOps::linear`] with an fp32 output (the logits of the output head).
    pub fn linear_f32(
        &self,
        out: &mut impl DevicePtrMut<f32>,
        x: &impl DevicePtr<bf16>,
        w: &impl DevicePtr<bf16>,
        m: usize,
        k: usize,
        n: usize,
    ) -> Result<()> {
        check_len("linear output", out.len(), m * n)?;
        ensure!(k > 0 || m * n == 0, "linear: empty inner dimension");
        let (op, _g) = out.device_ptr_mut(self.dev.stream());
        self.gemm(op, blas_sys::cudaDataType_t::CUDA_R_32F, x, w, (m, k, n), false, None)
    }

    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &self,
        op: u64,
        out_type: blas_sys::cudaDataType_t,
        x: &impl DevicePtr<bf16>,
        w: &impl DevicePtr<bf16>,
        (m, k, n): (usize, usize, usize),
        accumulate: bool,
        normalize: Option<f32>,
    ) -> Result<()> {
        check_len("linear input", x.len(), m * k)?;
        check_len("linear weight", w.len(), n * k)?;
        if m == 0 || n == 0 {
            return Ok(());
        }
        let s = self.dev.stream();
        let (xp, _g2) = x.device_ptr(s);
        let (wp, _g3) = w.device_ptr(s);
        if self.gemv_takes(m, k, xp | wp) {
            let f = if out_type == blas_sys::cudaDataType_t::CUDA_R_32F {
                &self.k.gemv_f32
            } else {
                &self.k.gemv_bf16
            };
            let splits = gemv_splits(n, k, self.gemv_warps);
            let (mi, ni, ki, acc, sp) = (
                m as i32,
                i32_of("n", n)?,
                i32_of("k", k)?,
                accumulate as i32,
                splits as i32,
            );
            let (norm, eps) = (normalize.is_some() as i32, normalize.unwrap_or(0.0));
            let cols = GEMV_WARPS / splits;
            let cfg = Self::launch_cfg((n.div_ceil(cols) as u32, 1, 1), (GEMV_WARPS * 32) as u32, 0);
            // SAFETY: out holds m·n (checked by the callers), x m·k and w n·k elements,
            // 16-byte aligned with k a multiple of 8 (checked).
            unsafe {
                self.launch_pdl(
                    f,
                    cfg,
                    &mut kernel_params![&op, &xp, &wp, &mi, &ni, &ki, &acc, &sp, &norm, &eps],
                )
            }?;
            return Ok(());
        }
        ensure!(normalize.is_none(), "linear: normalisation needs the GEMV kernel");
        let (alpha, beta) = (1.0f32, if accumulate { 1.0f32 } else { 0.0f32 });
        let (mi, ki, ni) = (i32_of("m", m)?, i32_of("k", k)?, i32_of("n", n)?);
        // Column-major view: outᵀ[n, m] = w[n, k] · xᵀ[k, m], where the row-major
        // w[n, k] is the column-major [k, n] matrix (transposed) and x[m, k] is the
        // column-major xᵀ[k, m].
        // SAFETY: the buffers hold m·n (checked by the callers), m·k and n·k elements;
        // alpha and beta are host scalars (the handle's default pointer mode).
        unsafe {
            blas::gemm_ex(
                *self.blas()?.handle(),
                blas_sys::cublasOperation_t::CUBLAS_OP_T,
                blas_sys::cublasOperation_t::CUBLAS_OP_N,
                ni,
                mi,
                ki,
                (&alpha as *const f32).cast(),
                wp as *const _,
                blas_sys::cudaDataType_t::CUDA_R_16BF,
                ki,
                xp as *const _,
                blas_sys::cudaDataType_t::CUDA_R_16BF,
                ki,
                (&beta as *const f32).cast(),
                op as *mut _,
                out_type,
                ni,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }?;
        Ok(())
    }

    /// Fills a bf16 buffer with NaN (poisoning outputs before a test launch).
    pub fn fill_nan_bf16(&self, buf: &mut impl DevicePtrMut<bf16>) -> Result<()> {
        let n = buf.len();
        let (p, _g) = buf.device_ptr_mut(self.dev.stream());
        self.fill_raw_u16(p, n, 0x7FC0)
    }

    /// Fills an f32 buffer with NaN.
    pub fn fill_nan_f32(&self, buf: &mut impl DevicePtrMut<f32>) -> Result<()> {
        let n = buf.len();
        let (p, _g) = buf.device_ptr_mut(self.dev.stream());
        self.fill_raw_u32(p, n, 0x7FC0_0000)
    }

    /// Fills a bf16 buffer with values uniform in `[-scale, scale)`, a function of
    /// `seed` and the index only (test and benchmark data made on the device).
    pub fn fill_random_bf16(&self, buf: &mut impl DevicePtrMut<bf16>, seed: u64, scale: f32) -> Result<()> {
        let n = buf.len();
        self.fill_random_rect(buf, (1, n), (n, 0, 0), seed, scale)
    }

    /// Fills a `[rows, cols]` bf16 buffer with the rectangle at `(row0, col0)` of the
    /// pseudo-random matrix of `ld` columns that [`CudaOps::fill_random_bf16`] would make
    /// whole with `seed` and `scale`: a device's shard of a synthetic weight, bit for bit
    /// the whole matrix's rows or columns.
    pub fn fill_random_rect(
        &self,
        buf: &mut impl DevicePtrMut<bf16>,
        (rows, cols): (usize, usize),
        (ld, row0, col0): (usize, usize, usize),
        seed: u64,
        scale: f32,
    ) -> Result<()> {
        check_len("random fill", buf.len(), rows * cols)?;
        ensure!(col0 + cols <= ld, "columns {col0}..{} of a matrix of {ld}", col0 + cols);
        let n = rows * cols;
        if n == 0 {
            return Ok(());
        }
        let s = self.dev.stream();
        let (p, _g) = buf.device_ptr_mut(s);
        let cfg = Self::launch_cfg(grid_1d(n, 256), 256, 0);
        // SAFETY: writes rows·cols elements of the buffer (checked).
        unsafe {
            s.launch_builder(&self.k.fill_random_bf16)
                .arg(&p)
                .arg(&rows)
                .arg(&cols)
                .arg(&ld)
                .arg(&row0)
                .arg(&col0)
                .arg(&seed)
                .arg(&scale)
                .launch(cfg)
        }?;
        Ok(())
    }

    pub(crate) fn fill_raw_u16(&self, p: u64, n: usize, v: u16) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        let s = self.dev.stream();
        let cfg = Self::launch_cfg(grid_1d(n, 256), 256, 0);
        // SAFETY: the caller passes a device pointer to n u16 elements.
        unsafe { s.launch_builder(&self.k.fill_u16).arg(&p).arg(&n).arg(&v).launch(cfg) }?;
        Ok(())
    }

    /// Writes the GPU's global timer (nanoseconds) to the u64 at device address `at`
    /// once the work queued before it on `stream` (of this device's context) is done.
    pub(crate) fn stamp_time(&self, stream: &CudaStream, at: u64) -> Result<()> {
        let cfg = Self::launch_cfg((1, 1, 1), 1, 0);
        // SAFETY: the caller passes the device address of a u64 that nothing else
        // touches until the stamp is read.
        unsafe { stream.launch_builder(&self.k.stamp_time).arg(&at).launch(cfg) }?;
        Ok(())
    }

    pub(crate) fn fill_raw_u32(&self, p: u64, n: usize, v: u32) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        let s = self.dev.stream();
        let cfg = Self::launch_cfg(grid_1d(n, 256), 256, 0);
        // SAFETY: the caller passes a device pointer to n u32 elements.
        unsafe { s.launch_builder(&self.k.fill_u32).arg(&p).arg(&n).arg(&v).launch(cfg) }?;
        Ok(())
    }
}

/// A read-only bf16 device buffer behind a trait object (for optional arguments).
pub trait DevicePtrDyn {
    /// Elements.
    fn len_bf16(&self) -> usize;
    /// The raw device address, for a launch on `stream`.
    fn raw_ptr(&self, stream: &cudarc::driver::CudaStream) -> u64;
}

impl<T: DevicePtr<bf16>> DevicePtrDyn for T {
    fn len_bf16(&self) -> usize {
        self.len()
    }
    fn raw_ptr(&self, stream: &cudarc::driver::CudaStream) -> u64 {
        self.device_ptr(stream).0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::ops::Rope;
    use crate::model::synthetic::preset;

    #[test]
    fn gemv_splits_fill_whole_waves() {
        // 132 SMs × 4 blocks × 8 warps resident.
        let r = 4224;
        // o-proj (n 4096): one wave already.
        assert_eq!(gemv_splits(4096, 4096, r), 1);
        // qkv (n 6144): 1.45 waves unsplit, 2.9 of half-length warps split in two.
        assert_eq!(gemv_splits(6144, 4096, r), 2);
        // Tiny k never splits below 64 chunks per warp.
        assert_eq!(gemv_splits(6144, 576, r), 1);
        // The output head is many waves: no split.
        assert_eq!(gemv_splits(128_256, 4096, r), 1);
    }

    #[test]
    fn inv_freq_matches_the_cpu_rope_tables() {
        for arch in ["llama-3.1-8b", "smollm2-135m", "qwen2-0.5b", "llama-2-7b"] {
            let cfg = preset(arch).unwrap();
            let f = rope_inv_freq(&cfg);
            assert_eq!(f.len(), cfg.head_dim / 2);
            let positions = [0usize, 1, 2, 37, 4095, 8192, 65_537, 131_071];
            let (cos, sin) = Rope::new(&cfg).tables(&positions);
            for (r, &p) in positions.iter().enumerate() {
                for (i, &fi) in f.iter().enumerate() {
                    let a = p as f32 * fi;
                    assert_eq!(
                        a.cos().to_bits(),
                        cos[r * f.len() + i].to_bits(),
                        "{arch} pos {p} i {i}"
                    );
                    assert_eq!(
                        a.sin().to_bits(),
                        sin[r * f.len() + i].to_bits(),
                        "{arch} pos {p} i {i}"
                    );
                }
            }
        }
    }
}
