//! The recorded Lambda events in `events/` (Function URL, HTTP API v2, REST v1) through the Lambda app, in process:
//! the same JSON `sam local invoke -e` and `cargo lambda invoke --data-file` send.

use axum::http::StatusCode;
use http_body_util::BodyExt;
use lambda_llm::config::Config;
use lambda_llm::engine::{Engine, EngineOptions};
use lambda_llm::http::AppState;
use lambda_llm::keys::{KeysDocument, MemoryKeyStore};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use tower::ServiceExt;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The real model, and the keys document that holds the events' sample key.
fn state() -> AppState {
    static STATE: OnceLock<AppState> = OnceLock::new();
    STATE
        .get_or_init(|| {
            let dir = root().join("model-artifacts/smollm2-135m-instruct");
            let engine = Engine::load(&dir, &EngineOptions::default()).expect("model (run `make setup`)");
            let keys = std::fs::read_to_string(root().join("events/keys.json")).unwrap();
            let store = MemoryKeyStore::new(KeysDocument::parse(&keys).unwrap());
            AppState::new(engine, Arc::new(store), &Config::from_lookup(|_| None).unwrap())
        })
        .clone()
}

/// A request as lambda_http builds it from an event, through the Lambda app.
async fn serve(req: lambda_http::Request) -> axum::response::Response {
    let (parts, body) = req.into_parts();
    let body = axum::body::Body::from(body.to_vec());
    lambda_llm::lambda::app(state())
        .oneshot(axum::http::Request::from_parts(parts, body))
        .await
        .unwrap()
}

/// A recorded event as JSON, to be edited by a test.
fn event(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(root().join("events").join(name)).unwrap()).unwrap()
}

async fn invoke(event: &Path) -> (StatusCode, String) {
    let text = std::fs::read_to_string(event).unwrap();
    let req = lambda_http::request::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", event.display()));
    let resp = serve(req).await;
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8(bytes.to_vec()).unwrap())
}

fn events(filter: &str) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(root().join("events"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .filter(|p| p.file_name().unwrap().to_string_lossy().contains(filter))
        .collect();
    out.sort();
    out
}

#[tokio::test]
async fn completion_events_of_every_shape_answer_paris() {
    let files = events("completions");
    assert_eq!(files.len(), 3, "function-url, http-api and rest-v1: {files:?}");
    for f in files {
        let (status, body) = invoke(&f).await;
        assert_eq!(status, StatusCode::OK, "{}: {body}", f.display());
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["object"], "text_completion", "{}", f.display());
        assert!(
            v["choices"][0]["text"].as_str().unwrap().contains("Paris"),
            "{}: {body}",
            f.display()
        );
    }
}

#[tokio::test]
async fn chat_events_of_every_shape_answer_paris_and_stream_frames() {
    let files = events("chat");
    assert!(files.len() >= 3, "{files:?}");
    for f in files {
        let (status, body) = invoke(&f).await;
        assert_eq!(status, StatusCode::OK, "{}: {body}", f.display());
        if body.starts_with("data: ") {
            assert!(body.ends_with("data: [DONE]\n\n"), "{body}");
            let text: String = body
                .split("\n\n")
                .filter_map(|e| e.strip_prefix("data: "))
                .filter(|d| *d != "[DONE]")
                .filter_map(|d| serde_json::from_str::<Value>(d).ok())
                .filter_map(|c| c["choices"][0]["delta"]["content"].as_str().map(str::to_owned))
                .collect();
            assert!(text.contains("Paris"), "{}: {text}", f.display());
        } else {
            let v: Value = serde_json::from_str(&body).unwrap();
            let content = v["choices"][0]["message"]["content"].as_str().unwrap();
            assert!(content.contains("Paris"), "{}: {content}", f.display());
        }
    }
}

#[tokio::test]
async fn the_rest_stage_prefix_is_stripped_and_health_needs_no_key() {
    let (status, _) = invoke(&root().join("events/rest-v1-completions.json")).await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = invoke(&root().join("events/function-url-health.json")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[tokio::test]
async fn an_event_without_the_key_is_refused() {
    let mut v = event("http-api-completions.json");
    v["headers"]
        .as_object_mut()
        .unwrap()
        .retain(|k, _| !k.eq_ignore_ascii_case("authorization"));
    let resp = serve(lambda_http::request::from_str(&v.to_string()).unwrap()).await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert!(
        resp.headers().get(axum::http::header::CONNECTION).is_none(),
        "hop-by-hop header through Lambda"
    );
}

#[tokio::test]
async fn generation_stops_before_the_invocation_deadline() {
    let mut v = event("http-api-completions.json");
    // Greedy, with end-of-sequence suppressed, so only the deadline can end it before 4000 tokens.
    let body = serde_json::json!({"model": "smollm2-135m-instruct", "prompt": "Count to a thousand:",
        "max_tokens": 4000, "temperature": 0, "logit_bias": {"0": -100, "2": -100}});
    v["body"] = Value::String(body.to_string());
    let mut req = lambda_http::request::from_str(&v.to_string()).unwrap();
    // The invocation has the margin plus a fraction of a second left: far too little for 4000 tokens.
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let mut ctx = lambda_http::Context::default();
    ctx.deadline = now_ms + lambda_llm::lambda::DEADLINE_MARGIN.as_millis() as u64 + 300;
    req.extensions_mut().insert(ctx);
    let resp = serve(req).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let v: Value = serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert!(v["usage"]["completion_tokens"].as_u64().unwrap() < 4000, "{v}");
}
