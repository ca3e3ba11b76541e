//! The OpenAI-compatible HTTP server (axum): routes, request checks, SSE streaming and
//! errors. The engine thread does the work; handlers only parse, tokenize, submit and
//! relay.

pub mod auth;
pub mod error;
pub mod openai;
pub mod routes;
pub mod sse;

use crate::engine::scheduler::EngineHandle;
use crate::model::chat::ChatTemplate;
use crate::model::tokenizer::TextTokenizer;
use auth::ApiKeys;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use sse::Kind;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// What the handlers share.
pub struct AppState {
    /// The engine.
    pub engine: EngineHandle,
    /// The model's tokenizer.
    pub tok: Arc<TextTokenizer>,
    /// Its chat template, if any.
    pub chat_template: Option<ChatTemplate>,
    /// The id clients name in `model`.
    pub model_name: String,
    /// Vocabulary size (token ids in prompts must be below it).
    pub vocab_size: usize,
    /// Most tokens of a request, prompt included.
    pub max_context: usize,
    /// Requests the server holds at once (batch + queue).
    pub capacity: usize,
    /// Largest request body.
    pub max_request_bytes: usize,
    /// Rendering of `/metrics`.
    pub metrics: Option<PrometheusHandle>,
    /// Unix time the server started.
    pub started_unix: u64,
    /// Requests being parsed and tokenized at once (one per core): a burst of long
    /// prompts waits here rather than tokenizing all together.
    pub preparing: tokio::sync::Semaphore,
    ids: AtomicU64,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl AppState {
    /// Shared state for the handlers.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        engine: EngineHandle,
        tok: Arc<TextTokenizer>,
        chat_template: Option<ChatTemplate>,
        model_name: String,
        vocab_size: usize,
        max_request_bytes: usize,
        metrics: Option<PrometheusHandle>,
    ) -> Self {
        let c = engine.config();
        AppState {
            max_context: c.max_context,
            capacity: c.max_batch + c.max_queue,
            engine,
            tok,
            chat_template,
            model_name,
            vocab_size,
            max_request_bytes,
            metrics,
            started_unix: unix_now(),
            preparing: tokio::sync::Semaphore::new(std::thread::available_parallelism().map_or(2, |n| n.get()).max(2)),
            ids: AtomicU64::new(0),
        }
    }

    /// A response id, unique within this process.
    pub fn next_id(&self, kind: Kind) -> String {
        let n = self.ids.fetch_add(1, Ordering::Relaxed);
        let prefix = match kind {
            Kind::Completion => "cmpl",
            Kind::Chat => "chatcmpl",
        };
        format!("{prefix}-{:x}{n:06x}", self.started_unix)
    }

    /// `created` of a response.
    pub fn created_now(&self) -> u64 {
        unix_now()
    }

    /// Seconds a client turned away with 429 should wait.
    pub fn retry_after_secs(&self) -> u64 {
        1
    }
}

/// The API router (with `/metrics`); with `keys` set, `/v1/*` and `/metrics` need one.
pub fn router(state: Arc<AppState>, keys: ApiKeys) -> Router {
    let limit = state.max_request_bytes;
    Router::new()
        .route("/v1/completions", post(routes::completions))
        .route("/v1/chat/completions", post(routes::chat_completions))
        .route("/v1/models", get(routes::models))
        .route("/v1/models/{id}", get(routes::model))
        .route("/health", get(routes::health))
        .route("/metrics", get(routes::metrics))
        .fallback(routes::not_found)
        .method_not_allowed_fallback(routes::method_not_allowed)
        .layer(DefaultBodyLimit::max(limit))
        .layer(axum::middleware::from_fn_with_state(keys, auth::require_key))
        .with_state(state)
}

/// A router serving only `/metrics` (for `server.metrics_listen`), open to all.
pub fn metrics_router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/metrics", get(routes::metrics))
        .fallback(routes::not_found)
        .with_state(state)
}
