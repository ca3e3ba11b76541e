//! Request bodies of the OpenAI API and their checks. Every rejection names the field.

use super::error::ApiError;
use super::AppState;
use crate::engine::sampling::SamplingParams;
use crate::engine::scheduler::{EngineRequest, Usage};
use crate::model::chat::ChatMessage;
use crate::topology::plain_serde_message;
use serde::Deserialize;
use serde_json::Value;

/// `stream_options`.
#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    /// Send a last chunk with the token counts.
    pub include_usage: Option<bool>,
}

/// The fields of `/v1/completions` and `/v1/chat/completions` (unknown ones are ignored).
#[derive(Debug, Default, Deserialize)]
pub struct RequestBody {
    /// Model id; must be the served one when given.
    pub model: Option<String>,
    /// Completions: a string, `[string]`, token ids, or `[[token ids]]`.
    pub prompt: Option<Value>,
    /// Chat: the conversation.
    pub messages: Option<Value>,
    /// Most tokens to generate.
    pub max_tokens: Option<i64>,
    /// Chat: newer name of `max_tokens`.
    pub max_completion_tokens: Option<i64>,
    /// Sampling temperature (default 1; 0 is greedy).
    pub temperature: Option<f64>,
    /// Nucleus sampling mass.
    pub top_p: Option<f64>,
    /// Keep the k most likely tokens (0 or -1: all).
    pub top_k: Option<i64>,
    /// Seed for repeatable sampling.
    pub seed: Option<i64>,
    /// A stop string or a list of them.
    pub stop: Option<Value>,
    /// Choices per request (only 1).
    pub n: Option<i64>,
    /// Stream Server-Sent Events.
    pub stream: Option<bool>,
    /// Streaming options.
    pub stream_options: Option<StreamOptions>,
    /// Unsupported unless false.
    pub echo: Option<bool>,
    /// Unsupported unless absent or false/0.
    pub logprobs: Option<Value>,
    /// Unsupported unless absent or 0.
    pub top_logprobs: Option<i64>,
    /// Unsupported unless 1.
    pub best_of: Option<i64>,
    /// Unsupported.
    pub suffix: Option<Value>,
    /// Unsupported unless 0.
    pub presence_penalty: Option<f64>,
    /// Unsupported unless 0.
    pub frequency_penalty: Option<f64>,
    /// Unsupported unless empty.
    pub logit_bias: Option<Value>,
    /// Unsupported unless empty.
    pub tools: Option<Value>,
    /// Only `{"type": "text"}`.
    pub response_format: Option<Value>,
}

/// Parses a request body, naming the field of a type error.
pub fn parse_body(bytes: &[u8]) -> Result<RequestBody, ApiError> {
    let v: Value = serde_json::from_slice(bytes)
        .map_err(|e| ApiError::bad_request(format!("The request body is not valid JSON: {e}"), "invalid_json"))?;
    if !v.is_object() {
        return Err(ApiError::bad_request(
            "The request body must be a JSON object",
            "invalid_json",
        ));
    }
    serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        let inner = plain_serde_message(&e.into_inner().to_string());
        ApiError::invalid(path.clone(), format!("Invalid value for `{path}`: {inner}")).with_code("invalid_type")
    })
}

/// What a request asks the engine for, after checks.
#[derive(Debug)]
pub struct Prepared {
    /// The engine's request.
    pub req: EngineRequest,
    /// Stream the answer.
    pub stream: bool,
    /// Send usage in the stream.
    pub include_usage: bool,
}

/// `param` (and `what` of it, when given) is not supported.
fn unsupported(param: &str, what: &str) -> ApiError {
    let what = if what.is_empty() {
        String::new()
    } else {
        format!(" {what}")
    };
    ApiError::invalid(param, format!("`{param}`{what} is not supported by this server")).with_code("unsupported")
}

/// Checks the sampling, stop, n, stream and unsupported fields.
fn common(b: &RequestBody, st: &AppState) -> Result<(SamplingParams, Vec<String>, bool, bool), ApiError> {
    if let Some(m) = &b.model {
        if m != &st.model_name {
            return Err(ApiError::model_not_found(m, &st.model_name));
        }
    }
    match b.n {
        None | Some(1) => {}
        Some(n) if n < 1 => return Err(ApiError::invalid("n", format!("`n` must be at least 1, got {n}"))),
        Some(n) => {
            return Err(ApiError::invalid(
                "n",
                format!("`n` = {n} is not supported: this server returns one choice per request (n = 1); send {n} requests instead"),
            )
            .with_code("unsupported"))
        }
    }
    let temperature = b.temperature.unwrap_or(1.0);
    // The engine samples in f32: a temperature past its range would become infinite.
    if !(0.0..=f64::from(f32::MAX)).contains(&temperature) {
        return Err(ApiError::invalid(
            "temperature",
            format!(
                "`temperature` must be a number from 0 to {:e}, got {temperature}",
                f32::MAX
            ),
        ));
    }
    let top_p = b.top_p.unwrap_or(1.0);
    if !(top_p.is_finite() && top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid(
            "top_p",
            format!("`top_p` must be in (0, 1], got {top_p}"),
        ));
    }
    let top_k = match b.top_k {
        None | Some(-1) => 0,
        Some(k) if k < 0 => {
            return Err(ApiError::invalid(
                "top_k",
                format!("`top_k` must be >= 0 (or -1 for no limit), got {k}"),
            ))
        }
        Some(k) => k as usize,
    };
    let stop = match &b.stop {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => {
            if a.len() > 4 {
                return Err(ApiError::invalid(
                    "stop",
                    format!("`stop` takes at most 4 strings, got {}", a.len()),
                ));
            }
            let mut out = Vec::new();
            for (i, s) in a.iter().enumerate() {
                match s {
                    Value::String(s) => out.push(s.clone()),
                    _ => {
                        return Err(ApiError::invalid(
                            format!("stop[{i}]"),
                            format!("`stop[{i}]` must be a string"),
                        ))
                    }
                }
            }
            out
        }
        Some(_) => {
            return Err(ApiError::invalid(
                "stop",
                "`stop` must be a string or a list of strings",
            ))
        }
    };
    if b.echo == Some(true) {
        return Err(unsupported("echo", "= true"));
    }
    match &b.logprobs {
        None | Some(Value::Null) | Some(Value::Bool(false)) => {}
        Some(Value::Number(n)) if n.as_i64() == Some(0) => {}
        Some(_) => return Err(unsupported("logprobs", "")),
    }
    if b.top_logprobs.is_some_and(|n| n != 0) {
        return Err(unsupported("top_logprobs", ""));
    }
    if b.best_of.is_some_and(|n| n != 1) {
        return Err(unsupported("best_of", "other than 1"));
    }
    if b.suffix.as_ref().is_some_and(|s| !s.is_null()) {
        return Err(unsupported("suffix", ""));
    }
    if b.presence_penalty.is_some_and(|p| p != 0.0) {
        return Err(unsupported("presence_penalty", "other than 0"));
    }
    if b.frequency_penalty.is_some_and(|p| p != 0.0) {
        return Err(unsupported("frequency_penalty", "other than 0"));
    }
    let non_empty = |v: &Option<Value>| match v {
        None | Some(Value::Null) => false,
        Some(Value::Object(o)) => !o.is_empty(),
        Some(Value::Array(a)) => !a.is_empty(),
        Some(_) => true,
    };
    if non_empty(&b.logit_bias) {
        return Err(unsupported("logit_bias", ""));
    }
    if non_empty(&b.tools) {
        return Err(unsupported("tools", "(function calling)"));
    }
    if let Some(rf) = &b.response_format {
        if !rf.is_null() && rf.get("type").and_then(|t| t.as_str()) != Some("text") {
            return Err(unsupported("response_format", "other than {\"type\": \"text\"}"));
        }
    }
    let stream = b.stream.unwrap_or(false);
    if b.stream_options.is_some() && !stream {
        return Err(ApiError::invalid(
            "stream_options",
            "`stream_options` is only allowed when `stream` is true",
        ));
    }
    let include_usage = b.stream_options.as_ref().and_then(|o| o.include_usage).unwrap_or(false);
    let sampling = SamplingParams {
        temperature: temperature as f32,
        top_k,
        top_p: top_p as f32,
        seed: b.seed.map(|s| s as u64),
    };
    Ok((sampling, stop, stream, include_usage))
}

/// Checks the prompt length and `max_tokens` against the context; `default_max` applies
/// when the request gives none.
fn budget(
    param: &str,
    prompt_len: usize,
    asked: Option<(&str, i64)>,
    default_max: Option<usize>,
    max_context: usize,
) -> Result<usize, ApiError> {
    if prompt_len == 0 {
        return Err(ApiError::invalid(param, format!("`{param}` must not be empty")));
    }
    // "the prompt has", "the messages have"
    let has = if param.ends_with('s') { "have" } else { "has" };
    if prompt_len >= max_context {
        return Err(ApiError::invalid(
            param,
            format!(
                "This server's maximum context length is {max_context} tokens, but the {param} {has} \
                 {prompt_len} tokens (at least one more is needed to generate). Shorten the {param}."
            ),
        )
        .with_code("context_length_exceeded"));
    }
    let room = max_context - prompt_len;
    match asked {
        Some((name, m)) => {
            if m < 1 {
                return Err(ApiError::invalid(name, format!("`{name}` must be at least 1, got {m}")));
            }
            let m = m as u64;
            if m > room as u64 {
                return Err(ApiError::invalid(
                    name,
                    format!(
                        "`{name}` = {m} is too large: the {param} {has} {prompt_len} tokens and this server's \
                         maximum context length is {max_context} tokens, so at most {room} can be generated"
                    ),
                )
                .with_code("context_length_exceeded"));
            }
            Ok(m as usize)
        }
        None => Ok(default_max.unwrap_or(room).min(room)),
    }
}

/// Checks a `/v1/completions` body and tokenizes its prompt.
pub fn prepare_completion(b: &RequestBody, st: &AppState) -> Result<Prepared, ApiError> {
    let (sampling, stop, stream, include_usage) = common(b, st)?;
    let vocab = st.vocab_size;
    let ids_of = |a: &[Value], param: &str| -> Result<Vec<u32>, ApiError> {
        a.iter()
            .enumerate()
            .map(|(i, v)| match v.as_u64() {
                Some(t) if (t as usize) < vocab => Ok(t as u32),
                _ => Err(ApiError::invalid(
                    format!("{param}[{i}]"),
                    format!("`{param}[{i}]` must be a token id below {vocab}"),
                )),
            })
            .collect()
    };
    let encode = |s: &str| {
        if s.is_empty() {
            return Ok(Vec::new());
        }
        st.tok
            .encode(s, true)
            .map_err(|e| ApiError::invalid("prompt", format!("cannot tokenize `prompt`: {e:#}")))
    };
    let prompt = match &b.prompt {
        None | Some(Value::Null) => return Err(ApiError::invalid("prompt", "`prompt` is required")),
        Some(Value::String(s)) => encode(s)?,
        Some(Value::Array(a)) if a.is_empty() => {
            return Err(ApiError::invalid("prompt", "`prompt` must not be empty"));
        }
        Some(Value::Array(a)) if a.iter().all(|v| v.is_number()) => ids_of(a, "prompt")?,
        Some(Value::Array(a)) if a.len() == 1 => match &a[0] {
            Value::String(s) => encode(s)?,
            Value::Array(ids) if ids.iter().all(|v| v.is_number()) => ids_of(ids, "prompt[0]")?,
            _ => {
                return Err(ApiError::invalid(
                    "prompt[0]",
                    "`prompt[0]` must be a string or a list of token ids",
                ))
            }
        },
        Some(Value::Array(a)) if a.iter().all(|v| v.is_string() || v.is_array()) => {
            return Err(ApiError::invalid(
                "prompt",
                format!(
                    "`prompt` holds {} prompts; this server takes one prompt per request",
                    a.len()
                ),
            )
            .with_code("unsupported"));
        }
        Some(_) => {
            return Err(ApiError::invalid(
                "prompt",
                "`prompt` must be a string, a list of token ids, or a list holding one of those",
            ))
        }
    };
    let asked = b.max_tokens.map(|m| ("max_tokens", m));
    let max_tokens = budget("prompt", prompt.len(), asked, Some(16), st.max_context)?;
    Ok(Prepared {
        req: EngineRequest {
            prompt,
            max_tokens,
            sampling,
            stop,
        },
        stream,
        include_usage,
    })
}

/// Text of a message's `content`: a string, or a list of `{"type": "text", "text"}` parts.
fn content_text(v: &Value, param: &str) -> Result<String, ApiError> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Null => Ok(String::new()),
        Value::Array(parts) => {
            let mut out = String::new();
            for (i, p) in parts.iter().enumerate() {
                let p_param = format!("{param}[{i}]");
                match (
                    p.get("type").and_then(|t| t.as_str()),
                    p.get("text").and_then(|t| t.as_str()),
                ) {
                    (Some("text"), Some(t)) => out.push_str(t),
                    (Some(other), _) if other != "text" => {
                        return Err(ApiError::invalid(
                            p_param,
                            format!("content parts of type `{other}` are not supported (text only)"),
                        )
                        .with_code("unsupported"))
                    }
                    _ => {
                        return Err(ApiError::invalid(
                            p_param.clone(),
                            format!("`{p_param}` must be {{\"type\": \"text\", \"text\": string}}"),
                        ))
                    }
                }
            }
            Ok(out)
        }
        _ => Err(ApiError::invalid(
            param,
            format!("`{param}` must be a string or a list of text parts"),
        )),
    }
}

/// Checks a `/v1/chat/completions` body and renders its messages through the chat template.
pub fn prepare_chat(b: &RequestBody, st: &AppState) -> Result<Prepared, ApiError> {
    let (sampling, stop, stream, include_usage) = common(b, st)?;
    let msgs = match &b.messages {
        None | Some(Value::Null) => return Err(ApiError::invalid("messages", "`messages` is required")),
        Some(Value::Array(a)) if a.is_empty() => {
            return Err(ApiError::invalid(
                "messages",
                "`messages` must hold at least one message",
            ))
        }
        Some(Value::Array(a)) => a,
        Some(_) => return Err(ApiError::invalid("messages", "`messages` must be a list of messages")),
    };
    let mut chat = Vec::with_capacity(msgs.len());
    for (i, m) in msgs.iter().enumerate() {
        let p = format!("messages[{i}]");
        let Some(obj) = m.as_object() else {
            return Err(ApiError::invalid(
                p.clone(),
                format!("`{p}` must be an object with `role` and `content`"),
            ));
        };
        let role = match obj.get("role").and_then(|r| r.as_str()) {
            Some(r @ ("system" | "user" | "assistant")) => r,
            Some("developer") => "system",
            Some(r) => {
                return Err(ApiError::invalid(
                    format!("{p}.role"),
                    format!("`{p}.role` must be system, developer, user or assistant, got `{r}`"),
                ))
            }
            None => {
                return Err(ApiError::invalid(
                    format!("{p}.role"),
                    format!("`{p}.role` is required"),
                ))
            }
        };
        let content = match obj.get("content") {
            Some(c) => content_text(c, &format!("{p}.content"))?,
            None => {
                return Err(ApiError::invalid(
                    format!("{p}.content"),
                    format!("`{p}.content` is required"),
                ))
            }
        };
        chat.push(ChatMessage::new(role, &content));
    }
    let tmpl = st.chat_template.as_ref().ok_or_else(|| {
        ApiError::bad_request(
            "This model has no chat template; use /v1/completions",
            "no_chat_template",
        )
    })?;
    let text = tmpl
        .render(&chat, true)
        .map_err(|e| ApiError::invalid("messages", format!("{e:#}")))?;
    let prompt = st
        .tok
        .encode(&text, false)
        .map_err(|e| ApiError::invalid("messages", format!("cannot tokenize: {e:#}")))?;
    let asked = match (b.max_completion_tokens, b.max_tokens) {
        (Some(m), _) => Some(("max_completion_tokens", m)),
        (None, Some(m)) => Some(("max_tokens", m)),
        (None, None) => None,
    };
    let max_tokens = budget("messages", prompt.len(), asked, None, st.max_context)?;
    Ok(Prepared {
        req: EngineRequest {
            prompt,
            max_tokens,
            sampling,
            stop,
        },
        stream,
        include_usage,
    })
}

/// A request's token counts as the OpenAI API's `usage` object.
pub(super) fn usage_json(u: Usage) -> Value {
    serde_json::json!({"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens})
}
