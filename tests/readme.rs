//! The README's promises, checked against the real binary: its client examples run as
//! written against `shadowkv serve` on `pipeline-configs/cpu.toml`, and the keys it
//! lists for `generate --json`, `bench --json` and `/health` are exactly the keys those
//! print.

mod common;
mod serve_util;

use serde_json::Value;
use serve_util::Server;
use std::collections::BTreeSet;
use std::process::Command;

fn readme() -> String {
    std::fs::read_to_string(common::repo_file("README.md")).unwrap()
}

/// The `backticked` words of the README sentence that starts with `marker`, up to the
/// sentence's end (a period followed by a space or a line end).
fn keys_after(marker: &str) -> BTreeSet<String> {
    let text = readme().replace('\n', " ");
    let start = text
        .find(marker)
        .unwrap_or_else(|| panic!("README.md no longer says {marker:?}"));
    let rest = &text[start + marker.len()..];
    let end = rest.find(". ").unwrap_or(rest.len());
    let keys: BTreeSet<String> = rest[..end].split('`').skip(1).step_by(2).map(str::to_string).collect();
    assert!(!keys.is_empty(), "no `keys` after {marker:?} in README.md");
    keys
}

fn object_keys(v: &Value) -> BTreeSet<String> {
    v.as_object()
        .unwrap_or_else(|| panic!("not a JSON object: {v}"))
        .keys()
        .cloned()
        .collect()
}

/// Runs `shadowkv args...`, asserting success; returns stdout.
fn shadowkv(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_shadowkv"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn generate_json_has_the_documented_keys() {
    let want = keys_after("`--json` prints one object with these keys:");
    for attention in ["full", "shadowkv"] {
        let out = shadowkv(&[
            "generate",
            "--model",
            "synthetic:tiny",
            "--prompt",
            // Long enough for chunks beyond the local window, so ShadowKV selects some.
            &"one two three four five six seven eight nine ten ".repeat(6),
            "--max-tokens",
            "4",
            "--attention",
            attention,
            "--json",
        ]);
        let v: Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(object_keys(&v), want, "{attention}: {v}");
        assert_eq!(v["backend"], "cpu");
        assert_eq!(v["attention"], attention);
        assert_eq!(v["model"], "synthetic:tiny");
        // Documented as null with full attention, numbers with ShadowKV.
        let full = attention == "full";
        assert_eq!(v["reuse_hit_rate"].is_null(), full, "{v}");
        assert_eq!(v["value_bytes_fetched"].is_null(), full, "{v}");
    }
}

#[test]
fn bench_json_has_the_documented_keys() {
    let top = keys_after("`--json` prints (or writes to FILE) one object with these keys:");
    let row = keys_after("Each of its results has these keys:");
    let out = shadowkv(&[
        "bench",
        "--model",
        "synthetic:tiny",
        "--context",
        // Chunks beyond the local window and the outliers, so ShadowKV selects some.
        "256",
        "--gen",
        "3",
        "--attention",
        "full,shadowkv",
        "--json",
    ]);
    // The JSON object is all of stdout (the table goes to stderr).
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(object_keys(&v), top, "{v}");
    assert_eq!(v["backend"], "cpu");
    let results = v["results"].as_array().unwrap();
    assert_eq!(results.len(), 2, "{v}");
    for r in results {
        assert_eq!(object_keys(r), row, "{r}");
        let full = r["method"] == "full";
        for k in ["reuse_hit_rate", "value_bytes_fetched_per_step", "compress_secs"] {
            assert_eq!(r[k].is_null(), full, "{k}: {r}");
        }
    }
}

#[test]
fn health_has_the_documented_keys() {
    let text = readme();
    let line = text
        .lines()
        .find(|l| l.starts_with("| `GET /health` |"))
        .expect("README.md documents GET /health");
    let body = &line[line.find('{').unwrap()..=line.find('}').unwrap()];
    let want: BTreeSet<String> = body
        .split('"')
        .skip(1)
        .step_by(2)
        .filter(|w| w.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
        .filter(|w| *w != "ok")
        .map(str::to_string)
        .collect();
    let s = Server::start("[model]\nname = \"tiny\"\n", &["--model", "synthetic:tiny"]);
    let h = s.get("/health");
    assert_eq!(h.status, 200, "{}", h.body);
    let v = h.json();
    assert_eq!(object_keys(&v), want, "{v}");
    assert_eq!(v["status"], "ok");
    assert_eq!(v["model"], "tiny");
    assert!(line.contains("\"shutting_down\""), "{line}");
}

/// The synopsis says `(--prompt TEXT | --prompt-file FILE)`: leaving both out names both.
#[test]
fn generate_without_a_prompt_names_both_options() {
    assert!(readme().contains("(--prompt TEXT | --prompt-file FILE)"));
    let out = Command::new(env!("CARGO_BIN_EXE_shadowkv"))
        .args(["generate", "--model", "synthetic:tiny"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--prompt <PROMPT>") && err.contains("--prompt-file <PROMPT_FILE>"),
        "{err}"
    );
}

/// The README's `curl` and `openai` examples, run as written (the project's Python from
/// `tools/python-env`) against the server of its first command, on the address it took.
#[test]
fn readme_client_examples_run_as_written() {
    let text = readme();
    let block = text
        .split("```sh\n")
        .skip(1)
        .filter_map(|b| b.split("\n```").next())
        .find(|b| b.contains("curl ") && b.contains("from openai import OpenAI"))
        .expect("README.md has the sh block with the curl and openai examples");
    assert!(text.contains("cargo run --release -- serve --topology pipeline-configs/cpu.toml"));
    let topology = std::fs::read_to_string(common::repo_file("pipeline-configs/cpu.toml")).unwrap();
    let model = common::test_model();
    let s = Server::start(&topology, &["--model", model.to_str().unwrap()]);
    assert!(block.contains("127.0.0.1:8000"), "{block}");
    let script = block.replace("127.0.0.1:8000", &s.addr.to_string());
    let out = Command::new("bash")
        .args(["-euo", "pipefail", "-c", &script])
        .current_dir(common::repo_file("."))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the README's examples failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // curl's answer is one JSON object; the streamed haiku follows on its own line.
    let (answer, haiku) = stdout.split_once('\n').unwrap_or((&stdout, ""));
    let v: Value = serde_json::from_str(answer).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    assert_eq!(v["model"], "smollm2-135m-instruct");
    let content = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(content.contains("Paris"), "{content}");
    assert!(haiku.trim().len() > 10, "no streamed text: {stdout}");
}
