//! Helpers of the server tests: start `shadowkv serve` on an ephemeral loopback port,
//! and a small HTTP/1.1 client (plain std, `Connection: close`, chunked bodies, SSE).
#![allow(dead_code)]

use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A running `shadowkv serve`, killed when dropped.
pub struct Server {
    pub child: Child,
    pub addr: SocketAddr,
    /// The `/metrics`-only address, when `server.metrics_listen` is set.
    pub metrics_addr: Option<SocketAddr>,
    pub log: Arc<Mutex<String>>,
    _dir: tempfile::TempDir,
}

/// Runs `shadowkv serve` with `topology` (TOML text) and extra arguments; returns its
/// exit status and stderr. For start-up failures.
pub fn serve_fails(topology: &str, args: &[&str]) -> (std::process::ExitStatus, String) {
    let dir = tempfile::tempdir().unwrap();
    let topo = dir.path().join("topology.toml");
    std::fs::write(&topo, topology).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_shadowkv"))
        .arg("serve")
        .arg("--topology")
        .arg(&topo)
        .args(["--listen", "127.0.0.1:0"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (out.status, String::from_utf8_lossy(&out.stderr).into_owned())
}

impl Server {
    /// Starts the server on 127.0.0.1:0 and waits until it listens.
    pub fn start(topology: &str, args: &[&str]) -> Server {
        Self::start_with_env(topology, args, &[])
    }

    /// [`Server::start`] with these environment variables set for the server.
    pub fn start_with_env(topology: &str, args: &[&str], env: &[(&str, &str)]) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let topo: PathBuf = dir.path().join("topology.toml");
        std::fs::write(&topo, topology).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_shadowkv"))
            .arg("serve")
            .arg("--topology")
            .arg(&topo)
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting shadowkv serve");
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().unwrap();
        let log2 = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                log2.lock().unwrap().push_str(&(line + "\n"));
            }
        });
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(a) = line.strip_prefix("shadowkv metrics on http://") {
                    let _ = tx.send(("metrics", a.trim().trim_end_matches("/metrics").to_string()));
                }
                if let Some(a) = line.strip_prefix("shadowkv listening on http://") {
                    let _ = tx.send(("api", a.trim().to_string()));
                }
            }
        });
        let mut metrics_addr = None;
        let addr = loop {
            match rx.recv_timeout(Duration::from_secs(300)) {
                Ok(("api", a)) => break a.parse().unwrap(),
                Ok((_, a)) => metrics_addr = Some(a.parse().unwrap()),
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("the server did not start; its log:\n{}", log.lock().unwrap());
                }
            }
        };
        Server {
            child,
            addr,
            metrics_addr,
            log,
            _dir: dir,
        }
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Sends a signal to the server (`TERM`, `INT`).
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    /// Waits for the process to end.
    pub fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let t0 = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            if t0.elapsed() > within {
                panic!("the server did not exit within {within:?}; log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn get(&self, path: &str) -> Response {
        request(self.addr, "GET", path, None)
    }

    pub fn post(&self, path: &str, body: &str) -> Response {
        request(self.addr, "POST", path, Some(body))
    }

    pub fn post_json(&self, path: &str, body: &Value) -> Response {
        self.post(path, &body.to_string())
    }

    /// The value of a sample line `name{labels} value` in /metrics (first match).
    pub fn metric(&self, name_and_labels: &str) -> Option<f64> {
        metric_value(&self.get("/metrics").body, name_and_labels)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The value of `name_and_labels` (exact text before the value) in Prometheus text.
pub fn metric_value(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (k, v) = l.rsplit_once(' ')?;
        (k == name_and_labels).then(|| v.parse().ok()).flatten()
    })
}

/// An HTTP response.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("response is not JSON ({e}): status {} {:?}", self.status, self.body))
    }
}

/// Sends a request without reading the answer; dropping the stream disconnects.
pub fn send(addr: SocketAddr, method: &str, path: &str, body: Option<&str>) -> TcpStream {
    send_with_headers(addr, method, path, &[], body)
}

/// [`send`] with extra header lines (`("Authorization", "Bearer ...")`).
pub fn send_with_headers(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(600))).unwrap();
    let body = body.unwrap_or("");
    let extra: String = headers.iter().map(|(k, v)| format!("{k}: {v}\r\n")).collect();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\n\
         {extra}Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).unwrap();
    s
}

/// The status line and headers of a response.
fn read_head(r: &mut impl BufRead) -> (u16, Vec<(String, String)>) {
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .unwrap_or_else(|| panic!("bad status line {line:?}"))
        .parse()
        .unwrap();
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        r.read_line(&mut h).unwrap();
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    (status, headers)
}

/// Reads a chunked body as it arrives.
pub struct Chunked<R> {
    inner: R,
    left: usize,
    done: bool,
}

impl<R: BufRead> Read for Chunked<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.done || buf.is_empty() {
            return Ok(0);
        }
        if self.left == 0 {
            let mut line = String::new();
            if self.inner.read_line(&mut line)? == 0 {
                self.done = true;
                return Ok(0);
            }
            if line.trim().is_empty() {
                line.clear();
                if self.inner.read_line(&mut line)? == 0 {
                    self.done = true;
                    return Ok(0);
                }
            }
            let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                .map_err(|e| std::io::Error::other(format!("bad chunk size {line:?}: {e}")))?;
            if size == 0 {
                self.done = true;
                return Ok(0);
            }
            self.left = size;
        }
        let n = buf.len().min(self.left);
        let got = self.inner.read(&mut buf[..n])?;
        if got == 0 {
            self.done = true;
        }
        self.left -= got;
        Ok(got)
    }
}

/// Sends one request and reads the whole response.
pub fn request(addr: SocketAddr, method: &str, path: &str, body: Option<&str>) -> Response {
    request_with_headers(addr, method, path, &[], body)
}

/// [`request`] with extra header lines.
pub fn request_with_headers(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> Response {
    let s = send_with_headers(addr, method, path, headers, body);
    let mut r = BufReader::new(s);
    let (status, headers) = read_head(&mut r);
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    let mut bytes = Vec::new();
    if chunked {
        Chunked {
            inner: r,
            left: 0,
            done: false,
        }
        .read_to_end(&mut bytes)
        .unwrap();
    } else {
        r.read_to_end(&mut bytes).unwrap();
    }
    Response {
        status,
        headers,
        body: String::from_utf8(bytes).unwrap(),
    }
}

/// An open streaming response, read one SSE `data:` payload at a time.
pub struct SseStream {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    lines: std::io::Lines<BufReader<Chunked<BufReader<TcpStream>>>>,
    pub body: String,
}

impl SseStream {
    /// Opens `POST path` with `body`; the caller reads events with [`SseStream::next_data`].
    pub fn open(addr: SocketAddr, path: &str, body: &Value) -> SseStream {
        let s = send(addr, "POST", path, Some(&body.to_string()));
        let mut r = BufReader::new(s);
        let (status, headers) = read_head(&mut r);
        let lines = BufReader::new(Chunked {
            inner: r,
            left: 0,
            done: false,
        })
        .lines();
        SseStream {
            status,
            headers,
            lines,
            body: String::new(),
        }
    }

    /// The next `data:` payload; `None` at the end of the body.
    pub fn next_data(&mut self) -> Option<String> {
        for line in self.lines.by_ref() {
            let line = line.ok()?;
            self.body.push_str(&line);
            self.body.push('\n');
            if let Some(d) = line.strip_prefix("data:") {
                return Some(d.trim_start().to_string());
            }
        }
        None
    }

    /// Every remaining payload.
    pub fn rest(&mut self) -> Vec<String> {
        std::iter::from_fn(|| self.next_data()).collect()
    }
}

/// Polls `f` until it returns true or `within` passes.
pub fn wait_until(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < within {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    f()
}
