//! The generation loop on the GPU: chunked prefill per request, then batched decode
//! steps (replayed from CUDA graphs) with the tokens sampled on the device, until each
//! sequence meets EOS, a stop string, its token limit or the model's context.

use super::generate::{prefill_bar, push_text, validate_requests, GenerateOptions, GenerateRequest};
use super::generate::{GenerateStats, Generation};
use super::text::{FinishReason, SeqText};
use crate::cpu::model::chunked_prefill;
use crate::cpu::LogitsWanted;
use crate::cuda::step::sampling_row;
use crate::cuda::{CudaModel, GpuCache, GpuSeq, StepGraphs};
use crate::model::tokenizer::TextTokenizer;
use anyhow::{bail, Result};
use std::time::Instant;

struct Active {
    cache: GpuCache,
    seed: u64,
    out: SeqText,
}

/// Runs every request to completion as one batch on the GPU; `graphs` captures decode
/// steps as CUDA graphs. Full attention only.
pub fn generate_cuda(
    model: &CudaModel,
    tok: &TextTokenizer,
    reqs: &[GenerateRequest],
    opts: GenerateOptions,
    graphs: bool,
) -> Result<(Vec<Generation>, GenerateStats)> {
    if opts.attention != crate::shadow::Attention::Full {
        bail!("the CUDA backend runs full attention only (ShadowKV runs on the CPU backend for now)");
    }
    let cfg = model.config();
    let ctx = cfg.max_position_embeddings;
    validate_requests(reqs, ctx)?;
    let eos = cfg.eos_token_ids.as_slice();
    let mut stats = GenerateStats::default();
    let total: usize = reqs.iter().map(|r| r.prompt.len()).sum();
    let bar = prefill_bar(opts, total);
    let mut graphs = StepGraphs::new(graphs);
    let mut seqs = Vec::with_capacity(reqs.len());
    let t0 = Instant::now();
    for r in reqs {
        let cap = (r.prompt.len() + r.max_tokens).min(ctx);
        let mut s = Active {
            cache: model.new_cache(cap)?,
            seed: r.sampling.seed.unwrap_or_else(rand::random),
            out: SeqText::new(),
        };
        let row = [sampling_row(&r.sampling, s.seed, 0)];
        let first = chunked_prefill(
            &r.prompt,
            opts.prefill_chunk,
            |n| bar.inc(n as u64),
            |part, logits| {
                let mut one = [GpuSeq {
                    tokens: part,
                    cache: &mut s.cache,
                    logits,
                }];
                model.step(&mut one, &row, &mut graphs)
            },
        )?;
        let full = s.cache.len() >= s.cache.capacity();
        push_text(&mut s.out, first[0], r, tok, eos, full)?;
        seqs.push(s);
    }
    bar.finish_and_clear();
    stats.prefill_tokens = total;
    stats.prefill_secs = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    loop {
        let live: Vec<usize> = (0..seqs.len()).filter(|&i| seqs[i].out.finish().is_none()).collect();
        if live.is_empty() {
            break;
        }
        let last: Vec<[u32; 1]> = live
            .iter()
            .map(|&i| [*seqs[i].out.ids().last().expect("has a token")])
            .collect();
        let rows: Vec<[u64; 5]> = live
            .iter()
            .map(|&i| sampling_row(&reqs[i].sampling, seqs[i].seed, seqs[i].out.ids().len() as u64))
            .collect();
        let mut inputs: Vec<GpuSeq> = seqs
            .iter_mut()
            .filter(|s| s.out.finish().is_none())
            .zip(&last)
            .map(|(s, t)| GpuSeq {
                tokens: t,
                cache: &mut s.cache,
                logits: LogitsWanted::Last,
            })
            .collect();
        let next = model.step(&mut inputs, &rows, &mut graphs)?;
        drop(inputs);
        for (&i, &id) in live.iter().zip(&next) {
            let s = &mut seqs[i];
            let full = s.cache.len() >= s.cache.capacity();
            push_text(&mut s.out, id, &reqs[i], tok, eos, full)?;
            stats.decode_tokens += 1;
        }
    }
    stats.decode_secs = t1.elapsed().as_secs_f64();
    let out = seqs
        .into_iter()
        .map(|s| Generation {
            completion_ids: s.out.completion_ids(),
            finish: s.out.finish().unwrap_or(FinishReason::Length),
            text: s.out.into_text(),
        })
        .collect();
    Ok((out, stats))
}
