//! The HTTP API: one axum `Router` (OpenAI-compatible) that both the local server and the Lambda function run.

pub mod auth;
pub mod chat;
pub mod completions;
pub mod error;
pub mod extract;
pub mod info;
pub mod openapi;
mod params;
mod sse;

use crate::engine::worker::Worker;
use crate::engine::{ChatTemplate, TextTokenizer};
use crate::keys::{KeyStore, RateLimiter};
use axum::extract::DefaultBodyLimit;
use axum::http::{header, HeaderMap, Method, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{middleware, Router};
use error::ApiError;
use std::sync::Arc;
use std::time::Duration;

/// Limits applied by the router (each configurable through `Config`; the table is in SECURITY.md).
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// `MAX_BODY_BYTES`: largest accepted request body in bytes (413 above).
    pub max_body_bytes: usize,
    /// `REQUEST_TIMEOUT_SECONDS`: a generation ends with `length` after this long.
    pub request_timeout: Duration,
    /// `MAX_STOP`: most stop strings per request (400 `stop` above).
    pub max_stop: usize,
    /// `MAX_N`: largest `n` / `best_of` (400 `n` / `best_of` above).
    pub max_n: usize,
    /// `MAX_PROMPT_TOKENS`: most tokens in one prompt (400 `context_length_exceeded` above); `None`: the model's
    /// context length is the only bound.
    pub max_prompt_tokens: Option<usize>,
    /// `MAX_COMPLETION_TOKENS`: largest `max_tokens` / `max_completion_tokens` (400 naming the field above), and
    /// the cap of their defaults; `None`: the model's context length is the only bound.
    pub max_completion_tokens: Option<usize>,
    /// Interval of SSE keep-alive comments.
    pub keep_alive: Duration,
}

/// Default `MAX_STOP` (OpenAI's limit).
pub const DEFAULT_MAX_STOP: usize = 4;
/// Default `MAX_N`.
pub const DEFAULT_MAX_N: usize = 16;

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: 1 << 20,
            request_timeout: Duration::from_secs(300),
            max_stop: DEFAULT_MAX_STOP,
            max_n: DEFAULT_MAX_N,
            max_prompt_tokens: None,
            max_completion_tokens: None,
            keep_alive: Duration::from_secs(3),
        }
    }
}

/// The served model as clients see it: its id, its aliases, and its text side.
pub struct ServedModel {
    /// Canonical model id.
    pub id: String,
    /// Other names accepted in `model` (`MODEL_ALIASES`).
    pub aliases: Vec<String>,
    /// Unix seconds reported as `created`.
    pub created: u64,
    /// Tokenizer.
    pub tokenizer: Arc<TextTokenizer>,
    /// Chat template.
    pub chat: Option<Arc<ChatTemplate>>,
    /// Context length.
    pub context_length: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// `system_fingerprint`: build and model source.
    pub fingerprint: String,
}

impl ServedModel {
    /// The canonical id for a requested name (the id itself or an alias).
    pub fn resolve(&self, name: &str) -> Option<&str> {
        (name == self.id || self.aliases.iter().any(|a| a == name)).then_some(self.id.as_str())
    }
}

/// Everything the handlers share.
#[derive(Clone)]
pub struct AppState {
    /// The served model.
    pub model: Arc<ServedModel>,
    /// The model thread and its queue.
    pub worker: Worker,
    /// API keys.
    pub keys: Arc<dyn KeyStore>,
    /// Per-key rpm/tpm limits.
    pub limiter: Arc<RateLimiter>,
    /// Request limits.
    pub limits: Limits,
    /// Function name for CloudWatch Embedded Metric Format lines per generation (Lambda); `None` = no metrics.
    pub metrics: Option<Arc<str>>,
}

impl AppState {
    /// Wires a loaded engine (its model goes to the model thread), a key store and the configuration together.
    pub fn new(engine: crate::engine::Engine, keys: Arc<dyn KeyStore>, config: &crate::config::Config) -> Self {
        let m = &engine.manifest;
        let aliases = config
            .model_aliases
            .iter()
            .filter(|(_, id)| *id == m.id)
            .map(|(a, _)| a.clone())
            .collect();
        let fingerprint = format!(
            "fp_{}_{}",
            env!("CARGO_PKG_VERSION"),
            m.source.sha256.get(..10).unwrap_or("0")
        );
        let model = ServedModel {
            id: m.id.clone(),
            aliases,
            created: unix_now(),
            tokenizer: engine.tokenizer.clone(),
            chat: engine.chat.clone(),
            context_length: m.context_length,
            vocab_size: m.vocab_size,
            fingerprint,
        };
        let worker = Worker::spawn(engine.model, engine.tokenizer, config.max_queue, config.max_batch);
        Self {
            model: Arc::new(model),
            worker,
            keys,
            limiter: Arc::new(RateLimiter::new()),
            limits: config.limits.clone(),
            metrics: None,
        }
    }
}

/// The router: every route but `GET /health` requires an API key.
pub fn router(state: AppState) -> Router {
    let keyed = Router::new()
        .route("/v1/completions", post(completions::create))
        .route("/v1/chat/completions", post(chat::create))
        .route("/v1/models", get(info::list_models))
        .route("/v1/models/{id}", get(info::get_model))
        .route("/tokenize", post(info::tokenize))
        .route("/detokenize", post(info::detokenize))
        .route("/openapi.json", get(openapi::spec))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth::require_key));
    Router::new()
        .route("/health", get(info::health))
        .merge(keyed)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(state.limits.max_body_bytes))
        .layer(middleware::from_fn(get_with_body))
        .layer(middleware::from_fn(auth::log_request))
        .with_state(state)
}

async fn not_found(method: Method, uri: Uri, headers: HeaderMap) -> Response {
    body_unread(&headers, ApiError::route_not_found(method.as_str(), uri.path()))
}

async fn method_not_allowed(method: Method, uri: Uri, headers: HeaderMap) -> Response {
    body_unread(&headers, ApiError::method_not_allowed(method.as_str(), uri.path()))
}

/// GET and HEAD handlers never read a body: one sent anyway makes the connection close, and the answer says so.
async fn get_with_body(req: axum::extract::Request, next: middleware::Next) -> Response {
    let unread = matches!(*req.method(), Method::GET | Method::HEAD) && announces_body(req.headers());
    let mut resp = next.run(req).await;
    if unread {
        resp.headers_mut()
            .insert(header::CONNECTION, header::HeaderValue::from_static("close"));
    }
    resp
}

fn announces_body(headers: &HeaderMap) -> bool {
    headers.contains_key(header::TRANSFER_ENCODING)
        || headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim() != "0")
}

/// `e`, closing the connection when the request announced a body that nobody read (see [`auth::unread_body`]).
fn body_unread(headers: &HeaderMap, e: ApiError) -> Response {
    if announces_body(headers) {
        auth::unread_body(e)
    } else {
        e.into_response()
    }
}

/// A hard end for the request set by the platform (Lambda's remaining time), inserted as a request extension.
///
/// Generation stops before it with finish reason `length`, so the response is delivered instead of timing out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadline(pub std::time::Instant);

/// Emits the per-generation metrics (time to first token, tokens/s, token counts) when enabled.
pub(crate) fn record_metrics(state: &AppState, g: &crate::core::Generation) {
    if let Some(function) = &state.metrics {
        let decode_s = g.timings.decode.as_secs_f64();
        let tps = if decode_s > 0.0 {
            g.usage.completion_tokens.saturating_sub(1) as f64 / decode_s
        } else {
            0.0
        };
        crate::telemetry::emf(
            function,
            &[
                (
                    "TimeToFirstToken",
                    g.timings.first_token.as_secs_f64() * 1e3,
                    "Milliseconds",
                ),
                ("DecodeTokensPerSecond", tps, "Count/Second"),
                ("PromptTokens", g.usage.prompt_tokens as f64, "Count"),
                ("CompletionTokens", g.usage.completion_tokens as f64, "Count"),
            ],
        );
    }
}

/// Seconds since the epoch.
pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A batch output line id (`batch_req_…`).
pub fn batch_request_id() -> String {
    request_id("batch_req_")
}

/// A random request id with `prefix` (`cmpl-`, `chatcmpl-`).
pub(crate) fn request_id(prefix: &str) -> String {
    let suffix = crate::keys::key::random_base62(24).unwrap_or_else(|_| format!("{:x}", unix_now()));
    format!("{prefix}{suffix}")
}
