//! Every request limit of the router, through `Config` as at start: enforced with its documented error, and moved by
//! its environment variable (`MAX_BODY_BYTES`, `MAX_STOP`, `MAX_N`, `MAX_PROMPT_TOKENS`, `MAX_COMPLETION_TOKENS`,
//! `REQUEST_TIMEOUT_SECONDS`, `MAX_QUEUE`, per-key tpm).

#[path = "support/app.rs"]
mod app;

use app::{post, send, state_with, with_eos_model, with_model, EosModel, KEY, MODEL, TPM, TPM_KEY};
use axum::http::{header, Request, StatusCode};
use lambda_llm::engine::{Engine, EngineOptions};
use lambda_llm::http::{router, AppState};
use lambda_llm::keys::{hash_key, KeyRecord, KeysDocument, MemoryKeyStore};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tower::ServiceExt;

/// A router over the real tokenizer whose model ends every choice at once, configured by `vars`.
fn quick(vars: &[(&str, &str)]) -> AppState {
    with_eos_model(state_with(vars))
}

fn completion(extra: Value) -> Value {
    let mut body = json!({"model": MODEL, "prompt": "hi", "max_tokens": 2});
    body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    body
}

fn chat(extra: Value) -> Value {
    let mut body = json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]});
    body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    body
}

async fn ok(state: &AppState, path: &str, body: Value) -> Value {
    let r = post(state, path, &body).await;
    assert_eq!(r.status, StatusCode::OK, "{body}: {}", String::from_utf8_lossy(&r.body));
    r.json()
}

async fn refused(state: &AppState, path: &str, body: Value, param: &str) -> Value {
    let e = post(state, path, &body).await.error(StatusCode::BAD_REQUEST);
    assert_eq!(e["param"], param, "{body}: {e}");
    assert_eq!(e["type"], "invalid_request_error");
    e
}

#[tokio::test]
async fn max_body_bytes_is_413_and_moves_with_the_variable() {
    let padded = |len: usize| {
        let mut b = completion(json!({})).to_string().into_bytes();
        b.resize(len, b' ');
        b
    };
    let small = quick(&[("MAX_BODY_BYTES", "200")]);
    let r = send(router(small.clone()), "POST", "/v1/completions", Some(KEY), padded(201)).await;
    let e = r.error(StatusCode::PAYLOAD_TOO_LARGE);
    assert!(e["message"].as_str().unwrap().contains("200 bytes"), "{e}");
    assert_eq!(r.headers[header::CONNECTION], "close");
    let r = send(router(small), "POST", "/v1/completions", Some(KEY), padded(200)).await;
    assert_eq!(r.status, StatusCode::OK);
    // The default (1 MiB) takes what 200 bytes refused.
    let r = send(router(quick(&[])), "POST", "/v1/completions", Some(KEY), padded(201)).await;
    assert_eq!(r.status, StatusCode::OK);
}

#[tokio::test]
async fn max_stop_limits_stop_strings() {
    let stops = |n: usize| json!({"stop": (0..n).map(|i| format!("s{i}")).collect::<Vec<_>>()});
    let default = quick(&[]);
    ok(&default, "/v1/completions", completion(stops(4))).await;
    let e = refused(&default, "/v1/completions", completion(stops(5)), "stop").await;
    assert_eq!(e["message"], "`stop` takes at most 4 strings, got 5");
    let two = quick(&[("MAX_STOP", "2")]);
    ok(&two, "/v1/completions", completion(stops(2))).await;
    refused(&two, "/v1/completions", completion(stops(3)), "stop").await;
    refused(&two, "/v1/chat/completions", chat(stops(3)), "stop").await;
    let many = quick(&[("MAX_STOP", "64")]);
    ok(&many, "/v1/chat/completions", chat(stops(64))).await;
    refused(&many, "/v1/chat/completions", chat(stops(65)), "stop").await;
}

#[tokio::test]
async fn max_n_limits_n_and_best_of() {
    let default = quick(&[]);
    ok(&default, "/v1/completions", completion(json!({"n": 16}))).await;
    let e = refused(&default, "/v1/completions", completion(json!({"n": 17})), "n").await;
    assert_eq!(e["message"], "`n` must be >= 1 and <= 16, got 17");
    let two = quick(&[("MAX_N", "2")]);
    let v = ok(&two, "/v1/chat/completions", chat(json!({"n": 2}))).await;
    assert_eq!(v["choices"].as_array().unwrap().len(), 2);
    refused(&two, "/v1/chat/completions", chat(json!({"n": 3})), "n").await;
    refused(&two, "/v1/completions", completion(json!({"n": 3})), "n").await;
    refused(&two, "/v1/completions", completion(json!({"best_of": 3})), "best_of").await;
    let more = quick(&[("MAX_N", "20")]);
    let v = ok(&more, "/v1/completions", completion(json!({"n": 20}))).await;
    assert_eq!(v["choices"].as_array().unwrap().len(), 20);
}

#[tokio::test]
async fn max_prompt_tokens_is_context_length_exceeded_naming_the_prompt_field() {
    let tokens = |n: u32| json!({"prompt": (1..=n).collect::<Vec<_>>()});
    // Default: only the context bounds a prompt.
    let default = quick(&[]);
    ok(&default, "/v1/completions", completion(tokens(600))).await;
    let five = quick(&[("MAX_PROMPT_TOKENS", "5")]);
    ok(&five, "/v1/completions", completion(tokens(5))).await;
    let e = refused(&five, "/v1/completions", completion(tokens(6)), "prompt").await;
    assert_eq!(e["code"], "context_length_exceeded");
    assert!(
        e["message"].as_str().unwrap().contains("at most 5 prompt tokens"),
        "{e}"
    );
    // Every prompt of a list counts on its own.
    let lists = json!({"prompt": [[1, 2], [1, 2, 3, 4, 5, 6]]});
    refused(&five, "/v1/completions", completion(lists), "prompt").await;
    // Chat: the rendered conversation is the prompt; the error names `messages`.
    let e = refused(&five, "/v1/chat/completions", chat(json!({})), "messages").await;
    assert_eq!(e["code"], "context_length_exceeded");
    ok(
        &quick(&[("MAX_PROMPT_TOKENS", "600")]),
        "/v1/completions",
        completion(tokens(600)),
    )
    .await;
}

#[tokio::test]
async fn max_completion_tokens_caps_max_tokens_and_its_defaults() {
    let default = quick(&[]);
    ok(&default, "/v1/completions", completion(json!({"max_tokens": 4000}))).await;
    let eight = quick(&[("MAX_COMPLETION_TOKENS", "8")]);
    ok(&eight, "/v1/completions", completion(json!({"max_tokens": 8}))).await;
    let e = refused(
        &eight,
        "/v1/completions",
        completion(json!({"max_tokens": 9})),
        "max_tokens",
    )
    .await;
    assert_eq!(e["message"], "`max_tokens` must be <= 8 on this server, got 9");
    refused(
        &eight,
        "/v1/chat/completions",
        chat(json!({"max_tokens": 9})),
        "max_tokens",
    )
    .await;
    let body = chat(json!({"max_completion_tokens": 9}));
    refused(&eight, "/v1/chat/completions", body, "max_completion_tokens").await;
    // Chat's default (the rest of the context) is capped, not refused: the real model stops at the cap.
    let real = state_with(&[("MAX_COMPLETION_TOKENS", "3")]);
    let body = chat(json!({"temperature": 0, "messages": [{"role": "user", "content": "Count from 1 to 50."}]}));
    let v = ok(&real, "/v1/chat/completions", body).await;
    assert_eq!(v["usage"]["completion_tokens"], 3, "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
}

#[tokio::test]
async fn request_timeout_seconds_ends_a_generation_with_length() {
    let state = state_with(&[("REQUEST_TIMEOUT_SECONDS", "1")]);
    let model = EosModel::endless(&state, Duration::from_millis(20));
    let state = with_model(state, model, 4);
    let start = Instant::now();
    let v = ok(&state, "/v1/completions", completion(json!({"max_tokens": 5000}))).await;
    let took = start.elapsed();
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    let tokens = v["usage"]["completion_tokens"].as_u64().unwrap();
    assert!(tokens > 0 && tokens < 5000, "{tokens}");
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(10),
        "{took:?}"
    );
    // The largest value the variable takes is no timeout at all (it once overflowed `Instant` and panicked).
    let forever = quick(&[("REQUEST_TIMEOUT_SECONDS", &u64::MAX.to_string())]);
    ok(&forever, "/v1/completions", completion(json!({}))).await;
}

#[tokio::test]
async fn max_queue_is_503_with_retry_after() {
    // A second real engine, wired by `AppState::new` as the binaries do, so the variable itself sizes the queue.
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("model-artifacts")
        .join(MODEL);
    let engine = Engine::load(&dir, &EngineOptions::default()).expect("model (run `make setup`)");
    let keys = KeysDocument {
        keys: vec![KeyRecord::new("key_main", "main", hash_key(KEY))],
        ..Default::default()
    };
    let state = AppState::new(
        engine,
        Arc::new(MemoryKeyStore::new(keys)),
        &app::config(&[("MAX_QUEUE", "1")]),
    );
    // End-of-sequence is suppressed, so these generations run until their client goes away.
    let long = json!({"model": MODEL, "prompt": "x", "max_tokens": 4000, "stream": true,
                      "logit_bias": {"0": -100, "2": -100}})
    .to_string();
    let mut held = Vec::new();
    for _ in 0..2 {
        let req = Request::post("/v1/completions").header(header::AUTHORIZATION, format!("Bearer {KEY}"));
        let resp = router(state.clone())
            .oneshot(req.body(axum::body::Body::from(long.clone())).unwrap())
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        held.push(resp);
        // Wait until the model thread took the first job, so the second one is the one waiting.
        while state.worker.queued() > 0 && held.len() == 1 {
            tokio::task::yield_now().await;
        }
    }
    let r = send(
        router(state.clone()),
        "POST",
        "/v1/completions",
        Some(KEY),
        long.into_bytes(),
    )
    .await;
    let e = r.error(StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(e["type"], "server_error");
    assert_eq!(r.headers[header::RETRY_AFTER], "1");
    drop(held);
}

#[tokio::test]
async fn tokens_per_minute_is_429_with_retry_after() {
    let state = quick(&[]);
    let prompt: Vec<u32> = (1..=TPM as u32 + 5).collect();
    let body = completion(json!({"prompt": prompt, "max_tokens": 1}));
    let first = send(
        router(state.clone()),
        "POST",
        "/v1/completions",
        Some(TPM_KEY),
        body.to_string().into(),
    )
    .await;
    assert_eq!(first.status, StatusCode::OK);
    let r = send(
        router(state),
        "POST",
        "/v1/completions",
        Some(TPM_KEY),
        body.to_string().into(),
    )
    .await;
    let e = r.error(StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        (e["type"].as_str(), e["code"].as_str()),
        (Some("rate_limit_error"), Some("rate_limit_exceeded"))
    );
    let wait: u64 = r.headers[header::RETRY_AFTER].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&wait), "{wait}");
}
