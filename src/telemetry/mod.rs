//! Metrics and traces. The metric names live here so the engine, the server and the
//! documentation agree; [`install_prometheus`] installs the process-wide recorder whose
//! text rendering `/metrics` serves.

pub mod trace;

use anyhow::{Context, Result};
use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Per-stage latency histogram, label `stage`: `prefill` (steps that carry prompt
/// tokens), `decode` (decode-only steps), `step` (every step: from when its lane could
/// start it to its end, sampling included), `output` (the host work after a step:
/// detokenising, stop strings, streaming; on the GPU it overlaps the next step).
pub const STAGE_SECONDS: &str = "shadowkv_stage_seconds";
/// Time from a request's arrival to its first generated token.
pub const TTFT_SECONDS: &str = "shadowkv_time_to_first_token_seconds";
/// Time between consecutive generated tokens of one sequence.
pub const ITL_SECONDS: &str = "shadowkv_inter_token_latency_seconds";
/// Time from a request's arrival to its end (any outcome).
pub const E2E_SECONDS: &str = "shadowkv_request_duration_seconds";
/// Requests accepted but not yet running.
pub const QUEUE_DEPTH: &str = "shadowkv_queue_depth";
/// Sequences in the running batch.
pub const RUNNING: &str = "shadowkv_running_sequences";
/// Tokens in the running batch's last step.
pub const BATCH_TOKENS: &str = "shadowkv_step_tokens";
/// Prompt tokens of admitted requests.
pub const PROMPT_TOKENS: &str = "shadowkv_prompt_tokens_total";
/// Tokens generated.
pub const GENERATED_TOKENS: &str = "shadowkv_generated_tokens_total";
/// Requests by outcome (label `outcome`: `completed`, `cancelled`, `rejected`,
/// `queue_full`, `shutdown`, `error`, `unauthorized`: a missing or wrong API key).
pub const REQUESTS: &str = "shadowkv_requests_total";
/// Bytes held by the KV caches of running sequences.
pub const KV_BYTES: &str = "shadowkv_kv_cache_bytes";
/// Bytes of host value pools in use (ShadowKV).
pub const POOL_BYTES: &str = "shadowkv_pool_bytes";
/// Accelerator memory in use.
pub const GPU_BYTES: &str = "shadowkv_gpu_memory_bytes";
/// Value bytes fetched from host memory (ShadowKV).
pub const VALUE_BYTES_FETCHED: &str = "shadowkv_value_bytes_fetched_total";
/// Share of selected value chunks already resident (ShadowKV reuse cache).
pub const REUSE_HIT_RATIO: &str = "shadowkv_reuse_hit_ratio";

/// Share of the time an actor thread spent handling messages since the previous
/// reading (label `actor`, e.g. `gather-0`; published every 5 s).
pub const ACTOR_BUSY_RATIO: &str = "shadowkv_actor_busy_ratio";
/// Messages waiting in an actor's inbox (label `actor`).
pub const ACTOR_INBOX_DEPTH: &str = "shadowkv_actor_inbox_depth";

/// Every metric name, for documentation and tests.
pub const ALL: &[&str] = &[
    STAGE_SECONDS,
    TTFT_SECONDS,
    ITL_SECONDS,
    E2E_SECONDS,
    QUEUE_DEPTH,
    RUNNING,
    BATCH_TOKENS,
    PROMPT_TOKENS,
    GENERATED_TOKENS,
    REQUESTS,
    KV_BYTES,
    POOL_BYTES,
    GPU_BYTES,
    VALUE_BYTES_FETCHED,
    REUSE_HIT_RATIO,
    ACTOR_BUSY_RATIO,
    ACTOR_INBOX_DEPTH,
];

/// Histogram buckets of the latency metrics, in seconds.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

/// Installs the process-wide Prometheus recorder and registers every metric (at zero)
/// so that all names appear in `/metrics` from the start.
pub fn install_prometheus() -> Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
        .context("latency buckets")?
        .set_buckets_for_metric(
            Matcher::Full(BATCH_TOKENS.into()),
            &[
                1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0,
            ],
        )
        .context("batch buckets")?
        .install_recorder()
        .context("installing the metrics recorder")?;
    describe();
    for stage in ["prefill", "decode", "step", "output"] {
        let _ = metrics::histogram!(STAGE_SECONDS, "stage" => stage);
    }
    for h in [TTFT_SECONDS, ITL_SECONDS, E2E_SECONDS, BATCH_TOKENS] {
        let _ = metrics::histogram!(h);
    }
    for g in [QUEUE_DEPTH, RUNNING, KV_BYTES, POOL_BYTES, GPU_BYTES, REUSE_HIT_RATIO] {
        metrics::gauge!(g).set(0.0);
    }
    for c in [PROMPT_TOKENS, GENERATED_TOKENS, VALUE_BYTES_FETCHED] {
        metrics::counter!(c).increment(0);
    }
    for outcome in [
        "completed",
        "cancelled",
        "rejected",
        "queue_full",
        "shutdown",
        "error",
        "unauthorized",
    ] {
        metrics::counter!(REQUESTS, "outcome" => outcome).increment(0);
    }
    Ok(handle)
}

fn describe() {
    describe_histogram!(
        STAGE_SECONDS,
        Unit::Seconds,
        "Latency of engine stages (label stage: prefill, decode, step, output; with ShadowKV on the GPU also \
         the GPU time of select, reuse, reconstruct, fetch, transfer, attention, append, mlp, sample, fold \
         and join, from GPU timestamps, and with cpu-gather the gather jobs' time)"
    );
    describe_histogram!(
        TTFT_SECONDS,
        Unit::Seconds,
        "Time from arrival to the first generated token"
    );
    describe_histogram!(
        ITL_SECONDS,
        Unit::Seconds,
        "Time between consecutive tokens of a sequence"
    );
    describe_histogram!(E2E_SECONDS, Unit::Seconds, "Time from arrival to the end of a request");
    describe_histogram!(BATCH_TOKENS, Unit::Count, "Tokens run through the model in one step");
    describe_gauge!(QUEUE_DEPTH, Unit::Count, "Accepted requests waiting to join the batch");
    describe_gauge!(RUNNING, Unit::Count, "Sequences in the running batch");
    describe_gauge!(
        KV_BYTES,
        Unit::Bytes,
        "Bytes held by the KV caches of running sequences"
    );
    describe_gauge!(POOL_BYTES, Unit::Bytes, "Bytes of host value pools in use (ShadowKV)");
    describe_gauge!(GPU_BYTES, Unit::Bytes, "Accelerator memory in use");
    describe_gauge!(
        REUSE_HIT_RATIO,
        Unit::Count,
        "Share of selected value chunks already resident (ShadowKV)"
    );
    describe_gauge!(
        ACTOR_BUSY_RATIO,
        Unit::Count,
        "Share of the last 5 s an actor thread spent handling messages (label actor)"
    );
    describe_gauge!(
        ACTOR_INBOX_DEPTH,
        Unit::Count,
        "Messages waiting in an actor's inbox (label actor)"
    );
    describe_counter!(PROMPT_TOKENS, Unit::Count, "Prompt tokens of admitted requests");
    describe_counter!(GENERATED_TOKENS, Unit::Count, "Generated tokens");
    describe_counter!(
        VALUE_BYTES_FETCHED,
        Unit::Bytes,
        "Value bytes fetched from host memory (ShadowKV)"
    );
    describe_counter!(REQUESTS, Unit::Count, "Requests by outcome");
}
