//! The daemon scraped by a real Prometheus server (Debian's `prometheus` package),
//! started by the test on loopback with a one-second scrape interval and bounded in
//! time: a stage histogram is read back through Prometheus' query API and agrees with
//! the daemon's own `/metrics`. Skips, saying so, where no `prometheus` binary is
//! installed (`.ci/run` installs it).

mod common;
mod serve_util;

use serde_json::{json, Value};
use serve_util::Server;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// `$SHADOWKV_PROMETHEUS`, else `prometheus` on `PATH`, else Debian's `/usr/bin/prometheus`.
fn prometheus_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("SHADOWKV_PROMETHEUS") {
        return Some(PathBuf::from(p));
    }
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("prometheus"))
        .chain([PathBuf::from("/usr/bin/prometheus")]);
    on_path.into_iter().find(|p| p.is_file())
}

/// A loopback port nobody listens on (the listener is closed before Prometheus binds).
fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

/// A Prometheus server, killed when dropped.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(bin: &PathBuf, target: SocketAddr) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n\
                 scrape_configs:\n  - job_name: shadowkv\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        let addr = free_addr();
        let child = Command::new(bin)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("stderr.log")).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
        Prometheus { child, addr, dir }
    }

    /// The value of the instant query `q` (one series, or the sum Prometheus was asked
    /// for), when Prometheus answers with one.
    fn query(&self, q: &str) -> Option<f64> {
        // Not listening yet: no answer (the request helper would panic).
        std::net::TcpStream::connect(self.addr).ok()?;
        let path = format!("/api/v1/query?query={}", percent_encode(q));
        let r = serve_util::request(self.addr, "GET", &path, None);
        if r.status != 200 {
            return None;
        }
        let v: Value = serde_json::from_str(&r.body).ok()?;
        v["data"]["result"][0]["value"][1].as_str()?.parse().ok()
    }

    /// Polls `q` until `ok` holds for its value, for at most `within`.
    fn wait_for(&mut self, q: &str, within: Duration, ok: impl Fn(f64) -> bool) -> f64 {
        let t0 = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                let log = std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default();
                panic!("Prometheus exited ({status}) while waiting for `{q}`:\n{log}");
            }
            if let Some(v) = self.query(q).filter(|&v| ok(v)) {
                return v;
            }
            assert!(
                t0.elapsed() < within,
                "Prometheus gave no acceptable value for `{q}` within {within:?} (last: {:?})",
                self.query(q)
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A query string's value, percent-encoded (everything but unreserved characters).
fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[test]
fn prometheus_scrapes_the_stage_histograms() {
    let Some(bin) = prometheus_binary() else {
        common::skip("no `prometheus` binary (Debian: apt-get install prometheus)");
        return;
    };
    let s = Server::start(
        "[limits]\nmax_batch = 2\n[server]\nmetrics_listen = \"127.0.0.1:0\"\n",
        &["--model", "synthetic:tiny"],
    );
    let target = s.metrics_addr.expect("metrics address printed");
    let mut prom = Prometheus::start(&bin, target);
    for i in 0..3 {
        let r = s.post_json(
            "/v1/completions",
            &json!({"prompt": format!("request {i}"), "max_tokens": 12, "temperature": 0}),
        );
        assert_eq!(r.status, 200, "{}", r.body);
    }
    let daemon_steps = s
        .metric("shadowkv_stage_seconds_count{stage=\"decode\"}")
        .expect("the daemon counts its decode steps");
    assert!(daemon_steps > 0.0);
    let within = Duration::from_secs(60);
    // The target is up, then the histogram's count reaches what the daemon reported.
    prom.wait_for("up{job=\"shadowkv\"}", within, |v| v == 1.0);
    let scraped = prom.wait_for(
        "sum(shadowkv_stage_seconds_count{job=\"shadowkv\",stage=\"decode\"})",
        within,
        |v| v >= daemon_steps,
    );
    assert_eq!(scraped, daemon_steps, "no steps ran after the requests ended");
    // The buckets make a histogram Prometheus can take a quantile of: a positive,
    // finite median no larger than the slowest step.
    let median = prom.wait_for(
        "histogram_quantile(0.5, sum by (le) (shadowkv_stage_seconds_bucket{job=\"shadowkv\",stage=\"decode\"}))",
        within,
        f64::is_finite,
    );
    let total = s.metric("shadowkv_stage_seconds_sum{stage=\"decode\"}").unwrap();
    assert!(median > 0.0 && median <= total, "median {median}, total {total}");
    // Request outcomes reached it as counters.
    let completed = prom.wait_for(
        "sum(shadowkv_requests_total{job=\"shadowkv\",outcome=\"completed\"})",
        within,
        |v| v >= 3.0,
    );
    assert_eq!(completed, 3.0);
}
