//! The router over the real model artifact for black-box tests of limits and hostile input, with `oneshot` helpers.
//!
//! Include it with `#[path = "support/app.rs"] mod app;`. The engine (tokenizer, chat template, ONNX session) is
//! loaded once per test binary; [`with_eos_model`] swaps the model thread for one that ends every choice at once,
//! so tests that send thousands of requests measure the HTTP path, not the CPU's decode speed.

// Each test crate that includes this file uses only part of it.
#![allow(dead_code)]

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use lambda_llm::config::Config;
use lambda_llm::core::{Model, ModelError, ModelInfo};
use lambda_llm::engine::worker::Worker;
use lambda_llm::engine::{Engine, EngineOptions};
use lambda_llm::http::{router, AppState};
use lambda_llm::keys::{hash_key, KeyRecord, KeysDocument, MemoryKeyStore, RateLimiter};
use serde_json::Value;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tower::ServiceExt;

/// A key allowed every model, without rate limits.
pub const KEY: &str = "sk-llm-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
/// A key with a small tokens-per-minute budget ([`TPM`]).
pub const TPM_KEY: &str = "sk-llm-TTTTTTTTTTTTTTTTTTTTTTTTTTTTTTTTTTTTTTTT";
/// The budget of [`TPM_KEY`].
pub const TPM: u64 = 20;
/// The served model.
pub const MODEL: &str = "smollm2-135m-instruct";

fn keys() -> KeysDocument {
    let mut limited = KeyRecord::new("key_tpm", "tpm", hash_key(TPM_KEY));
    limited.tpm = Some(TPM);
    KeysDocument {
        keys: vec![KeyRecord::new("key_main", "main", hash_key(KEY)), limited],
        ..Default::default()
    }
}

/// The real engine behind a router with the request limits of `vars` (environment variables, read by `Config` as
/// at start; `MAX_QUEUE` sizes the model thread's queue, which is built once: see `AppState::new` for that one).
///
/// The engine is loaded once per binary; every call gets its own rate limiter, so tests do not share budgets.
pub fn state_with(vars: &[(&str, &str)]) -> AppState {
    static BASE: OnceLock<AppState> = OnceLock::new();
    let base = BASE
        .get_or_init(|| {
            let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("model-artifacts")
                .join(MODEL);
            let engine = Engine::load(&dir, &EngineOptions::default()).expect("model (run `make setup`)");
            let config = Config::from_lookup(|_| None).unwrap();
            AppState::new(engine, Arc::new(MemoryKeyStore::new(keys())), &config)
        })
        .clone();
    let config = config(vars);
    AppState {
        limits: config.limits,
        limiter: Arc::new(RateLimiter::new()),
        ..base
    }
}

/// `Config` from exactly these variables.
pub fn config(vars: &[(&str, &str)]) -> Config {
    let vars: Vec<(String, String)> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    Config::from_lookup(|k| vars.iter().find(|(name, _)| name == k).map(|(_, v)| v.clone())).unwrap()
}

/// A model that puts all its weight on end-of-sequence: every choice ends after one step, whatever the request's
/// sampling settings (±100 logit bias, penalties and temperature cannot move 10 000 below another token's 100).
pub struct EosModel {
    info: ModelInfo,
    logits: Vec<f32>,
    delay: Duration,
}

/// End-of-sequence of the served model (`<|im_end|>`).
pub const EOS: usize = 2;

impl EosModel {
    /// For the model `state` serves.
    pub fn new(state: &AppState) -> Self {
        let mut logits = vec![0.0; state.model.vocab_size];
        logits[EOS] = 10_000.0;
        Self {
            info: info(state),
            logits,
            delay: Duration::ZERO,
        }
    }

    /// A model that never ends on its own (always token 64) and takes `delay` per step.
    pub fn endless(state: &AppState, delay: Duration) -> Self {
        let mut logits = vec![0.0; state.model.vocab_size];
        logits[64] = 10_000.0;
        Self {
            info: info(state),
            logits,
            delay,
        }
    }
}

fn info(state: &AppState) -> ModelInfo {
    ModelInfo {
        id: MODEL.into(),
        vocab_size: state.model.vocab_size,
        context_length: state.model.context_length,
        eos_ids: vec![EOS as u32],
    }
}

impl Model for EosModel {
    fn info(&self) -> &ModelInfo {
        &self.info
    }
    fn reset(&mut self, _: usize) -> Result<(), ModelError> {
        Ok(())
    }
    fn forward(&mut self, _: &[u32]) -> Result<&[f32], ModelError> {
        std::thread::sleep(self.delay);
        Ok(&self.logits)
    }
}

/// `state` with its model thread replaced by one running `model` behind a queue of `queue` jobs.
pub fn with_model(state: AppState, model: EosModel, queue: usize) -> AppState {
    let worker = Worker::spawn(
        lambda_llm::core::OneAtATime::new(model),
        state.model.tokenizer.clone(),
        queue,
        1,
    );
    AppState { worker, ..state }
}

/// `state` with its model thread replaced by an [`EosModel`] (every choice ends at once).
pub fn with_eos_model(state: AppState) -> AppState {
    let model = EosModel::new(&state);
    with_model(state, model, 64)
}

/// A response, read whole.
pub struct Reply {
    /// Status.
    pub status: StatusCode,
    /// Headers.
    pub headers: axum::http::HeaderMap,
    /// Body bytes.
    pub body: Vec<u8>,
}

impl Reply {
    /// The body as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    /// Asserts `status` and the OpenAI error envelope; returns its `error` object.
    pub fn error(&self, status: StatusCode) -> Value {
        assert_eq!(self.status, status, "{}", String::from_utf8_lossy(&self.body));
        let e = self.json()["error"].clone();
        assert!(envelope_ok(&e), "{e}");
        e
    }
}

/// Whether `e` is OpenAI's error object: a non-empty `message`, a `type`, and `param` and `code` present.
pub fn envelope_ok(e: &Value) -> bool {
    e["message"].as_str().is_some_and(|m| !m.is_empty())
        && e["type"].is_string()
        && e.get("param").is_some_and(|p| p.is_null() || p.is_string())
        && e.get("code").is_some_and(|c| c.is_null() || c.is_string())
}

/// One request through `app` with `key` as a bearer token and a JSON content type.
pub async fn send(app: Router, method: &str, path: &str, key: Option<&str>, body: Vec<u8>) -> Reply {
    send_typed(app, method, path, key, Some("application/json"), body).await
}

/// One request through `app` with any content type (or none).
pub async fn send_typed(
    app: Router,
    method: &str,
    path: &str,
    key: Option<&str>,
    content_type: Option<&str>,
    body: Vec<u8>,
) -> Reply {
    let mut req = Request::builder().method(method).uri(path);
    if let Some(k) = key {
        req = req.header(header::AUTHORIZATION, format!("Bearer {k}"));
    }
    if let Some(t) = content_type {
        req = req.header(header::CONTENT_TYPE, t);
    }
    let resp = app.oneshot(req.body(Body::from(body)).unwrap()).await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes().to_vec();
    Reply { status, headers, body }
}

/// POSTs JSON `body` to `path` of a router over `state` with [`KEY`].
pub async fn post(state: &AppState, path: &str, body: &Value) -> Reply {
    send(
        router(state.clone()),
        "POST",
        path,
        Some(KEY),
        body.to_string().into_bytes(),
    )
    .await
}
