//! `shadowkv serve` end to end: the real binary on an ephemeral loopback port, driven
//! over HTTP (and by the official `openai` Python client).

mod common;
mod serve_util;

use serde_json::{json, Value};
use serve_util::{metric_value, serve_fails, wait_until, Server, SseStream};
use std::process::Command;
use std::time::Duration;

fn model_arg() -> String {
    common::test_model().to_str().unwrap().to_string()
}

/// The main SmolLM2 server of these tests: chunked prefill (64 tokens per step) so long
/// prompts share steps with decoding ones.
const MAIN_TOPOLOGY: &str = r#"
[model]
name = "smollm2"

[limits]
max_batch = 16
max_context = 1024
max_queue = 32
prefill_chunk = 64

[server]
shutdown_grace_secs = 5
"#;

/// A completion or chat request of varied prompt length.
fn varied_request(i: usize) -> (&'static str, Value) {
    let filler = "The quick brown fox jumps over the lazy dog while the cat watches. ";
    let topic = [
        "rivers",
        "mountains",
        "the sea",
        "bread",
        "trains",
        "music",
        "stars",
        "gardens",
    ][i % 8];
    let body = format!("{}Tell me one fact about {topic}.", filler.repeat((i * 7) % 23));
    let max_tokens = 6 + (i % 5) * 3;
    if i % 2 == 0 {
        (
            "/v1/completions",
            json!({"model": "smollm2", "prompt": body, "max_tokens": max_tokens, "temperature": 0}),
        )
    } else {
        (
            "/v1/chat/completions",
            json!({"model": "smollm2", "messages": [{"role": "user", "content": body}],
                "max_tokens": max_tokens, "temperature": 0}),
        )
    }
}

fn answer_text(v: &Value) -> String {
    let c = &v["choices"][0];
    c.get("text")
        .or_else(|| c["message"].get("content"))
        .and_then(|t| t.as_str())
        .unwrap_or_else(|| panic!("no text in {v}"))
        .to_string()
}

fn concurrent_requests_equal_alone(s: &Server) {
    let reqs: Vec<(&str, Value)> = (0..16).map(varied_request).collect();
    let alone: Vec<Value> = reqs
        .iter()
        .map(|(p, b)| {
            let r = s.post_json(p, b);
            assert_eq!(r.status, 200, "{}", r.body);
            r.json()
        })
        .collect();
    let addr = s.addr;
    let handles: Vec<_> = reqs
        .iter()
        .cloned()
        .map(|(p, b)| std::thread::spawn(move || serve_util::request(addr, "POST", p, Some(&b.to_string()))))
        .collect();
    let together: Vec<Value> = handles
        .into_iter()
        .map(|h| {
            let r = h.join().unwrap();
            assert_eq!(r.status, 200, "{}", r.body);
            r.json()
        })
        .collect();
    let mut prompt_lens = Vec::new();
    for (i, (a, b)) in alone.iter().zip(&together).enumerate() {
        assert_eq!(
            answer_text(a),
            answer_text(b),
            "request {i}: batched output differs from alone"
        );
        assert_eq!(a["usage"], b["usage"], "request {i}");
        assert_eq!(a["choices"][0]["finish_reason"], b["choices"][0]["finish_reason"]);
        prompt_lens.push(a["usage"]["prompt_tokens"].as_u64().unwrap());
    }
    assert!(
        prompt_lens.iter().any(|&n| n > 128),
        "some prompt should span several prefill chunks: {prompt_lens:?}"
    );
}

fn streams_and_stop_strings(s: &Server) {
    let body = json!({"prompt": "Once upon a time", "max_tokens": 16, "temperature": 0});
    let whole = s.post_json("/v1/completions", &body).json();
    let text = answer_text(&whole);
    // Streamed: same text, usage chunk, [DONE] last.
    let mut b = body.clone();
    b["stream"] = json!(true);
    b["stream_options"] = json!({"include_usage": true});
    let mut st = SseStream::open(s.addr, "/v1/completions", &b);
    assert_eq!(st.status, 200);
    assert!(st
        .headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("content-type") && v.starts_with("text/event-stream")));
    let data = st.rest();
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{}", st.body);
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"].get(0))
        .map(|c| c["text"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(streamed, text);
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"], whole["usage"]);
    // A stop string cuts the text before it, streamed or not.
    let words: Vec<&str> = text.split_whitespace().collect();
    assert!(words.len() > 3, "too short to test stop strings: {text:?}");
    let stop = words[words.len() / 2];
    let cut = &text[..text.find(stop).unwrap()];
    let mut b = body.clone();
    b["stop"] = json!(["\u{1}never", stop]);
    let r = s.post_json("/v1/completions", &b).json();
    assert_eq!(answer_text(&r), cut, "stop {stop:?}");
    assert_eq!(r["choices"][0]["finish_reason"], "stop");
    b["stream"] = json!(true);
    let mut st = SseStream::open(s.addr, "/v1/completions", &b);
    let data = st.rest();
    let streamed: String = data
        .iter()
        .filter(|d| *d != "[DONE]")
        .map(|d| {
            serde_json::from_str::<Value>(d).unwrap()["choices"][0]["text"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(streamed, cut, "streamed text must never show the stop string");
    // Chat streams start with the role and end with a finish reason.
    let mut st = SseStream::open(
        s.addr,
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0, "stream": true}),
    );
    let data = st.rest();
    let first: Value = serde_json::from_str(&data[0]).unwrap();
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    let last: Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
    assert!(last["choices"][0]["finish_reason"].is_string(), "{last}");
    assert_eq!(data.last().unwrap(), "[DONE]");
}

fn bad_inputs_get_4xx_naming_the_field(s: &Server) {
    let msgs = json!([{"role": "user", "content": "hi"}]);
    let long = "word ".repeat(2000);
    let cases: Vec<(&str, String, u16, Option<&str>)> = vec![
        ("/v1/completions", "{not json".into(), 400, None),
        ("/v1/completions", "[1, 2]".into(), 400, None),
        ("/v1/completions", json!({}).to_string(), 400, Some("prompt")),
        (
            "/v1/completions",
            json!({"prompt": "hi", "max_tokens": "ten"}).to_string(),
            400,
            Some("max_tokens"),
        ),
        (
            "/v1/completions",
            json!({"prompt": "hi", "max_tokens": -5}).to_string(),
            400,
            Some("max_tokens"),
        ),
        (
            "/v1/completions",
            json!({"prompt": "hi", "max_tokens": 0}).to_string(),
            400,
            Some("max_tokens"),
        ),
        (
            "/v1/completions",
            json!({"prompt": "hi", "max_tokens": 10_000_000}).to_string(),
            400,
            Some("max_tokens"),
        ),
        (
            "/v1/completions",
            r#"{"prompt": "hi", "max_tokens": 1e300}"#.into(),
            400,
            Some("max_tokens"),
        ),
        (
            "/v1/completions",
            r#"{"prompt": "hi", "max_tokens": 99999999999999999999999}"#.into(),
            400,
            Some("max_tokens"),
        ),
        (
            "/v1/completions",
            json!({"prompt": "hi", "temperature": "hot"}).to_string(),
            400,
            Some("temperature"),
        ),
        (
            "/v1/completions",
            json!({"prompt": "hi", "temperature": -1}).to_string(),
            400,
            Some("temperature"),
        ),
        (
            "/v1/completions",
            r#"{"prompt": "hi", "temperature": 1e308}"#.into(),
            400,
            Some("temperature"),
        ),
        (
            "/v1/completions",
            json!({"prompt": "hi", "top_p": 0}).to_string(),
            400,
            Some("top_p"),
        ),
        (
            "/v1/completions",
            json!({"prompt": "hi", "top_k": -3}).to_string(),
            400,
            Some("top_k"),
        ),
        (
            "/v1/completions",
            json!({"prompt": "hi", "seed": "x"}).to_string(),
            400,
            Some("seed"),
        ),
        (
            "/v1/completions",
            json!({"prompt": "hi", "stop": 5}).to_string(),
            400,
            Some("stop"),
        ),
        (
            "/v1/completions",
            json!({"prompt": "hi", "stop": ["a", 3]}).to_string(),
            400,
            Some("stop[1]"),
        ),
        (
            "/v1/completions",
            json!({"prompt": "hi", "n": 2}).to_string(),
            400,
            Some("n"),
        ),
        (
            "/v1/completions",
            json!({"prompt": "hi", "stream": "yes"}).to_string(),
            400,
            Some("stream"),
        ),
        (
            "/v1/completions",
            json!({"prompt": "hi", "model": "gpt-4"}).to_string(),
            404,
            Some("model"),
        ),
        (
            "/v1/completions",
            json!({"prompt": long}).to_string(),
            400,
            Some("prompt"),
        ),
        (
            "/v1/completions",
            json!({"prompt": [1, 2, 99_999_999]}).to_string(),
            400,
            Some("prompt[2]"),
        ),
        (
            "/v1/completions",
            json!({"prompt": ["a", "b"]}).to_string(),
            400,
            Some("prompt"),
        ),
        ("/v1/completions", json!({"prompt": 7}).to_string(), 400, Some("prompt")),
        (
            "/v1/completions",
            json!({"prompt": ""}).to_string(),
            400,
            Some("prompt"),
        ),
        (
            "/v1/chat/completions",
            json!({"messages": []}).to_string(),
            400,
            Some("messages"),
        ),
        (
            "/v1/chat/completions",
            json!({"messages": "hi"}).to_string(),
            400,
            Some("messages"),
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "robot", "content": "x"}]}).to_string(),
            400,
            Some("messages[0].role"),
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user"}]}).to_string(),
            400,
            Some("messages[0].content"),
        ),
        (
            "/v1/chat/completions",
            json!({"messages": msgs, "n": 2}).to_string(),
            400,
            Some("n"),
        ),
        (
            "/v1/chat/completions",
            json!({"messages": msgs, "max_completion_tokens": 0}).to_string(),
            400,
            Some("max_completion_tokens"),
        ),
        (
            "/v1/chat/completions",
            json!({"messages": msgs, "stream_options": {"include_usage": true}}).to_string(),
            400,
            Some("stream_options"),
        ),
        (
            "/v1/chat/completions",
            json!({"messages": msgs, "stream": true, "stream_options": {"include_usage": 3}}).to_string(),
            400,
            Some("stream_options.include_usage"),
        ),
        (
            "/v1/chat/completions",
            json!({"messages": msgs, "logprobs": true}).to_string(),
            400,
            Some("logprobs"),
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": long}]}).to_string(),
            400,
            Some("messages"),
        ),
    ];
    for (path, body, status, param) in &cases {
        let r = s.post(path, body);
        assert_eq!(r.status, *status, "{path} {body:.80}: {}", r.body);
        let v = r.json();
        let e = &v["error"];
        assert!(
            e["message"].is_string() && e["type"].is_string(),
            "{path} {body:.80}: {v}"
        );
        assert_eq!(e["param"].as_str(), *param, "{path} {body:.80}: {v}");
        if let Some(p) = param {
            let field = p.split(['.', '[']).next().unwrap();
            assert!(
                e["message"].as_str().unwrap().contains(field),
                "message should name {p}: {v}"
            );
        }
    }
    // Types are named as a reader would, not as Rust does; and no doubled space.
    let r = s
        .post("/v1/completions", r#"{"prompt": "hi", "max_tokens": "ten"}"#)
        .json();
    let m = r["error"]["message"].as_str().unwrap();
    assert!(m.contains("expected a whole number") && !m.contains("i64"), "{r}");
    let r = s
        .post(
            "/v1/chat/completions",
            &json!({"messages": msgs, "logprobs": true}).to_string(),
        )
        .json();
    assert_eq!(
        r["error"]["message"], "`logprobs` is not supported by this server",
        "{r}"
    );
    // The context limit is named.
    let r = s.post("/v1/completions", &json!({"prompt": long}).to_string()).json();
    assert_eq!(r["error"]["code"], "context_length_exceeded");
    assert!(r["error"]["message"].as_str().unwrap().contains("1024"), "{r}");
    let msgs = json!({"messages": [{"role": "user", "content": long}]});
    let r = s.post("/v1/chat/completions", &msgs.to_string()).json();
    assert_eq!(r["error"]["code"], "context_length_exceeded");
    assert!(
        r["error"]["message"].as_str().unwrap().contains("the messages have"),
        "{r}"
    );
    // Unknown routes and methods answer JSON too.
    let r = s.get("/v1/nope");
    assert_eq!(r.status, 404);
    assert!(r.json()["error"]["message"].is_string());
    let r = s.get("/v1/completions");
    assert_eq!(r.status, 405);
    assert!(r.json()["error"]["message"].is_string());
    // ... and the server keeps serving.
    assert_eq!(s.get("/health").status, 200);
    let r = s.post_json(
        "/v1/completions",
        &json!({"prompt": "Hello", "max_tokens": 2, "temperature": 0}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
}

fn dropped_stream_frees_its_slot(s: &Server) {
    let body = json!({"messages": [{"role": "user", "content": "Write a long story about a dragon."}],
        "max_tokens": 500, "temperature": 0, "stream": true});
    let mut st = SseStream::open(s.addr, "/v1/chat/completions", &body);
    assert_eq!(st.status, 200);
    let mut contents = 0;
    while contents < 2 {
        let d = st.next_data().expect("stream ended early");
        let v: Value = serde_json::from_str(&d).unwrap();
        if v["choices"][0]["delta"]["content"]
            .as_str()
            .is_some_and(|c| !c.is_empty())
        {
            contents += 1;
        }
    }
    assert_eq!(s.metric("shadowkv_running_sequences"), Some(1.0));
    let cancelled = s.metric("shadowkv_requests_total{outcome=\"cancelled\"}").unwrap();
    drop(st);
    assert!(
        wait_until(Duration::from_secs(10), || s.metric("shadowkv_running_sequences")
            == Some(0.0)),
        "the slot of a dropped stream was not freed"
    );
    assert_eq!(
        s.metric("shadowkv_requests_total{outcome=\"cancelled\"}"),
        Some(cancelled + 1.0)
    );
    assert_eq!(s.metric("shadowkv_kv_cache_bytes"), Some(0.0));
    // A client waiting for a whole (non-streamed) answer that goes away frees it too.
    let body = json!({"prompt": "Once upon a time", "max_tokens": 500, "temperature": 0});
    let conn = serve_util::send(s.addr, "POST", "/v1/completions", Some(&body.to_string()));
    assert!(wait_until(Duration::from_secs(10), || s
        .metric("shadowkv_running_sequences")
        == Some(1.0)));
    drop(conn);
    assert!(
        wait_until(Duration::from_secs(10), || s.metric("shadowkv_running_sequences")
            == Some(0.0)),
        "the slot of a dropped non-streamed request was not freed"
    );
    assert_eq!(
        s.metric("shadowkv_requests_total{outcome=\"cancelled\"}"),
        Some(cancelled + 2.0)
    );
}

/// Two prompts of megabytes (each takes the tokenizer seconds, then is refused as longer
/// than the context) do not hold up `/health`: the tokenizing runs off the server's two
/// runtime threads, so the probe is answered before either refusal.
fn long_prompts_do_not_stall_health(s: &Server) {
    // 6 MB (of the 16 MiB a body may have): over half a second to tokenize on any core.
    let prompt = "lorem ipsum ".repeat(500_000);
    let body = json!({"prompt": prompt, "max_tokens": 4}).to_string();
    let big: Vec<_> = (0..2)
        .map(|_| {
            let (addr, body) = (s.addr, body.clone());
            std::thread::spawn(move || {
                let r = serve_util::request(addr, "POST", "/v1/completions", Some(&body));
                (r, std::time::Instant::now())
            })
        })
        .collect();
    // Both bodies sent and being tokenized.
    std::thread::sleep(Duration::from_millis(100));
    let h = s.get("/health");
    let probed = std::time::Instant::now();
    assert_eq!(h.status, 200, "{}", h.body);
    for t in big {
        let (r, done) = t.join().unwrap();
        assert_eq!(r.status, 400, "{}", r.body);
        assert_eq!(r.json()["error"]["code"], "context_length_exceeded", "{}", r.body);
        assert!(
            probed < done,
            "/health waited for a long prompt's tokenizing (answered after its refusal)"
        );
    }
}

/// Checks the Prometheus text format line by line; returns the metric types.
fn parse_prometheus(text: &str) -> std::collections::BTreeMap<String, String> {
    let mut types = std::collections::BTreeMap::new();
    let name_ok = |n: &str| {
        !n.is_empty()
            && n.chars()
                .enumerate()
                .all(|(i, c)| c.is_ascii_alphabetic() || c == '_' || c == ':' || (i > 0 && c.is_ascii_digit()))
    };
    for line in text.lines() {
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            match parts.next() {
                Some("TYPE") => {
                    let name = parts.next().unwrap();
                    let kind = parts.next().unwrap();
                    assert!(name_ok(name), "{line}");
                    assert!(
                        ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                        "{line}"
                    );
                    types.insert(name.to_string(), kind.to_string());
                }
                Some("HELP") => assert!(name_ok(parts.next().unwrap()), "{line}"),
                _ => {}
            }
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad sample line {line:?}"));
        assert!(
            value.parse::<f64>().is_ok() || ["+Inf", "-Inf", "NaN"].contains(&value),
            "bad value in {line:?}"
        );
        let name = match series.split_once('{') {
            Some((n, labels)) => {
                let labels = labels
                    .strip_suffix('}')
                    .unwrap_or_else(|| panic!("unclosed labels: {line}"));
                for pair in labels.split("\",").filter(|p| !p.is_empty()) {
                    let (k, v) = pair.split_once('=').unwrap_or_else(|| panic!("bad label in {line}"));
                    assert!(name_ok(k) && v.starts_with('"'), "bad label {pair:?} in {line}");
                }
                n
            }
            None => series,
        };
        assert!(name_ok(name), "bad metric name in {line:?}");
    }
    types
}

fn metrics_are_prometheus_with_histograms(s: &Server) {
    let r = s.get("/metrics");
    assert_eq!(r.status, 200);
    assert!(r.header("content-type").unwrap().starts_with("text/plain"));
    let text = r.body;
    let types = parse_prometheus(&text);
    for h in [
        "shadowkv_stage_seconds",
        "shadowkv_time_to_first_token_seconds",
        "shadowkv_inter_token_latency_seconds",
        "shadowkv_request_duration_seconds",
    ] {
        assert_eq!(types.get(h).map(String::as_str), Some("histogram"), "{h}:\n{text}");
    }
    for stage in ["prefill", "decode", "output", "step"] {
        let count = metric_value(&text, &format!("shadowkv_stage_seconds_count{{stage=\"{stage}\"}}"));
        assert!(count.unwrap_or(0.0) > 0.0, "stage {stage} never timed:\n{text}");
        assert!(text.contains(&format!(
            "shadowkv_stage_seconds_bucket{{stage=\"{stage}\",le=\"+Inf\"}}"
        )));
    }
    for h in ["time_to_first_token", "inter_token_latency", "request_duration"] {
        let c = metric_value(&text, &format!("shadowkv_{h}_seconds_count")).unwrap();
        assert!(c > 0.0, "{h} count {c}");
        assert!(metric_value(&text, &format!("shadowkv_{h}_seconds_sum")).is_some());
    }
    for g in [
        "shadowkv_queue_depth",
        "shadowkv_running_sequences",
        "shadowkv_kv_cache_bytes",
        "shadowkv_pool_bytes",
        "shadowkv_gpu_memory_bytes",
        "shadowkv_reuse_hit_ratio",
    ] {
        assert_eq!(types.get(g).map(String::as_str), Some("gauge"), "{g}");
    }
    for c in ["shadowkv_prompt_tokens_total", "shadowkv_generated_tokens_total"] {
        assert_eq!(types.get(c).map(String::as_str), Some("counter"), "{c}");
        assert!(metric_value(&text, c).unwrap() > 0.0, "{c}");
    }
    assert!(metric_value(&text, "shadowkv_value_bytes_fetched_total").is_some());
    assert!(metric_value(&text, "shadowkv_requests_total{outcome=\"completed\"}").unwrap() >= 16.0);
    assert!(metric_value(&text, "shadowkv_requests_total{outcome=\"rejected\"}").unwrap() >= 10.0);
    // One more request, alone, that ends at the end-of-sequence token: the counters
    // move by what its usage says (the end token not generated text), and by the time
    // its answer is in.
    let count = |name: &str| metric_value(&s.get("/metrics").body, name).unwrap();
    let (tokens, completed) = (
        count("shadowkv_generated_tokens_total"),
        count("shadowkv_requests_total{outcome=\"completed\"}"),
    );
    let r = s
        .post_json(
            "/v1/chat/completions",
            &json!({"messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 200, "temperature": 0}),
        )
        .json();
    assert_eq!(r["choices"][0]["finish_reason"], "stop", "{r}");
    let used = r["usage"]["completion_tokens"].as_f64().unwrap();
    assert_eq!(count("shadowkv_generated_tokens_total") - tokens, used, "{r}");
    assert_eq!(count("shadowkv_requests_total{outcome=\"completed\"}") - completed, 1.0);
}

/// The tests' Python (`common::python`), checked to have the `openai` package, for the
/// official-client tests.
fn python_with_openai() -> Command {
    let python = common::python();
    let py = Command::new(&python).args(["-c", "import openai"]).output();
    match py {
        Err(e) => panic!(
            "cannot run {python} for the openai client test ({e}): {}",
            common::PYTHON_HINT
        ),
        Ok(o) if !o.status.success() => panic!(
            "{python} lacks the `openai` package: {}\n{}",
            common::PYTHON_HINT,
            String::from_utf8_lossy(&o.stderr)
        ),
        Ok(_) => {}
    }
    Command::new(python)
}

fn openai_python_client(s: &Server) {
    let out = python_with_openai()
        .arg(common::repo_file("tests/openai_client.py"))
        .arg(format!("http://{}/v1", s.addr))
        .arg("smollm2")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openai client failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(out.stdout.trim_ascii()).unwrap();
    assert!(v["chat"].as_str().unwrap().contains("Paris"), "{v}");
}

#[test]
fn smollm2_server_end_to_end() {
    let s = Server::start(MAIN_TOPOLOGY, &["--model", &model_arg()]);
    let h = s.get("/health");
    assert_eq!(h.status, 200);
    assert_eq!(h.json()["status"], "ok");
    let m = s.get("/v1/models").json();
    assert_eq!(m["data"][0]["id"], "smollm2");
    assert_eq!(m["data"][0]["max_model_len"], 1024);
    eprintln!("[server] 16 concurrent requests against each alone");
    concurrent_requests_equal_alone(&s);
    eprintln!("[server] streaming and stop strings");
    streams_and_stop_strings(&s);
    eprintln!("[server] bad inputs");
    bad_inputs_get_4xx_naming_the_field(&s);
    eprintln!("[server] dropped stream");
    dropped_stream_frees_its_slot(&s);
    eprintln!("[server] long prompts beside /health");
    long_prompts_do_not_stall_health(&s);
    eprintln!("[server] metrics");
    metrics_are_prometheus_with_histograms(&s);
    eprintln!("[server] openai python client");
    openai_python_client(&s);
}

#[test]
fn full_queue_gets_429_and_sigterm_drains() {
    let topo = r#"
[model]
name = "smollm2"
[limits]
max_batch = 1
max_queue = 1
max_context = 1024
[server]
shutdown_grace_secs = 60
"#;
    let mut s = Server::start(topo, &["--model", &model_arg()]);
    let long = json!({"messages": [{"role": "user", "content": "Write a long story about a dragon."}],
        "max_tokens": 400, "temperature": 0, "stream": true});
    let mut a = SseStream::open(s.addr, "/v1/chat/completions", &long);
    a.next_data().unwrap();
    a.next_data().unwrap();
    let mut b = SseStream::open(
        s.addr,
        "/v1/completions",
        &json!({"prompt": "One two three", "max_tokens": 3, "stream": true, "temperature": 0}),
    );
    assert_eq!(b.status, 200);
    assert!(wait_until(Duration::from_secs(10), || s.metric("shadowkv_queue_depth")
        == Some(1.0)));
    let c = s.post_json("/v1/completions", &json!({"prompt": "x", "max_tokens": 1}));
    assert_eq!(c.status, 429, "{}", c.body);
    assert!(c.header("retry-after").unwrap().parse::<u64>().unwrap() >= 1);
    assert_eq!(c.json()["error"]["code"], "queue_full");
    assert_eq!(c.json()["error"]["type"], "rate_limit_error");
    // Freeing the running slot lets the queued request through.
    drop(a);
    let rest = b.rest();
    assert_eq!(rest.last().map(String::as_str), Some("[DONE]"), "{}", b.body);

    // SIGTERM: the queued request is refused with 503; while the running one finishes,
    // the listener stays open and /health and new requests answer 503; then the
    // process exits 0.
    let mut e = SseStream::open(
        s.addr,
        "/v1/completions",
        &json!({"prompt": "Once upon a time", "max_tokens": 200, "stream": true, "temperature": 0}),
    );
    e.next_data().unwrap();
    let addr = s.addr;
    let f = std::thread::spawn(move || {
        serve_util::request(
            addr,
            "POST",
            "/v1/completions",
            Some(r#"{"prompt": "y", "max_tokens": 2}"#),
        )
    });
    assert!(wait_until(Duration::from_secs(10), || s.metric("shadowkv_queue_depth")
        == Some(1.0)));
    s.signal("TERM");
    let f = f.join().unwrap();
    assert_eq!(f.status, 503, "{}", f.body);
    assert_eq!(f.json()["error"]["code"], "shutting_down");
    let h = s.get("/health");
    assert_eq!(h.status, 503, "{}", h.body);
    assert_eq!(h.json()["status"], "shutting_down", "{}", h.body);
    assert_eq!(
        h.json()["running"],
        1,
        "the long request should still be running: {}",
        h.body
    );
    let g = s.post_json("/v1/completions", &json!({"prompt": "z", "max_tokens": 1}));
    assert_eq!(g.status, 503, "{}", g.body);
    assert_eq!(g.json()["error"]["code"], "shutting_down");
    let data = e.rest();
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{}", e.body);
    let last: Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "length", "{}", e.body);
    let status = s.wait_exit(Duration::from_secs(60));
    assert!(status.success(), "exit status {status}; log:\n{}", s.log());
    assert!(
        std::net::TcpStream::connect(addr).is_err(),
        "still accepting after shutdown"
    );
}

#[test]
fn sigint_with_no_grace_cancels_cleanly_and_writes_the_trace() {
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("trace.json");
    let topo = format!(
        "[limits]\nmax_batch = 2\n[server]\nshutdown_grace_secs = 0\nmetrics_listen = \"127.0.0.1:0\"\n\
         [trace]\nenabled = true\npath = {:?}\n",
        trace.to_str().unwrap()
    );
    let mut s = Server::start(&topo, &["--model", "synthetic:tiny"]);
    // The separate metrics address serves /metrics only.
    let maddr = s.metrics_addr.expect("metrics address printed");
    let m = serve_util::request(maddr, "GET", "/metrics", None);
    assert_eq!(m.status, 200);
    assert!(m.body.contains("shadowkv_running_sequences"));
    assert_eq!(serve_util::request(maddr, "GET", "/v1/models", None).status, 404);
    let mut st = SseStream::open(
        s.addr,
        "/v1/completions",
        &json!({"prompt": "abc", "max_tokens": 4000, "stream": true, "temperature": 0}),
    );
    st.next_data().unwrap();
    s.signal("INT");
    let data = st.rest();
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{}", st.body);
    let last: Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
    let cancelled = last["error"]["code"] == "shutting_down";
    let finished = last["choices"][0]["finish_reason"].is_string();
    assert!(cancelled || finished, "{last}");
    let status = s.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "exit status {status}; log:\n{}", s.log());
    // The trace is a Chrome trace-event JSON array with the engine's steps.
    let t: Value = serde_json::from_str(&std::fs::read_to_string(&trace).unwrap()).unwrap();
    let names: Vec<&str> = t
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["name"].as_str())
        .collect();
    assert!(names.contains(&"prefill") && names.contains(&"output"), "{names:?}");
}

#[test]
fn bad_topologies_fail_with_key_and_line() {
    let cases: &[(&str, &[&str], &[&str])] = &[
        (
            "[limits]\nmax_batch = 4\nmax_btach = 2\n",
            &[],
            &["line 3", "max_btach"],
        ),
        (
            "[server]\nshutdown_grace_secs = \"soon\"\n",
            &[],
            &["line 2", "server.shutdown_grace_secs"],
        ),
        (
            "[attention]\nchunk_size = 8\nbudget = 1001\n",
            &[],
            &["line 3", "attention.budget"],
        ),
        (
            "[attention]\nmode = \"shadowkv\"\nrank = 4096\n",
            &["--model", "synthetic:tiny"],
            &["line 3", "attention.rank", "rank 4096"],
        ),
        (
            "[model]\npath = \"synthetic:tiny\"\n\n[limits]\nmax_context = 100000\n",
            &[],
            &["line 5", "limits.max_context", "4096"],
        ),
        ("[limits]\nmax_batch = 2\n", &[], &["no model"]),
        (
            "[model]\nname = \"x\"\npath = \"/nonexistent/model.gguf\"\n",
            &[],
            &["line 3", "model.path", "/nonexistent/model.gguf", "does not exist"],
        ),
        (
            "[model]\npath = \"auto:llama\"\n",
            &[],
            &["line 2", "model.path", "unknown model `auto:llama`"],
        ),
        (
            "[actors.compute]\nthreads = 1\ncores = [4095]\n",
            &[],
            &["line 3", "actors.compute.cores", "core 4095 does not exist"],
        ),
        (
            "\n[actors.compute]\nnuma_node = 63\n",
            &[],
            &["line 3", "actors.compute.numa_node", "NUMA node 63 does not exist"],
        ),
        ("[pools]\nnuma_node = 63\n", &[], &["line 2", "pools.numa_node"]),
        (
            "[backend]\nkind = \"cuda\"\n\n[attention]\nmode = \"shadowkv\"\n\n[limits]\nprefill_lane = \"mixed\"\n",
            &["--model", "synthetic:tiny"],
            &["line 8", "limits.prefill_lane", "separate"],
        ),
    ];
    for (topo, args, want) in cases {
        let (status, err) = serve_fails(topo, args);
        assert!(!status.success(), "{topo:?} was accepted");
        for w in *want {
            assert!(err.contains(w), "{topo:?}: stderr lacks {w:?}:\n{err}");
        }
    }
    // The GPU host's topology is valid; without a GPU it is refused by its
    // `backend.kind`, before any model is opened.
    if shadowkv::cuda::CudaDevice::new(0).is_err() {
        let h200 = std::fs::read_to_string(common::repo_file("pipeline-configs/h200.toml")).unwrap();
        let (status, err) = serve_fails(&h200, &[]);
        assert!(!status.success());
        assert!(err.contains("backend.kind"), "{err}");
    }
}

/// The CPUs a thread may run on, from its `/proc/.../status`.
fn cpus_allowed(status_path: &std::path::Path) -> String {
    let status = std::fs::read_to_string(status_path).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .map(|c| c.trim().to_string())
        .unwrap_or_default()
}

/// `actors.compute.cores` pins the CPU backend's matrix-product threads (named
/// `compute-<i>`), one core each, and the engine thread to those cores, and the
/// start-up log says where they run.
#[test]
fn compute_threads_are_pinned_to_their_cores() {
    let allowed = cpus_allowed(std::path::Path::new("/proc/self/status"));
    // The last CPU this test may use: `0-1` → 1, `0,2-5` → 5.
    let core: usize = allowed
        .rsplit([',', '-'])
        .next()
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("cannot read Cpus_allowed_list `{allowed}`"));
    let topology = format!("[model]\nname = \"smollm2\"\n\n[actors.compute]\ncores = [{core}]\n");
    let s = Server::start(&topology, &["--model", &model_arg()]);
    let log = s.log();
    assert!(log.contains(&format!("compute on core {core}")), "{log}");
    // The threads name and pin themselves as they start: they are read once the daemon
    // has answered a request.
    let r = s.post_json(
        "/v1/completions",
        &json!({"model": "smollm2", "prompt": "The capital of France is", "max_tokens": 4}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let tasks = std::path::PathBuf::from(format!("/proc/{}/task", s.child.id()));
    let compute: Vec<String> = std::fs::read_dir(&tasks)
        .unwrap()
        .filter_map(|t| {
            let t = t.ok()?.path();
            let name = std::fs::read_to_string(t.join("comm")).ok()?;
            name.starts_with("compute-").then(|| cpus_allowed(&t.join("status")))
        })
        .collect();
    assert_eq!(compute, vec![core.to_string()], "one compute thread, on core {core}");
    // The engine thread, which plans the steps, is the compute actor's too.
    let engine = std::fs::read_dir(&tasks)
        .unwrap()
        .filter_map(|t| t.ok().map(|t| t.path()))
        .find(|t| std::fs::read_to_string(t.join("comm")).is_ok_and(|n| n.trim() == "engine"))
        .expect("the daemon runs a thread named `engine`");
    assert_eq!(
        cpus_allowed(&engine.join("status")),
        core.to_string(),
        "the engine thread"
    );
}

/// ShadowKV behind the same API: with a budget covering the context, full rank and no
/// outliers it answers exactly as full attention does, and `/metrics` reports its reuse
/// hit ratio, value traffic and pool.
#[test]
fn shadowkv_server_matches_full_attention_and_reports_its_metrics() {
    use shadowkv::engine::generate::{generate, GenerateOptions, GenerateRequest};
    use shadowkv::engine::sampling::SamplingParams;
    let topology = r#"
[model]
name = "smollm2"

[attention]
mode = "shadowkv"
budget = 1024
rank = 192
outlier_chunks = 0
local_chunks = 2

[limits]
max_batch = 4
max_context = 1024
prefill_chunk = 128
"#;
    let s = Server::start(topology, &["--model", &model_arg()]);
    let prompt = "The old lighthouse keeper wrote in his journal every evening. ".repeat(20);
    let v = s
        .post_json(
            "/v1/completions",
            &json!({"prompt": prompt, "max_tokens": 24, "temperature": 0}),
        )
        .json();
    let m = shadowkv::model::load::open_model(&model_arg()).unwrap();
    let w = shadowkv::model::weights::ModelWeights::load(&m.config, m.source.as_ref(), false).unwrap();
    let model = shadowkv::cpu::CpuModel::new(m.config.clone(), w);
    let req = GenerateRequest {
        prompt: m.tokenizer.encode(&prompt, true).unwrap(),
        max_tokens: 24,
        sampling: SamplingParams::default(),
        stop: vec![],
    };
    let (full, _) = generate(&model, &m.tokenizer, &[req], GenerateOptions::default()).unwrap();
    assert_eq!(answer_text(&v), full[0].text, "{v}");
    let hit = s.metric("shadowkv_reuse_hit_ratio").unwrap();
    assert!(hit > 0.5 && hit <= 1.0, "hit ratio {hit}");
    assert!(s.metric("shadowkv_value_bytes_fetched_total").unwrap() > 0.0);
    // The anonymous pool was bound to this host's node before first use, or the log
    // says why this host could not bind memory.
    let log = s.log();
    if log.contains("value pool not bound") && (log.contains("permitted") || log.contains("supported")) {
        eprintln!("skipped the binding check: this host cannot bind memory");
    } else {
        assert!(log.contains("value pool bound to NUMA node"), "{log}");
    }
}

/// API keys from all three sources guard `/v1/*` and `/metrics` on the API address: raw
/// HTTP and the official client get 401 `authentication_error` without a key or with a
/// wrong one and work with any configured key; `/health` and the separate metrics address
/// stay open; afterwards no key is in the daemon's log or in `/metrics`.
#[test]
fn api_keys_guard_the_api_and_never_show() {
    const LISTED: &str = "sk-listed-3d1c9e77a0";
    const FILED: &str = "sk-filed-8b24f06e5c";
    const ENV_1: &str = "sk-env-one-5f9a2c11d4";
    const ENV_2: &str = "sk-env-two-c07e3b9a62";
    const WRONG: &str = "sk-wrong-guess-41ad7e";
    // What tests/openai_client.py sends as its wrong key.
    const CLIENT_WRONG: &str = "sk-wrong-key-never-valid";
    let secrets = [LISTED, FILED, ENV_1, ENV_2, WRONG, CLIENT_WRONG];
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keys");
    std::fs::write(&file, format!("# team A\n\n{FILED}\n")).unwrap();
    let topology = format!(
        "[model]\nname = \"smollm2\"\n[limits]\nmax_batch = 2\nmax_context = 512\n\
         [server]\nmetrics_listen = \"127.0.0.1:0\"\napi_keys = [\"{LISTED}\"]\n\
         api_keys_file = {:?}\napi_keys_env = \"SHADOWKV_TEST_API_KEYS\"\n",
        file.to_str().unwrap()
    );
    let env_value = format!("{ENV_1}, {ENV_2}");
    let s = Server::start_with_env(
        &topology,
        &["--model", &model_arg()],
        &[("SHADOWKV_TEST_API_KEYS", &env_value), ("RUST_LOG", "info")],
    );
    let call = |method: &str, path: &str, auth: Option<&str>, body: Option<&str>| {
        let h = auth.map(|a| ("Authorization", a));
        serve_util::request_with_headers(s.addr, method, path, h.as_slice(), body)
    };
    let completion = json!({"prompt": "Hi", "max_tokens": 2, "temperature": 0}).to_string();
    let chat = json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}).to_string();
    let protected: &[(&str, &str, Option<&str>)] = &[
        ("GET", "/v1/models", None),
        ("GET", "/v1/models/smollm2", None),
        ("POST", "/v1/completions", Some(&completion)),
        ("POST", "/v1/chat/completions", Some(&chat)),
        ("GET", "/v1/no-such-route", None),
        ("GET", "/metrics", None),
    ];
    let refusals = [
        None,
        Some(format!("Bearer {WRONG}")),
        Some(format!("Basic {LISTED}")),
        Some(LISTED.to_string()),
        Some("Bearer ".to_string()),
    ];
    for (method, path, body) in protected {
        for auth in &refusals {
            let r = call(method, path, auth.as_deref(), *body);
            assert_eq!(r.status, 401, "{method} {path} with {auth:?}: {}", r.body);
            assert_eq!(r.header("www-authenticate"), Some("Bearer"), "{path}");
            let e = &r.json()["error"];
            assert_eq!(e["type"], "authentication_error", "{path}: {}", r.body);
            assert_eq!(e["code"], "invalid_api_key", "{path}: {}", r.body);
            assert_eq!(e["param"], Value::Null, "{path}: {}", r.body);
            assert!(e["message"].is_string(), "{}", r.body);
            for k in secrets {
                assert!(!r.body.contains(k), "a 401 names a key: {}", r.body);
            }
        }
    }
    // Every source's keys are accepted.
    for key in [LISTED, FILED, ENV_1, ENV_2] {
        let r = call("GET", "/v1/models", Some(&format!("Bearer {key}")), None);
        assert_eq!(r.status, 200, "{}", r.body);
    }
    let r = call(
        "POST",
        "/v1/completions",
        Some(&format!("Bearer {ENV_2}")),
        Some(&completion),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    // /health and the separate metrics address need no key.
    let h = s.get("/health");
    assert_eq!((h.status, h.json()["status"].as_str()), (200, Some("ok")), "{}", h.body);
    let maddr = s.metrics_addr.expect("metrics address printed");
    let open_metrics = serve_util::request(maddr, "GET", "/metrics", None);
    assert_eq!(open_metrics.status, 200);
    // The official client: the key from OPENAI_API_KEY works for every call; a wrong
    // key and none raise its AuthenticationError.
    let out = python_with_openai()
        .arg(common::repo_file("tests/openai_client.py"))
        .arg(format!("http://{}/v1", s.addr))
        .arg("smollm2")
        .arg("--auth")
        .env("OPENAI_API_KEY", FILED)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openai client failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(out.stdout.trim_ascii()).unwrap();
    assert!(v["chat"].as_str().is_some_and(|c| !c.is_empty()), "{v}");
    assert!(v["stream"]["chunks"].as_u64().unwrap() > 1, "{v}");
    assert_eq!(v["refused"].as_array().map(Vec::len), Some(8), "{v}");
    // Refusals are counted; no key is in the log or either /metrics.
    let api_metrics = call("GET", "/metrics", Some(&format!("Bearer {LISTED}")), None);
    assert_eq!(api_metrics.status, 200);
    let unauthorized = metric_value(&api_metrics.body, "shadowkv_requests_total{outcome=\"unauthorized\"}");
    assert!(
        unauthorized >= Some((protected.len() * refusals.len() + 8) as f64),
        "{unauthorized:?}"
    );
    let log = s.log();
    assert!(log.contains("API keys: 4 set"), "{log}");
    for (what, text) in [
        ("log", &log),
        ("/metrics", &api_metrics.body),
        ("metrics_listen", &open_metrics.body),
    ] {
        for k in secrets {
            assert!(!text.contains(k), "the {what} shows a key:\n{text}");
        }
    }
}

/// A key source that cannot be read stops start-up with the topology key and line, and
/// the message quotes no key.
#[test]
fn api_key_sources_that_fail_stop_start_up_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-keys");
    let bad = dir.path().join("bad-keys");
    std::fs::write(&bad, "sk-good-a8f2\nsk-bad key-77e1\n").unwrap();
    let cases: Vec<(String, &[&str])> = vec![
        (
            "[server]\napi_keys = [\"sk-good-a8f2\", \"\"]\n".into(),
            &["line 2", "server.api_keys", "key 2 of the list is empty"],
        ),
        (
            "[server]\n\napi_keys_env = \"SHADOWKV_TEST_UNSET_VARIABLE\"\n".into(),
            &[
                "line 3",
                "server.api_keys_env",
                "`SHADOWKV_TEST_UNSET_VARIABLE` is not set",
            ],
        ),
        (
            format!("[server]\napi_keys_file = {:?}\n", missing.to_str().unwrap()),
            &["line 2", "server.api_keys_file", "cannot read", "no-such-keys"],
        ),
        (
            format!("[server]\napi_keys_file = {:?}\n", bad.to_str().unwrap()),
            &[
                "line 2",
                "server.api_keys_file",
                "bad-keys`, line 2: the key has a space",
            ],
        ),
    ];
    for (topo, want) in &cases {
        let (status, err) = serve_fails(topo, &["--model", "synthetic:tiny"]);
        assert!(!status.success(), "{topo:?} was accepted");
        for w in *want {
            assert!(err.contains(w), "{topo:?}: stderr lacks {w:?}:\n{err}");
        }
        for k in ["sk-good", "sk-bad", "key-77e1"] {
            assert!(!err.contains(k), "{topo:?}: stderr quotes a key:\n{err}");
        }
    }
}
