//! A ShadowKV step's GPU timeline: the stage marks of the compute stream and the fetch
//! spans of the fetch stream, turned into spans in milliseconds from a lane's anchor
//! event (for `bench --trace`; the events are the stage timing's, read after the step).

use super::decode::Stage;
use anyhow::Result;
use cudarc::driver::CudaEvent;

/// Which of a lane's streams a span ran on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamKind {
    /// The step's own stream: the model's products, selection, rebuild, attention.
    Compute,
    /// The stream the zero-copy value fetch runs on beside the rebuild.
    Fetch,
}

/// One span of GPU work, in milliseconds from the lane's anchor.
#[derive(Clone, Debug, PartialEq)]
pub struct GpuSpan {
    /// The stream it ran on.
    pub stream: StreamKind,
    /// The stage: `mlp` (the dense work between two layers' attention: the output
    /// projection, the MLP and the next projections), `append`, `scores`, `top-k`,
    /// `reuse`, `reconstruct`, `fetch`, `fetch-wait` (the compute stream waiting for the
    /// fetch stream), `attention`, `fold`.
    pub name: &'static str,
    /// The layer.
    pub layer: usize,
    /// Start, from the anchor.
    pub start_ms: f64,
    /// End, from the anchor.
    pub end_ms: f64,
}

/// The spans of one step from its compute-stream marks (each stage from the previous
/// mark to its own; the time before a layer's `Start` is the dense work since the last
/// layer's attention) and its fetch-stream (begin, end) pairs, one per layer, all as
/// milliseconds from the anchor. With fetch spans, the compute stream's `Fetch` stage is
/// its wait for them (`fetch-wait`).
pub fn spans(marks: &[(Stage, f64)], fetches: &[(f64, f64)]) -> Vec<GpuSpan> {
    let mut out = Vec::with_capacity(marks.len() + fetches.len());
    let mut layer = 0usize;
    let mut started = false;
    for w in marks.windows(2) {
        let ((_, a), (stage, b)) = (w[0], w[1]);
        let name = match stage {
            Stage::Start => "mlp",
            Stage::Fetch if !fetches.is_empty() => "fetch-wait",
            other => other.name(),
        };
        // The dense work before a layer's Start belongs to the layer before it (its
        // output projection and MLP).
        out.push(GpuSpan {
            stream: StreamKind::Compute,
            name,
            layer,
            start_ms: a,
            end_ms: b,
        });
        if stage == Stage::Start {
            if started {
                layer += 1;
            }
        } else {
            started = true;
        }
    }
    out.extend(fetches.iter().enumerate().map(|(l, &(a, b))| GpuSpan {
        stream: StreamKind::Fetch,
        name: "fetch",
        layer: l,
        start_ms: a,
        end_ms: b,
    }));
    out
}

/// [`spans`] of a step's events, timed from `anchor` (recorded before them).
pub fn step_spans(
    anchor: &CudaEvent,
    marks: &[(Stage, CudaEvent)],
    fetches: &[(CudaEvent, CudaEvent)],
) -> Result<Vec<GpuSpan>> {
    let at = |e: &CudaEvent| -> Result<f64> { Ok(anchor.elapsed_ms(e)? as f64) };
    let marks = marks
        .iter()
        .map(|(s, e)| Ok((*s, at(e)?)))
        .collect::<Result<Vec<_>>>()?;
    let fetches = fetches
        .iter()
        .map(|(a, b)| Ok((at(a)?, at(b)?)))
        .collect::<Result<Vec<_>>>()?;
    Ok(spans(&marks, &fetches))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_become_named_spans_per_layer() {
        use Stage::*;
        // Two layers; the gap before the second Start is the first layer's MLP.
        let marks = [
            (Start, 0.0),
            (Append, 0.1),
            (Scores, 0.5),
            (Select, 0.6),
            (Reuse, 0.7),
            (Rebuild, 1.0),
            (Fetch, 1.5),
            (Attend, 1.6),
            (Fold, 1.7),
            (Start, 2.0),
            (Append, 2.1),
        ];
        let s = spans(&marks, &[(0.7, 1.5)]);
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
    }
}
