//! The kernel files and the functions loaded from them.

use super::device::CudaDevice;
use super::nvrtc::{KernelFile, Nvrtc};
use anyhow::{Context, Result};
use cudarc::driver::sys::{CUdevice_attribute_enum, CUfunction_attribute_enum};
use cudarc::driver::{CudaFunction, CudaModule};
use std::sync::Arc;

macro_rules! kernel_file {
    ($name:literal) => {
        KernelFile {
            path: concat!("kernels/", $name),
            source: include_str!(concat!("../../kernels/", $name)),
            arch_specific: false,
        }
    };
}

/// Every kernel file, one per concern.
pub const KERNEL_FILES: &[KernelFile] = &[
    kernel_file!("embedding.cu"),
    kernel_file!("rmsnorm.cu"),
    kernel_file!("rope.cu"),
    kernel_file!("swiglu.cu"),
    kernel_file!("flash_decode.cu"),
    kernel_file!("util.cu"),
    kernel_file!("timeline.cu"),
    kernel_file!("flash_prefill.cu"),
    kernel_file!("qkv_append.cu"),
    kernel_file!("sample.cu"),
    kernel_file!("gemv.cu"),
    kernel_file!("select.cu"),
    kernel_file!("reuse.cu"),
    kernel_file!("rebuild.cu"),
    kernel_file!("fetch.cu"),
    kernel_file!("tier.cu"),
    kernel_file!("landmarks.cu"),
    kernel_file!("fold.cu"),
    kernel_file!("factor.cu"),
    kernel_file!("parallel.cu"),
];

/// The loaded kernel functions.
pub struct Kernels {
    pub(crate) embedding_gather: CudaFunction,
    pub(crate) rmsnorm_residual: CudaFunction,
    pub(crate) rope_inplace: CudaFunction,
    pub(crate) swiglu: CudaFunction,
    pub(crate) flash_decode_split_d64: CudaFunction,
    pub(crate) flash_decode_split_d128: CudaFunction,
    pub(crate) flash_decode_split_q8_d64: CudaFunction,
    pub(crate) flash_decode_split_q8_d128: CudaFunction,
    pub(crate) flash_decode_reduce: CudaFunction,
    pub(crate) flash_decode_reduce_few: CudaFunction,
    pub(crate) fill_u16: CudaFunction,
    pub(crate) fill_u32: CudaFunction,
    pub(crate) stamp_time: CudaFunction,
    pub(crate) fill_random_bf16: CudaFunction,
    pub(crate) vocab_concat: CudaFunction,
    pub(crate) flash_prefill_d64: CudaFunction,
    pub(crate) flash_prefill_d128: CudaFunction,
    pub(crate) qkv_rope_append: CudaFunction,
    pub(crate) sample_rows: CudaFunction,
    pub(crate) gemv_bf16: CudaFunction,
    pub(crate) gemv_f32: CudaFunction,
    pub(crate) qkv_rope_append_shadow: CudaFunction,
    pub(crate) shadow_logits: CudaFunction,
    pub(crate) shadow_top_k: CudaFunction,
    /// `shadow_top_k` in blocks of half the threads, four an SM (batches of many heads).
    pub(crate) shadow_top_k_half: CudaFunction,
    pub(crate) topk_rows: CudaFunction,
    pub(crate) shadow_reuse: CudaFunction,
    pub(crate) shadow_rebuild: CudaFunction,
    pub(crate) shadow_fetch: CudaFunction,
    pub(crate) shadow_scatter: CudaFunction,
    pub(crate) shadow_tier_fill: CudaFunction,
    pub(crate) shadow_tier_fill_pool: CudaFunction,
    pub(crate) shadow_landmarks: CudaFunction,
    pub(crate) shadow_outlier_flags: CudaFunction,
    pub(crate) shadow_place_prefill: CudaFunction,
    pub(crate) shadow_pool_write: CudaFunction,
    pub(crate) shadow_fold_chunk: CudaFunction,
    pub(crate) shadow_fold_project: CudaFunction,
    pub(crate) shadow_fold_shift: CudaFunction,
    pub(crate) factor_gram_f64: CudaFunction,
    pub(crate) factor_basis_out: CudaFunction,
    pub(crate) factor_code8_rows: CudaFunction,
    /// How many keys `shadow_top_k` and `topk_rows` may keep in dynamic shared memory.
    pub(crate) topk_shared_keys: usize,
    _modules: Vec<Arc<CudaModule>>,
}

impl Kernels {
    /// Compiles (or takes from the cache) and loads every kernel file for `dev`.
    pub fn load(dev: &CudaDevice) -> Result<Kernels> {
        let nvrtc = Nvrtc::new()?;
        let cc = dev.info().compute_capability;
        let mut modules = Vec::new();
        let mut load = |file: &KernelFile| -> Result<Arc<CudaModule>> {
            let cubin = nvrtc.cubin(file, cc)?;
            let m = dev
                .context()
                .load_module(cudarc::nvrtc::Ptx::from_binary(cubin))
                .with_context(|| format!("loading the module of {}", file.path))?;
            modules.push(m.clone());
            Ok(m)
        };
        let find = |name: &str| KERNEL_FILES.iter().find(|f| f.path.ends_with(name)).unwrap();
        let get = |m: &Arc<CudaModule>, f: &str| -> Result<CudaFunction> {
            m.load_function(f)
                .with_context(|| format!("kernel function {f} not found"))
        };
        let emb = load(find("embedding.cu"))?;
        let norm = load(find("rmsnorm.cu"))?;
        let rope = load(find("rope.cu"))?;
        let act = load(find("swiglu.cu"))?;
        let fd = load(find("flash_decode.cu"))?;
        let util = load(find("util.cu"))?;
        let timeline = load(find("timeline.cu"))?;
        let fp = load(find("flash_prefill.cu"))?;
        let qa = load(find("qkv_append.cu"))?;
        let smp = load(find("sample.cu"))?;
        let gv = load(find("gemv.cu"))?;
        let sel = load(find("select.cu"))?;
        let reuse = load(find("reuse.cu"))?;
        let rebuild = load(find("rebuild.cu"))?;
        let fetch = load(find("fetch.cu"))?;
        let tier = load(find("tier.cu"))?;
        let marks = load(find("landmarks.cu"))?;
        let fold = load(find("fold.cu"))?;
        let factor = load(find("factor.cu"))?;
        let par = load(find("parallel.cu"))?;
        let shadow_top_k = get(&sel, "shadow_top_k")?;
        let topk_rows = get(&sel, "topk_rows")?;
        let shadow_top_k_half = get(&sel, "shadow_top_k_half")?;
        let topk_shared_keys = allow_shared_keys(dev, &[&shadow_top_k, &shadow_top_k_half, &topk_rows])?;
        Ok(Kernels {
            embedding_gather: get(&emb, "embedding_gather")?,
            rmsnorm_residual: get(&norm, "rmsnorm_residual")?,
            rope_inplace: get(&rope, "rope_inplace")?,
            swiglu: get(&act, "swiglu")?,
            flash_decode_split_d64: get(&fd, "flash_decode_split_d64")?,
            flash_decode_split_d128: get(&fd, "flash_decode_split_d128")?,
            flash_decode_split_q8_d64: get(&fd, "flash_decode_split_q8_d64")?,
            flash_decode_split_q8_d128: get(&fd, "flash_decode_split_q8_d128")?,
            flash_decode_reduce: get(&fd, "flash_decode_reduce")?,
            flash_decode_reduce_few: get(&fd, "flash_decode_reduce_few")?,
            fill_u16: get(&util, "fill_u16")?,
            fill_u32: get(&util, "fill_u32")?,
            stamp_time: get(&timeline, "stamp_time")?,
            fill_random_bf16: get(&util, "fill_random_bf16")?,
            vocab_concat: get(&par, "vocab_concat")?,
            flash_prefill_d64: get(&fp, "flash_prefill_d64")?,
            flash_prefill_d128: get(&fp, "flash_prefill_d128")?,
            qkv_rope_append: get(&qa, "qkv_rope_append")?,
            sample_rows: get(&smp, "sample_rows")?,
            gemv_bf16: get(&gv, "gemv_bf16")?,
            gemv_f32: get(&gv, "gemv_f32")?,
            qkv_rope_append_shadow: get(&qa, "qkv_rope_append_shadow")?,
            shadow_logits: get(&sel, "shadow_logits")?,
            shadow_top_k,
            shadow_top_k_half,
            topk_rows,
            shadow_reuse: get(&reuse, "shadow_reuse")?,
            shadow_rebuild: get(&rebuild, "shadow_rebuild")?,
            shadow_fetch: get(&fetch, "shadow_fetch")?,
            shadow_scatter: get(&fetch, "shadow_scatter")?,
            shadow_tier_fill: get(&tier, "shadow_tier_fill")?,
            shadow_tier_fill_pool: get(&tier, "shadow_tier_fill_pool")?,
            shadow_landmarks: get(&marks, "shadow_landmarks")?,
            shadow_outlier_flags: get(&marks, "shadow_outlier_flags")?,
            shadow_place_prefill: get(&marks, "shadow_place_prefill")?,
            shadow_pool_write: get(&marks, "shadow_pool_write")?,
            shadow_fold_chunk: get(&fold, "shadow_fold_chunk")?,
            shadow_fold_project: get(&fold, "shadow_fold_project")?,
            shadow_fold_shift: get(&fold, "shadow_fold_shift")?,
            factor_gram_f64: get(&factor, "factor_gram_f64")?,
            factor_basis_out: get(&factor, "factor_basis_out")?,
            factor_code8_rows: get(&factor, "factor_code8_rows")?,
            topk_shared_keys,
            _modules: modules,
        })
    }
}

/// Lets the top-k kernels `fns` use as much dynamic shared memory as a block of the
/// device may have beside their static shared memory, and returns how many 4-byte keys
/// that holds: rows of up to that many values are selected from shared memory, longer
/// ones from global memory at each pass (slower, same result).
fn allow_shared_keys(dev: &CudaDevice, fns: &[&CudaFunction]) -> Result<usize> {
    dev.context().bind_to_thread()?;
    let most = dev
        .context()
        .attribute(CUdevice_attribute_enum::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
        .context("top-k: reading the shared memory a block may have")?;
    let mut fixed = 0;
    for f in fns {
        fixed = fixed.max(
            f.shared_size_bytes()
                .context("top-k: reading a kernel's shared memory")?,
        );
    }
    let bytes = (most - fixed).max(0) / 4 * 4;
    for f in fns {
        f.set_attribute(
            CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            bytes,
        )
        .with_context(|| format!("top-k: allowing {bytes} bytes of shared memory per block"))?;
    }
    Ok(bytes as usize / 4)
}
