//! API keys: with keys set, every `/v1/*` request (and `/metrics` on the API address)
//! needs `Authorization: Bearer <key>`; without one, or with a wrong one, the answer is a
//! 401 in OpenAI's error shape that tells nothing of the keys. `/health` stays open.
//! Keys are compared in constant time and appear in no log, metric or message.

use super::error::ApiError;
use crate::telemetry as tm;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use secrecy::{ExposeSecret, SecretString};
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use subtle::{Choice, ConstantTimeEq};

/// The keys the API accepts; none: the API is open.
#[derive(Clone, Default)]
pub struct ApiKeys(Arc<[SecretString]>);

/// Counts the keys, never shows them.
impl fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiKeys")
            .field("count", &self.0.len())
            .finish_non_exhaustive()
    }
}

impl ApiKeys {
    /// The API accepts these keys.
    pub fn new(keys: Vec<SecretString>) -> Self {
        ApiKeys(keys.into())
    }

    /// Whether no key is set (the API is open).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// How many keys are set.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether `presented` is one of the keys. It is compared with every key, with no
    /// early exit, each comparison in constant time (`subtle`), so the time taken does
    /// not tell how much of a key matched or which key did; only keys' lengths may show.
    pub fn accepts(&self, presented: &[u8]) -> bool {
        let mut hit = Choice::from(0);
        for k in self.0.iter() {
            hit |= k.expose_secret().as_bytes().ct_eq(presented);
        }
        hit.into()
    }
}

/// Whether a request to `path` needs a key: the OpenAI API and `/metrics`.
fn protected(path: &str) -> bool {
    path == "/v1" || path.starts_with("/v1/") || path == "/metrics"
}

/// The token of an `Authorization: Bearer <token>` value (scheme in any case);
/// `None` for another scheme.
fn bearer(value: &HeaderValue) -> Option<&[u8]> {
    let v = value.as_bytes().trim_ascii();
    let space = v.iter().position(|&b| b == b' ')?;
    let (scheme, token) = v.split_at(space);
    scheme.eq_ignore_ascii_case(b"bearer").then(|| token.trim_ascii())
}

/// The request's key is one of `keys`; otherwise the 401 to send.
fn check(keys: &ApiKeys, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Err(ApiError::unauthorized(
            "Missing API key: send it in the header `Authorization: Bearer <key>`",
        ));
    };
    match bearer(value) {
        None => Err(ApiError::unauthorized(
            "The Authorization header must be `Bearer <key>`",
        )),
        Some(token) if keys.accepts(token) => Ok(()),
        Some(_) => Err(ApiError::unauthorized("Incorrect API key")),
    }
}

/// Middleware of the API router: lets a request through when its path is open, no
/// key is set, or it carries one of the keys; answers 401 otherwise (counted as
/// `shadowkv_requests_total{outcome="unauthorized"}`).
pub async fn require_key(State(keys): State<ApiKeys>, req: Request, next: Next) -> Response {
    if keys.is_empty() || !protected(req.uri().path()) {
        return next.run(req).await;
    }
    match check(&keys, req.headers()) {
        Ok(()) => next.run(req).await,
        Err(e) => {
            metrics::counter!(tm::REQUESTS, "outcome" => "unauthorized").increment(1);
            let mut r = e.into_response();
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            r
        }
    }
}

/// The start-up warning for an API anyone may use: listening on `addr`, not a loopback
/// address, with no keys. `None` when keys are set or the address is loopback.
pub fn open_api_warning(addr: SocketAddr, keys: &ApiKeys) -> Option<String> {
    if !keys.is_empty() || addr.ip().to_canonical().is_loopback() {
        return None;
    }
    Some(format!(
        "the API on {addr} answers anyone who can reach it: no API keys are set \
         (server.api_keys, server.api_keys_file or server.api_keys_env)"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::StatusCode;

    fn keys(ks: &[&str]) -> ApiKeys {
        ApiKeys::new(ks.iter().map(|k| SecretString::from(*k)).collect())
    }

    fn headers(auth: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(a) = auth {
            h.insert(header::AUTHORIZATION, HeaderValue::from_str(a).unwrap());
        }
        h
    }

    #[test]
    fn accepts_every_key_and_nothing_else() {
        let k = keys(&["sk-one", "sk-two-longer"]);
        assert!(k.accepts(b"sk-one"));
        assert!(k.accepts(b"sk-two-longer"));
        for wrong in [&b""[..], b"sk-on", b"sk-one ", b"sk-onE", b"sk-two", b"sk-two-longer2"] {
            assert!(!k.accepts(wrong), "{:?}", String::from_utf8_lossy(wrong));
        }
        assert!(!ApiKeys::default().accepts(b""));
    }

    #[test]
    fn bearer_header_is_checked() {
        let k = keys(&["sk-one"]);
        assert_eq!(check(&k, &headers(Some("Bearer sk-one"))), Ok(()));
        assert_eq!(check(&k, &headers(Some("bearer   sk-one "))), Ok(()));
        for (h, says) in [
            (None, "Missing API key"),
            (Some("Bearer sk-two"), "Incorrect API key"),
            (Some("Bearer"), "must be `Bearer <key>`"),
            (Some("Basic c2stb25lOg=="), "must be `Bearer <key>`"),
            (Some("sk-one"), "must be `Bearer <key>`"),
        ] {
            let e = check(&k, &headers(h)).unwrap_err();
            assert_eq!(e.status, StatusCode::UNAUTHORIZED, "{h:?}");
            assert_eq!((e.kind, e.code), ("authentication_error", Some("invalid_api_key")));
            assert!(e.message.contains(says), "{h:?}: {}", e.message);
            assert!(!e.message.contains("sk-"), "{h:?}: {}", e.message);
        }
    }

    #[test]
    fn only_the_api_and_metrics_are_protected() {
        for p in ["/v1", "/v1/completions", "/v1/models/x", "/v1/nope", "/metrics"] {
            assert!(protected(p), "{p}");
        }
        for p in ["/health", "/", "/v10/models", "/metricsx"] {
            assert!(!protected(p), "{p}");
        }
    }

    #[test]
    fn warns_of_an_open_api_off_loopback_only() {
        let none = ApiKeys::default();
        let some = keys(&["sk-one"]);
        for a in ["0.0.0.0:8000", "[::]:8000", "10.1.2.3:80"] {
            let w = open_api_warning(a.parse().unwrap(), &none).expect(a);
            assert!(w.contains(a) && w.contains("server.api_keys"), "{w}");
            assert_eq!(open_api_warning(a.parse().unwrap(), &some), None);
        }
        for a in ["127.0.0.1:8000", "127.0.0.2:0", "[::1]:8000", "[::ffff:127.0.0.1]:1"] {
            assert_eq!(open_api_warning(a.parse().unwrap(), &none), None, "{a}");
        }
    }

    #[test]
    fn debug_shows_no_key() {
        let d = format!("{:?}", keys(&["sk-secret"]));
        assert_eq!(d, "ApiKeys { count: 1, .. }");
    }
}
