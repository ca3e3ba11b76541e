//! synth → write → load → generate round trips for every tiny architecture preset, in
//! every stored dtype, single-file and sharded, against the in-memory synthetic model.

mod common;

use shadowkv::cpu::{CpuModel, LogitsWanted, SeqInput};
use shadowkv::engine::generate::{generate, GenerateOptions, GenerateRequest};
use shadowkv::engine::sampling::SamplingParams;
use shadowkv::model::load::open_model;
use shadowkv::model::synthetic::{preset, write_hf, SyntheticSource, WriteDtype};
use shadowkv::model::weights::ModelWeights;
use std::process::Command;

fn load(spec: &str) -> (CpuModel, shadowkv::model::tokenizer::TextTokenizer) {
    let m = open_model(spec).unwrap_or_else(|e| panic!("{spec}: {e:#}"));
    let w = ModelWeights::load(&m.config, m.source.as_ref(), false).unwrap();
    (CpuModel::new(m.config.clone(), w), m.tokenizer)
}

fn last_logits(model: &CpuModel, ids: &[u32]) -> Vec<f32> {
    let mut cache = model.new_cache();
    model
        .forward(&mut [SeqInput {
            tokens: ids,
            cache: &mut cache,
            logits: LogitsWanted::Last,
        }])
        .unwrap()
        .remove(0)
}

fn greedy(model: &CpuModel, tok: &shadowkv::model::tokenizer::TextTokenizer, ids: &[u32], n: usize) -> Vec<u32> {
    let req = GenerateRequest {
        prompt: ids.to_vec(),
        max_tokens: n,
        sampling: SamplingParams::default(),
        stop: vec![],
    };
    generate(model, tok, &[req], GenerateOptions::default())
        .unwrap()
        .0
        .remove(0)
        .completion_ids
}

#[test]
fn every_tiny_arch_round_trips_in_every_dtype() {
    for arch in ["tiny", "tiny-llama3", "tiny-qwen2"] {
        let (mem, tok) = load(&format!("synthetic:{arch}@7"));
        let prompt = tok
            .encode("The quick brown fox jumps over the lazy dog.", true)
            .unwrap();
        assert_eq!(prompt[0], mem.config().bos_token_id.unwrap(), "{arch}: BOS added");
        let want_logits = last_logits(&mem, &prompt);
        let want_ids = greedy(&mem, &tok, &prompt, 12);
        let cfg = preset(arch).unwrap();
        for (dtype, shard) in [
            (WriteDtype::Bf16, usize::MAX),
            (WriteDtype::F32, 64 << 10),
            (WriteDtype::F16, usize::MAX),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let src = SyntheticSource::new(arch, &cfg, 7);
            write_hf(dir.path(), &cfg, &src, dtype, shard, |_| {}).unwrap();
            if shard != usize::MAX {
                assert!(
                    dir.path().join("model.safetensors.index.json").exists(),
                    "{arch}: sharded"
                );
            }
            let (disk, disk_tok) = load(dir.path().to_str().unwrap());
            assert_eq!(disk.config(), mem.config(), "{arch} {dtype:?}: config round trip");
            assert_eq!(
                disk_tok.encode("The quick brown fox", true).unwrap(),
                tok.encode("The quick brown fox", true).unwrap()
            );
            let got = last_logits(&disk, &prompt);
            let diff = common::max_rel_diff(&got, &want_logits);
            match dtype {
                // bf16 and f32 hold the synthetic (bf16-rounded) values exactly.
                WriteDtype::Bf16 | WriteDtype::F32 => assert_eq!(got, want_logits, "{arch} {dtype:?}"),
                WriteDtype::F16 => assert!(diff < 1e-2, "{arch} f16: logits differ by {diff}"),
            }
            if dtype != WriteDtype::F16 {
                assert_eq!(
                    greedy(&disk, &disk_tok, &prompt, 12),
                    want_ids,
                    "{arch} {dtype:?}: greedy tokens"
                );
            }
        }
    }
}

#[test]
fn batched_generation_equals_each_sequence_alone() {
    let (model, tok) = load("synthetic:tiny-qwen2@3");
    let prompts = [
        "a",
        "Hello there, how are you doing today?",
        "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18",
    ];
    let reqs: Vec<GenerateRequest> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| GenerateRequest {
            prompt: tok.encode(p, true).unwrap(),
            max_tokens: 10 + 3 * i,
            sampling: SamplingParams::default(),
            stop: vec![],
        })
        .collect();
    let (batched, _) = generate(&model, &tok, &reqs, GenerateOptions::default()).unwrap();
    for (r, b) in reqs.iter().zip(&batched) {
        let (alone, _) = generate(
            &model,
            &tok,
            std::slice::from_ref(r),
            GenerateOptions {
                prefill_chunk: 5,
                ..GenerateOptions::default()
            },
        )
        .unwrap();
        assert_eq!(alone[0].completion_ids, b.completion_ids);
        assert_eq!(b.completion_ids.len(), r.max_tokens);
    }
}

#[test]
fn cli_synth_then_generate_json() {
    let exe = env!("CARGO_BIN_EXE_shadowkv");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m");
    let st = Command::new(exe)
        .args(["synth", "--arch", "tiny-llama3", "--out"])
        .arg(&out)
        .args(["--seed", "5"])
        .output()
        .unwrap();
    assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));
    let again = Command::new(exe)
        .args(["synth", "--arch", "tiny", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(!again.status.success() && String::from_utf8_lossy(&again.stderr).contains("--force"));
    let run = |model: &str| {
        let o = Command::new(exe)
            .args([
                "generate",
                "--model",
                model,
                "--prompt",
                "Once upon a time",
                "--max-tokens",
                "8",
                "--json",
                "--threads",
                "2",
            ])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()
    };
    let a = run(out.to_str().unwrap());
    let b = run("synthetic:tiny-llama3@5");
    for key in [
        "prompt_ids",
        "completion_ids",
        "text",
        "prefill_tokens_per_s",
        "decode_tokens_per_s",
    ] {
        assert!(a.get(key).is_some(), "missing {key}");
    }
    assert_eq!(a["completion_ids"], b["completion_ids"]);
    assert_eq!(a["completion_ids"].as_array().unwrap().len(), 8);
    let chat = Command::new(exe)
        .args([
            "generate",
            "--model",
            "synthetic:tiny",
            "--prompt",
            "hi",
            "--chat",
            "--max-tokens",
            "3",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(chat.status.success(), "{}", String::from_utf8_lossy(&chat.stderr));
    let inspect = Command::new(exe)
        .args([
            "inspect",
            "--model",
            "synthetic:llama-3.1-8b",
            "--context",
            "131072",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(inspect.status.success(), "{}", String::from_utf8_lossy(&inspect.stderr));
    let v: serde_json::Value = serde_json::from_slice(&inspect.stdout).unwrap();
    assert_eq!(v["kv_bytes_per_token_bf16"], 131072);
    assert_eq!(v["memory_bytes"]["kv_bf16"], 131072u64 * 131072);
    let p = v["parameters"].as_u64().unwrap();
    assert!(
        (8_000_000_000..8_100_000_000).contains(&p),
        "llama-3.1-8b has {p} parameters"
    );
}

/// `--force` over a sharded model leaves none of its shards (the loader would read them);
/// a model larger than the disk's room is refused before a byte is written; a write
/// that fails part-way removes what it wrote, so the folder does not look like a model.
#[test]
fn synth_replaces_whole_models_and_leaves_no_half_written_one() {
    let exe = env!("CARGO_BIN_EXE_shadowkv");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m");
    let synth = |args: &[&str]| {
        Command::new(exe)
            .arg("synth")
            .args(args)
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap()
    };
    let big = synth(&["--arch", "smollm2-135m", "--shard-mib", "100"]);
    assert!(big.status.success(), "{}", String::from_utf8_lossy(&big.stderr));
    assert!(out.join("model.safetensors.index.json").exists());
    let small = synth(&["--arch", "tiny", "--force"]);
    assert!(small.status.success(), "{}", String::from_utf8_lossy(&small.stderr));
    let mut names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json"
        ]
    );
    let (m, _) = load(out.to_str().unwrap());
    assert_eq!(m.config().hidden_size, preset("tiny").unwrap().hidden_size);
    // 141 GB of bf16: more than this machine's disks hold.
    let huge = synth(&["--arch", "llama-3.1-70b", "--force"]);
    let err = String::from_utf8_lossy(&huge.stderr);
    assert!(!huge.status.success() && err.contains("GiB free"), "{err}");
    // A shard that cannot be written (its name taken by a folder): nothing is left.
    let failing = dir.path().join("f");
    std::fs::create_dir_all(failing.join("shard-00001.safetensors")).unwrap();
    let cfg = preset("tiny").unwrap();
    let src = SyntheticSource::new("synthetic:tiny", &cfg, 1);
    let e = write_hf(&failing, &cfg, &src, WriteDtype::F32, 64 << 10, |_| {}).unwrap_err();
    assert!(format!("{e:#}").contains("removed"), "{e:#}");
    let left: Vec<_> = std::fs::read_dir(&failing)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, ["shard-00001.safetensors"], "files left after a failed write");
}

/// Llama-3.1-70B's shape, described without generating a weight: `inspect` only reads
/// the config, so the 141 GB of weights are never allocated.
#[test]
fn inspect_describes_llama_3_1_70b_without_loading_it() {
    let out = Command::new(env!("CARGO_BIN_EXE_shadowkv"))
        .args([
            "inspect",
            "--model",
            "synthetic:llama-3.1-70b",
            "--context",
            "131072",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for (key, want) in [
        ("layers", 80),
        ("hidden_size", 8192),
        ("intermediate_size", 28672),
        ("heads", 64),
        ("kv_heads", 8),
        ("head_dim", 128),
        ("vocab_size", 128256),
        ("max_context", 131072),
    ] {
        assert_eq!(v[key], want, "{key}");
    }
    assert_eq!(v["rope_theta"], 500000.0);
    assert_eq!(v["llama3_rope_scaling"], true);
    // 2 (k, v) x 80 layers x 8 KV heads x 128 dims x 2 bytes.
    assert_eq!(v["kv_bytes_per_token_bf16"], 327_680);
    let p = v["parameters"].as_u64().unwrap();
    assert!(
        (70_500_000_000..70_600_000_000).contains(&p),
        "llama-3.1-70b has {p} parameters"
    );
    let bf16 = v["memory_bytes"]["weights_bf16"].as_u64().unwrap();
    assert!(
        (141_000_000_000..141_200_000_000).contains(&bf16),
        "{bf16} bytes of bf16 weights"
    );
    // 80 layers of 9 tensors, the embeddings, the final norm and the output head.
    assert_eq!(v["dtypes"]["bf16 (generated)"]["tensors"], 80 * 9 + 3, "{v}");
    assert!(v["shadowkv"]["gpu_bytes_per_sequence"].as_u64().unwrap() > 0, "{v}");
}

/// A model whose head size the GPU's ShadowKV kernels are not built for is still
/// described, the reason given in place of ShadowKV's GPU figures.
#[test]
fn inspect_describes_a_model_shadowkv_on_the_gpu_does_not_take() {
    let out = Command::new(env!("CARGO_BIN_EXE_shadowkv"))
        .args(["inspect", "--model", "synthetic:tiny", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["head_dim"], 16);
    assert!(v["shadowkv"]["gpu_bytes_per_sequence"].is_null(), "{v}");
    let why = v["shadowkv"]["gpu_unsupported"].as_str().unwrap();
    assert!(why.contains("head dimension 16"), "{why}");
}
