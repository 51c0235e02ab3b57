//! OpenAI Batch files: one JSONL request line in, exactly one result line out, each run through the HTTP router
//! itself so batch requests get the very same validation, errors and response bodies as the API.

pub mod events;
pub mod jobs;
pub mod local;
pub mod s3;
pub mod store;

use crate::http::{router, AppState};
use crate::keys::{hash_key, KeyRecord, KeysDocument, MemoryKeyStore};
use axum::body::Body;
use axum::http::{header, Request};
use axum::Router;
use http_body_util::BodyExt;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::sync::Arc;
use tower::ServiceExt;

/// Endpoints a batch line may call.
pub const BATCH_URLS: [&str; 2] = ["/v1/chat/completions", "/v1/completions"];

/// A batch input line, loosely typed so that every defect becomes a clear error line.
#[derive(Debug, Deserialize)]
struct InputLine {
    custom_id: Option<Value>,
    method: Option<String>,
    url: Option<String>,
    body: Option<Value>,
}

/// The result of a request that reached the API (any status).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LineResponse {
    /// HTTP status the API answered.
    pub status_code: u16,
    /// The API's request id.
    pub request_id: String,
    /// The API's JSON body (a completion, or an error envelope).
    pub body: Value,
}

/// Why a line could not be sent to the API at all.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LineError {
    /// Machine-readable code (`invalid_json`, `missing_custom_id`, `invalid_url`, …).
    pub code: String,
    /// What is wrong, with the line number.
    pub message: String,
}

/// One output line, in OpenAI's batch output format.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutputLine {
    /// `batch_req_…`.
    pub id: String,
    /// The input's `custom_id` (null if it had none).
    pub custom_id: Option<String>,
    /// The API's answer, when the line was sent.
    pub response: Option<LineResponse>,
    /// The reason the line was not sent.
    pub error: Option<LineError>,
}

impl OutputLine {
    /// Whether this line belongs in the output file (a 200 answer) rather than the errors file.
    pub fn succeeded(&self) -> bool {
        self.response.as_ref().is_some_and(|r| r.status_code == 200)
    }
}

/// Runs batch lines against an in-process router authorised by a key that exists only inside this process.
pub struct BatchRunner {
    app: Router,
    key: String,
    concurrency: usize,
}

impl BatchRunner {
    /// A runner over `state`'s model; its key store is replaced by one holding a fresh internal key.
    pub fn new(mut state: AppState) -> Result<Self, crate::keys::key::RandomError> {
        let key = crate::keys::generate_key()?;
        let concurrency = state.worker.max_batch();
        let record = KeyRecord::new("key_batch", "batch", hash_key(&key));
        state.keys = Arc::new(MemoryKeyStore::new(KeysDocument {
            keys: vec![record],
            ..Default::default()
        }));
        Ok(Self {
            app: router(state),
            key,
            concurrency,
        })
    }

    /// Lines to run at once: as many as the model decodes together.
    pub fn concurrency(&self) -> usize {
        self.concurrency
    }

    /// Runs input line `line_no` (1-based) and returns its output line; never fails.
    pub async fn run(&self, line_no: usize, raw: &str) -> OutputLine {
        let id = crate::http::batch_request_id();
        let error = |custom_id: Option<String>, code: &str, message: String| OutputLine {
            id: id.clone(),
            custom_id,
            response: None,
            error: Some(LineError {
                code: code.into(),
                message: format!("line {line_no}: {message}"),
            }),
        };
        let line: InputLine = match serde_json::from_str(raw) {
            Ok(l) => l,
            Err(e) => return error(None, "invalid_json", format!("not a JSON object: {e}")),
        };
        let custom_id = match line.custom_id {
            Some(Value::String(s)) if !s.is_empty() => s,
            Some(other) if !other.is_null() => {
                return error(
                    None,
                    "invalid_custom_id",
                    format!("`custom_id` must be a non-empty string, got {other}"),
                )
            }
            _ => return error(None, "missing_custom_id", "the line has no `custom_id`".into()),
        };
        let custom = Some(custom_id.clone());
        if line.method.as_deref() != Some("POST") {
            return error(custom, "invalid_method", "`method` must be \"POST\"".into());
        }
        let url = match line.url.as_deref() {
            Some(u) if BATCH_URLS.contains(&u) => u.to_owned(),
            other => {
                let msg = format!("`url` must be one of {BATCH_URLS:?}, got {other:?}");
                return error(custom, "invalid_url", msg);
            }
        };
        let body = match line.body {
            Some(b @ Value::Object(_)) => b,
            _ => return error(custom, "invalid_body", "`body` must be a JSON object".into()),
        };
        if body.get("stream").and_then(Value::as_bool) == Some(true) {
            return error(
                custom,
                "invalid_body",
                "`stream` is not supported in batch requests".into(),
            );
        }
        match self.call(&url, &body).await {
            Ok(response) => OutputLine {
                id,
                custom_id: custom,
                response: Some(response),
                error: None,
            },
            Err(msg) => error(custom, "internal_error", msg),
        }
    }

    async fn call(&self, url: &str, body: &Value) -> Result<LineResponse, String> {
        let req = Request::post(url)
            .header(header::AUTHORIZATION, format!("Bearer {}", self.key))
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body.to_string()))
            .map_err(|e| e.to_string())?;
        let resp = self.app.clone().oneshot(req).await.map_err(|e| e.to_string())?;
        let status_code = resp.status().as_u16();
        let request_id = resp
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let bytes = resp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
        let body = serde_json::from_slice(&bytes).map_err(|e| format!("the API answered non-JSON: {e}"))?;
        Ok(LineResponse {
            status_code,
            request_id,
            body,
        })
    }
}

/// Token counts of a finished line (0 when it failed), for progress and tokens/s.
pub fn completion_tokens(line: &OutputLine) -> u64 {
    line.response
        .as_ref()
        .and_then(|r| r.body["usage"]["completion_tokens"].as_u64())
        .unwrap_or(0)
}
