//! Contract tests of the router without sockets (`oneshot`), on the real model: every endpoint, every error class,
//! SSE framing.

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use lambda_llm::config::Config;
use lambda_llm::engine::{Engine, EngineOptions};
use lambda_llm::http::{router, AppState};
use lambda_llm::keys::{hash_key, KeyRecord, KeysDocument, MemoryKeyStore};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use tower::ServiceExt;

const KEY: &str = "sk-llm-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
const OTHER_MODEL_KEY: &str = "sk-llm-BBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB";
const DISABLED_KEY: &str = "sk-llm-CCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCC";
const EXPIRED_KEY: &str = "sk-llm-DDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDD";
const LIMITED_KEY: &str = "sk-llm-EEEEEEEEEEEEEEEEEEEEEEEEEEEEEEEEEEEEEEEE";
const MODEL: &str = "smollm2-135m-instruct";

fn keys() -> KeysDocument {
    let record = |id: &str, key: &str| KeyRecord::new(id, id, hash_key(key));
    let mut other = record("key_other", OTHER_MODEL_KEY);
    other.models = vec!["some-other-model".into()];
    let mut disabled = record("key_disabled", DISABLED_KEY);
    disabled.disabled = true;
    let mut expired = record("key_expired", EXPIRED_KEY);
    expired.expires_at = Some(time::OffsetDateTime::UNIX_EPOCH);
    let mut limited = record("key_limited", LIMITED_KEY);
    limited.rpm = Some(2);
    KeysDocument {
        keys: vec![record("key_main", KEY), other, disabled, expired, limited],
        ..Default::default()
    }
}

/// One real engine per test binary, shared by every test's router.
fn state() -> AppState {
    static STATE: OnceLock<AppState> = OnceLock::new();
    STATE
        .get_or_init(|| {
            let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("model-artifacts")
                .join(MODEL);
            let engine = Engine::load(&dir, &EngineOptions::default()).expect("model (run `make setup`)");
            let config =
                Config::from_lookup(|k| (k == "MODEL_ALIASES").then(|| format!("text-davinci-003={MODEL}"))).unwrap();
            AppState::new(engine, Arc::new(MemoryKeyStore::new(keys())), &config)
        })
        .clone()
}

fn app() -> Router {
    router(state())
}

struct Reply {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    body: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    /// Asserts the OpenAI error envelope and returns its `error` object.
    fn error(&self, status: StatusCode) -> Value {
        assert_eq!(self.status, status, "{}", self.body);
        let v = self.json();
        let e = v["error"].clone();
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
        assert!(
            e["type"].is_string() && e.get("param").is_some() && e.get("code").is_some(),
            "{v}"
        );
        e
    }
}

async fn send(app: Router, method: &str, path: &str, key: Option<&str>, body: Option<Vec<u8>>) -> Reply {
    let mut req = Request::builder().method(method).uri(path);
    if let Some(k) = key {
        req = req.header(header::AUTHORIZATION, format!("Bearer {k}"));
    }
    let req = req
        .header(header::CONTENT_TYPE, "application/json")
        .body(body.map_or_else(Body::empty, Body::from));
    let resp = app.oneshot(req.unwrap()).await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    Reply {
        status,
        headers,
        body: String::from_utf8(bytes.to_vec()).unwrap(),
    }
}

async fn post(path: &str, body: Value) -> Reply {
    send(app(), "POST", path, Some(KEY), Some(body.to_string().into_bytes())).await
}

#[tokio::test]
async fn health_needs_no_key() {
    let r = send(app(), "GET", "/health", None, None).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["model_loaded"], true);
    assert!(r.headers["x-request-id"].to_str().unwrap().starts_with("req_"));
}

#[tokio::test]
async fn every_keyed_route_refuses_missing_and_bad_keys_alike() {
    let routes = [
        ("POST", "/v1/completions"),
        ("POST", "/v1/chat/completions"),
        ("GET", "/v1/models"),
        ("GET", "/v1/models/x"),
        ("POST", "/tokenize"),
        ("POST", "/detokenize"),
        ("GET", "/openapi.json"),
    ];
    for (method, path) in routes {
        let e = send(app(), method, path, None, Some(b"{}".to_vec()))
            .await
            .error(StatusCode::UNAUTHORIZED);
        assert_eq!(e["code"], "invalid_api_key");
        // Unknown, malformed, disabled and expired keys get the very same answer.
        let mut bodies = Vec::new();
        for bad in ["sk-llm-nope", DISABLED_KEY, EXPIRED_KEY, "Basic abc"] {
            let r = send(app(), method, path, Some(bad), Some(b"{}".to_vec())).await;
            assert_eq!(r.status, StatusCode::UNAUTHORIZED);
            bodies.push(r.json());
        }
        assert!(bodies.iter().all(|b| b == &bodies[0]), "{path}: {bodies:?}");
    }
}

#[tokio::test]
async fn a_key_for_another_model_gets_403_and_does_not_see_the_model() {
    let body = json!({"model": MODEL, "prompt": "hi", "max_tokens": 1})
        .to_string()
        .into_bytes();
    let e = send(app(), "POST", "/v1/completions", Some(OTHER_MODEL_KEY), Some(body))
        .await
        .error(StatusCode::FORBIDDEN);
    assert_eq!(e["param"], "model");
    let list = send(app(), "GET", "/v1/models", Some(OTHER_MODEL_KEY), None)
        .await
        .json();
    assert_eq!(list["data"], json!([]));
    let body = json!({"prompt": "hi"}).to_string().into_bytes();
    send(app(), "POST", "/tokenize", Some(OTHER_MODEL_KEY), Some(body))
        .await
        .error(StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn answers_given_before_the_body_is_read_close_the_connection() {
    let body = || Some(json!({"model": MODEL, "prompt": "hi"}).to_string().into_bytes());
    for key in [None, Some("sk-llm-nope")] {
        let r = send(app(), "POST", "/v1/completions", key, body()).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
        assert_eq!(r.headers[header::CONNECTION], "close");
    }
    let r = send(app(), "POST", "/v1/completions", Some(KEY), Some(vec![b' '; 2 << 20])).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(r.headers[header::CONNECTION], "close");
    // A request whose body was read keeps the connection.
    let r = post("/v1/completions", json!({"model": MODEL, "prompt": "hi", "top_p": 0})).await;
    assert!(r.headers.get(header::CONNECTION).is_none());
}

#[tokio::test]
async fn rpm_limit_gives_429_with_retry_after() {
    let mut statuses = Vec::new();
    let mut retry_after = None;
    for _ in 0..3 {
        let r = send(app(), "GET", "/v1/models", Some(LIMITED_KEY), None).await;
        statuses.push(r.status);
        retry_after = retry_after.or(r.headers.get(header::RETRY_AFTER).cloned());
        if r.status == StatusCode::TOO_MANY_REQUESTS {
            assert_eq!(r.error(StatusCode::TOO_MANY_REQUESTS)["type"], "rate_limit_error");
        }
    }
    assert_eq!(
        statuses,
        vec![StatusCode::OK, StatusCode::OK, StatusCode::TOO_MANY_REQUESTS]
    );
    assert!(retry_after.unwrap().to_str().unwrap().parse::<u64>().unwrap() >= 1);
}

#[tokio::test]
async fn completion_has_the_openai_shape() {
    let r = post(
        "/v1/completions",
        json!({"model": MODEL, "prompt": "The capital of France is", "max_tokens": 5,
        "temperature": 0}),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let v = r.json();
    assert!(v["id"].as_str().unwrap().starts_with("cmpl-"));
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["model"], MODEL);
    assert!(v["system_fingerprint"].is_string() && v["created"].is_u64());
    assert_eq!(v["choices"][0]["index"], 0);
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 5);
    assert_eq!(
        v["usage"]["total_tokens"],
        v["usage"]["prompt_tokens"].as_u64().unwrap() + 5
    );
}

#[tokio::test]
async fn chat_greedy_answers_paris() {
    let r = post(
        "/v1/chat/completions",
        json!({"model": MODEL, "temperature": 0, "max_tokens": 30,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "What is the capital of France?"}]}]}),
    )
    .await;
    let v = r.json();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert!(
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .contains("Paris"),
        "{v}"
    );
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
}

#[tokio::test]
async fn prompt_shapes_n_and_alias() {
    let v = post(
        "/v1/completions",
        json!({"model": "text-davinci-003", "prompt": [[504, 3458], [19556]],
        "max_tokens": 2, "n": 2, "temperature": 0.7, "seed": 1}),
    )
    .await
    .json();
    assert_eq!(v["model"], "text-davinci-003");
    let idx: Vec<u64> = v["choices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["index"].as_u64().unwrap())
        .collect();
    assert_eq!(idx, vec![0, 1, 2, 3]);
    assert_eq!(v["usage"]["prompt_tokens"], 3);
    assert_eq!(v["usage"]["completion_tokens"], 8);
}

/// Splits an SSE body into `data:` payloads, checking the framing.
fn sse_data(body: &str) -> Vec<String> {
    assert!(body.ends_with("data: [DONE]\n\n"), "{body}");
    body.split("\n\n")
        .filter(|e| !e.is_empty())
        .filter(|e| !e.starts_with(':'))
        .map(|e| {
            e.strip_prefix("data: ")
                .unwrap_or_else(|| panic!("bad event {e:?}"))
                .to_owned()
        })
        .collect()
}

#[tokio::test]
async fn streamed_completion_frames_chunks_usage_and_done() {
    let r = post(
        "/v1/completions",
        json!({"model": MODEL, "prompt": "Once upon a time", "max_tokens": 6,
        "temperature": 0, "stream": true, "stream_options": {"include_usage": true}}),
    )
    .await;
    assert_eq!(r.headers[header::CONTENT_TYPE], "text/event-stream");
    let data = sse_data(&r.body);
    assert_eq!(data.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 6);
    let text: String = chunks.iter().filter_map(|c| c["choices"][0]["text"].as_str()).collect();
    let plain = post(
        "/v1/completions",
        json!({"model": MODEL, "prompt": "Once upon a time", "max_tokens": 6,
        "temperature": 0}),
    )
    .await
    .json();
    assert_eq!(text, plain["choices"][0]["text"].as_str().unwrap());
    assert_eq!(chunks[chunks.len() - 2]["choices"][0]["finish_reason"], "length");
}

#[tokio::test]
async fn streamed_chat_sends_the_role_first_and_no_usage_unless_asked() {
    let r = post(
        "/v1/chat/completions",
        json!({"model": MODEL, "max_tokens": 4, "stream": true,
        "messages": [{"role": "user", "content": "Hi"}]}),
    )
    .await;
    let data = sse_data(&r.body);
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert_eq!(chunks[0]["object"], "chat.completion.chunk");
    assert_eq!(
        chunks[0]["choices"][0]["delta"],
        json!({"role": "assistant", "content": ""})
    );
    assert!(chunks[1..]
        .iter()
        .all(|c| c["choices"][0]["delta"].get("role").is_none()));
    assert!(chunks.last().unwrap()["choices"][0]["finish_reason"].is_string());
    assert!(chunks.iter().all(|c| c["usage"].is_null()));
}

#[tokio::test]
async fn invalid_values_are_400s_naming_the_field() {
    let base = json!({"model": MODEL, "prompt": "hi"});
    let cases: Vec<(Value, &str)> = vec![
        (json!({"temperature": 2.5}), "temperature"),
        (json!({"temperature": "hot"}), "temperature"),
        (json!({"top_p": 0}), "top_p"),
        (json!({"n": 0}), "n"),
        (json!({"n": 17}), "n"),
        (json!({"max_tokens": -1}), "max_tokens"),
        (json!({"logprobs": 6}), "logprobs"),
        (json!({"stop": ["a", "b", "c", "d", "e"]}), "stop"),
        (json!({"suffix": "x"}), "suffix"),
        (json!({"n": 3, "best_of": 2}), "best_of"),
        (json!({"best_of": 2, "stream": true}), "best_of"),
        (json!({"echo": true, "logprobs": 1}), "echo"),
        (json!({"logit_bias": {"99999999": 1}}), "logit_bias"),
        (json!({"prompt": [1, -5]}), "prompt"),
        (json!({"prompt": []}), "prompt"),
        (json!({"model": null}), "model"),
        (json!({"max_tokens": 9000}), "max_tokens"),
    ];
    for (patch, param) in cases {
        let mut body = base.clone();
        body.as_object_mut().unwrap().extend(patch.as_object().unwrap().clone());
        let e = post("/v1/completions", body.clone())
            .await
            .error(StatusCode::BAD_REQUEST);
        assert_eq!(e["param"], param, "{body}: {e}");
    }
    let e = post(
        "/v1/completions",
        json!({"model": MODEL, "prompt": "hi", "max_tokens": 9000}),
    )
    .await
    .error(StatusCode::BAD_REQUEST);
    assert_eq!(e["code"], "context_length_exceeded");
    let chat = |extra: Value| {
        let mut b = json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]});
        b.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        b
    };
    for (patch, param) in [
        (json!({"response_format": {"type": "json_object"}}), "response_format"),
        (json!({"top_logprobs": 3}), "top_logprobs"),
        (json!({"logprobs": true, "top_logprobs": 21}), "top_logprobs"),
        (json!({"messages": []}), "messages"),
        (
            json!({"messages": [{"role": "tool", "content": "x"}]}),
            "messages[0].role",
        ),
        (
            json!({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
            "messages[0].content[0]",
        ),
        (json!({"max_completion_tokens": -2}), "max_completion_tokens"),
    ] {
        let e = post("/v1/chat/completions", chat(patch.clone()))
            .await
            .error(StatusCode::BAD_REQUEST);
        assert_eq!(e["param"], param, "{patch}: {e}");
    }
}

#[tokio::test]
async fn malformed_bodies_unknown_routes_methods_and_models() {
    let raw = |body: &'static [u8]| send(app(), "POST", "/v1/completions", Some(KEY), Some(body.to_vec()));
    for body in [&b"{\"model\": "[..], b"not json", b"", b"[1]", b"\xff\xfe"] {
        raw(body).await.error(StatusCode::BAD_REQUEST);
    }
    let e = post("/v1/completions", json!({"model": "gpt-9", "prompt": "x"}))
        .await
        .error(StatusCode::NOT_FOUND);
    assert_eq!(e["code"], "model_not_found");
    send(app(), "GET", "/v1/nothing", Some(KEY), None)
        .await
        .error(StatusCode::NOT_FOUND);
    send(app(), "GET", "/v1/completions", Some(KEY), None)
        .await
        .error(StatusCode::METHOD_NOT_ALLOWED);
    send(app(), "DELETE", "/health", None, None)
        .await
        .error(StatusCode::METHOD_NOT_ALLOWED);
    // Answered without reading an announced body: the connection closes, and the answer says so.
    for (method, path, status) in [
        ("PUT", "/v1/completions", StatusCode::METHOD_NOT_ALLOWED),
        ("POST", "/no/such/route", StatusCode::NOT_FOUND),
        ("GET", "/v1/models", StatusCode::OK),
    ] {
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header(header::AUTHORIZATION, format!("Bearer {KEY}"))
            .header(header::CONTENT_LENGTH, "2")
            .body(Body::from("{}"))
            .unwrap();
        let resp = app().oneshot(req).await.unwrap();
        assert_eq!(resp.status(), status, "{method} {path}");
        assert_eq!(resp.headers()[header::CONNECTION], "close", "{method} {path}");
    }
    let r = send(app(), "GET", "/v1/nothing", Some(KEY), None).await;
    assert!(r.headers.get(header::CONNECTION).is_none(), "no body, keep-alive stays");
    let huge = vec![b' '; 2 << 20];
    send(app(), "POST", "/v1/completions", Some(KEY), Some(huge))
        .await
        .error(StatusCode::PAYLOAD_TOO_LARGE);
    // Unknown fields are ignored, never rejected.
    let r = post(
        "/v1/completions",
        json!({"model": MODEL, "prompt": "hi", "max_tokens": 1, "frobnicate": [1]}),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
}

#[tokio::test]
async fn models_tokenize_detokenize_and_openapi() {
    let list = send(app(), "GET", "/v1/models", Some(KEY), None).await.json();
    let ids: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![MODEL, "text-davinci-003"]);
    assert_eq!(
        send(app(), "GET", "/v1/models/text-davinci-003", Some(KEY), None)
            .await
            .json()["object"],
        "model"
    );
    send(app(), "GET", "/v1/models/nope", Some(KEY), None)
        .await
        .error(StatusCode::NOT_FOUND);
    // An id that is not UTF-8 once percent-decoded is the same 404 envelope.
    send(app(), "GET", "/v1/models/%ff%fe", Some(KEY), None)
        .await
        .error(StatusCode::NOT_FOUND);
    let t = post("/tokenize", json!({"prompt": "Hello <|im_end|>"})).await.json();
    let tokens = t["tokens"].clone();
    assert_eq!(t["count"], tokens.as_array().unwrap().len());
    assert_eq!(tokens.as_array().unwrap().last().unwrap(), 2);
    assert_eq!(
        post("/detokenize", json!({"tokens": tokens})).await.json()["prompt"],
        "Hello <|im_end|>"
    );
    let chat = post("/tokenize", json!({"messages": [{"role": "user", "content": "Hi"}]}))
        .await
        .json();
    assert_eq!(chat["tokens"][0], 1, "ChatML starts with <|im_start|>");
    post("/detokenize", json!({"tokens": [1, 99999999]}))
        .await
        .error(StatusCode::BAD_REQUEST);
    let spec = send(app(), "GET", "/openapi.json", Some(KEY), None).await.json();
    for path in [
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/models",
        "/tokenize",
        "/detokenize",
        "/health",
    ] {
        assert!(
            spec["paths"].get(path).is_some(),
            "{path} missing from the OpenAPI document"
        );
    }
    // Every keyed route documents the key, rate-limit and availability errors; body-taking ones the body limit.
    let completions = &spec["paths"]["/v1/completions"]["post"]["responses"];
    for code in ["200", "401", "413", "429", "503"] {
        assert!(completions.get(code).is_some(), "/v1/completions lacks {code}");
    }
    assert!(spec["paths"]["/v1/models"]["get"]["responses"].get("401").is_some());
    assert!(spec["paths"]["/tokenize"]["post"]["responses"].get("404").is_some());
    assert!(
        spec["paths"]["/health"]["get"]["responses"].get("401").is_none(),
        "health needs no key"
    );
}

#[tokio::test]
async fn a_request_deadline_ends_with_length() {
    let mut s = state();
    s.limits.request_timeout = std::time::Duration::from_millis(1);
    let body = json!({"model": MODEL, "prompt": "Count: one two three", "max_tokens": 200})
        .to_string()
        .into_bytes();
    let v = send(router(s), "POST", "/v1/completions", Some(KEY), Some(body))
        .await
        .json();
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert!(v["usage"]["completion_tokens"].as_u64().unwrap() < 200);
}

/// A stand-in model for queue and disconnect behaviour: always says the same token, slowly, and counts steps.
struct Slow {
    info: lambda_llm::core::ModelInfo,
    logits: Vec<f32>,
    steps: Arc<std::sync::atomic::AtomicUsize>,
}

impl lambda_llm::core::Model for Slow {
    fn info(&self) -> &lambda_llm::core::ModelInfo {
        &self.info
    }
    fn reset(&mut self, _: usize) -> Result<(), lambda_llm::core::ModelError> {
        Ok(())
    }
    fn forward(&mut self, _: &[u32]) -> Result<&[f32], lambda_llm::core::ModelError> {
        self.steps.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        std::thread::sleep(std::time::Duration::from_millis(5));
        Ok(&self.logits)
    }
}

fn slow_state(queue: usize) -> (AppState, Arc<std::sync::atomic::AtomicUsize>) {
    let s = state();
    let steps = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut logits = vec![0.0; s.model.vocab_size];
    logits[64] = 10.0;
    let info = lambda_llm::core::ModelInfo {
        id: MODEL.into(),
        vocab_size: s.model.vocab_size,
        context_length: s.model.context_length,
        eos_ids: vec![2],
    };
    let model = Slow {
        info,
        logits,
        steps: steps.clone(),
    };
    let worker = lambda_llm::engine::worker::Worker::spawn(
        lambda_llm::core::OneAtATime::new(model),
        s.model.tokenizer.clone(),
        queue,
        1,
    );
    (AppState { worker, ..s }, steps)
}

#[tokio::test]
async fn a_full_queue_is_503_with_retry_after() {
    let (s, _) = slow_state(1);
    let long = json!({"model": MODEL, "prompt": "x", "max_tokens": 400, "stream": true}).to_string();
    // One running and one waiting fill the model; the third is refused at once.
    let mut held = Vec::new();
    for _ in 0..2 {
        let req = Request::post("/v1/completions").header(header::AUTHORIZATION, format!("Bearer {KEY}"));
        let resp = router(s.clone())
            .oneshot(req.body(Body::from(long.clone())).unwrap())
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        held.push(resp);
        while s.worker.queued() > 0 && held.len() == 1 {
            tokio::task::yield_now().await;
        }
    }
    let r = send(
        router(s.clone()),
        "POST",
        "/v1/completions",
        Some(KEY),
        Some(long.into_bytes()),
    )
    .await;
    r.error(StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.headers[header::RETRY_AFTER], "1");
}

#[tokio::test]
async fn a_client_that_disconnects_stops_its_generation() {
    let (s, steps) = slow_state(4);
    let body = json!({"model": MODEL, "prompt": "x", "max_tokens": 5000, "stream": true}).to_string();
    let req = Request::post("/v1/completions").header(header::AUTHORIZATION, format!("Bearer {KEY}"));
    let resp = router(s).oneshot(req.body(Body::from(body)).unwrap()).await.unwrap();
    let mut body = resp.into_body();
    let first = body.frame().await.unwrap().unwrap();
    assert!(first.is_data());
    drop(body);
    let pause = std::time::Duration::from_millis(300);
    tokio::time::sleep(pause).await;
    let after_drop = steps.load(std::sync::atomic::Ordering::SeqCst);
    tokio::time::sleep(pause).await;
    assert_eq!(
        steps.load(std::sync::atomic::Ordering::SeqCst),
        after_drop,
        "generation went on after disconnect"
    );
    assert!(after_drop < 5000);
}

/// A streaming client that leaves while its job still waits in the queue takes the job with it: the model never runs
/// it (the SSE pump notices the client at once, not at the first token it would send).
#[tokio::test]
async fn a_streaming_client_that_disconnects_while_queued_leaves_the_queue() {
    let (s, _) = slow_state(4);
    let body = json!({"model": MODEL, "prompt": "x", "max_tokens": 400, "stream": true}).to_string();
    let post = || {
        Request::post("/v1/completions")
            .header(header::AUTHORIZATION, format!("Bearer {KEY}"))
            .body(Body::from(body.clone()))
            .unwrap()
    };
    let running = router(s.clone()).oneshot(post()).await.unwrap();
    while s.worker.queued() > 0 {
        tokio::task::yield_now().await;
    }
    let waiting = router(s.clone()).oneshot(post()).await.unwrap();
    assert_eq!(s.worker.queued(), 1, "the second job waits behind the first");
    drop(waiting);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    while s.worker.queued() > 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(s.worker.queued(), 0, "the job of the client that left is still queued");
    drop(running);
}

#[tokio::test]
async fn keep_alive_comments_flow_while_a_long_prompt_is_processed() {
    let mut s = state();
    s.limits.keep_alive = std::time::Duration::from_millis(10);
    let prompt = "The history of computing is long and varied. ".repeat(120);
    let body = json!({"model": MODEL, "prompt": prompt, "max_tokens": 1, "stream": true})
        .to_string()
        .into_bytes();
    let r = send(router(s), "POST", "/v1/completions", Some(KEY), Some(body)).await;
    assert!(
        r.body.contains(": keep-alive\n\n"),
        "no keep-alive comment in {}",
        &r.body[..r.body.len().min(300)]
    );
    assert!(r.body.ends_with("data: [DONE]\n\n"));
}

/// Fails on its third forward pass (after the prompt and one token), as a backend error would mid-stream.
struct Breaks {
    inner: Slow,
    calls: usize,
}

impl lambda_llm::core::Model for Breaks {
    fn info(&self) -> &lambda_llm::core::ModelInfo {
        lambda_llm::core::Model::info(&self.inner)
    }
    fn reset(&mut self, capacity: usize) -> Result<(), lambda_llm::core::ModelError> {
        self.calls = 0;
        lambda_llm::core::Model::reset(&mut self.inner, capacity)
    }
    fn forward(&mut self, tokens: &[u32]) -> Result<&[f32], lambda_llm::core::ModelError> {
        self.calls += 1;
        if self.calls == 3 {
            return Err(lambda_llm::core::ModelError::Backend("device lost".into()));
        }
        lambda_llm::core::Model::forward(&mut self.inner, tokens)
    }
}

#[tokio::test]
async fn an_error_after_the_stream_started_is_an_error_event_then_done() {
    let (s, steps) = slow_state(1);
    let info = lambda_llm::core::ModelInfo {
        id: MODEL.into(),
        vocab_size: s.model.vocab_size,
        context_length: s.model.context_length,
        eos_ids: vec![2],
    };
    let mut logits = vec![0.0; s.model.vocab_size];
    logits[64] = 10.0;
    let model = Breaks {
        inner: Slow { info, logits, steps },
        calls: 0,
    };
    let worker = lambda_llm::engine::worker::Worker::spawn(
        lambda_llm::core::OneAtATime::new(model),
        s.model.tokenizer.clone(),
        1,
        1,
    );
    let s = AppState { worker, ..s };
    let body = json!({"model": MODEL, "prompt": "x", "max_tokens": 50, "stream": true})
        .to_string()
        .into_bytes();
    let r = send(router(s), "POST", "/v1/completions", Some(KEY), Some(body)).await;
    assert_eq!(r.status, StatusCode::OK);
    let data = sse_data(&r.body);
    let first: Value = serde_json::from_str(&data[0]).unwrap();
    assert_eq!(first["object"], "text_completion", "text streamed before the failure");
    let err: Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
    assert_eq!(err["error"]["type"], "server_error", "{err}");
    assert!(err["error"]["message"].as_str().unwrap().contains("device lost"));
}
