//! Chunk selection: score every landmark against the query heads of a GQA group,
//! `softmax_c(q_h · L_c / √d)` per head, max over the group, and keep the top k.

use crate::cpu::ops::softmax;

/// Where one KV head's landmarks live (8-bit, [`crate::shadow::landmarks::Marks8`]).
#[derive(Clone, Copy, Debug)]
pub struct HeadMarks<'a> {
    /// Codes `[chunks, kv_heads·d]` of all heads.
    pub codes: &'a [i8],
    /// Scales `[chunks, kv_heads]` of all heads.
    pub scales: &'a [f32],
    /// KV heads.
    pub kv_heads: usize,
    /// This head.
    pub head: usize,
    /// Head dimension.
    pub head_dim: usize,
}

/// Per-chunk scores of one KV head: the max over the group's query heads `q`
/// (`[group, d]`) of each head's softmax over the candidate chunks. Excluded chunks
/// (outliers) score `-inf`. A logit is `(q_h · codes) · s_c / √d`.
pub fn chunk_scores(q: &[f32], m: HeadMarks, excluded: &[bool]) -> Vec<f32> {
    let d = m.head_dim;
    let kvd = m.kv_heads * d;
    let chunks = m.scales.len() / m.kv_heads;
    let scale = 1.0 / (d as f32).sqrt();
    let mut best = vec![f32::NEG_INFINITY; chunks];
    let mut row = vec![0.0f32; chunks];
    for qh in q.chunks_exact(d) {
        for (c, s) in row.iter_mut().enumerate() {
            *s = if excluded[c] {
                f32::NEG_INFINITY
            } else {
                let l = &m.codes[c * kvd + m.head * d..][..d];
                let dot = qh.iter().zip(l).map(|(a, &b)| a * b as f32).sum::<f32>();
                dot * m.scales[c * m.kv_heads + m.head] * scale
            };
        }
        softmax(&mut row);
        for (b, &s) in best.iter_mut().zip(&row) {
            if !s.is_nan() && s > *b {
                *b = s;
            }
        }
    }
    for (b, &e) in best.iter_mut().zip(excluded) {
        if e {
            *b = f32::NEG_INFINITY;
        }
    }
    best
}

/// The `k` best-scoring non-excluded chunks, ascending by id (ties go to the lower id).
pub fn top_k(scores: &[f32], excluded: &[bool], k: usize) -> Vec<u32> {
    let mut cand: Vec<u32> = (0..scores.len() as u32).filter(|&c| !excluded[c as usize]).collect();
    if k < cand.len() {
        let by_score = |a: &u32, b: &u32| scores[*b as usize].total_cmp(&scores[*a as usize]).then(a.cmp(b));
        cand.select_nth_unstable_by(k, by_score);
        cand.truncate(k);
    }
    cand.sort_unstable();
    cand
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn top_k_matches_brute_force() {
        let seed = rand::random();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        for _ in 0..200 {
            let n = rng.random_range(1..60);
            // Few distinct values so ties are common.
            let scores: Vec<f32> = (0..n).map(|_| rng.random_range(0..8) as f32).collect();
            let excluded: Vec<bool> = (0..n).map(|_| rng.random_bool(0.2)).collect();
            let k = rng.random_range(0..n + 3);
            let mut all: Vec<u32> = (0..n as u32).filter(|&c| !excluded[c as usize]).collect();
            all.sort_by(|a, b| scores[*b as usize].total_cmp(&scores[*a as usize]).then(a.cmp(b)));
            all.truncate(k);
            all.sort_unstable();
            assert_eq!(top_k(&scores, &excluded, k), all, "seed {seed}");
        }
    }

    #[test]
    fn scores_take_the_max_over_the_group() {
        // Two query heads of dim 2; chunk 0 matches head 0, chunk 2 matches head 1.
        let codes = [4, 0, 0, 0, 0, 4, 0, 0];
        let m = HeadMarks {
            codes: &codes,
            scales: &[1.0; 4],
            kv_heads: 1,
            head: 0,
            head_dim: 2,
        };
        let q = [1.0, 0.0, 0.0, 1.0];
        let s = chunk_scores(&q, m, &[false, false, false, true]);
        assert!(s[0] > s[1] && s[2] > s[1] && s[3] == f32::NEG_INFINITY);
        assert_eq!(top_k(&s, &[false, false, false, true], 2), vec![0, 2]);
    }
}
