//! `tools/trace`, the overlap-timeline viewer, run through the project's Python: exact
//! numbers on a hand-written trace with known overlaps (in both JSON forms), a trace
//! recorded from `shadowkv serve` on the CPU backend (the one committed in tests/data and
//! one recorded now), the SVG as XML with one labelled row per track, and bad input.

mod common;
mod serve_util;

use serde_json::{json, Value};
use serve_util::Server;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

/// Runs `tools/trace args...` with the project's Python.
fn trace_tool(args: &[&str]) -> Output {
    Command::new(common::python())
        .arg(common::repo_file("tools/trace"))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {} tools/trace: {e}; {}", common::python(), common::PYTHON_HINT))
}

/// Runs the tool and asserts that it succeeded; returns stdout.
fn trace_ok(args: &[&str]) -> String {
    let out = trace_tool(args);
    assert!(
        out.status.success(),
        "tools/trace {args:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The stage names of the tool's `--json` numbers, in its order.
fn stage_names(v: &Value) -> Vec<&str> {
    v["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect()
}

/// The tool's `--json` numbers for `trace`, its SVG and HTML written under `out`.
fn numbers(trace: &Path, out: &Path) -> Value {
    let text = trace_ok(&[trace.to_str().unwrap(), "--out", out.to_str().unwrap(), "--json"]);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("--json printed no JSON ({e}):\n{text}"))
}

fn data(name: &str) -> std::path::PathBuf {
    common::repo_file(&format!("tests/data/{name}"))
}

/// A track row of the SVG.
#[derive(Debug, PartialEq)]
struct Row {
    label: String,
    /// The row's `data-spans`: the spans of the track.
    spans: usize,
    /// Spans drawn as their own rectangle.
    drawn: usize,
    /// Bars of bins that sum spans too narrow to draw apart.
    binned: usize,
}

/// The SVG's track rows, in order (the SVG parsed as XML).
fn svg_rows(svg_path: &Path) -> Vec<Row> {
    let text = std::fs::read_to_string(svg_path).unwrap();
    let doc = roxmltree::Document::parse(&text).unwrap_or_else(|e| panic!("{} is not XML: {e}", svg_path.display()));
    assert_eq!(doc.root_element().tag_name().name(), "svg");
    let class = |n: &roxmltree::Node, c: &str| n.attribute("class") == Some(c);
    doc.descendants()
        .filter(|n| n.has_tag_name("g") && class(n, "track"))
        .map(|g| {
            let labels: Vec<String> = g
                .children()
                .filter(|n| n.has_tag_name("text") && class(n, "track-label"))
                .map(|t| {
                    // The label's own text; its <title> child holds the untruncated name.
                    t.children().filter(|c| c.is_text()).filter_map(|c| c.text()).collect()
                })
                .collect();
            assert_eq!(labels.len(), 1, "a track row with {} labels", labels.len());
            let rects = |c: &str| {
                g.descendants()
                    .filter(|n| n.has_tag_name("rect") && class(n, c))
                    .count()
            };
            Row {
                label: labels[0].clone(),
                spans: g.attribute("data-spans").unwrap().parse().unwrap(),
                drawn: rects("span"),
                binned: rects("span-bin"),
            }
        })
        .collect()
}

/// (label, spans) of each row.
fn labels_and_spans(rows: &[Row]) -> Vec<(String, usize)> {
    rows.iter().map(|r| (r.label.clone(), r.spans)).collect()
}

/// The hand-written trace (tests/data/trace-overlap.json, µs): a compute stream with two
/// `step`s around reconstruct/attention/mlp ([0,4000] and [5000,8000] busy), two gather
/// threads, a copy stream, the engine, and a second lane prefilling over [3500,4800].
/// Every figure below is worked out by hand from those intervals, e.g. gather: union
/// [500,2500] ∪ [4500,6000] = 3.5 ms; compute on other tracks covers [500,2500],
/// [4500,4800] and [5000,6000] of it = 3.3 ms. Value fetch (gather ∪ transfer) = [500,3500]
/// ∪ [4500,6000] ∪ [8000,9000] = 5.5 ms, of which [4800,5000] and [8000,9000] are exposed.
#[test]
fn hand_written_trace_gives_the_overlaps_worked_out_by_hand() {
    let dir = tempfile::tempdir().unwrap();
    let trace = data("trace-overlap.json");
    let out = trace_ok(&[trace.to_str().unwrap(), "--out", dir.path().to_str().unwrap()]);
    let table = "\
stage        kind      spans    total ms   summed ms  overlapped ms  overlapped
attention    compute       2       2.000       2.000          0.000       0.0 %
mlp          compute       1       1.000       1.000          0.500      50.0 %
prefill      compute       1       1.300       1.300          0.500      38.5 %
reconstruct  compute       2       4.000       4.000          0.000       0.0 %
gather       fetch         3       3.500       4.000          3.300      94.3 %
transfer     fetch         2       2.000       2.000          1.000      50.0 %
output                     1       1.000       1.000          0.500      50.0 %
step                       2       7.000       7.000          0.500       7.1 %

value fetch (gather, transfer): 4.300 of 5.500 ms hidden behind compute (78.2 %), 1.200 ms exposed
";
    assert!(out.contains(table), "the report differs:\n{out}");
    assert!(out.contains(": 6 tracks, 14 spans, 9.000 ms"), "{out}");
    let svg = dir.path().join("trace-overlap.svg");
    let html = dir.path().join("trace-overlap.html");
    assert!(out.contains(&format!("wrote {}", svg.display())), "{out}");
    assert!(out.contains(&format!("wrote {}", html.display())), "{out}");

    // --json: the same numbers, exactly.
    let v = numbers(&trace, dir.path());
    let stage = |name: &str| -> Value {
        let s = v["stages"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == name)
            .unwrap()
            .clone();
        json!([
            s["kind"],
            s["spans"],
            s["total_ms"],
            s["summed_ms"],
            s["overlapped_ms"],
            s["overlapped_share"]
        ])
    };
    assert_eq!(stage("gather"), json!(["fetch", 3, 3.5, 4.0, 3.3, 0.942857]));
    assert_eq!(stage("transfer"), json!(["fetch", 2, 2.0, 2.0, 1.0, 0.5]));
    assert_eq!(stage("prefill"), json!(["compute", 1, 1.3, 1.3, 0.5, 0.384615]));
    assert_eq!(stage("reconstruct"), json!(["compute", 2, 4.0, 4.0, 0.0, 0.0]));
    assert_eq!(stage("step"), json!([null, 2, 7.0, 7.0, 0.5, 0.071429]));
    assert_eq!(
        v["value_fetch"],
        json!({"stages": ["gather", "transfer"], "total_ms": 5.5, "hidden_ms": 4.3, "exposed_ms": 1.2,
            "hidden_share": 0.781818})
    );
    assert_eq!(v["traced_ms"], 9.0);
    assert_eq!(v["window_ms"], json!([0.0, 9.0]));

    // The SVG: one labelled row per track, in track order, each span its own rectangle.
    let rows = svg_rows(&svg);
    assert!(rows.iter().all(|r| r.drawn == r.spans && r.binned == 0), "{rows:?}");
    assert_eq!(
        labels_and_spans(&rows),
        [
            ("compute stream", 7),
            ("gather 0", 2),
            ("gather 1", 1),
            ("copy stream", 2),
            ("engine", 1),
            ("lane 1", 1)
        ]
        .map(|(n, c)| (n.to_string(), c))
    );
    // The HTML page embeds it, with the table, and fetches nothing.
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(page.contains("<svg") && page.contains("<td>gather</td>"), "{page}");
    for outside in ["<script", "<link", "src=", "@import", "url("] {
        assert!(!page.contains(outside), "the page has {outside:?}");
    }
    // --compute and --fetch choose the stages: with only `mlp` [3000,4000] as compute,
    // of the transfers [2500,3500] and [8000,9000] only [3000,3500] is hidden.
    let v = numbers_with(&trace, dir.path(), &["--compute", "mlp", "--fetch", "transfer"]);
    assert_eq!(
        v["value_fetch"],
        json!({"stages": ["transfer"], "total_ms": 2.0, "hidden_ms": 0.5, "exposed_ms": 1.5, "hidden_share": 0.25})
    );
}

fn numbers_with(trace: &Path, out: &Path, extra: &[&str]) -> Value {
    let mut args = vec![trace.to_str().unwrap(), "--out", out.to_str().unwrap(), "--json"];
    args.extend_from_slice(extra);
    serde_json::from_str(&trace_ok(&args)).unwrap()
}

/// The object form with "B"/"E" pairs (nested, some ending without a name), timestamps
/// a second later, an instant and a counter event, describes the same timeline.
#[test]
fn begin_end_pairs_in_the_object_form_give_the_same_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let a = numbers(&data("trace-overlap.json"), dir.path());
    let b = numbers(&data("trace-overlap-be.json"), dir.path());
    for key in ["traced_ms", "window_ms", "tracks", "stages", "value_fetch"] {
        assert_eq!(a[key], b[key], "{key}");
    }
    assert_eq!(
        svg_rows(&dir.path().join("trace-overlap-be.svg")),
        svg_rows(&dir.path().join("trace-overlap.svg"))
    );
}

/// --window cuts the spans to a stretch of the trace: the numbers and the rows cover
/// only it. In [4000,6000] µs of the hand-written trace: the second step and its
/// reconstruct cut to [5000,6000], one gather [4500,6000], the prefill [4000,4800]
/// (spans that end at 4000 are out); the gather is hidden over [4500,4800] and
/// [5000,6000].
#[test]
fn a_window_covers_only_its_stretch() {
    let dir = tempfile::tempdir().unwrap();
    let v = numbers_with(&data("trace-overlap.json"), dir.path(), &["--window", "4:6"]);
    assert_eq!(v["traced_ms"], 9.0);
    assert_eq!(v["window_ms"], json!([4.0, 6.0]));
    let spans: Vec<(String, usize)> = v["tracks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["name"].as_str().unwrap().to_string(),
                t["spans"].as_u64().unwrap() as usize,
            )
        })
        .collect();
    let want = [
        ("compute stream", 2),
        ("gather 0", 1),
        ("gather 1", 0),
        ("copy stream", 0),
        ("engine", 0),
        ("lane 1", 1),
    ];
    assert_eq!(spans, want.map(|(n, c)| (n.to_string(), c)));
    let names = stage_names(&v);
    assert_eq!(names, ["prefill", "reconstruct", "gather", "step"]);
    assert_eq!(
        v["value_fetch"],
        json!({"stages": ["gather"], "total_ms": 1.5, "hidden_ms": 1.3, "exposed_ms": 0.2, "hidden_share": 0.866667})
    );
    // Every track keeps its row, empty or not.
    let rows = svg_rows(&dir.path().join("trace-overlap.svg"));
    assert_eq!(labels_and_spans(&rows), spans);
    assert!(rows.iter().all(|r| r.drawn == r.spans), "{rows:?}");
    // A window with no span in it is an error.
    let out = trace_tool(&[
        data("trace-overlap.json").to_str().unwrap(),
        "--out",
        dir.path().to_str().unwrap(),
        "--window",
        "20:30",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("no span in the window 20:30 ms (the trace covers 0 – 9.000 ms)"),
        "{err}"
    );
    // The text report counts the window's spans, and says the trace's whole length apart.
    let text = trace_ok(&[
        data("trace-overlap.json").to_str().unwrap(),
        "--out",
        dir.path().to_str().unwrap(),
        "--window",
        "4:6",
    ]);
    assert!(
        text.contains(": 6 tracks, 4 spans in the window (the whole trace: 9.000 ms)"),
        "{text}"
    );
    // A negative start is the window's own error, not the argument parser's.
    let out = trace_tool(&[data("trace-overlap.json").to_str().unwrap(), "--window", "-1:3"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("expected 0 <= FROM < TO, got '-1:3'"),
        "{err}"
    );
}

/// --hide-idle leaves out the tracks without a span in the window (here: the second
/// gather thread, the copy stream and the engine in [4000,6000] µs), in the numbers and
/// in the picture; the hidden share is the same (idle tracks run nothing).
#[test]
fn hide_idle_leaves_out_the_tracks_without_spans() {
    let dir = tempfile::tempdir().unwrap();
    let all = numbers_with(&data("trace-overlap.json"), dir.path(), &["--window", "4:6"]);
    let v = numbers_with(
        &data("trace-overlap.json"),
        dir.path(),
        &["--window", "4:6", "--hide-idle"],
    );
    let names: Vec<&str> = v["tracks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["compute stream", "gather 0", "lane 1"]);
    assert_eq!(v["value_fetch"], all["value_fetch"]);
    assert_eq!(v["stages"], all["stages"]);
    let rows = svg_rows(&dir.path().join("trace-overlap.svg"));
    assert_eq!(
        labels_and_spans(&rows),
        [("compute stream", 2), ("gather 0", 1), ("lane 1", 1)].map(|(n, c)| (n.to_string(), c))
    );
}

/// Names holding characters XML cannot hold (a C0 control) still give a valid SVG: each
/// such character drawn as U+FFFD.
#[test]
fn control_characters_in_names_keep_the_svg_valid() {
    let dir = tempfile::tempdir().unwrap();
    let trace = json!([
        {"ph": "M", "name": "thread_name", "pid": 1, "tid": 1, "args": {"name": "lane\u{7} 0"}},
        {"ph": "X", "name": "reconstruct\u{1b}", "pid": 1, "tid": 1, "ts": 0, "dur": 100},
    ]);
    let path = dir.path().join("ctl.json");
    std::fs::write(&path, trace.to_string()).unwrap();
    numbers(&path, dir.path());
    let rows = svg_rows(&dir.path().join("ctl.svg"));
    assert_eq!(labels_and_spans(&rows), [("lane\u{fffd} 0".to_string(), 1)]);
}

/// A track label longer than the label column keeps its start and its end around a
/// "…" (labels of one run differ at the end: "…, lane 0 compute", "…, lane 0 fetch"),
/// and the whole name in its tooltip.
#[test]
fn long_track_labels_keep_their_start_and_end() {
    let dir = tempfile::tempdir().unwrap();
    let name = |lane: &str| format!("124928 tokens, zero-copy, GPU tier 11712 (2 micro-batches), {lane}");
    let trace = json!([
        {"ph": "M", "name": "thread_name", "pid": 1, "tid": 1, "args": {"name": name("lane 0 compute")}},
        {"ph": "M", "name": "thread_name", "pid": 1, "tid": 2, "args": {"name": name("lane 0 fetch")}},
        {"ph": "X", "name": "reconstruct", "pid": 1, "tid": 1, "ts": 0, "dur": 100},
        {"ph": "X", "name": "fetch", "pid": 1, "tid": 2, "ts": 20, "dur": 100},
    ]);
    let path = dir.path().join("long.json");
    std::fs::write(&path, trace.to_string()).unwrap();
    let v = numbers(&path, dir.path());
    assert_eq!(v["value_fetch"]["hidden_ms"], 0.08);
    let text = std::fs::read_to_string(dir.path().join("long.svg")).unwrap();
    let rows = svg_rows(&dir.path().join("long.svg"));
    let labels: Vec<&str> = rows.iter().map(|r| r.label.as_str()).collect();
    assert_eq!(
        labels,
        [
            "124928 tokens, zero-copy, G…cro-batches), lane 0 compute",
            "124928 tokens, zero-copy, G…micro-batches), lane 0 fetch"
        ]
    );
    for lane in ["lane 0 compute", "lane 0 fetch"] {
        assert!(text.contains(&format!("<title>{}</title>", name(lane))), "{lane}");
    }
}

/// What the daemon's trace says, read here independently of the tool: per track its
/// name and span count, per span name the count and summed duration (µs).
struct Recorded {
    tracks: Vec<(String, usize)>,
    stages: BTreeMap<String, (usize, f64)>,
}

fn read_recorded(path: &Path) -> Recorded {
    let v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut names = BTreeMap::new();
    let mut per_track: BTreeMap<u64, usize> = BTreeMap::new();
    let mut stages: BTreeMap<String, (usize, f64)> = BTreeMap::new();
    for e in v.as_array().unwrap() {
        let tid = e["tid"].as_u64().unwrap();
        match e["ph"].as_str().unwrap() {
            "M" => {
                names.insert(tid, e["args"]["name"].as_str().unwrap().to_string());
            }
            "X" => {
                *per_track.entry(tid).or_default() += 1;
                let s = stages.entry(e["name"].as_str().unwrap().to_string()).or_default();
                s.0 += 1;
                s.1 += e["dur"].as_f64().unwrap();
            }
            ph => panic!("the daemon wrote a {ph:?} event"),
        }
    }
    let tracks = names
        .iter()
        .map(|(tid, n)| (n.clone(), per_track.get(tid).copied().unwrap_or(0)))
        .collect();
    Recorded { tracks, stages }
}

/// Renders a trace the daemon wrote and checks the tool's rows and numbers against it.
fn check_daemon_trace(trace: &Path) {
    let dir = tempfile::tempdir().unwrap();
    let rec = read_recorded(trace);
    assert!(rec.tracks.iter().any(|(n, _)| n == "engine"), "{:?}", rec.tracks);
    assert!(rec.tracks.iter().any(|(n, _)| n == "lane 0"), "{:?}", rec.tracks);
    let v = numbers(trace, dir.path());
    let stem = trace.file_stem().unwrap().to_str().unwrap();
    let rows = svg_rows(&dir.path().join(format!("{stem}.svg")));
    assert_eq!(labels_and_spans(&rows), rec.tracks);
    // Each span is drawn, or summed into a bin with its neighbours where too narrow.
    for r in &rows {
        assert!(r.drawn <= r.spans && (r.spans == 0 || r.drawn + r.binned > 0), "{r:?}");
    }
    let stages = v["stages"].as_array().unwrap();
    assert_eq!(stages.len(), rec.stages.len(), "{v}");
    for s in stages {
        let name = s["name"].as_str().unwrap();
        let (count, summed_us) = rec.stages[name];
        assert_eq!(s["spans"], count, "{name}");
        let f = |k: &str| s[k].as_f64().unwrap();
        assert!(
            (f("summed_ms") - summed_us / 1000.0).abs() < 1e-5,
            "{name}: {s} vs {summed_us} µs"
        );
        // Spans on one track do not overlap, so a stage on one track has total = summed;
        // overlap is part of the total.
        if s["tracks"] == 1 {
            assert!((f("total_ms") - f("summed_ms")).abs() < 1e-5, "{name}: {s}");
        }
        assert!(f("overlapped_ms") <= f("total_ms") + 1e-9, "{name}: {s}");
        let kind = match name {
            "prefill" | "decode" => json!("compute"),
            _ => Value::Null,
        };
        assert_eq!(s["kind"], kind, "{name}");
    }
    assert!(
        rec.stages.contains_key("prefill") && rec.stages.contains_key("output"),
        "{v}"
    );
    // No value-fetch stage in today's traces: the report says so instead of a share.
    assert!(v["value_fetch"].is_null(), "{v}");
    let text = trace_ok(&[trace.to_str().unwrap(), "--out", dir.path().to_str().unwrap()]);
    assert!(
        text.contains("value fetch: no spans named gather, transfer, fetch in this trace"),
        "{text}"
    );
}

/// tests/data/trace-daemon-cpu.json: recorded from `shadowkv serve` with SmolLM2 on the
/// CPU backend, four completions at once (prefill_chunk 64).
#[test]
fn the_committed_daemon_trace_renders_one_row_per_track() {
    check_daemon_trace(&data("trace-daemon-cpu.json"));
}

/// A trace recorded now: the daemon with `trace.enabled = true`, a few requests at
/// once, stopped with SIGTERM, then rendered.
#[test]
fn a_trace_recorded_from_the_daemon_now_renders() {
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("daemon-trace.json");
    let topo = format!(
        "[limits]\nmax_batch = 4\nprefill_chunk = 16\n[trace]\nenabled = true\npath = {:?}\n",
        trace.to_str().unwrap()
    );
    let model = common::test_model();
    let mut s = Server::start(&topo, &["--model", model.to_str().unwrap()]);
    let addr = s.addr;
    let clients: Vec<_> = (0..3)
        .map(|i| {
            std::thread::spawn(move || {
                let body = json!({"prompt": format!("Name {} colours of the rainbow.", i + 2),
                    "max_tokens": 3 + i, "temperature": 0});
                serve_util::request(addr, "POST", "/v1/completions", Some(&body.to_string()))
            })
        })
        .collect();
    for c in clients {
        let r = c.join().unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
    }
    s.signal("TERM");
    let status = s.wait_exit(Duration::from_secs(60));
    assert!(status.success(), "exit status {status}; log:\n{}", s.log());
    check_daemon_trace(&trace);
    // Without --out the pictures go beside the trace.
    let out = trace_ok(&[trace.to_str().unwrap()]);
    assert!(dir.path().join("daemon-trace.svg").exists(), "{out}");
    assert!(dir.path().join("daemon-trace.html").exists(), "{out}");
}

/// A trace cut off by a writer that did not finish (no closing bracket, the last event
/// half written) is read up to the cut, with a warning.
#[test]
fn a_trace_cut_off_mid_event_is_read_up_to_the_cut() {
    let dir = tempfile::tempdir().unwrap();
    let full = std::fs::read_to_string(data("trace-daemon-cpu.json")).unwrap();
    let lines: Vec<&str> = full.lines().collect();
    // The opening bracket, the two thread names, six spans, and half of the seventh.
    let last = lines[9];
    let cut = format!("{}\n{}", lines[..9].join("\n"), &last[..last.len() / 2]);
    let p = dir.path().join("cut.json");
    std::fs::write(&p, cut).unwrap();
    let out = trace_tool(&[p.to_str().unwrap(), "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("ends in the middle of an event (line 10); read the 8 before it"),
        "{err}"
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let spans: u64 = v["tracks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["spans"].as_u64().unwrap())
        .sum();
    assert_eq!(spans, 6, "{v}");
}

/// Bad input is an error naming the file and the problem, and writes nothing.
#[test]
fn bad_input_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&str, &str, &str)] = &[
        ("not-json.json", "shadowkv trace\n", "not JSON (line 1, column 1"),
        (
            "empty.json",
            "[]",
            "no spans (complete \"X\" events or \"B\"/\"E\" pairs) in 0 events",
        ),
        (
            "metadata-only.json",
            r#"{"traceEvents": [{"name": "thread_name", "ph": "M", "pid": 1, "tid": 1, "args": {"name": "engine"}}]}"#,
            "no spans",
        ),
        (
            "object.json",
            r#"{"events": []}"#,
            "a JSON object without \"traceEvents\"",
        ),
        ("number.json", "42", "JSON int, not a list of trace events"),
        (
            "bad-ts.json",
            r#"[{"name": "decode", "ph": "X", "pid": 1, "tid": 2, "ts": "soon", "dur": 5}]"#,
            "event 0 (ph \"X\", name \"decode\"): \"ts\" must be a number of microseconds, got \"soon\"",
        ),
        (
            "negative.json",
            r#"[{"name": "gather", "ph": "X", "pid": 1, "tid": 2, "ts": 10, "dur": -5}]"#,
            "event 0 (ph \"X\", name \"gather\"): negative dur -5",
        ),
        (
            "no-phase.json",
            r#"[{"name": "gather", "ts": 1}]"#,
            "event 0 has no \"ph\"",
        ),
    ];
    for (file, text, want) in cases {
        let p = dir.path().join(file);
        std::fs::write(&p, text).unwrap();
        let out = trace_tool(&[p.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{file}: {err}");
        assert!(err.contains(&format!("error: {}: ", p.display())), "{file}: {err}");
        assert!(err.contains(want), "{file}: {err}");
        assert!(!err.contains("Traceback"), "{file}: {err}");
        let stem = file.trim_end_matches(".json");
        assert!(!dir.path().join(format!("{stem}.svg")).exists(), "{file}: wrote an SVG");
    }
    let missing = dir.path().join("missing.json");
    let out = trace_tool(&[missing.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("missing.json: cannot read: No such file or directory"),
        "{err}"
    );
    // A stage cannot be both compute and fetch.
    let out = trace_tool(&[
        data("trace-overlap.json").to_str().unwrap(),
        "--compute",
        "gather,mlp",
        "--out",
        dir.path().to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("stages both compute and fetch: gather"), "{err}");
}

/// The tool's `--json` numbers for one lane's GPU `spans`, written as `bench --trace`
/// writes them, under `label`.
fn bench_timeline(label: &str, spans: &[shadowkv::cuda::shadow::timeline::GpuSpan]) -> Value {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gpu.json");
    let mut t = shadowkv::cli::bench_cuda_shadow::BenchTrace::create(&path).unwrap();
    t.lane(label, std::time::Instant::now(), spans).unwrap();
    t.finish().unwrap();
    numbers(&path, dir.path())
}

/// The GPU timeline `bench --trace` writes (a step's stage marks as spans on a lane's
/// compute stream, its fetch and fold streams' spans, through the same code), drawn by
/// the tool: three tracks, the fetch [1.0, 2.0] ms hidden behind the rebuild [1.0, 1.6]
/// and nothing else (the fetch-wait is not compute; the fold [2.2, 2.3] comes after),
/// so 60 % hidden; the stages by name.
#[test]
fn a_bench_gpu_timeline_shows_the_fetch_hidden_behind_the_rebuild() {
    use shadowkv::cuda::shadow::stages::{SideWork, Stage::*};
    use shadowkv::cuda::shadow::timeline::spans;
    let marks = [
        (0, Start, 0.0),
        (0, Append, 0.1),
        (0, Scores, 0.5),
        (0, Select, 0.6),
        (0, Reuse, 1.0),
        (0, Rebuild, 1.6),
        (0, Fetch, 2.0),
        (0, Attend, 2.2),
    ];
    let sides = [(SideWork::Fetch, 0, 1.0, 2.0), (SideWork::Fold, 0, 2.2, 2.3)];
    let v = bench_timeline("61440 tokens, zero-copy, lane 0", &spans(&marks, &sides));
    assert_eq!(v["tracks"].as_array().unwrap().len(), 3, "{v}");
    let f = &v["value_fetch"];
    assert!((f["total_ms"].as_f64().unwrap() - 1.0).abs() < 1e-3, "{f}");
    assert!((f["hidden_ms"].as_f64().unwrap() - 0.6).abs() < 1e-3, "{f}");
    let names = stage_names(&v);
    for n in [
        "scores",
        "top-k",
        "reconstruct",
        "fetch",
        "fetch-wait",
        "attention",
        "fold",
    ] {
        assert!(names.contains(&n), "{n} missing from {names:?}");
    }
}

/// Two micro-batches (`bench --micro-batches 2`): the first on a stream of its own
/// (track `micro-batch 0`), selecting and rebuilding beside the second's landmark scores
/// on the compute stream, which waits for it (`join`) before the layer's fold on the
/// fold stream. The fetches [0.4, 1.0] and [1.0, 2.0] ms run beside compute on either
/// stream until 1.6 ms: 1.2 of 1.6 ms hidden, and neither wait (`fetch-wait`, `join`)
/// counts as compute.
#[test]
fn a_bench_gpu_timeline_of_two_micro_batches_has_a_track_per_stream() {
    use shadowkv::cuda::shadow::stages::{SideWork, Stage::*};
    use shadowkv::cuda::shadow::timeline::{hidden_fetch_share, spans};
    let marks = [
        (0, Start, 0.0),
        (0, Append, 0.1),
        (1, Start, 0.1),
        (1, Scores, 0.3),
        (1, Select, 0.35),
        (1, Reuse, 0.4),
        (1, Rebuild, 0.9),
        (1, Fetch, 1.0),
        (1, Attend, 1.1),
        (0, Scores, 0.5),
        (0, Select, 0.6),
        (0, Reuse, 1.0),
        (0, Rebuild, 1.6),
        (0, Fetch, 2.0),
        (0, Attend, 2.2),
        (0, Join, 2.4),
    ];
    let s = spans(
        &marks,
        &[
            (SideWork::Fetch, 0, 0.4, 1.0),
            (SideWork::Fetch, 0, 1.0, 2.0),
            (SideWork::Fold, 0, 2.4, 2.5),
        ],
    );
    assert!((hidden_fetch_share(&s).unwrap() - 0.75).abs() < 1e-9);
    let v = bench_timeline("61440 tokens, zero-copy, 2 micro-batches, lane 0", &s);
    let tracks: Vec<&str> = v["tracks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(tracks.len(), 4, "{v}");
    assert!(tracks.iter().any(|t| t.ends_with("lane 0 micro-batch 0")), "{tracks:?}");
    assert!(tracks.iter().any(|t| t.ends_with("lane 0 fold")), "{tracks:?}");
    let f = &v["value_fetch"];
    assert!((f["total_ms"].as_f64().unwrap() - 1.6).abs() < 1e-3, "{f}");
    assert!((f["hidden_ms"].as_f64().unwrap() - 1.2).abs() < 1e-3, "{f}");
    assert!(stage_names(&v).contains(&"join"), "{:?}", stage_names(&v));
}
