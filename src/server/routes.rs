//! The HTTP handlers.

use super::error::ApiError;
use super::openai::{parse_body, prepare_chat, prepare_completion, usage_json, Prepared, RequestBody};
use super::sse::{event_stream, Kind};
use super::AppState;
use crate::engine::scheduler::{EngineError, Event, SubmitError, Usage};
use crate::engine::text::FinishReason;
use crate::telemetry as tm;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{header, Method, StatusCode, Uri};
use axum::response::sse::{KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;

type St = State<Arc<AppState>>;

fn rejected(e: ApiError) -> Response {
    let outcome = if e.status == StatusCode::TOO_MANY_REQUESTS {
        "queue_full"
    } else if e.status == StatusCode::SERVICE_UNAVAILABLE {
        "shutdown"
    } else if e.status.is_server_error() {
        "error"
    } else {
        "rejected"
    };
    metrics::counter!(tm::REQUESTS, "outcome" => outcome).increment(1);
    e.into_response()
}

fn body_bytes(body: Result<Bytes, BytesRejection>, limit: usize) -> Result<Bytes, ApiError> {
    body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::status(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("The request body is larger than {limit} bytes"),
                "request_too_large",
            )
        } else {
            ApiError::bad_request(format!("Cannot read the request body: {e}"), "invalid_body")
        }
    })
}

/// `POST /v1/completions`.
pub async fn completions(State(st): St, body: Result<Bytes, BytesRejection>) -> Response {
    match prepare(&st, body, prepare_completion).await {
        Ok(p) => run(st, p, Kind::Completion).await,
        Err(e) => rejected(e),
    }
}

/// `POST /v1/chat/completions`.
pub async fn chat_completions(State(st): St, body: Result<Bytes, BytesRejection>) -> Response {
    match prepare(&st, body, prepare_chat).await {
        Ok(p) => run(st, p, Kind::Chat).await,
        Err(e) => rejected(e),
    }
}

/// Parses a request body and tokenizes its prompt on a blocking thread: a long prompt
/// takes seconds to tokenize, which on the runtime's threads would stall every other
/// request (`/health` among them). At most [`AppState::preparing`] at once; none once
/// the server drains.
async fn prepare(
    st: &Arc<AppState>,
    body: Result<Bytes, BytesRejection>,
    prep: fn(&RequestBody, &AppState) -> Result<Prepared, ApiError>,
) -> Result<Prepared, ApiError> {
    let bytes = body_bytes(body, st.max_request_bytes)?;
    let draining = || ApiError::shutting_down("The server is shutting down");
    if st.engine.is_shutting_down() {
        return Err(draining());
    }
    let _slot = st.preparing.acquire().await.map_err(|_| draining())?;
    if st.engine.is_shutting_down() {
        return Err(draining());
    }
    let st = Arc::clone(st);
    match tokio::task::spawn_blocking(move || parse_body(&bytes).and_then(|b| prep(&b, &st))).await {
        Ok(prepared) => prepared,
        Err(e) => {
            tracing::error!("preparing a request failed: {e}");
            Err(ApiError::internal("The server failed to prepare the request"))
        }
    }
}

/// Submits to the engine and answers, streamed or whole.
async fn run(st: Arc<AppState>, p: Prepared, kind: Kind) -> Response {
    let prompt_tokens = p.req.prompt.len();
    let rx = match st.engine.submit(p.req) {
        Ok(rx) => rx,
        Err(SubmitError::QueueFull { in_system }) => {
            return rejected(ApiError::queue_full(
                format!(
                    "The server is at capacity ({in_system} requests running or queued, limit {}); retry later",
                    st.capacity
                ),
                st.retry_after_secs(),
            ))
        }
        Err(SubmitError::ShuttingDown) => return rejected(ApiError::shutting_down("The server is shutting down")),
        Err(SubmitError::Invalid(m)) => return rejected(ApiError::bad_request(m, "invalid_value")),
    };
    let id = st.next_id(kind);
    // `created` is when the request was taken, streamed or whole alike.
    let created = st.created_now();
    if p.stream {
        let stream = event_stream(rx, kind, id, created, st.model_name.clone(), p.include_usage);
        return Sse::new(stream)
            .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
            .into_response();
    }
    let mut rx = rx;
    let mut text = String::new();
    let (finish, usage) = loop {
        match rx.recv().await {
            Some(Event::Text(t)) => text.push_str(&t),
            Some(Event::Done { finish, usage }) => break (finish, usage),
            Some(Event::Failed(EngineError::ShuttingDown)) => {
                return ApiError::shutting_down("The server is shutting down; the request was cancelled")
                    .into_response()
            }
            Some(Event::Failed(e)) => return ApiError::internal(e.to_string()).into_response(),
            None => {
                return ApiError::internal(format!(
                    "The engine stopped before finishing the request ({prompt_tokens} prompt tokens)"
                ))
                .into_response()
            }
        }
    };
    Json(whole_response(kind, &id, created, &st.model_name, &text, finish, usage)).into_response()
}

fn whole_response(
    kind: Kind,
    id: &str,
    created: u64,
    model: &str,
    text: &str,
    finish: FinishReason,
    usage: Usage,
) -> Value {
    match kind {
        Kind::Completion => json!({
            "id": id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": null, "finish_reason": finish.as_str()}],
            "usage": usage_json(usage),
        }),
        Kind::Chat => json!({
            "id": id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                "logprobs": null, "finish_reason": finish.as_str()}],
            "usage": usage_json(usage),
        }),
    }
}

fn model_card(st: &AppState) -> Value {
    json!({"id": st.model_name, "object": "model", "created": st.started_unix, "owned_by": "shadowkv",
        "max_model_len": st.max_context})
}

/// `GET /v1/models`.
pub async fn models(State(st): St) -> Json<Value> {
    Json(json!({"object": "list", "data": [model_card(&st)]}))
}

/// `GET /v1/models/{id}`.
pub async fn model(State(st): St, Path(id): Path<String>) -> Response {
    if id == st.model_name {
        Json(model_card(&st)).into_response()
    } else {
        ApiError::model_not_found(&id, &st.model_name).into_response()
    }
}

/// `GET /health`: 200 `ok` while serving; 503 `shutting_down` while running requests
/// drain after a signal, `unavailable` if the engine has stopped otherwise.
pub async fn health(State(st): St) -> Response {
    let status = if st.engine.is_serving() {
        "ok"
    } else if st.engine.is_shutting_down() {
        "shutting_down"
    } else {
        "unavailable"
    };
    let body = json!({"status": status,
        "model": st.model_name, "running": st.engine.running(),
        "queued": st.engine.in_system().saturating_sub(st.engine.running())});
    if st.engine.is_serving() {
        Json(body).into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
    }
}

/// `GET /metrics`: Prometheus text format.
pub async fn metrics(State(st): St) -> Response {
    match &st.metrics {
        Some(h) => (
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
            h.render(),
        )
            .into_response(),
        None => ApiError::status(StatusCode::NOT_FOUND, "Metrics are not enabled", "not_found").into_response(),
    }
}

/// Unknown routes.
pub async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::status(
        StatusCode::NOT_FOUND,
        format!("No route for {method} {}", uri.path()),
        "not_found",
    )
}

/// Known routes with the wrong method.
pub async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::status(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{method} is not allowed on {}", uri.path()),
        "method_not_allowed",
    )
}
