//! The `--backend` options of the command line fail with clear messages where they
//! cannot run (no GPU here, or a model the CUDA kernels do not serve), never a panic.

use std::process::Command;

fn shadowkv(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_shadowkv"))
        .args(args)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!err.contains("panicked"), "{args:?} panicked:\n{err}");
    (out.status.success(), err)
}

#[test]
fn cuda_backend_without_a_usable_gpu_or_shape_says_why() {
    // synthetic:tiny has a head dimension of 16, which the kernels do not serve: on a GPU
    // host that is the error; without a GPU, the missing GPU is.
    let (ok, err) = shadowkv(&[
        "generate",
        "--backend",
        "cuda",
        "--model",
        "synthetic:tiny",
        "--prompt",
        "hi",
    ]);
    assert!(!ok);
    assert!(
        err.contains("--backend cuda: no usable GPU") || err.contains("head dimensions 64 and 128"),
        "{err}"
    );
    let (ok, err) = shadowkv(&[
        "eval",
        "ruler",
        "--backend",
        "cuda",
        "--model",
        "synthetic:tiny",
        "--lengths",
        "512",
        "--samples",
        "1",
    ]);
    assert!(!ok);
    assert!(
        err.contains("--backend cuda: no usable GPU") || err.contains("head dimensions 64 and 128"),
        "{err}"
    );
    let (ok, err) = shadowkv(&[
        "bench",
        "--backend",
        "cuda",
        "--model",
        "synthetic:tiny",
        "--context",
        "64",
        "--batch",
        "auto",
        "--attention",
        "full",
    ]);
    assert!(!ok);
    assert!(
        err.contains("--backend cuda: no usable GPU") || err.contains("head dimensions 64 and 128"),
        "{err}"
    );
}

#[test]
fn bench_options_are_checked_by_name() {
    let cases: &[(&[&str], &str)] = &[
        (&["--batch", "auto"], "--batch auto needs --backend cuda"),
        (
            &["--batch", "0"],
            "--batch must be a positive number or `auto`, got `0`",
        ),
        (&["--batch", "many"], "got `many`"),
        (&["--peer", "torch"], "--peer needs --backend cuda"),
        (&["--lanes", "0"], "--lanes takes counts of at least 1"),
        (&["--lanes", "1,2"], "--lanes needs --backend cuda"),
        (
            &["--backend", "cuda", "--value-fetch", "sideways"],
            "invalid value 'sideways'",
        ),
        (&["--gpu-tier", "auto"], "--gpu-tier needs --backend cuda"),
        (&["--value-fetch", "cpu-gather"], "--value-fetch needs --backend cuda"),
        (&["--no-graph"], "--no-graph needs --backend cuda"),
        (
            &["--backend", "cuda", "--gpu-tier", "lots"],
            "the GPU value tier is `off`, `auto` or a number of chunks",
        ),
        (&["--gpu-value-slots", "auto"], "--gpu-value-slots needs --backend cuda"),
        (
            &["--backend", "cuda", "--gpu-value-slots", "lots"],
            "GPU value slots are `off`, `auto` or a number of sequences",
        ),
        (
            &["--backend", "cuda", "--attention", "full", "--gpu-value-slots", "2"],
            "add shadowkv to --attention",
        ),
        (
            &[
                "--backend",
                "cuda",
                "--gpu-value-slots",
                "2",
                "--value-fetch",
                "zero-copy,cpu-gather",
            ],
            "--gpu-value-slots with --value-fetch cpu-gather",
        ),
        (
            &["--backend", "cuda", "--gpu-value-slots", "auto", "--devices", "0,1"],
            "not measured over a tensor-parallel group (--devices)",
        ),
    ];
    for (extra, want) in cases {
        let mut args = vec!["bench", "--model", "synthetic:tiny", "--context", "64", "--gen", "2"];
        args.extend_from_slice(extra);
        let (ok, err) = shadowkv(&args);
        assert!(!ok, "{args:?} was accepted");
        assert!(err.contains(want), "{args:?}: stderr lacks {want:?}:\n{err}");
    }
}

/// `generate`'s sampling flags are refused by the flag's name (the API's checks would
/// name the request fields), and the GPU-only ones by what they need.
#[test]
fn generate_options_are_checked_by_name() {
    let cases: &[(&[&str], &str)] = &[
        (
            &["--max-tokens", "0"],
            "'--max-tokens <MAX_TOKENS>': must be at least 1",
        ),
        (&["--top-p", "0"], "'--top-p <TOP_P>': must be in (0, 1]"),
        (
            &["--temperature", "-1"],
            "'--temperature <TEMPERATURE>': must be a finite number >= 0",
        ),
        (&["--temperature", "inf"], "must be a finite number >= 0"),
        (&["--no-graph"], "--no-graph needs --backend cuda"),
        (&["--value-fetch", "cpu-gather"], "--value-fetch needs --backend cuda"),
        (
            &["--attention", "full", "--budget", "64", "--rank", "8"],
            "--budget, --rank set ShadowKV's settings, but --attention runs no `shadowkv`",
        ),
        (
            &["--attention", "shadowkv-paper", "--local-chunks", "2"],
            "--local-chunks sets ShadowKV's settings",
        ),
    ];
    for (extra, want) in cases {
        let mut args = vec!["generate", "--model", "synthetic:tiny", "--prompt", "hi"];
        args.extend_from_slice(extra);
        let (ok, err) = shadowkv(&args);
        assert!(!ok, "{args:?} was accepted");
        assert!(err.contains(want), "{args:?}: stderr lacks {want:?}:\n{err}");
    }
}

/// `backend.kind = "cuda"` in a topology names the file, the line and the key where there
/// is no GPU, like every other topology error (and never a flag that was not used). On
/// a GPU host the GPU opens and synthetic:tiny's head dimension is what is refused.
#[test]
fn serve_with_the_cuda_backend_and_no_gpu_names_the_topology_key() {
    let dir = tempfile::tempdir().unwrap();
    let topo = dir.path().join("gpu.toml");
    std::fs::write(
        &topo,
        "[model]\npath = \"synthetic:tiny\"\n\n[backend]\nkind = \"cuda\"\n",
    )
    .unwrap();
    let (ok, err) = shadowkv(&["serve", "--topology", topo.to_str().unwrap(), "--listen", "127.0.0.1:0"]);
    assert!(!ok, "{err}");
    if err.contains("head dimensions 64 and 128") {
        return;
    }
    let want = format!("{}, line 5, column 1, key `backend.kind`: ", topo.display());
    assert!(err.contains(&want), "stderr lacks {want:?}:\n{err}");
    assert!(err.contains("needs a usable NVIDIA GPU"), "{err}");
    assert!(!err.contains("--backend"), "{err}");
}

/// A tensor-parallel group (`--devices`, `backend.devices`) is checked at start-up:
/// the CPU backend refuses it, a repeated GPU is named, and without the GPUs (or NCCL)
/// the error says which GPU or library is missing, for a group of two or of one, with
/// the flag or the topology key. On a host with the GPUs the tiny model's head dimension
/// is what is refused.
#[test]
fn device_groups_are_checked_at_start_up() {
    let tiny = ["--model", "synthetic:tiny"];
    let runs: [&[&str]; 3] = [
        &["generate", "--prompt", "hi"],
        &[
            "bench",
            "--context",
            "64",
            "--gen",
            "2",
            "--batch",
            "1",
            "--attention",
            "full",
        ],
        &["eval", "ruler", "--lengths", "512", "--samples", "1"],
    ];
    // Why a group cannot start on this host (or, with the GPUs and NCCL, the model).
    let cannot_start = |err: &str| {
        err.contains("cannot be used")
            || err.contains("libnccl.so.2 not found")
            || err.contains("head dimensions 64 and 128")
    };
    for run in runs {
        let args = [run, &tiny[..], &["--backend", "cpu", "--devices", "0,1"]].concat();
        let (ok, err) = shadowkv(&args);
        assert!(
            !ok && err.contains("--devices 0,1 needs --backend cuda"),
            "{args:?}: {err}"
        );
        // A group of two, and of one (the group's code on one GPU).
        for list in ["0,1", "0"] {
            let args = [run, &tiny[..], &["--backend", "cuda", "--devices", list]].concat();
            let (ok, err) = shadowkv(&args);
            assert!(!ok && cannot_start(&err), "{args:?}: {err}");
        }
        let args = [run, &tiny[..], &["--backend", "cuda", "--devices", "1,1"]].concat();
        let (ok, err) = shadowkv(&args);
        assert!(!ok && err.contains("--devices lists GPU 1 twice"), "{args:?}: {err}");
        let args = [run, &tiny[..], &["--device", "1", "--devices", "0,1"]].concat();
        let (ok, err) = shadowkv(&args);
        assert!(!ok && err.contains("cannot be used with"), "{args:?}: {err}");
    }
    let dir = tempfile::tempdir().unwrap();
    let topo = dir.path().join("two.toml");
    let text = "[model]\npath = \"synthetic:tiny\"\n\n[backend]\nkind = \"cuda\"\ndevices = [0, 1]\n";
    std::fs::write(&topo, text).unwrap();
    let (ok, err) = shadowkv(&["serve", "--topology", topo.to_str().unwrap(), "--listen", "127.0.0.1:0"]);
    assert!(!ok, "{err}");
    if !err.contains("head dimensions 64 and 128") {
        let want = format!("{}, line 6, column 1, key `backend.devices`: ", topo.display());
        assert!(
            err.contains(&want) && cannot_start(&err),
            "stderr lacks {want:?}:\n{err}"
        );
    }
}
