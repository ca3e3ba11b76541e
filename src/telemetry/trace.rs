//! A writer of Chrome trace-event JSON (opens in Perfetto and `chrome://tracing`): one
//! complete event (`"ph": "X"`) per span, one track per named thread.

use anyhow::{Context, Result};
use serde_json::{json, Value};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::time::Instant;

/// Writes spans to a trace file as they happen.
pub struct TraceWriter {
    out: BufWriter<File>,
    t0: Instant,
    events: usize,
}

impl TraceWriter {
    /// Creates (truncates) `path`; timestamps count from `t0`.
    pub fn create(path: &Path, t0: Instant) -> Result<Self> {
        let f = File::create(path).with_context(|| format!("creating trace file {}", path.display()))?;
        let mut out = BufWriter::new(f);
        out.write_all(b"[\n")?;
        Ok(TraceWriter { out, t0, events: 0 })
    }

    fn event(&mut self, v: Value) -> Result<()> {
        if self.events > 0 {
            self.out.write_all(b",\n")?;
        }
        serde_json::to_writer(&mut self.out, &v)?;
        self.events += 1;
        Ok(())
    }

    /// Names the track of thread `tid`.
    pub fn thread_name(&mut self, tid: u64, name: &str) -> Result<()> {
        self.event(json!({"name": "thread_name", "ph": "M", "pid": 1, "tid": tid, "args": {"name": name}}))
    }

    /// Records a span on thread `tid` from `start` to `end`.
    pub fn span(&mut self, tid: u64, name: &str, start: Instant, end: Instant, args: Value) -> Result<()> {
        let ts = start.saturating_duration_since(self.t0).as_secs_f64() * 1e6;
        let dur = end.saturating_duration_since(start).as_secs_f64() * 1e6;
        self.event(json!({"name": name, "ph": "X", "pid": 1, "tid": tid, "ts": ts, "dur": dur, "args": args}))
    }

    /// Closes the JSON array and flushes the file.
    pub fn finish(mut self) -> Result<()> {
        self.out.write_all(b"\n]\n")?;
        self.out.flush()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_a_json_array_of_events() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.json");
        let t0 = Instant::now();
        let mut w = TraceWriter::create(&p, t0).unwrap();
        w.thread_name(1, "engine").unwrap();
        w.span(1, "step", t0, Instant::now(), json!({"batch": 3})).unwrap();
        w.finish().unwrap();
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        let a = v.as_array().unwrap();
        assert_eq!(a.len(), 2);
        assert_eq!(a[1]["ph"], "X");
        assert_eq!(a[1]["args"]["batch"], 3);
    }
}
