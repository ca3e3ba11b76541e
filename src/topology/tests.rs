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
    assert_eq!(h200.pipeline.micro_batches, 1);
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
    // In words, not Rust's type names.
    assert!(e.message.contains("expected a whole number >= 0"), "{e}");
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
        ("[limits]\nprefill_sm_share = \"half\"\n", "limits.prefill_sm_share", 2),
        (
            "[backend]\nkind = \"cuda\"\n[limits]\nprefill_lane = \"mixed\"\nprefill_sm_share = \"half\"\n",
            "limits.prefill_sm_share",
            5,
        ),
        ("[limits]\nprefill_sms = 100\n", "limits.prefill_sms", 2),
        (
            "[backend]\nkind = \"cuda\"\n[limits]\nprefill_lane = \"mixed\"\nprefill_sms = 100\n",
            "limits.prefill_sms",
            5,
        ),
        (
            "[backend]\nkind = \"cuda\"\ndevices = [0, 1]\n[limits]\nprefill_sms = 64\n",
            "limits.prefill_sms",
            5,
        ),
        ("[limits]\ndecode_spacing_ms = 20\n", "limits.decode_spacing_ms", 2),
        (
            "[backend]\nkind = \"cuda\"\n[limits]\ndecode_spacing_ms = 20000\n",
            "limits.decode_spacing_ms",
            4,
        ),
        ("[attention]\nchunk_size = 8\nbudget = 100\n", "attention.budget", 3),
        ("[attention]\nrank = 0\n", "attention.rank", 2),
        ("[attention]\nchunk_size = 0\n", "attention.chunk_size", 2),
        ("[attention]\nlocal_chunks = 0\n", "attention.local_chunks", 2),
        (
            "[limits]\nmax_batch = 2\n[pipeline]\nmicro_batches = 3\n",
            "pipeline.micro_batches",
            4,
        ),
        ("[pipeline]\ndecode_lanes = 2\n", "pipeline.decode_lanes", 2),
        (
            "[backend]\nkind = \"cuda\"\n[pipeline]\ndecode_lanes = 5\n",
            "pipeline.decode_lanes",
            4,
        ),
        (
            "[backend]\nkind = \"cuda\"\n[limits]\nmax_batch = 2\n[pipeline]\ndecode_lanes = 3\n",
            "pipeline.decode_lanes",
            6,
        ),
        (
            "[backend]\nkind = \"cuda\"\n[limits]\nprefill_lane = \"mixed\"\n[pipeline]\ndecode_lanes = 2\n",
            "pipeline.decode_lanes",
            6,
        ),
        (
            "[backend]\nkind = \"cuda\"\ndevices = [0, 1]\n[pipeline]\ndecode_lanes = 2\n",
            "pipeline.decode_lanes",
            5,
        ),
        ("[pipeline]\nvalue_fetch = \"zero-copy\"\n", "pipeline.value_fetch", 2),
        ("[pipeline]\ngpu_tier = \"auto\"\n", "pipeline.gpu_tier", 2),
        ("[pipeline]\ngpu_value_slots = 2\n", "pipeline.gpu_value_slots", 2),
        (
            "[backend]\nkind = \"cuda\"\n[pipeline]\ngpu_value_slots = 2\n",
            "pipeline.gpu_value_slots",
            4,
        ),
        (
            "[backend]\nkind = \"cuda\"\n[limits]\nmax_batch = 2\n[pipeline]\nvalue_fetch = \"zero-copy\"\ngpu_value_slots = 3\n",
            "pipeline.gpu_value_slots",
            7,
        ),
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
fn gpu_value_slots_need_cuda_zero_copy_and_room_in_the_batch() {
    let ok = "[backend]\nkind = \"cuda\"\n[limits]\nmax_batch = 4\n[pipeline]\nvalue_fetch = \"zero-copy\"\n";
    let t = Topology::parse(ok, "t.toml").unwrap();
    assert_eq!(t.pipeline.gpu_value_slots, 0);
    for n in [1, 4] {
        let t = Topology::parse(&format!("{ok}gpu_value_slots = {n}\n"), "t.toml").unwrap();
        assert_eq!(t.pipeline.gpu_value_slots, n);
    }
    let e = err(&format!("{ok}gpu_value_slots = 5\n"));
    assert!(e.message.contains("at most limits.max_batch (4)"), "{e}");
    // cpu-gather (the default fetch) is refused, naming both keys.
    let e = err("[backend]\nkind = \"cuda\"\n[pipeline]\ngpu_value_slots = 1\n");
    assert_eq!(e.key.as_deref(), Some("pipeline.gpu_value_slots"), "{e}");
    assert!(e.message.contains("pipeline.value_fetch = \"zero-copy\""), "{e}");
    let e = err("[pipeline]\ngpu_value_slots = 1\n");
    assert!(e.message.contains("backend.kind = \"cuda\""), "{e}");
    let e = err("[pipeline]\ngpu_value_slots = -1\n");
    assert_eq!(e.key.as_deref(), Some("pipeline.gpu_value_slots"), "{e}");
}

#[test]
fn file_pools_on_the_gpu_are_read_by_cpu_gather() {
    let pools = "[pools]\nbacking = \"file\"\npath = \"/tmp/p\"\n";
    let shadow = "[attention]\nmode = \"shadowkv\"\n";
    let cuda = "[backend]\nkind = \"cuda\"\n";
    let zero_copy = "[pipeline]\nvalue_fetch = \"zero-copy\"\n";
    let e = err(&format!("{cuda}{shadow}{pools}{zero_copy}"));
    assert_eq!(e.key.as_deref(), Some("pipeline.value_fetch"), "{e}");
    assert!(e.message.contains("value_fetch = \"cpu-gather\""), "{e}");
    let gather = "[pipeline]\nvalue_fetch = \"cpu-gather\"\n";
    for ok in [
        format!("{shadow}{pools}"),
        format!("{cuda}{pools}"),
        format!("{cuda}{shadow}{pools}{gather}"),
    ] {
        let t = Topology::parse(&ok, "t.toml").unwrap();
        assert_eq!(t.pools.backing, PoolBacking::File);
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

mod api_keys {
    use super::*;
    use secrecy::ExposeSecret;
    use std::ffi::OsString;

    fn shown(keys: &[SecretString]) -> Vec<&str> {
        keys.iter().map(|k| k.expose_secret()).collect()
    }

    fn no_env(_: &str) -> Option<OsString> {
        None
    }

    /// `err` checked for the key, the line, and that it quotes none of `secrets`.
    fn check(e: &TopologyError, key: &str, line: usize, secrets: &[&str]) {
        assert_eq!(e.key.as_deref(), Some(key), "{e}");
        assert_eq!(e.line.map(|l| l.0), Some(line), "{e}");
        let text = format!("{e} {e:?}");
        for s in secrets {
            assert!(!text.contains(s), "the error quotes a key: {text}");
        }
    }

    #[test]
    fn none_set_means_an_open_api() {
        let t = Topology::parse("[server]\nlisten = \"0.0.0.0:8000\"\n", "t.toml").unwrap();
        assert!(t.api_keys_with(no_env).unwrap().is_empty());
    }

    #[test]
    fn listed_keys_parse_and_never_show() {
        let t = Topology::parse("[server]\napi_keys = [\"sk-a1\", \"sk-b2\"]\n", "t.toml").unwrap();
        assert_eq!(shown(&t.api_keys_with(no_env).unwrap()), ["sk-a1", "sk-b2"]);
        let debug = format!("{t:?}");
        assert!(!debug.contains("sk-a1") && !debug.contains("sk-b2"), "{debug}");
        let t = Topology::parse("[server]\napi_keys = \"sk-only\"\n", "t.toml").unwrap();
        assert_eq!(shown(&t.api_keys_with(no_env).unwrap()), ["sk-only"]);
    }

    #[test]
    fn bad_listed_keys_name_key_and_line_not_the_key() {
        let cases: &[(&str, &str, usize, &[&str])] = &[
            (
                "[server]\napi_keys = [\"sk-fine\", \"\"]\n",
                "server.api_keys",
                2,
                &["sk-fine"],
            ),
            (
                "[server]\n\napi_keys = [\"sk-has space\"]\n",
                "server.api_keys",
                3,
                &["sk-has"],
            ),
            (
                "[server]\napi_keys = [\"sk-caf\u{e9}\"]\n",
                "server.api_keys",
                2,
                &["sk-caf"],
            ),
            (
                "[server]\napi_keys = [\"sk-fine\", 5]\n",
                "server.api_keys",
                2,
                &["sk-fine"],
            ),
            (
                "[server]\napi_keys = {k = \"sk-in-table\"}\n",
                "server.api_keys",
                2,
                &["sk-in"],
            ),
            ("[server]\napi_keys_env = \"\"\n", "server.api_keys_env", 2, &[]),
            ("[server]\napi_keys_file = \"\"\n", "server.api_keys_file", 2, &[]),
            ("[server]\napi_key = \"sk-typo\"\n", "server.api_key", 2, &["sk-typo"]),
        ];
        for (src, key, line, secrets) in cases {
            check(&err(src), key, *line, secrets);
        }
        let e = err("[server]\napi_keys = [\"sk-fine\", \"\"]\n");
        assert!(e.message.contains("key 2 of the list is empty"), "{e}");
    }

    #[test]
    fn keys_file_skips_blanks_and_comments() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        std::fs::write(&path, "# team A\nsk-file-1\r\n\n   \n  sk-file-2  \n#sk-commented\n").unwrap();
        let src = format!(
            "[server]\napi_keys = [\"sk-list\"]\napi_keys_file = {:?}\napi_keys_env = \"SKV_KEYS\"\n",
            path.to_str().unwrap()
        );
        let t = Topology::parse(&src, "t.toml").unwrap();
        let env = |name: &str| (name == "SKV_KEYS").then(|| OsString::from(" sk-env-1,sk-env-2\tsk-env-3,\n"));
        assert_eq!(
            shown(&t.api_keys_with(env).unwrap()),
            ["sk-list", "sk-file-1", "sk-file-2", "sk-env-1", "sk-env-2", "sk-env-3"]
        );
    }

    #[test]
    fn keys_file_errors_name_the_file_and_its_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        let src = format!("# c\n[server]\napi_keys_file = {:?}\n", path.to_str().unwrap());
        let t = Topology::parse(&src, "t.toml").unwrap();
        let e = t.api_keys_with(no_env).unwrap_err();
        check(&e, "server.api_keys_file", 3, &[]);
        assert!(e.message.contains("cannot read") && e.message.contains("keys"), "{e}");
        std::fs::write(&path, "# nothing here\n\n").unwrap();
        let e = t.api_keys_with(no_env).unwrap_err();
        check(&e, "server.api_keys_file", 3, &[]);
        assert!(e.message.contains("holds no key"), "{e}");
        std::fs::write(&path, "sk-good\n\nsk-bad key\n").unwrap();
        let e = t.api_keys_with(no_env).unwrap_err();
        check(&e, "server.api_keys_file", 3, &["sk-good", "sk-bad"]);
        assert!(e.message.contains("line 3: the key has a space"), "{e}");
    }

    #[test]
    fn env_errors_name_the_variable() {
        let t = Topology::parse("[server]\n\napi_keys_env = \"SKV_KEYS\"\n", "t.toml").unwrap();
        let e = t.api_keys_with(no_env).unwrap_err();
        check(&e, "server.api_keys_env", 3, &[]);
        assert!(e.message.contains("`SKV_KEYS` is not set"), "{e}");
        for empty in ["", " , \n"] {
            let e = t.api_keys_with(|_| Some(OsString::from(empty))).unwrap_err();
            check(&e, "server.api_keys_env", 3, &[]);
            assert!(e.message.contains("holds no key"), "{e}");
        }
        let e = t
            .api_keys_with(|_| Some(OsString::from("sk-good,sk-bad\u{7}bell")))
            .unwrap_err();
        check(&e, "server.api_keys_env", 3, &["sk-good", "sk-bad", "bell"]);
        assert!(e.message.contains("key 2 of `SKV_KEYS`"), "{e}");
        #[cfg(unix)]
        {
            use std::os::unix::ffi::OsStringExt;
            let e = t
                .api_keys_with(|_| Some(OsString::from_vec(vec![b's', 0xff])))
                .unwrap_err();
            assert!(e.message.contains("not valid UTF-8"), "{e}");
        }
    }
}

#[test]
fn backend_devices_one_or_several_never_both() {
    let t = |src: &str| Topology::parse(src, "t.toml").unwrap().backend.device_list();
    assert_eq!(t(""), vec![0]);
    assert_eq!(t("[backend]\ndevice = 2\n"), vec![2]);
    assert_eq!(t("[backend]\nkind = \"cuda\"\ndevices = [0, 1]\n"), vec![0, 1]);
    assert_eq!(t("[backend]\ndevices = [3]\n"), vec![3]);
    let e = err("[backend]\ndevice = 0\ndevices = [0, 1]\n");
    assert_eq!(e.key.as_deref(), Some("backend.devices"), "{e}");
    assert_eq!(e.line, Some((3, 1)), "{e}");
    assert!(e.message.contains("backend.device or backend.devices, not both"), "{e}");
    let e = err("[backend]\ndevices = []\n");
    assert_eq!(e.key.as_deref(), Some("backend.devices"), "{e}");
    assert!(e.message.contains("at least one"), "{e}");
    let e = err("[backend]\ndevices = [1, 0, 1]\n");
    assert_eq!(e.message, "device 1 is listed twice (entries 1 and 3)", "{e}");
    let e = err("[backend]\ndevices = \"0,1\"\n");
    assert_eq!(e.key.as_deref(), Some("backend.devices"), "{e}");
    let e = err("[backend]\ndevices = [-1]\n");
    assert_eq!(e.key.as_deref(), Some("backend.devices"), "{e}");
}

#[test]
fn serde_type_names_read_as_words() {
    assert_eq!(
        plain_serde_message("invalid type: string \"x\", expected usize"),
        "invalid type: string \"x\", expected a whole number >= 0"
    );
    assert_eq!(
        plain_serde_message("expected i64 or expected f32, expected u8s"),
        "expected a whole number or expected a number, expected u8s"
    );
    assert_eq!(
        plain_serde_message("invalid value: integer `70000`, expected u16"),
        "invalid value: integer `70000`, expected a whole number from 0 to 65535"
    );
    assert_eq!(plain_serde_message("expected a string"), "expected a string");
}
