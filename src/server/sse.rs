//! Server-Sent Events for `stream: true`: one `data:` chunk per piece of text, a last
//! chunk with the finish reason, an optional usage chunk, then `data: [DONE]`.
//! Dropping the stream (the client went away) drops the engine's receiver, which frees
//! the sequence's slot before the next step.

use super::error::ApiError;
use super::openai::usage_json;
use crate::engine::scheduler::{EngineError, Event};
use axum::response::sse::Event as SseEvent;
use futures_util::stream::{self, Stream};
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::convert::Infallible;
use tokio::sync::mpsc::UnboundedReceiver;

/// Which API a stream answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `/v1/completions`.
    Completion,
    /// `/v1/chat/completions`.
    Chat,
}

struct State {
    rx: UnboundedReceiver<Event>,
    kind: Kind,
    id: String,
    created: u64,
    model: String,
    include_usage: bool,
    out: VecDeque<SseEvent>,
    ended: bool,
}

impl State {
    fn chunk(&self, text: Option<&str>, role: bool, finish: Option<&str>) -> Value {
        let choice = match self.kind {
            Kind::Completion => json!({"index": 0, "text": text.unwrap_or(""), "logprobs": null,
                "finish_reason": finish}),
            Kind::Chat => {
                let mut delta = serde_json::Map::new();
                if role {
                    delta.insert("role".into(), json!("assistant"));
                }
                if let Some(t) = text {
                    delta.insert("content".into(), json!(t));
                }
                json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish})
            }
        };
        let object = match self.kind {
            Kind::Completion => "text_completion",
            Kind::Chat => "chat.completion.chunk",
        };
        let mut v = json!({"id": self.id, "object": object, "created": self.created, "model": self.model,
            "choices": [choice]});
        if self.include_usage {
            v["usage"] = Value::Null;
        }
        v
    }

    fn push(&mut self, v: Value) {
        self.out.push_back(SseEvent::default().data(v.to_string()));
    }

    fn done(&mut self) {
        self.out.push_back(SseEvent::default().data("[DONE]"));
        self.ended = true;
    }

    /// Turns one engine event (or the end of the channel) into SSE events.
    fn on(&mut self, ev: Option<Event>) {
        match ev {
            Some(Event::Text(t)) => {
                let v = self.chunk(Some(&t), false, None);
                self.push(v);
            }
            Some(Event::Done { finish, usage }) => {
                let text = match self.kind {
                    Kind::Completion => Some(""),
                    Kind::Chat => None,
                };
                let v = self.chunk(text, false, Some(finish.as_str()));
                self.push(v);
                if self.include_usage {
                    let u = json!({"id": self.id, "object": match self.kind {
                            Kind::Completion => "text_completion", Kind::Chat => "chat.completion.chunk" },
                        "created": self.created, "model": self.model, "choices": [],
                        "usage": usage_json(usage)});
                    self.push(u);
                }
                self.done();
            }
            Some(Event::Failed(e)) => {
                let err = match e {
                    EngineError::ShuttingDown => {
                        ApiError::shutting_down("The server is shutting down; the request was cancelled")
                    }
                    EngineError::Internal(m) => ApiError::internal(m),
                };
                self.push(err.body());
                self.done();
            }
            None => {
                self.push(ApiError::internal("The engine stopped before finishing the request").body());
                self.done();
            }
        }
    }
}

/// The SSE stream of one request.
pub fn event_stream(
    rx: UnboundedReceiver<Event>,
    kind: Kind,
    id: String,
    created: u64,
    model: String,
    include_usage: bool,
) -> impl Stream<Item = Result<SseEvent, Infallible>> + Send + 'static {
    let mut st = State {
        rx,
        kind,
        id,
        created,
        model,
        include_usage,
        out: VecDeque::new(),
        ended: false,
    };
    if kind == Kind::Chat {
        // The assistant's role comes first, before any text.
        let v = st.chunk(Some(""), true, None);
        st.push(v);
    }
    stream::unfold(st, |mut st| async move {
        loop {
            if let Some(e) = st.out.pop_front() {
                return Some((Ok(e), st));
            }
            if st.ended {
                return None;
            }
            let ev = st.rx.recv().await;
            st.on(ev);
        }
    })
}
