//! Middleware: API-key authentication with per-key request limits, and one log line per request.

use super::error::ApiError;
use super::AppState;
use crate::keys::{authenticate, Credentials};
use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
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
        Err(e) => return ApiError::from(e).into_response(),
    };
    if let Err(limited) = state.limiter.check_request(&key.id, key.limits, Instant::now()) {
        return ApiError::rate_limited(limited.to_string(), limited.retry_after_secs()).into_response();
    }
    let id = KeyId(key.id.clone());
    req.extensions_mut().insert(key);
    let mut resp = next.run(req).await;
    resp.extensions_mut().insert(id);
    resp
}

/// One info line per request: request id, method, path, status, latency, key id and tokens — never the key or the
/// prompt. The request id is also returned as `x-request-id`.
pub async fn log_request(req: Request, next: Next) -> Response {
    let start = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let request_id = super::request_id("req_");
    let mut resp = next.run(req).await;
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    let key = resp.extensions().get::<KeyId>().map(|k| k.0.as_str()).unwrap_or("-");
    let tokens = resp.extensions().get::<Tokens>().copied();
    tracing::info!(
        request_id,
        %method,
        path,
        status = resp.status().as_u16(),
        latency_ms = start.elapsed().as_secs_f64() * 1e3,
        key,
        prompt_tokens = tokens.map(|t| t.prompt),
        completion_tokens = tokens.map(|t| t.completion),
        "request"
    );
    resp
}
