//! Weights loaded straight into their tensor-parallel shards: `TensorSource::load_shard`
//! and `ModelWeights::load_shard` from the synthetic source, safetensors written here
//! and the real SmolLM2 GGUF, for Llama and Qwen2 (biases) shapes over every device
//! count they divide. Each device's weights must equal, bit for bit, the plan's cut
//! (`TensorShard::apply`) of the whole tensor, and have the shapes of
//! `ShardPlan::device_config`. A counting allocator shows the shard path never holds a
//! whole sharded matrix (while a whole load does, so the measure can fail).

mod common;

use shadowkv::model::config::{Arch, ModelConfig};
use shadowkv::model::gguf_model::GgufModel;
use shadowkv::model::safetensors_dir::SafetensorsDir;
use shadowkv::model::shard::{ShardPlan, TensorShard};
use shadowkv::model::synthetic::{preset, write_hf, SyntheticSource, WriteDtype};
use shadowkv::model::weights::{expected_tensors, ModelWeights, Tensor, TensorSource};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

/// The system allocator, noting the largest single allocation each thread makes.
struct Largest;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(bytes: usize) {
    let _ = LARGEST.try_with(|c| c.set(c.get().max(bytes)));
}

// SAFETY: every call is forwarded unchanged to `System`; `note` only updates a
// thread-local counter and allocates nothing.
unsafe impl GlobalAlloc for Largest {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Largest = Largest;

/// `f`'s result and the largest single allocation this thread made while it ran.
fn largest_allocation<T>(f: impl FnOnce() -> T) -> (T, usize) {
    LARGEST.with(|c| c.set(0));
    let r = f();
    (r, LARGEST.with(|c| c.get()))
}

/// Every tensor of `w` under its Hugging Face name, in `expected_tensors` order.
fn named(w: &ModelWeights) -> Vec<(String, &Tensor)> {
    let mut v = vec![("model.embed_tokens.weight".to_string(), &w.embed)];
    for (l, x) in w.layers.iter().enumerate() {
        let p = |s: &str| format!("model.layers.{l}.{s}");
        v.push((p("input_layernorm.weight"), &x.input_norm));
        v.push((p("self_attn.q_proj.weight"), &x.q_proj));
        v.push((p("self_attn.k_proj.weight"), &x.k_proj));
        v.push((p("self_attn.v_proj.weight"), &x.v_proj));
        v.push((p("self_attn.o_proj.weight"), &x.o_proj));
        v.push((p("post_attention_layernorm.weight"), &x.post_norm));
        v.push((p("mlp.gate_proj.weight"), &x.gate_proj));
        v.push((p("mlp.up_proj.weight"), &x.up_proj));
        v.push((p("mlp.down_proj.weight"), &x.down_proj));
        if let Some([q, k, b]) = &x.qkv_bias {
            v.push((p("self_attn.q_proj.bias"), q));
            v.push((p("self_attn.k_proj.bias"), k));
            v.push((p("self_attn.v_proj.bias"), b));
        }
    }
    v.push(("model.norm.weight".into(), &w.norm));
    if let Some(h) = &w.lm_head {
        v.push(("lm_head.weight".into(), h));
    }
    v
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.data.iter().map(|x| x.to_bits()).collect()
}

/// Loads every device's weights of `cfg` from `src` over each device count in `ns`
/// with `ModelWeights::load_shard`, and checks each tensor against the plan's cut of
/// the whole tensor (bit for bit) and the device config's shape. Returns how many
/// tensors were actually split (not `Whole`).
fn check(label: &str, cfg: &ModelConfig, src: &dyn TensorSource, ns: &[usize]) -> usize {
    let full = ModelWeights::load(cfg, src, false).unwrap();
    let full = named(&full);
    let mut split = 0;
    for &n in ns {
        let plan = ShardPlan::new(cfg, n).unwrap_or_else(|e| panic!("{label} over {n}: {e}"));
        for rank in 0..n {
            let shard = plan.shard(rank).unwrap();
            let w = ModelWeights::load_shard(cfg, src, &shard, false)
                .unwrap_or_else(|e| panic!("{label} device {rank}/{n}: {e:#}"));
            let got = named(&w);
            let local = expected_tensors(&plan.device_config(rank).unwrap());
            assert_eq!(got.len(), full.len(), "{label} {rank}/{n}: tensor count");
            assert_eq!(got.len(), local.len(), "{label} {rank}/{n}: device config's tensors");
            for (((name, t), (full_name, whole)), (local_name, local_shape)) in got.iter().zip(&full).zip(&local) {
                assert_eq!((name, name), (full_name, local_name));
                let part = shard.tensor(name).unwrap();
                split += usize::from(part != TensorShard::Whole && n > 1);
                let want = part.apply(whole).unwrap();
                assert_eq!(t.shape, want.shape, "{label} {rank}/{n} {name}: shape");
                assert_eq!(&t.shape, local_shape, "{label} {rank}/{n} {name}: device config shape");
                assert!(
                    bits(t) == bits(&want),
                    "{label} {rank}/{n} {name}: values differ from the cut"
                );
            }
        }
        println!("{label}: {n} device(s) load their shards bit-exactly");
    }
    split
}

#[test]
fn synthetic_shards_equal_the_cut_of_the_whole() {
    let smol = ModelConfig {
        num_layers: 2,
        ..preset("smollm2-135m").unwrap()
    };
    let cases: [(&str, ModelConfig, &[usize]); 6] = [
        ("tiny", preset("tiny").unwrap(), &[1, 2]),
        ("tiny-llama3", preset("tiny-llama3").unwrap(), &[1]),
        ("tiny-qwen2", preset("tiny-qwen2").unwrap(), &[1, 2]),
        ("wide llama", common::wide_model(Arch::Llama), &[1, 2, 4]),
        ("wide qwen2", common::wide_model(Arch::Qwen2), &[1, 2, 4]),
        ("smollm2-135m (2 layers)", smol, &[1, 3]),
    ];
    for (label, cfg, ns) in cases {
        let src = SyntheticSource::new(label, &cfg, 5);
        let split = check(label, &cfg, &src, ns);
        assert!(split > 0 || ns == [1], "{label}: nothing was split");
    }
}

#[test]
fn safetensors_shards_equal_the_cut_of_the_whole() {
    for (arch, dtype, shard_bytes) in [
        (Arch::Qwen2, WriteDtype::Bf16, 64 << 10),
        (Arch::Llama, WriteDtype::F16, usize::MAX),
        (Arch::Qwen2, WriteDtype::F32, usize::MAX),
    ] {
        let cfg = common::wide_model(arch);
        let dir = tempfile::tempdir().unwrap();
        write_hf(
            dir.path(),
            &cfg,
            &SyntheticSource::new("w", &cfg, 9),
            dtype,
            shard_bytes,
            |_| {},
        )
        .unwrap();
        let src = SafetensorsDir::open(dir.path()).unwrap();
        let label = format!("{arch:?} {dtype:?} safetensors");
        assert!(check(&label, &cfg, &src, &[1, 2, 4]) > 0);
    }
}

/// The real SmolLM2 (Q4_1 and Q8_0 blocks, rotary-permuted Q/K rows): 9 query and 3 KV
/// heads divide over 3 devices only.
#[test]
fn gguf_shards_equal_the_cut_of_the_whole() {
    let src = GgufModel::open(&common::test_model()).unwrap();
    let cfg = src.config().clone();
    assert!(check("SmolLM2 GGUF", &cfg, &src, &[1, 3]) > 0);
}

/// For every sharded matrix of every source, `load_shard` allocates at most the shard
/// plus one f32 row of the whole tensor at once, while `load` allocates the whole.
#[test]
fn the_shard_path_never_holds_a_whole_matrix() {
    let cfg = common::wide_model(Arch::Qwen2);
    let synth = SyntheticSource::new("wide", &cfg, 3);
    let dir = tempfile::tempdir().unwrap();
    write_hf(dir.path(), &cfg, &synth, WriteDtype::Bf16, usize::MAX, |_| {}).unwrap();
    let st = SafetensorsDir::open(dir.path()).unwrap();
    let gguf = GgufModel::open(&common::test_model()).unwrap();
    let gcfg = ModelConfig {
        num_layers: 2,
        ..gguf.config().clone()
    };
    let sources: [(&dyn TensorSource, &ModelConfig, usize); 3] = [(&synth, &cfg, 2), (&st, &cfg, 4), (&gguf, &gcfg, 3)];
    for (src, cfg, n) in sources {
        let plan = ShardPlan::new(cfg, n).unwrap();
        let mut checked = 0;
        for (name, shape) in expected_tensors(cfg) {
            if shape.len() != 2 {
                continue;
            }
            let whole_bytes = shape[0] * shape[1] * 4;
            let (whole, peak) = largest_allocation(|| src.load(&name).unwrap().unwrap());
            assert!(
                peak >= whole_bytes,
                "{name}: the whole load's peak {peak} < {whole_bytes}"
            );
            for rank in 0..n {
                let part = plan.shard(rank).unwrap().tensor(&name).unwrap();
                let (t, peak) = largest_allocation(|| src.load_shard(&name, &part).unwrap().unwrap());
                let bound = t.len() * 4 + shape[1] * 4;
                assert!(
                    peak <= bound,
                    "{} {name} {part:?}: {peak} bytes at once, more than the shard and a row ({bound})",
                    src.describe()
                );
                assert_eq!(bits(&t), bits(&part.apply(&whole).unwrap()), "{name} {part:?}");
                checked += 1;
            }
        }
        println!(
            "{}: {checked} shards of matrices loaded without the whole",
            src.describe()
        );
        assert!(checked > 0);
    }
}

#[test]
fn ranges_outside_a_tensor_are_named() {
    let cfg = preset("tiny").unwrap();
    let synth = SyntheticSource::new("synthetic:tiny", &cfg, 1);
    let dir = tempfile::tempdir().unwrap();
    write_hf(dir.path(), &cfg, &synth, WriteDtype::Bf16, usize::MAX, |_| {}).unwrap();
    let st = SafetensorsDir::open(dir.path()).unwrap();
    let down = "model.layers.1.mlp.down_proj.weight";
    for src in [&synth as &dyn TensorSource, &st] {
        let e = src.load_shard(down, &TensorShard::Cols(100..161)).unwrap_err();
        let e = format!("{e:#}");
        assert!(
            e.contains(&format!(
                "tensor `{down}` has shape [64, 160]: columns 100..161 are outside it"
            )),
            "{e}"
        );
        let e = format!("{:#}", src.load_shard(down, &TensorShard::Rows(60..65)).unwrap_err());
        assert!(e.contains("has shape [64, 160]: rows 60..65 are outside it"), "{e}");
        assert!(src
            .load_shard("model.nothing", &TensorShard::Rows(0..1))
            .unwrap()
            .is_none());
    }
    let gguf = GgufModel::open(&common::test_model()).unwrap();
    let e = format!(
        "{:#}",
        gguf.load_shard("model.layers.0.self_attn.q_proj.weight", &TensorShard::Rows(500..577))
            .unwrap_err()
    );
    assert!(
        e.contains(
            "tensor `model.layers.0.self_attn.q_proj.weight` has shape [576, 576]: rows 500..577 are outside it"
        ),
        "{e}"
    );
    // A plan made for another shape: the whole tensor's shape is checked first.
    let bigger = ModelConfig {
        vocab_size: 600,
        ..cfg.clone()
    };
    let shard = ShardPlan::new(&bigger, 2).unwrap().shard(1).unwrap();
    let e = format!(
        "{:#}",
        ModelWeights::load_shard(&bigger, &st, &shard, false).unwrap_err()
    );
    assert!(
        e.contains("tensor `model.embed_tokens.weight` has shape [512, 64], the config implies [600, 64]"),
        "{e}"
    );
}
