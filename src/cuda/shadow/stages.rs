//! The stages of a ShadowKV decode step as its timing names them, the marks a timed step
//! makes on its streams, and the milliseconds per stage they give
//! ([`super::timeline::Stamps`] holds the stamps the GPU writes).

/// A stage mark: the step's stream it was made on (0: the step's own; p + 1: that of
/// micro-batch p), the stage that ends there, and its stamp's index in the step's
/// [`super::timeline::Stamps`].
pub type StageMark = (usize, Stage, usize);

/// Work a step runs on a side stream of its lane's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SideWork {
    /// The zero-copy value fetch, beside the key rebuild.
    Fetch,
    /// The fold of full windows, beside the next layers.
    Fold,
}

/// Work on a side stream: which, its layer, and the indices of the stamps at its begin
/// and end.
pub type SideMark = (SideWork, usize, usize, usize);

/// The stages of a ShadowKV decode layer, as the stage timing names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stage {
    /// The layer's work begins (no stage ends here).
    Start,
    /// The qkv split and the append to the recent window.
    Append,
    /// Landmark logits and each tile's softmax statistics.
    Scores,
    /// The scores (the softmax of the logits) and their top-k.
    Select,
    /// The reuse diff.
    Reuse,
    /// The key rebuild of the misses (and the copy of those found in the GPU value tier).
    Rebuild,
    /// The value fetch of the misses (zero-copy, or cpu-gather's copy and scatter).
    Fetch,
    /// Flash-decoding over the attended rows.
    Attend,
    /// The step's stream waiting for the micro-batches on streams of their own.
    Join,
    /// The fold of full windows.
    Fold,
    /// The dense work after the last layer's attention: its output projection and MLP.
    /// (Between two layers, the same work and the next layer's projections end at the
    /// next layer's `Start`, which [`stage_ms`] counts as `Mlp`.)
    Mlp,
    /// The final norm, the output head's logits and the sampling.
    Sample,
    /// The values' way to the GPU: zero-copy, the fetch kernel's time on the fetch
    /// stream; otherwise (cpu-gather, or zero-copy without a fetch stream) the `Fetch`
    /// stage's. Never marked: [`stage_ms`] derives it.
    Transfer,
}

impl Stage {
    /// The stage's name (metrics and benchmark labels).
    pub fn name(self) -> &'static str {
        match self {
            Stage::Start => "start",
            Stage::Append => "append",
            Stage::Scores => "scores",
            Stage::Select => "top-k",
            Stage::Reuse => "reuse",
            Stage::Rebuild => "reconstruct",
            Stage::Fetch => "fetch",
            Stage::Attend => "attention",
            Stage::Join => "join",
            Stage::Fold => "fold",
            Stage::Mlp => "mlp",
            Stage::Sample => "sample",
            Stage::Transfer => "transfer",
        }
    }
}

/// Milliseconds of GPU time per stage, from a step's marks (on each stream, each stage
/// from the previous mark to its own; `Start` marks open a layer, and on the step's own
/// stream the time before one is the dense work since the layer before: `Mlp`) and its
/// side streams' spans (`Fold` and the fetch's `Transfer`, begin to end), their stamps
/// `ns`. Without fetch spans `Transfer` is the `Fetch` stage. Stages that ran at once on
/// several streams count on each.
pub fn stage_ms(marks: &[StageMark], sides: &[SideMark], ns: &[u64]) -> Vec<(Stage, f64)> {
    let mut out: Vec<(Stage, f64)> = Vec::new();
    let mut add = |stage: Stage, a: usize, b: usize| {
        let ms = stamp_ms(ns, a, b);
        match out.iter_mut().find(|(s, _)| *s == stage) {
            Some((_, t)) => *t += ms,
            None => out.push((stage, ms)),
        }
    };
    let fetched = sides.iter().any(|s| s.0 == SideWork::Fetch);
    let streams = marks.iter().map(|m| m.0).max().map_or(0, |m| m + 1);
    for tag in 0..streams {
        let mine: Vec<_> = marks.iter().filter(|m| m.0 == tag).collect();
        for w in mine.windows(2) {
            let (_, _, a) = w[0];
            let (_, stage, b) = w[1];
            match *stage {
                // A micro-batch's stream is idle before its layer starts.
                Stage::Start if tag == 0 => add(Stage::Mlp, *a, *b),
                Stage::Start => {}
                Stage::Fetch if !fetched => {
                    add(Stage::Fetch, *a, *b);
                    add(Stage::Transfer, *a, *b);
                }
                other => add(other, *a, *b),
            }
        }
    }
    for &(kind, _, a, b) in sides {
        match kind {
            SideWork::Fold => add(Stage::Fold, a, b),
            SideWork::Fetch => add(Stage::Transfer, a, b),
        }
    }
    out
}

/// The most stage marks a step of `layers` layers in `parts` micro-batches makes: a
/// layer's on the step's stream (its start, append, join and fold) and its fold's two,
/// each micro-batch's (start, scores, top-k, reuse, rebuild, the attention's two passes
/// and the fetch between them) with its fetch's two on the fetch stream, and the step's
/// last two (the last layer's MLP, the sampling).
pub fn stage_marks_bound(layers: usize, parts: usize) -> usize {
    layers * (4 + 2 + parts * (8 + 2)) + 2
}

/// Milliseconds from stamp `a` to stamp `b` of `ns` (negative where `b` came first).
pub fn stamp_ms(ns: &[u64], a: usize, b: usize) -> f64 {
    ms_between(ns[a], ns[b])
}

/// Milliseconds from the stamp `from` to the stamp `to` (nanoseconds; negative where
/// `to` came first).
pub fn ms_between(from: u64, to: u64) -> f64 {
    (to as f64 - from as f64) / 1e6
}

#[cfg(test)]
mod tests {
    use super::{stage_marks_bound, stage_ms, stamp_ms, SideWork, Stage};

    /// The milliseconds `got` gives stage `s`, if any.
    fn ms_of(got: &[(Stage, f64)], s: Stage) -> Option<f64> {
        got.iter().find(|(g, _)| *g == s).map(|(_, m)| *m)
    }

    /// Whether `a` is there and within 1e-9 of `b`.
    fn close_to(a: Option<f64>, b: f64) -> bool {
        a.is_some_and(|a| (a - b).abs() < 1e-9)
    }

    #[test]
    fn stage_times_come_from_the_stamps_of_each_stream() {
        // Stamps (ns): the compute stream 0..4, micro-batch 0's stream 4..7, a fold.
        let ns = [
            0, 1_000_000, 3_000_000, 3_500_000, 500_000, 2_500_000, 2_750_000, 3_000_000, 3_250_000, 3_100_000,
        ];
        let marks = [
            (0, Stage::Start, 0),
            (0, Stage::Append, 1),
            (0, Stage::Join, 2),
            (0, Stage::Start, 3),
            (1, Stage::Start, 4),
            (1, Stage::Scores, 5),
            (1, Stage::Attend, 6),
            (1, Stage::Fetch, 9),
        ];
        let sides = [(SideWork::Fold, 0, 7, 8), (SideWork::Fetch, 0, 4, 6)];
        let got = stage_ms(&marks, &sides, &ns);
        let (ms, close) = (|s: Stage| ms_of(&got, s), close_to);
        assert!(close(ms(Stage::Append), 1.0) && close(ms(Stage::Join), 2.0), "{got:?}");
        assert!(
            close(ms(Stage::Scores), 2.0) && close(ms(Stage::Attend), 0.25),
            "{got:?}"
        );
        // The fold from its side stream, the fetch's side span as the transfer; a Start
        // ends no stage of its own: on the compute stream the time before it is the
        // dense work (Mlp), on a micro-batch's stream idle time.
        assert!(
            close(ms(Stage::Fold), 0.25) && close(ms(Stage::Transfer), 2.25),
            "{got:?}"
        );
        assert!(close(ms(Stage::Mlp), 0.5), "{got:?}");
        // With a fetch stream, a stream's fetch stage is its wait, not the transfer.
        assert!(close(ms(Stage::Fetch), 0.35), "{got:?}");
        assert!(ms(Stage::Start).is_none(), "{got:?}");
        assert_eq!(got.len(), 8, "{got:?}");
        // A step's marks stay within their bound: 12 here, of 18 for 1 layer of 1
        // micro-batch.
        assert_eq!(stage_marks_bound(1, 1), 18);
        assert!(marks.len() + 2 * sides.len() <= stage_marks_bound(1, 1));
    }

    #[test]
    fn the_step_s_last_marks_and_a_fetch_without_its_own_stream() {
        // One layer on the compute stream: its stages, the fetch on that stream (no
        // fetch stream: the fetch is the transfer), the last layer's MLP, the sampling.
        let ns = [0, 1_000_000, 2_000_000, 4_000_000, 5_000_000, 7_000_000, 7_500_000];
        let marks = [
            (0, Stage::Start, 0),
            (0, Stage::Rebuild, 1),
            (0, Stage::Fetch, 2),
            (0, Stage::Attend, 3),
            (0, Stage::Mlp, 4),
            (0, Stage::Sample, 5),
            (0, Stage::Start, 6),
        ];
        let got = stage_ms(&marks, &[], &ns);
        let (ms, close) = (|s: Stage| ms_of(&got, s), close_to);
        assert!(
            close(ms(Stage::Fetch), 1.0) && close(ms(Stage::Transfer), 1.0),
            "{got:?}"
        );
        assert!(close(ms(Stage::Sample), 2.0), "{got:?}");
        // The MLP after the last layer and the dense work before the next Start.
        assert!(close(ms(Stage::Mlp), 1.0 + 0.5), "{got:?}");
        assert_eq!(Stage::Mlp.name(), "mlp");
        assert_eq!(Stage::Sample.name(), "sample");
        assert_eq!(Stage::Transfer.name(), "transfer");
    }

    #[test]
    fn milliseconds_between_stamps_either_way() {
        let ns = [1_000_000_000_000, 1_000_000_100_000];
        assert!((stamp_ms(&ns, 0, 1) - 0.1).abs() < 1e-12);
        assert!((stamp_ms(&ns, 1, 0) + 0.1).abs() < 1e-12);
    }
}
