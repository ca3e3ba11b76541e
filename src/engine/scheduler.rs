//! Continuous batching on an engine thread.
//!
//! Requests arrive on a channel and join the running batch between steps. Each step runs
//! one forward pass over every decoding sequence (one token each) plus prompt chunks of
//! sequences still prefilling, at most `prefill_chunk` prompt tokens per step, so long
//! prompts never stall running streams. Chunk boundaries of a prompt are always the same
//! (multiples of `prefill_chunk`), whatever else shares the step. A sequence whose
//! receiver is gone (the client disconnected) leaves the batch before the next step.

use super::backend::{BatchModel, BatchSeq};
use super::sampling::{Sampler, SamplingParams};
use super::text::{FinishReason, SeqText, StopRules};
use crate::cpu::LogitsWanted;
use crate::model::tokenizer::TextTokenizer;
use crate::telemetry::{self as tm, trace::TraceWriter};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

/// Limits of the scheduler.
#[derive(Debug, Clone, Copy)]
pub struct SchedulerConfig {
    /// Most sequences in the running batch.
    pub max_batch: usize,
    /// Most accepted requests waiting for a slot.
    pub max_queue: usize,
    /// Most tokens (prompt and generated) of one sequence.
    pub max_context: usize,
    /// Most prompt tokens prefilled per step.
    pub prefill_chunk: usize,
}

/// One request for the engine.
#[derive(Debug, Clone)]
pub struct EngineRequest {
    /// Prompt token ids (not empty, shorter than the context).
    pub prompt: Vec<u32>,
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// How to pick tokens.
    pub sampling: SamplingParams,
    /// Stop strings.
    pub stop: Vec<String>,
}

/// Token counts of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Generated tokens (a final end-of-sequence token excluded).
    pub completion_tokens: usize,
}

/// Why the engine ended a request early.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EngineError {
    /// The server is shutting down.
    ShuttingDown,
    /// The backend failed.
    Internal(String),
}

impl std::fmt::Display for EngineError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EngineError::ShuttingDown => write!(f, "the server is shutting down; the request was cancelled"),
            EngineError::Internal(m) => write!(f, "internal error: {m}"),
        }
    }
}

/// What the engine tells a request's owner.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// New final text of the completion (never empty).
    Text(String),
    /// The request is complete.
    Done {
        /// Why it ended.
        finish: FinishReason,
        /// Token counts.
        usage: Usage,
    },
    /// The request ended without completing.
    Failed(EngineError),
}

/// Why a request was not accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubmitError {
    /// Every slot and queue place is taken.
    QueueFull {
        /// Requests in the system.
        in_system: usize,
    },
    /// The server is shutting down.
    ShuttingDown,
    /// The request itself is wrong.
    Invalid(String),
}

impl std::fmt::Display for SubmitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SubmitError::QueueFull { in_system } => {
                write!(
                    f,
                    "the server is at capacity ({in_system} requests running or queued); retry later"
                )
            }
            SubmitError::ShuttingDown => write!(f, "the server is shutting down"),
            SubmitError::Invalid(m) => f.write_str(m),
        }
    }
}

enum Command {
    Submit(Job),
    Shutdown(Duration),
}

struct Job {
    req: EngineRequest,
    tx: UnboundedSender<Event>,
    arrived: Instant,
}

struct Shared {
    config: SchedulerConfig,
    tx: Mutex<Option<mpsc::Sender<Command>>>,
    in_system: AtomicUsize,
    running: AtomicUsize,
    closing: AtomicBool,
    alive: AtomicBool,
}

/// The submitting side of the engine; cheap to clone.
#[derive(Clone)]
pub struct EngineHandle {
    shared: Arc<Shared>,
}

impl EngineHandle {
    /// The scheduler's limits.
    pub fn config(&self) -> SchedulerConfig {
        self.shared.config
    }

    /// Queues a request; the receiver gets its text and its end. Dropping the receiver
    /// cancels the request.
    pub fn submit(&self, req: EngineRequest) -> Result<UnboundedReceiver<Event>, SubmitError> {
        let c = self.shared.config;
        if req.prompt.is_empty() {
            return Err(SubmitError::Invalid("the prompt is empty".into()));
        }
        if req.prompt.len() >= c.max_context {
            return Err(SubmitError::Invalid(format!(
                "the prompt has {} tokens; the context limit is {} tokens",
                req.prompt.len(),
                c.max_context
            )));
        }
        if req.max_tokens == 0 {
            return Err(SubmitError::Invalid("max_tokens must be at least 1".into()));
        }
        req.sampling
            .validate()
            .map_err(|e| SubmitError::Invalid(e.to_string()))?;
        if self.shared.closing.load(Ordering::SeqCst) || !self.shared.alive.load(Ordering::SeqCst) {
            return Err(SubmitError::ShuttingDown);
        }
        let cap = c.max_batch + c.max_queue;
        let taken = self
            .shared
            .in_system
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| (n < cap).then_some(n + 1));
        if let Err(n) = taken {
            return Err(SubmitError::QueueFull { in_system: n });
        }
        let (tx, rx) = unbounded_channel();
        let job = Job {
            req,
            tx,
            arrived: Instant::now(),
        };
        let sent = match self.shared.tx.lock().expect("engine sender lock").as_ref() {
            Some(s) => s.send(Command::Submit(job)).is_ok(),
            None => false,
        };
        if !sent {
            self.shared.in_system.fetch_sub(1, Ordering::SeqCst);
            return Err(SubmitError::ShuttingDown);
        }
        Ok(rx)
    }

    /// Requests in the system (running or queued).
    pub fn in_system(&self) -> usize {
        self.shared.in_system.load(Ordering::SeqCst)
    }

    /// Sequences in the running batch.
    pub fn running(&self) -> usize {
        self.shared.running.load(Ordering::SeqCst)
    }

    /// Whether the engine thread is running and accepting requests.
    pub fn is_serving(&self) -> bool {
        self.shared.alive.load(Ordering::SeqCst) && !self.shared.closing.load(Ordering::SeqCst)
    }

    /// Whether [`EngineHandle::shutdown`] was called (the engine may still be draining).
    pub fn is_shutting_down(&self) -> bool {
        self.shared.closing.load(Ordering::SeqCst)
    }

    /// Stops accepting requests: queued ones are cancelled at once, running ones may
    /// finish within `grace` and are cancelled after it. The engine thread then ends.
    pub fn shutdown(&self, grace: Duration) {
        self.shared.closing.store(true, Ordering::SeqCst);
        if let Some(tx) = self.shared.tx.lock().expect("engine sender lock").take() {
            let _ = tx.send(Command::Shutdown(grace));
        }
    }
}

/// Starts the engine thread. `trace`, when given, gets one span per step.
pub fn spawn_engine<M: BatchModel>(
    model: M,
    tok: Arc<TextTokenizer>,
    config: SchedulerConfig,
    trace: Option<TraceWriter>,
) -> std::io::Result<(EngineHandle, JoinHandle<()>)> {
    assert!(config.max_batch >= 1 && config.prefill_chunk >= 1 && config.max_context >= 2);
    let (tx, rx) = mpsc::channel();
    let shared = Arc::new(Shared {
        config,
        tx: Mutex::new(Some(tx)),
        in_system: AtomicUsize::new(0),
        running: AtomicUsize::new(0),
        closing: AtomicBool::new(false),
        alive: AtomicBool::new(true),
    });
    let eos = model.config().eos_token_ids.clone();
    let mut engine = Engine {
        model,
        tok,
        eos,
        config,
        rx,
        shared: shared.clone(),
        waiting: VecDeque::new(),
        running: Vec::new(),
        deadline: None,
        trace,
    };
    let join = std::thread::Builder::new().name("engine".into()).spawn(move || {
        let _alive = AliveGuard(engine.shared.clone());
        engine.run();
    })?;
    Ok((EngineHandle { shared }, join))
}

struct AliveGuard(Arc<Shared>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.alive.store(false, Ordering::SeqCst);
        self.0.running.store(0, Ordering::SeqCst);
        metrics::gauge!(tm::RUNNING).set(0.0);
        metrics::gauge!(tm::QUEUE_DEPTH).set(0.0);
    }
}

struct Seq<C> {
    prompt: Vec<u32>,
    /// Prompt tokens already in the cache.
    fed: usize,
    cache: C,
    sampler: Sampler,
    out: SeqText,
    stop: Vec<String>,
    max_tokens: usize,
    tx: UnboundedSender<Event>,
    arrived: Instant,
    last_token_at: Option<Instant>,
    /// The last sampled token, still to be fed (decoding) — `None` while prefilling.
    next: Option<[u32; 1]>,
    /// Set when the sequence must leave the batch.
    gone: bool,
}

struct Engine<M: BatchModel> {
    model: M,
    tok: Arc<TextTokenizer>,
    eos: Vec<u32>,
    config: SchedulerConfig,
    rx: mpsc::Receiver<Command>,
    shared: Arc<Shared>,
    waiting: VecDeque<Job>,
    running: Vec<Seq<M::Cache>>,
    deadline: Option<Instant>,
    trace: Option<TraceWriter>,
}

fn request_done(outcome: &'static str, arrived: Instant) {
    metrics::counter!(tm::REQUESTS, "outcome" => outcome).increment(1);
    metrics::histogram!(tm::E2E_SECONDS).record(arrived.elapsed().as_secs_f64());
}

impl<M: BatchModel> Engine<M> {
    fn run(&mut self) {
        if let Some(t) = &mut self.trace {
            let _ = t.thread_name(1, "engine");
        }
        loop {
            if !self.receive() {
                break;
            }
            if let Some(d) = self.deadline {
                if Instant::now() >= d {
                    for s in &mut self.running {
                        let _ = s.tx.send(Event::Failed(EngineError::ShuttingDown));
                        s.gone = true;
                        request_done("shutdown", s.arrived);
                    }
                }
            }
            self.drop_gone();
            self.admit();
            if !self.running.is_empty() {
                self.step();
                self.drop_gone();
            }
            self.publish();
            if self.deadline.is_some() && self.running.is_empty() && self.waiting.is_empty() {
                break;
            }
        }
        // Anything still queued (the channel closed without a shutdown) is cancelled.
        for j in self.waiting.drain(..) {
            let _ = j.tx.send(Event::Failed(EngineError::ShuttingDown));
        }
        if let Some(t) = self.trace.take() {
            if let Err(e) = t.finish() {
                tracing::warn!("writing the trace: {e:#}");
            }
        }
        tracing::info!("engine stopped");
    }

    /// Takes commands off the channel, blocking while idle. False when the engine must end.
    fn receive(&mut self) -> bool {
        let idle = self.running.is_empty() && self.waiting.is_empty();
        if idle && self.deadline.is_none() {
            match self.rx.recv() {
                Ok(c) => self.command(c),
                Err(_) => return false,
            }
        }
        loop {
            match self.rx.try_recv() {
                Ok(c) => self.command(c),
                Err(mpsc::TryRecvError::Empty) => return true,
                // Every handle is gone: finish what is in flight, then end.
                Err(mpsc::TryRecvError::Disconnected) => {
                    return self.deadline.is_some() || !self.running.is_empty() || !self.waiting.is_empty();
                }
            }
        }
    }

    fn command(&mut self, c: Command) {
        match c {
            Command::Submit(job) => {
                if self.deadline.is_some() {
                    let _ = job.tx.send(Event::Failed(EngineError::ShuttingDown));
                    self.shared.in_system.fetch_sub(1, Ordering::SeqCst);
                    request_done("shutdown", job.arrived);
                } else {
                    self.waiting.push_back(job);
                }
            }
            Command::Shutdown(grace) => {
                tracing::info!(
                    running = self.running.len(),
                    queued = self.waiting.len(),
                    "shutting down: cancelling queued requests, letting running ones finish for up to {:.1}s",
                    grace.as_secs_f64()
                );
                self.deadline = Some(Instant::now() + grace);
                for j in self.waiting.drain(..) {
                    let _ = j.tx.send(Event::Failed(EngineError::ShuttingDown));
                    self.shared.in_system.fetch_sub(1, Ordering::SeqCst);
                    request_done("shutdown", j.arrived);
                }
            }
        }
    }

    /// Removes finished, failed and disconnected sequences (and disconnected waiters).
    fn drop_gone(&mut self) {
        let before = self.waiting.len();
        self.waiting.retain(|j| {
            let keep = !j.tx.is_closed();
            if !keep {
                request_done("cancelled", j.arrived);
            }
            keep
        });
        let mut freed = before - self.waiting.len();
        let n = self.running.len();
        self.running.retain(|s| {
            if !s.gone && s.tx.is_closed() {
                request_done("cancelled", s.arrived);
                return false;
            }
            !s.gone
        });
        freed += n - self.running.len();
        if freed > 0 {
            self.shared.in_system.fetch_sub(freed, Ordering::SeqCst);
        }
    }

    fn admit(&mut self) {
        if self.deadline.is_some() {
            return;
        }
        while self.running.len() < self.config.max_batch {
            let Some(job) = self.waiting.pop_front() else { break };
            metrics::counter!(tm::PROMPT_TOKENS).increment(job.req.prompt.len() as u64);
            self.running.push(Seq {
                cache: self.model.new_cache(),
                sampler: Sampler::new(job.req.sampling),
                out: SeqText::new(),
                fed: 0,
                prompt: job.req.prompt,
                stop: job.req.stop,
                max_tokens: job.req.max_tokens,
                tx: job.tx,
                arrived: job.arrived,
                last_token_at: None,
                next: None,
                gone: false,
            });
        }
    }

    fn publish(&self) {
        let running = self.running.len();
        self.shared.running.store(running, Ordering::SeqCst);
        let queued = self.shared.in_system.load(Ordering::SeqCst).saturating_sub(running);
        metrics::gauge!(tm::RUNNING).set(running as f64);
        metrics::gauge!(tm::QUEUE_DEPTH).set(queued as f64);
        let kv: usize = self.running.iter().map(|s| self.model.cache_bytes(&s.cache)).sum();
        metrics::gauge!(tm::KV_BYTES).set(kv as f64);
        let st = self.model.stats();
        metrics::gauge!(tm::POOL_BYTES).set(st.pool_bytes as f64);
        metrics::gauge!(tm::GPU_BYTES).set(st.gpu_bytes as f64);
        metrics::gauge!(tm::REUSE_HIT_RATIO).set(st.reuse_hit_ratio);
        metrics::counter!(tm::VALUE_BYTES_FETCHED).absolute(st.value_bytes_fetched);
    }

    /// One forward pass over the batch, then sampling for every sequence that got logits.
    fn step(&mut self) {
        let t0 = Instant::now();
        let chunk = self.config.prefill_chunk;
        let mut members = Vec::with_capacity(self.running.len());
        let mut batch: Vec<BatchSeq<'_, M::Cache>> = Vec::with_capacity(self.running.len());
        let (mut prefill_tokens, mut decode_rows) = (0usize, 0usize);
        for (i, s) in self.running.iter_mut().enumerate() {
            if let Some(t) = &s.next {
                batch.push(BatchSeq {
                    tokens: t,
                    cache: &mut s.cache,
                    logits: LogitsWanted::Last,
                });
                decode_rows += 1;
            } else {
                let n = (s.prompt.len() - s.fed).min(chunk);
                if prefill_tokens > 0 && prefill_tokens + n > chunk {
                    continue;
                }
                prefill_tokens += n;
                let last = s.fed + n == s.prompt.len();
                batch.push(BatchSeq {
                    tokens: &s.prompt[s.fed..s.fed + n],
                    cache: &mut s.cache,
                    logits: if last { LogitsWanted::Last } else { LogitsWanted::None },
                });
            }
            members.push(i);
        }
        let result = self.model.forward(&mut batch);
        drop(batch);
        let t1 = Instant::now();
        let stage = if prefill_tokens > 0 { "prefill" } else { "decode" };
        metrics::histogram!(tm::STAGE_SECONDS, "stage" => stage).record((t1 - t0).as_secs_f64());
        metrics::histogram!(tm::BATCH_TOKENS).record((prefill_tokens + decode_rows) as f64);
        let logits = match result {
            Ok(l) => l,
            Err(e) => {
                tracing::error!("forward pass failed: {e:#}");
                for &i in &members {
                    let s = &mut self.running[i];
                    let _ = s.tx.send(Event::Failed(EngineError::Internal(format!("{e:#}"))));
                    s.gone = true;
                    request_done("error", s.arrived);
                }
                return;
            }
        };
        let mut generated = 0u64;
        for (&i, row) in members.iter().zip(&logits) {
            let s = &mut self.running[i];
            if s.next.is_none() {
                let n = (s.prompt.len() - s.fed).min(chunk);
                s.fed += n;
                if s.fed < s.prompt.len() {
                    continue;
                }
                if let Err(e) = self.model.finish_prefill(&mut s.cache) {
                    tracing::error!("finishing a prefill failed: {e:#}");
                    let _ = s.tx.send(Event::Failed(EngineError::Internal(format!("{e:#}"))));
                    s.gone = true;
                    request_done("error", s.arrived);
                    continue;
                }
            }
            let id = s.sampler.sample(row);
            let now = Instant::now();
            match s.last_token_at {
                None => metrics::histogram!(tm::TTFT_SECONDS).record((now - s.arrived).as_secs_f64()),
                Some(t) => metrics::histogram!(tm::ITL_SECONDS).record((now - t).as_secs_f64()),
            }
            s.last_token_at = Some(now);
            generated += 1;
            let rules = StopRules {
                eos: &self.eos,
                stop: &s.stop,
                max_tokens: s.max_tokens,
            };
            let full = self.model.cache_len(&s.cache) >= self.config.max_context;
            let finish = match s.out.push(id, &self.tok, &rules, full) {
                Ok(f) => f,
                Err(e) => {
                    let _ = s.tx.send(Event::Failed(EngineError::Internal(format!("{e:#}"))));
                    s.gone = true;
                    request_done("error", s.arrived);
                    continue;
                }
            };
            s.next = Some([id]);
            let delta = s.out.take_stream_delta(&s.stop);
            if !delta.is_empty() && s.tx.send(Event::Text(delta)).is_err() {
                s.gone = true;
                request_done("cancelled", s.arrived);
                continue;
            }
            if let Some(finish) = finish {
                let usage = Usage {
                    prompt_tokens: s.prompt.len(),
                    completion_tokens: s.out.completion_len(),
                };
                let _ = s.tx.send(Event::Done { finish, usage });
                s.gone = true;
                request_done("completed", s.arrived);
            }
        }
        metrics::counter!(tm::GENERATED_TOKENS).increment(generated);
        let t2 = Instant::now();
        metrics::histogram!(tm::STAGE_SECONDS, "stage" => "sample").record((t2 - t1).as_secs_f64());
        metrics::histogram!(tm::STAGE_SECONDS, "stage" => "step").record((t2 - t0).as_secs_f64());
        if let Some(tr) = &mut self.trace {
            let args = serde_json::json!({"sequences": members.len(), "prefill_tokens": prefill_tokens,
                "decode_rows": decode_rows});
            let _ = tr.span(1, stage, t0, t1, args);
            let _ = tr.span(1, "sample", t1, t2, serde_json::json!({"tokens": generated}));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::CpuModel;
    use crate::engine::generate::{generate, GenerateOptions, GenerateRequest};
    use crate::model::load::open_model;
    use crate::model::weights::ModelWeights;

    fn tiny() -> (CpuModel, TextTokenizer) {
        let m = open_model("synthetic:tiny@5").unwrap();
        let w = ModelWeights::load(&m.config, m.source.as_ref(), false).unwrap();
        (CpuModel::new(m.config.clone(), w), m.tokenizer)
    }

    fn collect(mut rx: UnboundedReceiver<Event>) -> (String, FinishReason, Usage) {
        let mut text = String::new();
        loop {
            match rx.blocking_recv().expect("engine ended the stream") {
                Event::Text(t) => text.push_str(&t),
                Event::Done { finish, usage } => return (text, finish, usage),
                Event::Failed(e) => panic!("request failed: {e}"),
            }
        }
    }

    #[test]
    fn batched_requests_equal_each_alone() {
        let (model, tok) = tiny();
        let (reference, _) = tiny();
        let tok = Arc::new(tok);
        let config = SchedulerConfig {
            max_batch: 4,
            max_queue: 8,
            max_context: 256,
            prefill_chunk: 7,
        };
        let (engine, join) = spawn_engine(model, tok.clone(), config, None).unwrap();
        let reqs: Vec<EngineRequest> = (0..7)
            .map(|i| EngineRequest {
                prompt: tok.encode(&"word ".repeat(1 + 5 * i), true).unwrap(),
                max_tokens: 3 + 2 * i,
                sampling: SamplingParams::default(),
                stop: vec![],
            })
            .collect();
        let rxs: Vec<_> = reqs.iter().map(|r| engine.submit(r.clone()).unwrap()).collect();
        for (r, rx) in reqs.iter().zip(rxs) {
            let (text, finish, usage) = collect(rx);
            let alone = GenerateRequest {
                prompt: r.prompt.clone(),
                max_tokens: r.max_tokens,
                sampling: r.sampling,
                stop: vec![],
            };
            let (g, _) = generate(&reference, &tok, &[alone], GenerateOptions::default()).unwrap();
            assert_eq!(text, g[0].text);
            assert_eq!(finish, g[0].finish);
            assert_eq!(usage.completion_tokens, g[0].completion_ids.len());
            assert_eq!(usage.prompt_tokens, r.prompt.len());
        }
        engine.shutdown(Duration::ZERO);
        join.join().unwrap();
        assert!(matches!(engine.submit(reqs[0].clone()), Err(SubmitError::ShuttingDown)));
    }

    #[test]
    fn full_queue_is_refused_and_dropped_receivers_free_slots() {
        let (model, tok) = tiny();
        let tok = Arc::new(tok);
        let config = SchedulerConfig {
            max_batch: 1,
            max_queue: 1,
            max_context: 4096,
            prefill_chunk: 64,
        };
        let (engine, join) = spawn_engine(model, tok.clone(), config, None).unwrap();
        let long = EngineRequest {
            prompt: tok.encode("a b c", true).unwrap(),
            max_tokens: 4000,
            sampling: SamplingParams::default(),
            stop: vec![],
        };
        let a = engine.submit(long.clone()).unwrap();
        let b = engine.submit(long.clone()).unwrap();
        assert_eq!(
            engine.submit(long.clone()).unwrap_err(),
            SubmitError::QueueFull { in_system: 2 }
        );
        drop(a);
        drop(b);
        let t0 = Instant::now();
        while engine.in_system() > 0 {
            assert!(t0.elapsed() < Duration::from_secs(30), "slots were not freed");
            std::thread::sleep(Duration::from_millis(5));
        }
        let short = EngineRequest { max_tokens: 2, ..long };
        let (_, finish, usage) = collect(engine.submit(short).unwrap());
        assert_eq!((finish, usage.completion_tokens), (FinishReason::Length, 2));
        let bad = EngineRequest {
            prompt: vec![],
            max_tokens: 1,
            sampling: SamplingParams::default(),
            stop: vec![],
        };
        assert!(matches!(engine.submit(bad), Err(SubmitError::Invalid(_))));
        engine.shutdown(Duration::ZERO);
        join.join().unwrap();
    }
}
