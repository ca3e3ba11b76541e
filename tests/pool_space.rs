//! Value pools that cannot be backed (issue 15): a file-backed pool on a disk without
//! room is refused when `shadowkv serve` starts, naming `pools.path` and both sizes,
//! instead of killing the daemon with SIGBUS at its first long prompt; a pool that
//! cannot be leased while serving fails only the request that hit it.

mod common;
mod serve_util;

use serde_json::json;
use serve_util::{serve_fails, Server};
use shadowkv::engine::backend::CpuBackend;
use shadowkv::engine::sampling::SamplingParams;
use shadowkv::engine::scheduler::{spawn_engine, EngineError, EngineRequest, Event, SchedulerConfig};
use shadowkv::model::load::open_model;
use shadowkv::model::weights::ModelWeights;
use shadowkv::pool::space::{free_space, human_size};
use shadowkv::pool::ValuePool;
use shadowkv::shadow::ShadowParams;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

/// The ShadowKV settings of the issue's report.
const SHADOW: ShadowParams = ShadowParams {
    budget: 256,
    rank: 96,
    chunk_size: 8,
    outlier_chunks: 8,
    local_chunks: 4,
};

/// A ShadowKV topology on the test model with a file-backed pool in `dir`.
fn topology(dir: &Path, p: ShadowParams, max_batch: usize, max_context: usize) -> String {
    format!(
        r#"[model]
path = "{}"

[attention]
mode = "shadowkv"
budget = {}
rank = {}
outlier_chunks = {}
local_chunks = {}

[limits]
max_batch = {max_batch}
max_context = {max_context}

[pools]
backing = "file"
path = "{}"
"#,
        common::test_model().display(),
        p.budget,
        p.rank,
        p.outlier_chunks,
        p.local_chunks,
        dir.display()
    )
}

/// Bytes of the pool `serve` makes for these limits on the test model.
fn pool_bytes(p: ShadowParams, max_batch: usize, max_context: usize) -> u64 {
    let m = open_model(common::test_model().to_str().unwrap()).unwrap();
    p.pool_shape(&m.config, max_batch, max_context).bytes().unwrap() as u64
}

/// The size printed after `label` (`2.0 MiB`), in bytes.
fn size_after(text: &str, label: &str) -> Option<u64> {
    let rest = &text[text.find(label)? + label.len()..];
    let mut words = rest.split_whitespace();
    let n: f64 = words.next()?.parse().ok()?;
    let unit = match words.next()? {
        "GiB" => 1u64 << 30,
        "MiB" => 1 << 20,
        "KiB" => 1 << 10,
        "bytes" => 1,
        _ => return None,
    };
    Some((n * unit as f64) as u64)
}

/// Checks a refused start-up names `pools.path` on its line, the pool's size and the
/// filesystem's free space (within `slack` bytes of `free`), and leaves no pool file.
fn assert_refused_for_room(topo: &str, dir: &Path, needed: u64, free: u64, slack: u64) {
    let (status, err) = serve_fails(topo, &[]);
    assert!(!status.success(), "a pool of {needed} bytes was accepted:\n{err}");
    let dir_text = dir.to_string_lossy();
    let line = topo
        .lines()
        .position(|l| l.starts_with("path") && l.contains(&*dir_text));
    let line = format!("line {}", 1 + line.unwrap());
    let want = format!("needs {} for ", human_size(needed));
    for w in [&line, "key `pools.path`", &want, "the filesystem has"] {
        assert!(err.contains(w), "stderr lacks {w:?}:\n{err}");
    }
    let said = size_after(&err, "the filesystem has ").unwrap_or_else(|| panic!("no free size in:\n{err}"));
    assert!(
        said.abs_diff(free) <= slack,
        "said {said} bytes free, statvfs says {free}:\n{err}"
    );
    assert!(
        !dir.join("shadowkv-values.pool").exists(),
        "the refused pool file was left behind"
    );
}

#[test]
fn a_pool_bigger_than_its_disk_is_refused_at_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let free = free_space(dir.path()).unwrap();
    // Twice the free space (other processes write to this disk meanwhile).
    let per_seq = pool_bytes(SHADOW, 1, 4096);
    let max_batch = (2 * free / per_seq + 1) as usize;
    let needed = pool_bytes(SHADOW, max_batch, 4096);
    let topo = topology(dir.path(), SHADOW, max_batch, 4096);
    assert_refused_for_room(&topo, dir.path(), needed, free, free / 20 + (1 << 30));
}

/// A tmpfs mounted for a test, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    /// Mounts a tmpfs of `size` (`2m`) on `dir`, or says why it cannot.
    fn mount(dir: &Path, size: &str) -> Result<Tmpfs, String> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err("not running as root".into());
        }
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .map_err(|e| format!("running mount: {e}"))?;
        if !out.status.success() {
            return Err(format!("mount failed: {}", String::from_utf8_lossy(&out.stderr).trim()));
        }
        Ok(Tmpfs(dir.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// The issue's report: a 2 MiB tmpfs. Too small for its pool (refused with both sizes),
/// large enough for a smaller one, which then serves a completion from the tmpfs.
#[test]
fn a_small_tmpfs_refuses_a_large_pool_and_serves_from_a_small_one() {
    let dir = tempfile::tempdir().unwrap();
    let tmpfs = match Tmpfs::mount(dir.path(), "2m") {
        Ok(t) => t,
        Err(why) => {
            common::skip(&format!(
                "cannot mount a tmpfs ({why}); the free-space test covers the refusal"
            ));
            return;
        }
    };
    let free = free_space(dir.path()).unwrap();
    assert_eq!(free, 2 << 20, "a fresh 2 MiB tmpfs");
    let needed = pool_bytes(SHADOW, 4, 4096);
    assert_refused_for_room(&topology(dir.path(), SHADOW, 4, 4096), dir.path(), needed, free, 0);

    // One sequence of 64 tokens: 1.4 MiB, reserved whole on the tmpfs.
    let small = ShadowParams {
        budget: 32,
        outlier_chunks: 1,
        local_chunks: 1,
        ..SHADOW
    };
    let needed = pool_bytes(small, 1, 64);
    assert!(needed < free);
    let s = Server::start(&topology(dir.path(), small, 1, 64), &[]);
    let file = dir.path().join("shadowkv-values.pool");
    let meta = std::fs::metadata(&file).unwrap();
    assert_eq!(meta.len(), needed);
    assert!(meta.blocks() * 512 >= needed, "{} blocks: not reserved", meta.blocks());
    let r = s.post_json(
        "/v1/completions",
        &json!({"prompt": "The lighthouse keeper wrote", "max_tokens": 8, "temperature": 0}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["usage"]["completion_tokens"], 8, "{}", r.body);
    drop(s);
    drop(tmpfs);
}

/// A pool with fewer slots than the batch: the request whose prefill cannot lease one
/// fails with the pool's error, the one holding the slot completes, and the engine goes
/// on serving.
#[test]
fn a_pool_that_cannot_be_leased_fails_only_that_request() {
    let m = open_model("synthetic:tiny@5").unwrap();
    let w = ModelWeights::load(&m.config, m.source.as_ref(), false).unwrap();
    let model = shadowkv::cpu::CpuModel::new(m.config.clone(), w);
    let p = ShadowParams {
        budget: 16,
        rank: 16,
        chunk_size: 8,
        outlier_chunks: 1,
        local_chunks: 1,
    };
    let pool = ValuePool::anonymous(p.pool_shape(&m.config, 1, 256)).unwrap();
    let config = SchedulerConfig {
        max_batch: 2,
        max_queue: 4,
        max_context: 256,
        prefill_chunk: 256,
        decode_spacing: std::time::Duration::ZERO,
    };
    let tok = Arc::new(m.tokenizer);
    let (engine, join) = spawn_engine(
        CpuBackend::new(model, Some((p, pool))).unwrap(),
        tok.clone(),
        config,
        None,
    )
    .unwrap();
    let req = |words: usize| EngineRequest {
        prompt: tok.encode(&"word ".repeat(words), true).unwrap(),
        max_tokens: 12,
        sampling: SamplingParams::default(),
        stop: vec![],
    };
    // Both prompts are prefilled in one step; the second finds the only slot leased.
    let outcome = |mut rx: tokio::sync::mpsc::UnboundedReceiver<Event>| loop {
        match rx.blocking_recv().expect("the engine ended the stream") {
            Event::Text(_) => {}
            Event::Done { usage, .. } => return Ok(usage.completion_tokens),
            Event::Failed(e) => return Err(e),
        }
    };
    let a = engine.submit(req(20)).unwrap();
    let b = engine.submit(req(30)).unwrap();
    let (a, b) = (outcome(a), outcome(b));
    let (done, failed) = match (a, b) {
        (Ok(n), Err(e)) | (Err(e), Ok(n)) => (n, e),
        other => panic!("want one completed and one failed request, got {other:?}"),
    };
    assert_eq!(done, 12);
    match failed {
        EngineError::Internal(m) => assert!(m.contains("value pool is full"), "{m}"),
        e => panic!("{e}"),
    }
    // The slot came back: the engine serves the next request.
    assert_eq!(outcome(engine.submit(req(25)).unwrap()), Ok(12));
    assert!(engine.is_serving());
    engine.shutdown(Duration::ZERO);
    join.join().unwrap();
}

#[test]
fn an_anonymous_pool_binds_to_a_numa_node_before_it_is_shared() {
    use shadowkv::pipeline::machine::Source;
    use shadowkv::pipeline::Machine;
    use shadowkv::pool::{PoolShape, ValueFormat};
    let shape = PoolShape {
        layers: 2,
        seqs: 2,
        kv_heads: 2,
        chunks: 64,
        chunk: 8,
        head_dim: 16,
        format: ValueFormat::Int8,
    };
    let node = Machine::read(Source::Host, None).unwrap().nodes[0].index;
    let mut pool = ValuePool::anonymous(shape).unwrap();
    let base = unsafe { pool.base_ptr() } as usize;
    let policy = numa_policy(base).expect("the pool's map is in /proc/self/numa_maps");
    assert_eq!(policy, "default", "a fresh map has the default policy");
    if let Err(e) = pool.bind_to_node(node) {
        let why = format!("{e:#}");
        if why.contains("permitted") || why.contains("supported") {
            eprintln!("skipped: this host cannot bind memory ({why})");
            return;
        }
        panic!("{why}");
    }
    // A preference for the node ("prefer:0", or "prefer (many):0" where the kernel has
    // MPOL_PREFERRED_MANY), not a strict binding the kernel would enforce by killing
    // the process when the node is full.
    let policy = numa_policy(base).unwrap();
    assert!(
        policy.starts_with("prefer") && policy.ends_with(&format!(":{node}")),
        "{policy}"
    );
    // Bound memory serves as before.
    let mut lease = pool.lease().unwrap();
    // Integers with 127 in every row: scale 1, codes the values, back exactly.
    let data: Vec<f32> = (0..shape.chunk_values())
        .map(|i| if i % 16 == 0 { 127.0 } else { i as f32 - 64.0 })
        .collect();
    lease.write(1, 1, 63, &data);
    let mut back = vec![0f32; shape.chunk_values()];
    lease.read(1, 1, 63, &mut back);
    assert_eq!(back, data);
    // Once shared, no more binding; a node that is not there; a file-backed pool.
    let e = pool.bind_to_node(node).unwrap_err().to_string();
    assert!(e.contains("before it is shared"), "{e}");
    drop(lease);
    let mut other = ValuePool::anonymous(shape).unwrap();
    let e = other.bind_to_node(4000).unwrap_err().to_string();
    assert!(e.contains("NUMA node 4000"), "{e}");
    let dir = tempfile::tempdir().unwrap();
    let mut file = ValuePool::file_backed(shape, &dir.path().join("values.pool")).unwrap();
    let e = file.bind_to_node(node).unwrap_err().to_string();
    assert!(e.contains("file-backed"), "{e}");
}

/// The memory policy `/proc/self/numa_maps` shows for the map starting at `base`: the
/// words after the address up to the first `key=value` or map kind.
fn numa_policy(base: usize) -> Option<String> {
    let maps = std::fs::read_to_string("/proc/self/numa_maps").ok()?;
    let line = maps.lines().find(|line| {
        let start = line
            .split_whitespace()
            .next()
            .and_then(|a| usize::from_str_radix(a, 16).ok());
        start == Some(base)
    })?;
    let policy: Vec<&str> = line
        .split_whitespace()
        .skip(1)
        .take_while(|w| !w.contains('=') && !["heap", "stack", "huge"].contains(w))
        .collect();
    Some(policy.join(" "))
}
