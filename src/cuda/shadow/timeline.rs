//! A ShadowKV step's GPU timeline: the stage marks of the compute stream (and of the
//! micro-batches' own streams) and the spans of the fetch and fold streams, each a
//! timestamp the GPU writes ([`Stamps`], kernels/timeline.cu), turned into spans in
//! milliseconds from a lane's anchor stamp (read after the step), and written to a trace
//! file as a lane's GPU tracks, one per stream ([`GpuTracks`]: `bench --trace` and the
//! daemon's `trace.enabled`).

use super::stages::{ms_between, SideMark, SideWork, Stage, StageMark};
use crate::cuda::ops::CudaOps;
use crate::telemetry::trace::TraceWriter;
use anyhow::{ensure, Result};
use cudarc::driver::{CudaSlice, DevicePtr, PinnedHostSlice};
use std::cell::Cell;
use std::time::{Duration, Instant};

/// Room for one step's stamps, written by the GPU ([`CudaOps::stamp_time`]: its global
/// timer, in nanoseconds, once the work queued before on the stream is done) and copied
/// to pinned host memory at the step's end. With timing events instead (some 400 a step
/// for an 8B model's 32 layers), two lanes' timed steps ran one after the other on the
/// H200: 52 ms a step against 42 untimed at 58 × 61440 tokens, though the host queued
/// them as fast as it queues these stamps. With the stamps: 42.0 ms.
pub struct Stamps {
    dev: CudaSlice<u64>,
    host: PinnedHostSlice<u64>,
    used: Cell<usize>,
}

impl Stamps {
    /// Room for `capacity` stamps (allocated on `ops`'s stream: a step's work on other
    /// streams must come after it there).
    pub fn new(ops: &CudaOps, capacity: usize) -> Result<Self> {
        let dev = ops.device().zeros::<u64>(capacity)?;
        // SAFETY: read only after the copy of queue_read_back wrote it.
        let host = unsafe { ops.device().context().alloc_pinned_with_flags::<u64>(capacity, 0) }?;
        Ok(Stamps {
            dev,
            host,
            used: Cell::new(0),
        })
    }

    /// How many stamps it holds.
    pub fn capacity(&self) -> usize {
        self.dev.len()
    }

    /// Queues a stamp on `ops`'s stream and returns its index.
    pub fn stamp(&self, ops: &CudaOps) -> Result<usize> {
        let i = self.used.get();
        ensure!(
            i < self.capacity(),
            "a step made more than {} stage marks",
            self.capacity()
        );
        let stream = ops.device().stream();
        let (base, _guard) = self.dev.device_ptr(stream);
        ops.stamp_time(stream, base + 8 * i as u64)?;
        self.used.set(i + 1);
        Ok(i)
    }

    /// Queues the copy of the stamps made so far to the host on `ops`'s stream, which
    /// must have waited for every stream that made them.
    pub fn queue_read_back(&mut self, ops: &CudaOps) -> Result<()> {
        let n = self.used.get();
        if n > 0 {
            ops.device()
                .stream()
                .memcpy_dtoh(&self.dev.slice(0..n), &mut self.host)?;
        }
        Ok(())
    }

    /// The stamps, in nanoseconds, once the copy is done (it waits for it).
    pub fn read(&self) -> Result<&[u64]> {
        Ok(&self.host.as_slice()?[..self.used.get()])
    }

    /// Empties it for another step's stamps.
    pub fn clear(&mut self) {
        self.used.set(0);
    }
}

/// The GPU's global timer now, in nanoseconds, and the host time it stands for: a stamp
/// on a new stream (so nothing queued on the device delays it), read back at once.
pub fn gpu_clock_now(ops: &CudaOps) -> Result<(u64, Instant)> {
    let idle = ops.device().new_stream()?;
    let slot = idle.alloc_zeros::<u64>(1)?;
    {
        let (at, _guard) = slot.device_ptr(&idle);
        ops.stamp_time(&idle, at)?;
    }
    let ns = idle.clone_dtoh(&slot)?;
    Ok((ns[0], Instant::now()))
}

/// Which of a lane's streams a span ran on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamKind {
    /// The step's own stream: the model's products, selection, rebuild, attention.
    Compute,
    /// The stream the zero-copy value fetch runs on beside the rebuild.
    Fetch,
    /// The stream of micro-batch `p` (all but the last micro-batch run on one of their
    /// own: selection, rebuild and attention).
    Part(usize),
    /// The stream the fold of full windows runs on beside the next layers.
    Fold,
}

/// One span of GPU work, in milliseconds from the lane's anchor.
#[derive(Clone, Debug, PartialEq)]
pub struct GpuSpan {
    /// The stream it ran on.
    pub stream: StreamKind,
    /// The stage: `mlp` (the dense work between two layers' attention: the output
    /// projection, the MLP and the next projections; after the last layer its output
    /// projection and MLP), `append`, `scores`, `top-k`, `reuse`, `reconstruct`,
    /// `fetch`, `fetch-wait` (a stream waiting for the fetch stream), `attention`, `join`
    /// (the compute stream waiting for the micro-batches' streams), `fold`, `sample`
    /// (the step's final norm, logits and sampling).
    pub name: &'static str,
    /// The layer.
    pub layer: usize,
    /// Start, from the anchor.
    pub start_ms: f64,
    /// End, from the anchor.
    pub end_ms: f64,
}

/// The spans of one step from its stage marks, (stream tag, stage, ms) as
/// [`StageMark`]s (tag 0: the compute stream, each stage from the previous mark to its
/// own; the time before a layer's `Start` is the dense work since the last layer's
/// attention; tag p + 1: micro-batch p's stream, idle before each `Start`), and its
/// side streams' (work, layer, begin, end): a fetch per layer and micro-batch, a fold
/// per layer, all as milliseconds from the anchor. With fetch spans, a `Fetch` stage is
/// its stream's wait for them (`fetch-wait`).
pub fn spans(marks: &[(usize, Stage, f64)], sides: &[(SideWork, usize, f64, f64)]) -> Vec<GpuSpan> {
    let mut out = Vec::with_capacity(marks.len() + sides.len());
    let fetched = sides.iter().any(|s| s.0 == SideWork::Fetch);
    let streams = marks.iter().map(|m| m.0).max().map_or(0, |m| m + 1);
    for tag in 0..streams {
        let stream = if tag == 0 {
            StreamKind::Compute
        } else {
            StreamKind::Part(tag - 1)
        };
        let mine: Vec<(Stage, f64)> = marks.iter().filter(|m| m.0 == tag).map(|m| (m.1, m.2)).collect();
        let mut layer = 0usize;
        let mut started = false;
        for w in mine.windows(2) {
            let ((_, a), (stage, b)) = (w[0], w[1]);
            let name = match stage {
                Stage::Start => "mlp",
                Stage::Fetch if fetched => "fetch-wait",
                other => other.name(),
            };
            // The dense work before a layer's Start belongs to the layer before it (its
            // output projection and MLP); a micro-batch's stream is idle then.
            if stage != Stage::Start || tag == 0 {
                out.push(GpuSpan {
                    stream,
                    name,
                    layer,
                    start_ms: a,
                    end_ms: b,
                });
            }
            if stage == Stage::Start {
                if started {
                    layer += 1;
                }
            } else {
                started = true;
            }
        }
    }
    out.extend(sides.iter().map(|&(work, layer, a, b)| {
        let (stream, name) = match work {
            SideWork::Fetch => (StreamKind::Fetch, "fetch"),
            SideWork::Fold => (StreamKind::Fold, "fold"),
        };
        GpuSpan {
            stream,
            name,
            layer,
            start_ms: a,
            end_ms: b,
        }
    }));
    out
}

/// The share of the fetch stream's time that the compute streams spent computing, over
/// `spans` (one lane's): the measure of the union of the `fetch` spans intersected with
/// the union of the compute and micro-batch streams' spans other than `fetch-wait` and
/// `join` (waits are not work), over the measure of the fetch spans; `None` without fetch
/// spans. The fold stream's spans are not counted: a fold beside a `fetch-wait` does not
/// take the fetch off the step's critical path. What
/// `tools/trace` reports as the value fetch hidden behind compute.
pub fn hidden_fetch_share(spans: &[GpuSpan]) -> Option<f64> {
    let union = |pick: &dyn Fn(&GpuSpan) -> bool| {
        let mut iv: Vec<(f64, f64)> = spans
            .iter()
            .filter(|s| pick(s))
            .map(|s| (s.start_ms, s.end_ms))
            .collect();
        iv.sort_by(|a, b| a.0.total_cmp(&b.0));
        let mut out: Vec<(f64, f64)> = Vec::with_capacity(iv.len());
        for (a, b) in iv {
            match out.last_mut() {
                Some(last) if a <= last.1 => last.1 = last.1.max(b),
                _ => out.push((a, b)),
            }
        }
        out
    };
    let fetch = union(&|s| s.stream == StreamKind::Fetch && s.name == "fetch");
    let compute = union(&|s| {
        !matches!(s.stream, StreamKind::Fetch | StreamKind::Fold) && s.name != "fetch-wait" && s.name != "join"
    });
    let total: f64 = fetch.iter().map(|(a, b)| b - a).sum();
    if total <= 0.0 {
        return None;
    }
    let (mut i, mut j, mut hidden) = (0, 0, 0.0);
    while i < fetch.len() && j < compute.len() {
        let (a, b) = (fetch[i].0.max(compute[j].0), fetch[i].1.min(compute[j].1));
        if b > a {
            hidden += b - a;
        }
        if fetch[i].1 < compute[j].1 {
            i += 1;
        } else {
            j += 1;
        }
    }
    Some(hidden / total)
}

/// [`spans`] of a step's marks, their stamps `ns`, timed from the stamp `anchor_ns`
/// (made before them).
pub fn step_spans(anchor_ns: u64, marks: &[StageMark], sides: &[SideMark], ns: &[u64]) -> Vec<GpuSpan> {
    let at = |i: usize| ms_between(anchor_ns, ns[i]);
    let marks: Vec<_> = marks.iter().map(|&(t, s, i)| (t, s, at(i))).collect();
    let sides: Vec<_> = sides.iter().map(|&(w, l, a, b)| (w, l, at(a), at(b))).collect();
    spans(&marks, &sides)
}

/// Trace tracks (thread ids) a lane's GPU streams take: its compute stream, its fetch
/// stream, the streams of micro-batches 0..=12 (later micro-batches share the last,
/// where their spans may overlap) and its fold stream, last.
pub const TRACKS_PER_LANE: u64 = 16;

/// A lane's GPU tracks in a trace file, one per stream: its compute stream, its fetch
/// stream, its micro-batches' streams and its fold stream (each named once its first
/// span comes), with the host time its anchor event stands for.
pub struct GpuTracks {
    label: String,
    anchor: Instant,
    first: u64,
    named: u64,
}

impl GpuTracks {
    /// Tracks `first .. first + TRACKS_PER_LANE` named `<label> compute`, `<label>
    /// fetch`, `<label> micro-batch p` and `<label> fold`, whose spans count from the
    /// host time `anchor`;
    /// names the compute track in `w`.
    pub fn new(w: &mut TraceWriter, label: &str, first: u64, anchor: Instant) -> Result<Self> {
        w.thread_name(first, &format!("{label} compute"))?;
        Ok(GpuTracks {
            label: label.to_string(),
            anchor,
            first,
            named: 1,
        })
    }

    /// Writes `spans` (milliseconds from the anchor) to their tracks, each with its
    /// layer.
    pub fn write(&mut self, w: &mut TraceWriter, spans: &[GpuSpan]) -> Result<()> {
        let at = |ms: f64| self.anchor + Duration::from_secs_f64(ms.max(0.0) / 1e3);
        for s in spans {
            let track = match s.stream {
                StreamKind::Compute => 0,
                StreamKind::Fetch => 1,
                StreamKind::Part(p) => 2 + (p as u64).min(TRACKS_PER_LANE - 4),
                StreamKind::Fold => TRACKS_PER_LANE - 1,
            };
            if self.named & (1 << track) == 0 {
                let name = match s.stream {
                    StreamKind::Fetch => format!("{} fetch", self.label),
                    StreamKind::Fold => format!("{} fold", self.label),
                    _ => format!("{} micro-batch {}", self.label, track - 2),
                };
                w.thread_name(self.first + track, &name)?;
                self.named |= 1 << track;
            }
            w.span(
                self.first + track,
                s.name,
                at(s.start_ms),
                at(s.end_ms),
                serde_json::json!({"layer": s.layer}),
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two layers' marks; the gap before the second Start is the first layer's MLP.
    const TWO_LAYERS: [(usize, Stage, f64); 11] = [
        (0, Stage::Start, 0.0),
        (0, Stage::Append, 0.1),
        (0, Stage::Scores, 0.5),
        (0, Stage::Select, 0.6),
        (0, Stage::Reuse, 0.7),
        (0, Stage::Rebuild, 1.0),
        (0, Stage::Fetch, 1.5),
        (0, Stage::Attend, 1.6),
        (0, Stage::Fold, 1.7),
        (0, Stage::Start, 2.0),
        (0, Stage::Append, 2.1),
    ];

    #[test]
    fn stamps_become_spans_from_the_anchor() {
        // Stamps in nanoseconds, the anchor 1 ms before the first: TWO_LAYERS' times.
        let anchor = 5_000_000_000u64;
        let ns: Vec<u64> = TWO_LAYERS
            .iter()
            .map(|m| anchor + (m.2 * 1e6).round() as u64)
            .chain([anchor + 700_000, anchor + 1_500_000])
            .collect();
        let marks: Vec<StageMark> = TWO_LAYERS.iter().enumerate().map(|(i, m)| (m.0, m.1, i)).collect();
        let fetch = [(SideWork::Fetch, 0, ns.len() - 2, ns.len() - 1)];
        let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
        let want = spans(&TWO_LAYERS, &[(SideWork::Fetch, 0, 0.7, 1.5)]);
        let got = step_spans(anchor, &marks, &fetch, &ns);
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(&want) {
            assert_eq!((g.stream, g.name, g.layer), (w.stream, w.name, w.layer));
            assert!(
                close(g.start_ms, w.start_ms) && close(g.end_ms, w.end_ms),
                "{g:?} {w:?}"
            );
        }
    }

    #[test]
    fn marks_become_named_spans_per_layer() {
        let marks = TWO_LAYERS;
        let s = spans(&marks, &[(SideWork::Fetch, 0, 0.7, 1.5)]);
        let names: Vec<_> = s.iter().map(|s| (s.name, s.layer, s.stream)).collect();
        assert_eq!(names[0], ("append", 0, StreamKind::Compute));
        assert_eq!(names[1], ("scores", 0, StreamKind::Compute));
        assert_eq!(names[2], ("top-k", 0, StreamKind::Compute));
        assert_eq!(names[4], ("reconstruct", 0, StreamKind::Compute));
        assert_eq!(names[5], ("fetch-wait", 0, StreamKind::Compute));
        assert_eq!(names[8], ("mlp", 0, StreamKind::Compute));
        assert_eq!(names[9], ("append", 1, StreamKind::Compute));
        assert_eq!(names[10], ("fetch", 0, StreamKind::Fetch));
        assert_eq!((s[8].start_ms, s[8].end_ms), (1.7, 2.0));
        assert_eq!((s[10].start_ms, s[10].end_ms), (0.7, 1.5));
        // Without a fetch stream the compute stream's fetch stage is the fetch itself.
        let s = spans(&marks, &[]);
        assert_eq!(s[5].name, "fetch");
        assert_eq!(s.len(), marks.len() - 1);
        // The step's last marks: the last layer's MLP, then the sampling, both of it.
        let mut last = marks.to_vec();
        last.extend([(0, Stage::Mlp, 2.4), (0, Stage::Sample, 2.6)]);
        let s = spans(&last, &[]);
        let tail: Vec<_> = s[s.len() - 2..].iter().map(|s| (s.name, s.layer, s.start_ms)).collect();
        assert_eq!(tail, [("mlp", 1, 2.1), ("sample", 1, 2.4)]);
    }

    #[test]
    fn hidden_fetch_share_counts_fetch_time_beside_compute_not_beside_the_wait() {
        // Fetch 0.7..1.5 beside the rebuild (0.7..1.0), then the compute stream waits
        // 1.0..1.5: 0.3 of 0.8 ms hidden.
        let marks = TWO_LAYERS;
        let s = spans(&marks, &[(SideWork::Fetch, 0, 0.7, 1.5)]);
        let h = hidden_fetch_share(&s).unwrap();
        assert!((h - 0.3 / 0.8).abs() < 1e-9, "{h}");
        // Two fetches of a layer overlapping each other count once.
        let s = spans(
            &marks,
            &[(SideWork::Fetch, 0, 0.7, 1.0), (SideWork::Fetch, 0, 0.8, 1.0)],
        );
        assert!((hidden_fetch_share(&s).unwrap() - 1.0).abs() < 1e-9);
        // No fetch stream: nothing to hide.
        assert_eq!(hidden_fetch_share(&spans(&marks, &[])), None);
        // A fold on its own stream beside the wait (the last layer's, say) hides nothing.
        let marks: Vec<_> = marks.iter().copied().filter(|m| m.1 != Stage::Fold).collect();
        let s = spans(&marks, &[(SideWork::Fetch, 0, 0.7, 1.5), (SideWork::Fold, 0, 1.1, 1.3)]);
        assert!((hidden_fetch_share(&s).unwrap() - 0.3 / 0.8).abs() < 1e-9);
    }

    #[test]
    fn folds_on_their_stream_become_fold_spans_there() {
        // Layer 0 folded on the fold stream: the compute stream's marks have no Fold, so
        // its time after the attention is the layer's MLP; the fetch wait stays one.
        let marks: Vec<_> = TWO_LAYERS.iter().copied().filter(|m| m.1 != Stage::Fold).collect();
        let s = spans(&marks, &[(SideWork::Fetch, 0, 0.7, 1.5), (SideWork::Fold, 0, 1.6, 1.9)]);
        let fold: Vec<_> = s.iter().filter(|s| s.name == "fold").collect();
        assert_eq!(fold.len(), 1);
        assert_eq!((fold[0].stream, fold[0].layer), (StreamKind::Fold, 0));
        assert_eq!((fold[0].start_ms, fold[0].end_ms), (1.6, 1.9));
        let mlp = s.iter().find(|s| s.name == "mlp").unwrap();
        assert_eq!((mlp.stream, mlp.start_ms, mlp.end_ms), (StreamKind::Compute, 1.6, 2.0));
        assert!(s
            .iter()
            .any(|s| s.name == "fetch-wait" && s.stream == StreamKind::Compute));
        // Folds alone (cpu-gather: no fetch stream) leave the fetch stage the fetch.
        let s = spans(&marks, &[(SideWork::Fold, 0, 1.6, 1.9)]);
        assert!(s.iter().any(|s| s.name == "fetch" && s.stream == StreamKind::Compute));
    }

    #[test]
    fn gpu_tracks_write_each_stream_on_its_track_from_the_anchor() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.json");
        let t0 = Instant::now();
        let mut w = TraceWriter::create(&path, t0).unwrap();
        let anchor = t0 + Duration::from_millis(10);
        let mut g = GpuTracks::new(&mut w, "lane 1 GPU", 7, anchor).unwrap();
        let span = |stream, name, start_ms, end_ms| GpuSpan {
            stream,
            name,
            layer: 3,
            start_ms,
            end_ms,
        };
        g.write(&mut w, &[span(StreamKind::Compute, "scores", 1.0, 1.5)])
            .unwrap();
        g.write(&mut w, &[span(StreamKind::Fetch, "fetch", 2.0, 2.25)]).unwrap();
        g.write(&mut w, &[span(StreamKind::Fetch, "fetch", 3.0, 3.25)]).unwrap();
        g.write(&mut w, &[span(StreamKind::Fold, "fold", 3.5, 3.75)]).unwrap();
        w.finish().unwrap();
        let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let ev = v.as_array().unwrap();
        let names: Vec<(&str, u64)> = ev
            .iter()
            .filter(|e| e["ph"] == "M")
            .map(|e| (e["args"]["name"].as_str().unwrap(), e["tid"].as_u64().unwrap()))
            .collect();
        // The fetch track is named once, when its first span comes.
        assert_eq!(
            names,
            [
                ("lane 1 GPU compute", 7),
                ("lane 1 GPU fetch", 8),
                ("lane 1 GPU fold", 22)
            ]
        );
        let spans: Vec<(&str, u64, f64, f64)> = ev
            .iter()
            .filter(|e| e["ph"] == "X")
            .map(|e| {
                assert_eq!(e["args"]["layer"], 3);
                (
                    e["name"].as_str().unwrap(),
                    e["tid"].as_u64().unwrap(),
                    e["ts"].as_f64().unwrap(),
                    e["dur"].as_f64().unwrap(),
                )
            })
            .collect();
        assert_eq!(spans.len(), 4);
        let close = |a: f64, b: f64| (a - b).abs() < 0.01;
        assert!(spans[0].0 == "scores" && spans[0].1 == 7, "{spans:?}");
        assert!(close(spans[0].2, 11_000.0) && close(spans[0].3, 500.0), "{spans:?}");
        assert!(
            spans[1].0 == "fetch" && spans[1].1 == 8 && close(spans[1].2, 12_000.0),
            "{spans:?}"
        );
        assert!(close(spans[2].2, 13_000.0) && close(spans[2].3, 250.0), "{spans:?}");
        assert!(spans[3].0 == "fold" && spans[3].1 == 22, "{spans:?}");
    }
}
