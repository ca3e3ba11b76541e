use super::*;

fn repo(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn err(src: &str) -> TopologyError {
    match Topology::parse(src, "t.toml") {
        Ok(t) => panic!("expected an error, parsed {t:?}"),
        Err(e) => e,
    }
}

#[test]
fn shipped_configs_parse() {
    let cpu = Topology::load(&repo("pipeline-configs/cpu.toml")).unwrap();
    assert_eq!(cpu.backend.kind, BackendKind::Cpu);
    assert_eq!(cpu.attention.mode, AttentionMode::Full);
    assert_eq!(cpu.model.path.as_deref(), Some("auto:smollm2"));
    let h200 = Topology::load(&repo("pipeline-configs/h200.toml")).unwrap();
    assert_eq!(h200.backend.kind, BackendKind::Cuda);
    assert_eq!(h200.attention.mode, AttentionMode::Shadowkv);
    assert_eq!(h200.actors.gather.cores, Cores::List((3..=15).collect()));
    assert_eq!(h200.actors.gather.threads, AutoOr::Value(12));
    assert_eq!(h200.pipeline.micro_batches, 2);
    let cuda = Topology::load(&repo("pipeline-configs/cuda.toml")).unwrap();
    assert_eq!(cuda.backend.kind, BackendKind::Cuda);
    assert_eq!(cuda.attention.mode, AttentionMode::Full);
}

#[test]
fn empty_file_takes_defaults() {
    let t = Topology::parse("", "t.toml").unwrap();
    assert_eq!(t.limits.max_batch, 8);
    assert_eq!(t.attention.budget, 2048);
    assert_eq!(t.server.listen, "127.0.0.1:8000");
    assert_eq!(t.actors.compute.threads, AutoOr::Auto);
}

#[test]
fn unknown_keys_name_key_and_line() {
    let e = err("[limits]\nmax_batch = 4\nmax_batchh = 5\n");
    assert_eq!(e.line.map(|l| l.0), Some(3), "{e}");
    assert!(e.message.contains("max_batchh"), "{e}");
    let e = err("[model]\npath = \"x\"\n\n[limitz]\nmax_batch = 1\n");
    assert_eq!(e.line.map(|l| l.0), Some(4), "{e}");
    assert!(e.to_string().contains("limitz"), "{e}");
    let e = err("[actors.compute]\nthreads = 2\n[actors.decoder]\nthreads = 1\n");
    assert_eq!(e.line.map(|l| l.0), Some(3), "{e}");
    assert!(e.to_string().contains("decoder"), "{e}");
}

#[test]
fn wrong_types_name_key_and_line() {
    let e = err("[limits]\nmax_batch = \"many\"\n");
    assert_eq!(e.key.as_deref(), Some("limits.max_batch"), "{e}");
    assert_eq!(e.line.map(|l| l.0), Some(2));
    let e = err("[backend]\nkind = \"tpu\"\n");
    assert_eq!(e.key.as_deref(), Some("backend.kind"), "{e}");
    assert!(e.message.contains("tpu"), "{e}");
    let e = err("[limits]\nmax_queue = -1\n");
    assert_eq!(e.key.as_deref(), Some("limits.max_queue"), "{e}");
    let e = err("\n\n[actors.gather]\nthreads = \"lots\"\n");
    assert_eq!(e.key.as_deref(), Some("actors.gather.threads"), "{e}");
    assert_eq!(e.line.map(|l| l.0), Some(4));
    let e = err("[actors.gather]\ncores = \"0-3,2\"\n");
    assert_eq!(e.key.as_deref(), Some("actors.gather.cores"), "{e}");
    assert!(e.message.contains("twice"), "{e}");
    let e = err("[pipeline]\nvalue_fetch = \"teleport\"\n");
    assert_eq!(e.key.as_deref(), Some("pipeline.value_fetch"), "{e}");
    let e = err("[trace]\nenabled = \"yes\"\n");
    assert_eq!(e.key.as_deref(), Some("trace.enabled"), "{e}");
}

#[test]
fn impossible_values_name_key_and_line() {
    let cases: &[(&str, &str, usize)] = &[
        ("[limits]\nmax_batch = 0\n", "limits.max_batch", 2),
        ("[limits]\nmax_context = 1\n", "limits.max_context", 2),
        ("[limits]\nprefill_chunk = 0\n", "limits.prefill_chunk", 2),
        ("[limits]\nprefill_lane = \"separate\"\n", "limits.prefill_lane", 2),
        ("[attention]\nchunk_size = 8\nbudget = 100\n", "attention.budget", 3),
        ("[attention]\nrank = 0\n", "attention.rank", 2),
        ("[attention]\nchunk_size = 0\n", "attention.chunk_size", 2),
        ("[attention]\nlocal_chunks = 0\n", "attention.local_chunks", 2),
        (
            "[limits]\nmax_batch = 2\n[pipeline]\nmicro_batches = 3\n",
            "pipeline.micro_batches",
            4,
        ),
        ("[pipeline]\nvalue_fetch = \"zero-copy\"\n", "pipeline.value_fetch", 2),
        (
            "[actors.gather]\nthreads = 4\ncores = [0, 1]\n",
            "actors.gather.threads",
            2,
        ),
        ("[actors.select]\nthreads = 0\n", "actors.select.threads", 2),
        ("[pools]\nbacking = \"file\"\n", "pools.backing", 2),
        ("[pools]\npath = \"/tmp/p\"\n", "pools.path", 2),
        ("[server]\nlisten = \"localhost\"\n", "server.listen", 2),
        (
            "[server]\nlisten = \"127.0.0.1:9000\"\nmetrics_listen = \"127.0.0.1:9000\"\n",
            "server.metrics_listen",
            3,
        ),
        (
            "[server]\nshutdown_grace_secs = -1.0\n",
            "server.shutdown_grace_secs",
            2,
        ),
        ("[model]\nname = \"  \"\n", "model.name", 2),
    ];
    for (src, key, line) in cases {
        let e = err(src);
        assert_eq!(e.key.as_deref(), Some(*key), "{src:?}: {e}");
        assert_eq!(e.line.map(|l| l.0), Some(*line), "{src:?}: {e}");
        let shown = e.to_string();
        assert!(
            shown.contains(&format!("line {line}")) && shown.contains(key),
            "{shown}"
        );
    }
}

#[test]
fn syntax_errors_give_the_line() {
    let e = err("[limits]\nmax_batch = 4\nmax_queue = = 2\n");
    assert_eq!(e.line.map(|l| l.0), Some(3), "{e}");
    assert!(e.message.contains("TOML"), "{e}");
}

#[test]
fn error_at_locates_keys_for_later_checks() {
    let t = Topology::parse("# c\n[limits]\nmax_context = 100000\n", "f.toml").unwrap();
    let e = t.error_at("limits.max_context", "exceeds the model's context");
    assert_eq!(e.line, Some((3, 1)));
    assert_eq!(
        e.to_string(),
        "f.toml, line 3, column 1, key `limits.max_context`: exceeds the model's context"
    );
    let e = t.error_at("attention.mode", "x");
    assert_eq!(e.line, None);
}

#[test]
fn core_ranges() {
    assert_eq!(values::parse_core_ranges("0-2, 5").unwrap(), vec![0, 1, 2, 5]);
    assert!(values::parse_core_ranges("3-1").is_err());
    assert!(values::parse_core_ranges("a").is_err());
}
