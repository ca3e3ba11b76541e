//! The rank-r factorisation of a layer's pre-RoPE keys at prefill, on the GPU
//! (kernels/factor.cu and cuBLAS; reference [`crate::shadow::factor::LowRank::factorize`]):
//! the Gram matrix `G = KᵀK` of the keys `K` (`[rows, kvd]` bf16) in fp32, its top-`rank`
//! eigenvectors as the rows of the basis `sv` (`[rank, kvd]` f32), and the coefficients
//! `u = K[..u_rows]·svᵀ` (`[u_rows, rank]`, 8-bit codes with a scale per row). The basis comes from every key of the
//! prompt; `u` covers the sparse chunks only (the recent window keeps exact keys).
//!
//! Two ways to the eigenvectors, chosen by size ([`FactorMethod`]):
//! - exact: `G` to the host and the CPU reference's own eigendecomposition in f64
//!   ([`crate::shadow::factor::top_eigenvectors`]), so that the basis is the CPU's up to the
//!   summation order of `G`. Cheap at small widths (6 ms at kvd = 192 on a 2-core EPYC)
//!   and the only way when `rank + p ≥ kvd` (full rank);
//! - randomised: subspace iteration on the GPU ([`crate::shadow::subspace`]), `G` in f64
//!   (8 MiB at kvd = 1024) with cuBLAS DGEMM and DTRSM on `[kvd, rank + p]` blocks, the
//!   `[rank + p]²` matrices factorised on the host: a few milliseconds at kvd = 1024
//!   where the host eigendecomposition takes about a second.
//!
//! `G` is one cuBLAS GEMM (bf16 keys, fp32 products and accumulation, as
//! [`CudaOps::linear`]). `u` is two: cuBLAS multiplies bf16 by bf16 only, so `sv` is split
//! into `hi + lo`, both bf16 (`hi + lo` is `sv` to 2⁻¹⁶), and the keys are multiplied by
//! each, accumulating in fp32 in pieces of at most [`U_PIECE`] values, each row then
//! rounded once to 8 bits (`factor_code8_rows`): `u` is `K·svᵀ` with the fp32 `sv`, rounded
//! as [`crate::shadow::factor::LowRank::project`] rounds it and as the fold rounds later
//! keys' rows (`shadow_fold_project`, `shadow_fold_shift`).
//!
//! With [`FactorWorkspace::time_steps`] on, each call records an event on the stream at
//! the end of each [`FactorStep`] and adds up the host's time on the eigenvectors' small
//! matrices (no synchronisation added; `bench` reads them).

use crate::cuda::device::CudaDevice;
use crate::cuda::ops::{check_len, i32_of, CudaOps};
use crate::shadow::factor::top_eigenvectors;
use crate::shadow::subspace::{gaussian_block, top_subspace, BlockOps, SubspacePlan, OVERSAMPLING, RIDGE};
use anyhow::{ensure, Result};
use cudarc::cublas::{result as blas, sys as blas_sys};
use cudarc::driver::{
    CudaEvent, CudaSlice, DevicePtr, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg, ValidAsZeroBits,
};
use half::bf16;
use nalgebra::DMatrix;
use std::time::{Duration, Instant};

/// Widths up to which [`FactorMethod::Auto`] takes the exact eigendecomposition: the
/// host's f64 eigendecomposition costs about as much as the randomised path's host work
/// there (measured on a 2-core EPYC: 6 ms at 192, 13 ms at 256, 110 ms at 512, 950 ms at
/// 1024), and it is exact. SmolLM2 (192) and Qwen2-0.5B (128) stay exact; Llama-3.1-8B
/// (1024) takes the randomised path.
pub const EXACT_MAX_WIDTH: usize = 256;

/// Most fp32 values of `u` accumulated at once (16 MiB of scratch).
pub const U_PIECE: usize = 1 << 22;

/// Threads of `factor_gram_f64` (FACTOR_THREADS in kernels/factor.cu).
const GRAM_THREADS: u32 = 256;

/// How [`CudaOps::shadow_factorize`] finds the top eigenvectors of `G`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FactorMethod {
    /// [`FactorMethod::Exact`] for widths up to [`EXACT_MAX_WIDTH`] or when the subspace
    /// iteration would span every dimension (`rank + p ≥ kvd`), else
    /// [`FactorMethod::Randomized`].
    #[default]
    Auto,
    /// `G` to the host, full f64 eigendecomposition.
    Exact,
    /// Randomised subspace iteration on the GPU.
    Randomized,
}

impl FactorMethod {
    /// The method this one stands for at width `kvd` and `rank` (never `Auto`).
    pub fn resolve(self, kvd: usize, rank: usize) -> FactorMethod {
        match self {
            FactorMethod::Auto if kvd <= EXACT_MAX_WIDTH || rank + OVERSAMPLING >= kvd => FactorMethod::Exact,
            FactorMethod::Auto => FactorMethod::Randomized,
            m => m,
        }
    }
}

/// The steps of [`CudaOps::shadow_factorize`], as [`FactorWorkspace::time_steps`] marks
/// their ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FactorStep {
    /// `G = KᵀK` (and, on the randomised path, its symmetric f64 copy).
    Gram,
    /// The top eigenvectors of `G`: the subspace iteration with its host round trips, or
    /// `G` to the host and its eigendecomposition there.
    Eigenvectors,
    /// `sv`, its bf16 terms and the coefficients `u`.
    Coefficients,
}

/// What the factorisations timed since the last [`FactorWorkspace::take_timing`].
#[derive(Default)]
pub struct FactorTiming {
    /// An event on the stream at the end of each step, in order.
    pub marks: Vec<(FactorStep, CudaEvent)>,
    /// The host's own work on the eigenvectors: the `[l, l]` factorisations of the
    /// subspace iteration (its waits for the device and copies excluded), or the whole
    /// exact eigendecomposition.
    pub host: Duration,
}

/// The device scratch of [`CudaOps::shadow_factorize`], grown on demand and kept, so that
/// the factorisation of every layer of a prefill allocates once.
#[derive(Default)]
pub struct FactorWorkspace {
    method: FactorMethod,
    /// Step timing, when on.
    timing: Option<FactorTiming>,
    /// `G` in fp32, `[kvd, kvd]`.
    gram: Option<CudaSlice<f32>>,
    /// `(G + Gᵀ)/2 + ridge·I` in f64, `[kvd, kvd]` (randomised path).
    gram64: Option<CudaSlice<f64>>,
    /// The starting block `Ω` and its `(kvd, width)`.
    omega: Option<(CudaSlice<f64>, (usize, usize))>,
    /// The iteration's blocks `Y`, `Z` (`[kvd, width]`) and the basis (`[kvd, rank]`).
    y: Option<CudaSlice<f64>>,
    z: Option<CudaSlice<f64>>,
    basis: Option<CudaSlice<f64>>,
    /// `[width, width]` matrices to the host (`QᵀY`) and from it (`R`, `W`).
    small_out: Option<CudaSlice<f64>>,
    small_in: Option<CudaSlice<f64>>,
    /// `sv` as `hi + lo`, bf16, `[rank, kvd]` each.
    sv_hi: Option<CudaSlice<bf16>>,
    sv_lo: Option<CudaSlice<bf16>>,
    /// A piece of `u` in fp32.
    u_part: Option<CudaSlice<f32>>,
}

impl FactorWorkspace {
    /// An empty workspace choosing the method by size ([`FactorMethod::Auto`]).
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty workspace that always uses `method`.
    pub fn with_method(method: FactorMethod) -> Self {
        FactorWorkspace {
            method,
            ..Self::default()
        }
    }

    /// Turns step timing on (events at the ends of the steps, host timers; nothing
    /// waits) or off (and drops what was timed).
    pub fn time_steps(&mut self, on: bool) {
        self.timing = on.then(FactorTiming::default);
    }

    /// What was timed since the last call (empty with timing off); the events are read
    /// once the stream has passed them.
    pub fn take_timing(&mut self) -> FactorTiming {
        self.timing.as_mut().map(std::mem::take).unwrap_or_default()
    }

    /// With timing on, records the end of `step` on `ops`'s stream.
    fn mark(&mut self, ops: &CudaOps, step: FactorStep) -> Result<()> {
        if let Some(t) = &mut self.timing {
            let e = ops.device().event(true)?;
            e.record(ops.device().stream())?;
            t.marks.push((step, e));
        }
        Ok(())
    }

    /// With timing on, adds `d` to the host's time on the eigenvectors.
    fn add_host(&mut self, d: Duration) {
        if let Some(t) = &mut self.timing {
            t.host += d;
        }
    }

    /// Allocates now the scratch of `u` that a factorisation at rank `rank` with up to
    /// `u_rows` rows of `u` needs, so that it allocates nothing for it later.
    pub fn reserve_coefficients(&mut self, dev: &CudaDevice, rank: usize, u_rows: usize) -> Result<()> {
        if rank > 0 && u_rows > 0 {
            grow(dev, &mut self.u_part, u_piece_rows(rank, u_rows) * rank)?;
        }
        Ok(())
    }

    /// Device bytes held.
    pub fn bytes(&self) -> usize {
        fn b<T>(s: &Option<CudaSlice<T>>) -> usize {
            s.as_ref().map_or(0, |s| s.len() * std::mem::size_of::<T>())
        }
        b(&self.gram)
            + b(&self.gram64)
            + self.omega.as_ref().map_or(0, |(o, _)| o.len() * 8)
            + b(&self.y)
            + b(&self.z)
            + b(&self.basis)
            + b(&self.small_out)
            + b(&self.small_in)
            + b(&self.sv_hi)
            + b(&self.sv_lo)
            + b(&self.u_part)
    }
}

/// Rows of `u` accumulated at once: at most [`U_PIECE`] values, at least one row.
fn u_piece_rows(rank: usize, u_rows: usize) -> usize {
    (U_PIECE / rank).clamp(1, u_rows)
}

/// `buf` with at least `n` elements (reallocated, contents lost, when shorter).
fn grow<'a, T: DeviceRepr + ValidAsZeroBits>(
    dev: &CudaDevice,
    buf: &'a mut Option<CudaSlice<T>>,
    n: usize,
) -> Result<&'a mut CudaSlice<T>> {
    if buf.as_ref().is_none_or(|b| b.len() < n) {
        *buf = None;
        *buf = Some(dev.zeros(n.max(1))?);
    }
    Ok(buf.as_mut().expect("allocated above"))
}

impl CudaOps {
    /// Factorises the pre-RoPE keys `kpre` (`[rows, kvd]` bf16) at rank `rank`: writes
    /// `sv` (`[rank, kvd]` f32, orthonormal rows spanning the top-`rank` eigenvectors of
    /// `kpreᵀ·kpre`, the largest first) and `u` (`[u_rows, rank]` 8-bit codes, and a
    /// scale per row in `u_scales`) = `kpre[..u_rows]·svᵀ`, `u_rows ≤ rows` (the basis comes from every key, `u` covers
    /// the sparse tokens only). See the module documentation for the method; `ws` chooses
    /// it and holds the scratch.
    ///
    /// The host waits for the device inside (it factorises small matrices there); the
    /// products of `u` are queued when it returns. Non-finite keys are an error.
    #[allow(clippy::too_many_arguments)]
    pub fn shadow_factorize(
        &self,
        kpre: &impl DevicePtr<bf16>,
        rows: usize,
        kvd: usize,
        rank: usize,
        u_rows: usize,
        sv: &mut impl DevicePtrMut<f32>,
        (u, u_scales): (&mut impl DevicePtrMut<i8>, &mut impl DevicePtrMut<f32>),
        ws: &mut FactorWorkspace,
    ) -> Result<()> {
        ensure!(kvd > 0, "factorisation: key width 0");
        ensure!(
            (1..=kvd).contains(&rank),
            "factorisation: rank {rank} must be in 1..={kvd} (the key width)"
        );
        ensure!(rows > 0, "factorisation: no key rows");
        ensure!(
            u_rows <= rows,
            "factorisation: u_rows = {u_rows} exceeds the {rows} key rows"
        );
        check_len("factorisation: keys", kpre.len(), rows * kvd)?;
        check_len("factorisation: sv", sv.len(), rank * kvd)?;
        check_len("factorisation: u", u.len(), u_rows * rank)?;
        check_len("factorisation: u_scales", u_scales.len(), u_rows)?;
        let (rows_i, kvd_i) = (i32_of("rows", rows)?, i32_of("kvd", kvd)?);
        let dev = self.device();
        let s = dev.stream();

        // G = kpreᵀ·kpre: the row-major keys are the column-major [kvd, rows] matrix A,
        // and G = A·Aᵀ (column-major, symmetric).
        let gram = grow(dev, &mut ws.gram, kvd * kvd)?;
        {
            let (kp, _g1) = kpre.device_ptr(s);
            let (gp, _g2) = gram.device_ptr_mut(s);
            let (alpha, beta) = (1.0f32, 0.0f32);
            // SAFETY: kpre holds rows·kvd elements, gram kvd² (checked / grown); host scalars.
            unsafe {
                blas::gemm_ex(
                    *self.blas()?.handle(),
                    blas_sys::cublasOperation_t::CUBLAS_OP_N,
                    blas_sys::cublasOperation_t::CUBLAS_OP_T,
                    kvd_i,
                    kvd_i,
                    rows_i,
                    (&alpha as *const f32).cast(),
                    kp as *const _,
                    blas_sys::cudaDataType_t::CUDA_R_16BF,
                    kvd_i,
                    kp as *const _,
                    blas_sys::cudaDataType_t::CUDA_R_16BF,
                    kvd_i,
                    (&beta as *const f32).cast(),
                    gp as *mut _,
                    blas_sys::cudaDataType_t::CUDA_R_32F,
                    kvd_i,
                    blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                )
            }?;
        }

        let n_sv = rank * kvd;
        grow(dev, &mut ws.sv_hi, n_sv)?;
        grow(dev, &mut ws.sv_lo, n_sv)?;
        let randomized = ws.method.resolve(kvd, rank) == FactorMethod::Randomized;
        if randomized {
            self.factor_randomized(kvd, rank, ws)?;
        } else {
            ws.mark(self, FactorStep::Gram)?;
            let g = dev.download(ws.gram.as_ref().expect("grown above"))?;
            let t = Instant::now();
            let basis = top_eigenvectors(&g[..kvd * kvd], kvd, rank)?;
            ws.add_host(t.elapsed());
            s.memcpy_htod(&basis, sv)?;
        }
        ws.mark(self, FactorStep::Eigenvectors)?;
        let basis_f64 = randomized.then(|| ws.basis.as_ref().expect("written by factor_randomized"));

        // sv (from the f64 basis, or as uploaded) and its bf16 terms hi + lo.
        {
            let vp = basis_f64.map_or(0u64, |b| b.device_ptr(s).0);
            let (sp, _g1) = sv.device_ptr_mut(s);
            let (hp, _g2) = ws.sv_hi.as_mut().expect("grown above").device_ptr_mut(s);
            let (lp, _g3) = ws.sv_lo.as_mut().expect("grown above").device_ptr_mut(s);
            let cfg = grid_stride(n_sv);
            // SAFETY: v (when not null) holds kvd·rank f64 values, sv, hi and lo rank·kvd
            // elements (checked / grown).
            unsafe {
                s.launch_builder(&self.k.factor_basis_out)
                    .arg(&vp)
                    .arg(&sp)
                    .arg(&hp)
                    .arg(&lp)
                    .arg(&n_sv)
                    .launch(cfg)
            }?;
        }

        self.factor_coefficients(kpre, (kvd, rank, u_rows), (u, u_scales), ws)?;
        ws.mark(self, FactorStep::Coefficients)
    }

    /// `u = kpre[..u_rows]·(hi + lo)ᵀ` from the terms in `ws`, in pieces of whole rows, each
    /// row rounded to 8 bits: column-major, `uᵀ[rank, n] = svᵀ[rank, kvd]` (the row-major sv is the column-major
    /// `[kvd, rank]` matrix, transposed) `· kpreᵀ[kvd, n]`.
    fn factor_coefficients(
        &self,
        kpre: &impl DevicePtr<bf16>,
        (kvd, rank, u_rows): (usize, usize, usize),
        (u, u_scales): (&mut impl DevicePtrMut<i8>, &mut impl DevicePtrMut<f32>),
        ws: &mut FactorWorkspace,
    ) -> Result<()> {
        if u_rows == 0 {
            return Ok(());
        }
        let (kvd_i, rank_i) = (i32_of("kvd", kvd)?, i32_of("rank", rank)?);
        let dev = self.device();
        let s = dev.stream();
        let piece_rows = u_piece_rows(rank, u_rows);
        let part = grow(dev, &mut ws.u_part, piece_rows * rank)?;
        let (kp, _g1) = kpre.device_ptr(s);
        let (up, _g2) = u.device_ptr_mut(s);
        let (usp, _g6) = u_scales.device_ptr_mut(s);
        let (hp, _g3) = ws.sv_hi.as_ref().expect("grown by shadow_factorize").device_ptr(s);
        let (lp, _g4) = ws.sv_lo.as_ref().expect("grown by shadow_factorize").device_ptr(s);
        let (pp, _g5) = part.device_ptr_mut(s);
        for first in (0..u_rows).step_by(piece_rows) {
            let n = piece_rows.min(u_rows - first);
            let n_i = i32_of("rows of a piece of u", n)?;
            let kp_piece = kp + (first * kvd * 2) as u64;
            for (term, beta) in [(hp, 0.0f32), (lp, 1.0f32)] {
                let alpha = 1.0f32;
                // SAFETY: the piece's keys are rows first..first+n of kpre (n ≤ u_rows − first,
                // u_rows ≤ rows), the terms rank·kvd values, part piece_rows·rank ≥ n·rank;
                // host scalars.
                unsafe {
                    blas::gemm_ex(
                        *self.blas()?.handle(),
                        blas_sys::cublasOperation_t::CUBLAS_OP_T,
                        blas_sys::cublasOperation_t::CUBLAS_OP_N,
                        rank_i,
                        n_i,
                        kvd_i,
                        (&alpha as *const f32).cast(),
                        term as *const _,
                        blas_sys::cudaDataType_t::CUDA_R_16BF,
                        kvd_i,
                        kp_piece as *const _,
                        blas_sys::cudaDataType_t::CUDA_R_16BF,
                        kvd_i,
                        (&beta as *const f32).cast(),
                        pp as *mut _,
                        blas_sys::cudaDataType_t::CUDA_R_32F,
                        rank_i,
                        blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                        blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                    )
                }?;
            }
            let (codes, scales) = (up + (first * rank) as u64, usp + (first * 4) as u64);
            // SAFETY: part holds n rows of rank fp32 values; u rows first..first+n (n·rank
            // codes from `codes`, n scales from `scales`) inside its u_rows·rank and u_rows
            // (checked); a warp a row.
            unsafe {
                s.launch_builder(&self.k.factor_code8_rows)
                    .arg(&pp)
                    .arg(&codes)
                    .arg(&scales)
                    .arg(&n)
                    .arg(&rank_i)
                    .launch(grid_stride(n * 32))
            }?;
        }
        Ok(())
    }

    /// The randomised path: `ws.basis` (`[kvd, rank]` f64, column-major = the row-major
    /// `[rank, kvd]` basis) from `ws.gram`.
    fn factor_randomized(&self, kvd: usize, rank: usize, ws: &mut FactorWorkspace) -> Result<()> {
        let plan = SubspacePlan::new(kvd, rank)?;
        let l = plan.width;
        let dev = self.device();
        let s = dev.stream();
        grow(dev, &mut ws.gram64, kvd * kvd)?;
        grow(dev, &mut ws.y, kvd * l)?;
        grow(dev, &mut ws.z, kvd * l)?;
        grow(dev, &mut ws.basis, kvd * rank)?;
        grow(dev, &mut ws.small_out, l * l)?;
        grow(dev, &mut ws.small_in, l * l)?;
        if ws.omega.as_ref().is_none_or(|(_, shape)| *shape != (kvd, l)) {
            ws.omega = None;
            ws.omega = Some((dev.upload(&gaussian_block(kvd, l))?, (kvd, l)));
        }
        {
            let (gp, _g1) = ws.gram.as_ref().expect("grown by the caller").device_ptr(s);
            let (dp, _g2) = ws.gram64.as_mut().expect("grown above").device_ptr_mut(s);
            let n = i32_of("kvd", kvd)?;
            let cfg = LaunchConfig {
                grid_dim: (n as u32, 1, 1),
                block_dim: (GRAM_THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: gram holds kvd² fp32 values, gram64 kvd² f64 (grown).
            unsafe {
                s.launch_builder(&self.k.factor_gram_f64)
                    .arg(&gp)
                    .arg(&dp)
                    .arg(&n)
                    .arg(&RIDGE)
                    .launch(cfg)
            }?;
        }
        ws.mark(self, FactorStep::Gram)?;
        let host = {
            let FactorWorkspace {
                gram64,
                omega,
                y,
                z,
                basis,
                small_out,
                small_in,
                ..
            } = &mut *ws;
            let (gp, _g1) = gram64.as_ref().expect("grown above").device_ptr(s);
            let (op, _g2) = omega.as_ref().expect("uploaded above").0.device_ptr(s);
            let (yp, _g3) = y.as_mut().expect("grown above").device_ptr_mut(s);
            let (zp, _g4) = z.as_mut().expect("grown above").device_ptr_mut(s);
            let (bp, _g5) = basis.as_mut().expect("grown above").device_ptr_mut(s);
            let mut blocks = DeviceBlocks {
                ops: self,
                g: gp,
                dim: kvd,
                width: l,
                small_out: small_out.as_ref().expect("grown above"),
                small_in: small_in.as_mut().expect("grown above"),
                in_ops: Duration::ZERO,
            };
            let (mut yb, mut zb, mut out) = (Block(yp), Block(zp), Block(bp));
            let t = Instant::now();
            top_subspace(&mut blocks, &plan, &Block(op), (&mut yb, &mut zb), &mut out)?;
            t.elapsed().saturating_sub(blocks.in_ops)
        };
        ws.add_host(host);
        Ok(())
    }
}

/// A grid-stride launch over `n` elements.
fn grid_stride(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(256).clamp(1, 65_535 * 16) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// A `[dim, ·]` f64 block on the device, column-major with leading dimension `dim`.
struct Block(u64);

/// The subspace iteration's products on cuBLAS (f64), on the compute stream.
struct DeviceBlocks<'a> {
    ops: &'a CudaOps,
    /// `G + ridge·I`, `[dim, dim]`.
    g: u64,
    dim: usize,
    width: usize,
    small_out: &'a CudaSlice<f64>,
    small_in: &'a mut CudaSlice<f64>,
    /// Host time spent inside the [`BlockOps`] calls (launches, copies, waits for the
    /// device): the rest of the iteration's time is the host's own work.
    in_ops: Duration,
}

impl DeviceBlocks<'_> {
    /// `f(self)`, its time added to [`DeviceBlocks::in_ops`].
    fn timed<R>(&mut self, f: impl FnOnce(&mut Self) -> R) -> R {
        let t = Instant::now();
        let r = f(self);
        self.in_ops += t.elapsed();
        r
    }

    /// `c[m, n] = op(a)·b` in f64, column-major, with the leading dimensions given.
    fn dgemm(
        &self,
        ta: bool,
        (m, n, k): (usize, usize, usize),
        a: (u64, usize),
        b: (u64, usize),
        c: (u64, usize),
    ) -> Result<()> {
        let (alpha, beta) = (1.0f64, 0.0f64);
        let op_a = if ta {
            blas_sys::cublasOperation_t::CUBLAS_OP_T
        } else {
            blas_sys::cublasOperation_t::CUBLAS_OP_N
        };
        // SAFETY: the callers pass blocks of the workspace with the shapes named (the
        // workspace grew them for this dim and width); host scalars.
        unsafe {
            blas::dgemm(
                *self.ops.blas()?.handle(),
                op_a,
                blas_sys::cublasOperation_t::CUBLAS_OP_N,
                i32_of("m", m)?,
                i32_of("n", n)?,
                i32_of("k", k)?,
                &alpha,
                a.0 as *const f64,
                i32_of("lda", a.1)?,
                b.0 as *const f64,
                i32_of("ldb", b.1)?,
                &beta,
                c.0 as *mut f64,
                i32_of("ldc", c.1)?,
            )
        }?;
        Ok(())
    }

    /// Uploads the column-major `m` to `small_in`.
    fn upload(&mut self, m: &DMatrix<f64>) -> Result<u64> {
        ensure!(
            m.len() <= self.small_in.len(),
            "subspace iteration: a {}×{} matrix exceeds the scratch",
            m.nrows(),
            m.ncols()
        );
        let s = self.ops.device().stream();
        s.memcpy_htod(m.as_slice(), self.small_in)?;
        Ok(self.small_in.device_ptr(s).0)
    }
}

impl BlockOps for DeviceBlocks<'_> {
    type Block = Block;

    fn apply_g(&mut self, x: &Block, out: &mut Block) -> Result<()> {
        self.timed(|b| b.apply_g_now(x, out))
    }

    fn inner(&mut self, x: &Block, y: &Block) -> Result<DMatrix<f64>> {
        self.timed(|b| b.inner_now(x, y))
    }

    fn solve_upper(&mut self, x: &mut Block, r: &DMatrix<f64>) -> Result<()> {
        self.timed(|b| b.solve_upper_now(x, r))
    }

    fn times(&mut self, x: &Block, m: &DMatrix<f64>, out: &mut Block) -> Result<()> {
        self.timed(|b| b.times_now(x, m, out))
    }
}

/// The [`BlockOps`] products themselves (untimed).
impl DeviceBlocks<'_> {
    fn apply_g_now(&mut self, x: &Block, out: &mut Block) -> Result<()> {
        let (d, l) = (self.dim, self.width);
        self.dgemm(false, (d, l, d), (self.g, d), (x.0, d), (out.0, d))
    }

    fn inner_now(&mut self, x: &Block, y: &Block) -> Result<DMatrix<f64>> {
        let (d, l) = (self.dim, self.width);
        let s = self.ops.device().stream();
        let op = self.small_out.device_ptr(s).0;
        self.dgemm(true, (l, l, d), (x.0, d), (y.0, d), (op, l))?;
        let mut host = vec![0.0f64; l * l];
        s.memcpy_dtoh(&self.small_out.slice(0..l * l), &mut host)?;
        self.ops.device().synchronize()?;
        Ok(DMatrix::from_vec(l, l, host))
    }

    fn solve_upper_now(&mut self, x: &mut Block, r: &DMatrix<f64>) -> Result<()> {
        let (d, l) = (self.dim, self.width);
        ensure!(
            r.nrows() == l && r.ncols() == l,
            "subspace iteration: R is {}×{}",
            r.nrows(),
            r.ncols()
        );
        let rp = self.upload(r)?;
        let alpha = 1.0f64;
        // SAFETY: x is a [d, l] block (ld d), R the [l, l] matrix just uploaded; solves
        // X·R = x in place; host scalar.
        unsafe {
            blas_sys::cublasDtrsm_v2(
                *self.ops.blas()?.handle(),
                blas_sys::cublasSideMode_t::CUBLAS_SIDE_RIGHT,
                blas_sys::cublasFillMode_t::CUBLAS_FILL_MODE_UPPER,
                blas_sys::cublasOperation_t::CUBLAS_OP_N,
                blas_sys::cublasDiagType_t::CUBLAS_DIAG_NON_UNIT,
                i32_of("m", d)?,
                i32_of("n", l)?,
                &alpha,
                rp as *const f64,
                i32_of("lda", l)?,
                x.0 as *mut f64,
                i32_of("ldb", d)?,
            )
        }
        .result()?;
        Ok(())
    }

    fn times_now(&mut self, x: &Block, m: &DMatrix<f64>, out: &mut Block) -> Result<()> {
        let (d, l) = (self.dim, self.width);
        ensure!(
            m.nrows() == l,
            "subspace iteration: a {}-row factor for {l} columns",
            m.nrows()
        );
        let mp = self.upload(m)?;
        self.dgemm(false, (d, m.ncols(), l), (x.0, d), (mp, l), (out.0, d))
    }
}
