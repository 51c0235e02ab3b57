//! Middleware: API-key authentication with per-key request limits, and one log line per request.

use super::error::ApiError;
use super::AppState;
use crate::keys::{authenticate, Credentials};
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::header::{AUTHORIZATION, CONNECTION};
use axum::http::{HeaderValue, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

/// The authenticated key's id, copied into the response so the request log can name it.
#[derive(Debug, Clone)]
pub struct KeyId(pub String);

/// Token counts of a finished, non-streamed generation, for the request log.
#[derive(Debug, Clone, Copy)]
pub struct Tokens {
    /// Prompt tokens.
    pub prompt: usize,
    /// Completion tokens.
    pub completion: usize,
}

/// Requires a valid key (401/503), then applies its request-per-minute limit (429 with `Retry-After`).
pub async fn require_key(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let headers = req.headers();
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let (authorization, x_api_key) = (header(AUTHORIZATION.as_str()), header("x-api-key"));
    let credentials = Credentials {
        authorization: authorization.as_deref(),
        x_api_key: x_api_key.as_deref(),
    };
    let key = match authenticate(state.keys.as_ref(), credentials, None, SystemTime::now()).await {
        Ok(key) => key,
        Err(e) => return unread_body(ApiError::from(e)),
    };
    if let Err(limited) = state.limiter.check_request(&key.id, key.limits, Instant::now()) {
        return unread_body(ApiError::rate_limited(limited.to_string(), limited.retry_after_secs()));
    }
    let id = KeyId(key.id.clone());
    req.extensions_mut().insert(key);
    let mut resp = next.run(req).await;
    resp.extensions_mut().insert(id);
    resp
}

/// An error answered before the request body was read: the connection is closed after it, since the unread body
/// would otherwise be taken for the next request (and reading a stranger's body first would be wasted work).
pub fn unread_body(e: ApiError) -> Response {
    let mut resp = e.into_response();
    resp.headers_mut().insert(CONNECTION, HeaderValue::from_static("close"));
    resp
}

/// Token counts of a stream, filled in by the SSE pump as choices finish (read when the stream ends).
#[derive(Debug, Default)]
pub struct StreamTally {
    /// Prompt tokens so far.
    pub prompt: AtomicUsize,
    /// Completion tokens so far.
    pub completion: AtomicUsize,
}

/// The fields of one request log line; logs itself when dropped (for streams: when the body ends or the client
/// goes away, so latency and tokens cover the whole generation).
struct RequestLine {
    request_id: String,
    method: Method,
    path: String,
    status: u16,
    key: String,
    start: Instant,
    tokens: Option<Tokens>,
    tally: Option<Arc<StreamTally>>,
}

impl Drop for RequestLine {
    fn drop(&mut self) {
        let tokens = self.tokens.or_else(|| {
            self.tally.as_ref().map(|t| Tokens {
                prompt: t.prompt.load(Ordering::Relaxed),
                completion: t.completion.load(Ordering::Relaxed),
            })
        });
        tracing::info!(
            request_id = self.request_id,
            method = %self.method,
            path = self.path,
            status = self.status,
            latency_ms = self.start.elapsed().as_secs_f64() * 1e3,
            key = self.key,
            prompt_tokens = tokens.map(|t| t.prompt),
            completion_tokens = tokens.map(|t| t.completion),
            "request"
        );
    }
}

/// One info line per request: request id, method, path, status, latency, key id and tokens — never the key or the
/// prompt. The request id is also returned as `x-request-id`. A streamed response is logged when it ends.
pub async fn log_request(req: Request, next: Next) -> Response {
    let start = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let request_id = super::request_id("req_");
    let mut resp = next.run(req).await;
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    let line = RequestLine {
        request_id,
        method,
        path,
        status: resp.status().as_u16(),
        key: resp
            .extensions()
            .get::<KeyId>()
            .map_or_else(|| "-".to_owned(), |k| k.0.clone()),
        start,
        tokens: resp.extensions().get::<Tokens>().copied(),
        tally: resp.extensions().get::<Arc<StreamTally>>().cloned(),
    };
    if line.tally.is_none() {
        return resp; // `line` logs now
    }
    let (parts, body) = resp.into_parts();
    let stream = body.into_data_stream().map(move |chunk| {
        let _ = &line; // moved in: logs when the stream is dropped
        chunk
    });
    Response::from_parts(parts, Body::from_stream(stream))
}
