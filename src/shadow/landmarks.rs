//! Chunk landmarks (mean post-RoPE key per chunk and KV head), their 8-bit storage, and
//! outlier chunks (the chunks whose keys their landmark represents worst).

use crate::cpu::codes8;

/// Landmarks `[chunks, kv_heads·d]` of the first `chunks·chunk_size` rows of `k`
/// (post-RoPE keys, `[tokens, kv_heads·d]`).
pub fn landmarks(k: &[f32], chunks: usize, chunk_size: usize, kvd: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; chunks * kvd];
    for (c, l) in out.chunks_exact_mut(kvd).enumerate() {
        for t in 0..chunk_size {
            let row = &k[(c * chunk_size + t) * kvd..(c * chunk_size + t + 1) * kvd];
            l.iter_mut().zip(row).for_each(|(a, b)| *a += b);
        }
        l.iter_mut().for_each(|a| *a /= chunk_size as f32);
    }
    out
}

/// Landmarks stored in 8 bits ([`codes8`]): each (chunk, KV head) vector of `d` values
/// as codes and one scale, so the landmark is `code · s`. The scores read every landmark
/// at every step; codes halve what bf16 would read.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Marks8 {
    /// Codes `[chunks, kv_heads·d]`.
    pub codes: Vec<i8>,
    /// Scales `[chunks, kv_heads]`.
    pub scales: Vec<f32>,
}

impl Marks8 {
    /// The codes and scales of `marks` (`[chunks, kv_heads·d]`, from [`landmarks`]).
    pub fn quantize(marks: &[f32], head_dim: usize) -> Marks8 {
        let mut codes = vec![0i8; marks.len()];
        let scales = marks
            .chunks_exact(head_dim)
            .zip(codes.chunks_exact_mut(head_dim))
            .map(|(v, q)| codes8::quantize(v, q))
            .collect();
        Marks8 { codes, scales }
    }

    /// Appends `more`'s chunks after this one's.
    pub fn append(&mut self, more: Marks8) {
        self.codes.extend(more.codes);
        self.scales.extend(more.scales);
    }

    /// Bytes held (codes and scales).
    pub fn bytes(&self) -> usize {
        self.codes.len() + 4 * self.scales.len()
    }
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    if na == 0.0 || nb == 0.0 {
        return 1.0;
    }
    dot / (na * nb)
}

/// For each KV head (`[kv_heads][chunks]`), each chunk's minimum cosine similarity
/// between its landmark and its keys (a zero vector has cosine 1).
pub fn min_cosines(k: &[f32], marks: &[f32], chunk_size: usize, kv_heads: usize, head_dim: usize) -> Vec<Vec<f32>> {
    let kvd = kv_heads * head_dim;
    let chunks = marks.len() / kvd;
    (0..kv_heads)
        .map(|h| {
            let cols = h * head_dim..(h + 1) * head_dim;
            (0..chunks)
                .map(|c| {
                    let l = &marks[c * kvd..][cols.clone()];
                    (0..chunk_size)
                        .map(|t| cosine(l, &k[(c * chunk_size + t) * kvd..][cols.clone()]))
                        .fold(f32::INFINITY, f32::min)
                })
                .collect()
        })
        .collect()
}

/// For each KV head, the `count` chunks with the lowest minimum cosine similarity
/// between the landmark and the chunk's keys ([`min_cosines`]), ties to the lower id,
/// ascending by chunk id.
pub fn outlier_chunks(
    k: &[f32],
    marks: &[f32],
    chunk_size: usize,
    kv_heads: usize,
    head_dim: usize,
    count: usize,
) -> Vec<Vec<u32>> {
    min_cosines(k, marks, chunk_size, kv_heads, head_dim)
        .into_iter()
        .map(|mins| {
            let mut worst: Vec<(f32, u32)> = mins.into_iter().zip(0u32..).collect();
            worst.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
            let mut ids: Vec<u32> = worst.into_iter().take(count).map(|(_, c)| c).collect();
            ids.sort_unstable();
            ids
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn landmark_is_the_chunk_mean_and_a_scattered_chunk_is_an_outlier() {
        // 3 chunks of 2 tokens, 1 head of dim 2. Chunk 1's keys point in opposite directions.
        let k = [1.0, 0.0, 1.0, 0.2, 1.0, 1.0, -1.0, 1.0, 0.0, 1.0, 0.1, 1.0];
        let m = landmarks(&k, 3, 2, 2);
        assert_eq!(&m[..2], &[1.0, 0.1]);
        assert_eq!(&m[2..4], &[0.0, 1.0]);
        assert_eq!(outlier_chunks(&k, &m, 2, 1, 2, 1), vec![vec![1]]);
        assert_eq!(outlier_chunks(&k, &m, 2, 1, 2, 5), vec![vec![0, 1, 2]]);
    }

    #[test]
    fn codes_keep_each_vector_within_half_a_step_of_its_scale() {
        // Two chunks of two heads of dim 3; the second head of chunk 1 is zero.
        let m = [1.0, -0.5, 0.25, 254.0, 1.0, -127.0, -0.1, 0.0, 0.3, 0.0, 0.0, 0.0];
        let q = Marks8::quantize(&m, 3);
        assert_eq!(q.scales, vec![1.0 / 127.0, 2.0, 0.3 / 127.0, 0.0]);
        // 0.5 and 1.0 / 2 round to even: 64 (63.5), 0 (0.5).
        assert_eq!(&q.codes[..6], &[127, -64, 32, 127, 0, -64]);
        assert_eq!(&q.codes[9..], &[0, 0, 0]);
        for (v, (c, s)) in m.chunks(3).zip(q.codes.chunks(3).zip(&q.scales)) {
            for (x, &k) in v.iter().zip(c) {
                assert!((x - k as f32 * s).abs() <= 0.5 * s * (1.0 + 1e-6), "{x} vs {k} x {s}");
            }
        }
        let mut two = q.clone();
        two.append(q.clone());
        assert_eq!((two.codes.len(), two.scales.len(), two.bytes()), (24, 8, 24 + 32));
    }
}
