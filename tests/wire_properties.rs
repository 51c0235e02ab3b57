//! Property tests of the request path (issue 7): arbitrary JSON, arbitrary bytes and mutated valid requests sent to
//! the real router never panic and never get a 5xx; every 4xx is OpenAI's error envelope; and the validators give
//! either checked values or a `ValidationError`, whatever they are fed.
//!
//! The router runs the real tokenizer and chat template; its model thread ends every choice at once (see
//! `support/app.rs`), so thousands of requests take seconds. Case counts are fixed below (9,000 router requests, about 20 s in debug).

#[path = "support/app.rs"]
mod app;

use app::{envelope_ok, send_typed, state_with, with_eos_model, KEY, MODEL};
use axum::http::{header, StatusCode};
use lambda_llm::core::validate::{check_context, check_prompt_limit};
use lambda_llm::core::RawSampling;
use lambda_llm::http::extract::parse_json;
use lambda_llm::http::{router, AppState};
use lambda_llm::openai::{ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest};
use proptest::prelude::*;
use proptest::sample::select;
use proptest::test_runner::{TestCaseError, TestRunner};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

/// Requests per router property (three of them; the pure properties run 2,000 cases each).
const ROUTER_CASES: u32 = 3_000;

const POST_PATHS: [&str; 4] = ["/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"];

/// Every field the request types know, so that mutations hit parsed fields, not only ignored ones.
const FIELDS: [&str; 30] = [
    "model",
    "prompt",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "n",
    "best_of",
    "stream",
    "stream_options",
    "logprobs",
    "top_logprobs",
    "echo",
    "stop",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "logit_bias",
    "seed",
    "user",
    "suffix",
    "response_format",
    "tokens",
    "role",
    "content",
    "include_usage",
    "type",
];

/// JSON text that `serde_json::Value` cannot hold or that stresses the parser: spliced into bodies as raw text.
const RAW_LITERALS: [&str; 22] = [
    "NaN",
    "Infinity",
    "-Infinity",
    "1e999",
    "-1e999",
    "18446744073709551616",
    "-9223372036854775809",
    "9223372036854775807",
    "-0",
    "1.0e-400",
    "0x10",
    "01",
    "+1",
    r#""\ud800""#,
    r#""\udc00x\ud800""#,
    r#""\u0000\u001f\u007f""#,
    r#""<|im_start|>system\n<|im_end|>""#,
    "true false",
    "",
    "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]",
    r#"{"a":{"a":{"a":{"a":{"a":{"a":{"a":{"a":{"a":{"a":1}}}}}}}}}}"#,
    r#"[-1, 0, 4294967296, 99999999999, -9223372036854775808]"#,
];

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| tokio::runtime::Runtime::new().unwrap())
}

/// The router's state: real tokenizer and template, an instant model, and a short deadline as a safety net.
fn state() -> AppState {
    static STATE: OnceLock<AppState> = OnceLock::new();
    STATE
        .get_or_init(|| with_eos_model(state_with(&[("REQUEST_TIMEOUT_SECONDS", "2")])))
        .clone()
}

fn hostile_string() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => ".{0,24}",
        2 => "[\\x00-\\x1f\\x7f\u{80}-\u{9f}\u{200b}-\u{202e}\u{fffd}\u{fffe}\u{10ffff}a<|>]{0,24}",
        1 => select(vec!["", " ", "<|im_end|>", "<|endoftext|>", "{{ raise('x') }}", "{% for %}", "\u{0}"])
            .prop_map(str::to_owned),
        1 => (1usize..4_000).prop_map(|n| "é".repeat(n)),
    ]
}

fn number() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (-3i64..40).prop_map(Value::from),
        any::<f64>().prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        (-3.0f64..3.0).prop_map(Value::from),
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        number(),
        hostile_string().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 8, |inner| {
        let key = prop_oneof![select(FIELDS.to_vec()).prop_map(str::to_owned), hostile_string()];
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            prop::collection::btree_map(key, inner, 0..8).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A valid request for one of the POST routes.
fn valid_request() -> impl Strategy<Value = (&'static str, Value)> {
    select(vec![
        (
            "/v1/completions",
            json!({"model": MODEL, "prompt": "Once upon a time", "max_tokens": 4, "temperature": 0.7, "n": 2,
                   "stop": ["\n"], "logprobs": 2, "seed": 3}),
        ),
        (
            "/v1/completions",
            json!({"model": MODEL, "prompt": [[1, 2, 3], [4]], "max_tokens": 2, "echo": true, "stream": true,
                   "stream_options": {"include_usage": true}, "best_of": 1}),
        ),
        (
            "/v1/chat/completions",
            json!({"model": MODEL, "messages": [{"role": "system", "content": "Be brief."},
                   {"role": "user", "content": [{"type": "text", "text": "Hi"}]}], "max_tokens": 3,
                   "logprobs": true, "top_logprobs": 2, "logit_bias": {"5": 1.5}, "top_p": 0.9}),
        ),
        (
            "/v1/chat/completions",
            json!({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "stream": true,
                   "max_completion_tokens": 2, "response_format": {"type": "text"}, "presence_penalty": 1}),
        ),
        ("/tokenize", json!({"model": MODEL, "prompt": "Hello"})),
        ("/detokenize", json!({"model": MODEL, "tokens": [1, 2, 3]})),
    ])
}

/// One change to a valid request: a field (top level or in the first message) set to an arbitrary value, or to a
/// raw literal spliced into the text.
#[derive(Debug, Clone)]
enum Mutation {
    Set {
        field: &'static str,
        in_message: bool,
        value: Value,
    },
    Raw {
        field: &'static str,
        literal: &'static str,
    },
    Remove {
        field: &'static str,
    },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let field = || select(FIELDS.to_vec());
    prop_oneof![
        4 => (field(), any::<bool>(), json_value())
            .prop_map(|(field, in_message, value)| Mutation::Set { field, in_message, value }),
        2 => (field(), select(RAW_LITERALS.to_vec())).prop_map(|(field, literal)| Mutation::Raw { field, literal }),
        1 => field().prop_map(|field| Mutation::Remove { field }),
    ]
}

/// `base` with `mutations` applied, as body bytes.
fn mutate(mut base: Value, mutations: &[Mutation]) -> Vec<u8> {
    let mut raw = Vec::new();
    for (i, m) in mutations.iter().enumerate() {
        let obj = base.as_object_mut().expect("requests are objects");
        match m {
            Mutation::Set {
                field,
                in_message,
                value,
            } => {
                let target = match obj.get_mut("messages").and_then(|v| v.get_mut(0)) {
                    Some(Value::Object(msg)) if *in_message => msg,
                    _ => obj,
                };
                target.insert((*field).to_owned(), value.clone());
            }
            Mutation::Raw { field, literal } => {
                let marker = format!("@@raw{i}@@");
                obj.insert((*field).to_owned(), Value::String(marker.clone()));
                raw.push((format!("\"{marker}\""), *literal));
            }
            Mutation::Remove { field } => {
                obj.remove(*field);
            }
        }
    }
    let mut text = base.to_string();
    for (marker, literal) in raw {
        text = text.replace(&marker, literal);
    }
    text.into_bytes()
}

/// Byte-level damage to a valid body: truncation, flipped bytes, inserted bytes.
fn damage(mut bytes: Vec<u8>, edits: &[(usize, u8, u8)]) -> Vec<u8> {
    for &(at, kind, byte) in edits {
        let at = at % (bytes.len() + 1);
        match kind % 3 {
            0 => bytes.truncate(at),
            1 if at < bytes.len() => bytes[at] = byte,
            _ => bytes.insert(at, byte),
        }
    }
    bytes
}

/// The property every response must have: 2xx or 4xx, never 5xx; a 4xx is the OpenAI envelope; a 2xx is JSON or a
/// complete SSE stream without error events.
fn check(method: &str, path: &str, reply: &app::Reply) -> Result<(), TestCaseError> {
    let body = String::from_utf8_lossy(&reply.body);
    let what = format!("{method} {path} -> {}: {body:.400}", reply.status);
    prop_assert!(reply.status.is_success() || reply.status.is_client_error(), "{}", what);
    if reply.status.is_client_error() && method != "HEAD" {
        let v: Value = serde_json::from_slice(&reply.body).map_err(|e| TestCaseError::fail(format!("{e}: {what}")))?;
        prop_assert!(envelope_ok(&v["error"]), "{}", what);
    }
    if reply.status.is_success() && method != "HEAD" {
        let sse = reply
            .headers
            .get(header::CONTENT_TYPE)
            .is_some_and(|t| t == "text/event-stream");
        if sse {
            prop_assert!(body.ends_with("data: [DONE]\n\n"), "{}", what);
            prop_assert!(!body.contains("data: {\"error\""), "{}", what);
        } else {
            prop_assert!(serde_json::from_slice::<Value>(&reply.body).is_ok(), "{}", what);
        }
    }
    Ok(())
}

/// Responses seen by one router property, by class.
#[derive(Default)]
struct Tally {
    success: AtomicUsize,
    client_error: AtomicUsize,
    other: AtomicUsize,
}

fn call(
    tally: &Tally,
    method: &str,
    path: &str,
    content_type: Option<&str>,
    body: Vec<u8>,
) -> Result<(), TestCaseError> {
    let reply = runtime().block_on(send_typed(router(state()), method, path, Some(KEY), content_type, body));
    let class = match reply.status.as_u16() {
        200..=299 => &tally.success,
        400..=499 => &tally.client_error,
        _ => &tally.other,
    };
    class.fetch_add(1, Ordering::Relaxed);
    check(method, path, &reply)
}

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        // A failure is shrunk and reported; its seed is printed, not written beside the sources.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Runs [`ROUTER_CASES`] requests made by `request` from `strategy`'s values, checks each, and prints the figures.
fn router_property<S: Strategy>(
    name: &str,
    strategy: S,
    request: impl Fn(S::Value) -> (&'static str, &'static str, Option<&'static str>, Vec<u8>),
) {
    let tally = Tally::default();
    let start = std::time::Instant::now();
    let result = TestRunner::new(config(ROUTER_CASES)).run(&strategy, |value| {
        let (method, path, content_type, body) = request(value);
        call(&tally, method, path, content_type, body)
    });
    let [ok, client, other] = [&tally.success, &tally.client_error, &tally.other].map(|n| n.load(Ordering::Relaxed));
    eprintln!(
        "{name}: {} requests in {:.1} s: {ok} 2xx, {client} 4xx, {other} other",
        ok + client + other,
        start.elapsed().as_secs_f64(),
    );
    if let Err(e) = result {
        panic!("{name}: {e}");
    }
    assert_eq!(other, 0, "{name}: responses that were neither 2xx nor 4xx");
}

#[test]
fn arbitrary_json_bodies_get_2xx_or_an_error_envelope() {
    router_property(
        "arbitrary JSON",
        (select(POST_PATHS.to_vec()), json_value()),
        |(path, body)| ("POST", path, Some("application/json"), body.to_string().into_bytes()),
    );
}

#[test]
fn mutated_valid_requests_get_2xx_or_an_error_envelope() {
    let strategy = (valid_request(), prop::collection::vec(mutation(), 1..4));
    router_property("mutated valid requests", strategy, |((path, base), mutations)| {
        ("POST", path, Some("application/json"), mutate(base, &mutations))
    });
}

#[test]
fn arbitrary_bytes_methods_and_content_types_get_2xx_or_an_error_envelope() {
    let bytes = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..512),
        (
            valid_request(),
            prop::collection::vec((any::<usize>(), any::<u8>(), any::<u8>()), 0..6)
        )
            .prop_map(|((_, base), edits)| damage(base.to_string().into_bytes(), &edits)),
    ];
    let methods = select(vec![
        "POST", "POST", "POST", "GET", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD",
    ]);
    let paths = prop_oneof![
        6 => select(POST_PATHS.to_vec()),
        1 => select(vec!["/health", "/v1/models", "/v1/models/x%00", "/openapi.json", "/v1//completions"]),
    ];
    let content_types = select(vec![
        Some("application/json"),
        None,
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        Some("multipart/form-data; boundary=x"),
        Some("application/json; charset=latin1"),
    ]);
    router_property(
        "arbitrary bytes",
        (bytes, methods, paths, content_types),
        |(body, method, path, content_type)| (method, path, content_type, body),
    );
}

proptest! {
    #![proptest_config(config(2_000))]

    #[test]
    fn the_body_parser_gives_a_value_or_a_400(bytes in prop::collection::vec(any::<u8>(), 0..256), json in json_value()) {
        for input in [bytes, json.to_string().into_bytes()] {
            let results = [
                parse_json::<CompletionRequest>(&input).err(),
                parse_json::<ChatCompletionRequest>(&input).err(),
                parse_json::<TokenizeRequest>(&input).err(),
                parse_json::<DetokenizeRequest>(&input).err(),
            ];
            for e in results.into_iter().flatten() {
                prop_assert_eq!(e.status, StatusCode::BAD_REQUEST);
                prop_assert!(!e.message.is_empty());
            }
        }
    }

    #[test]
    fn sampling_validation_gives_checked_values_or_an_error_naming_a_field(
        floats in prop::array::uniform6(prop::option::of(prop_oneof![any::<f64>(), -3.0f64..3.0])),
        top_k in prop::option::of(any::<i64>()),
        seed in prop::option::of(any::<i64>()),
        bias in prop::option::of(prop::collection::btree_map(
            prop_oneof![".{0,6}", (0u64..70_000).prop_map(|n| n.to_string()), Just("-1".to_owned())],
            prop_oneof![any::<f64>(), -150.0f64..150.0],
            0..4,
        )),
        vocab in 1usize..70_000,
    ) {
        let raw = RawSampling {
            temperature: floats[0],
            top_p: floats[1],
            min_p: floats[2],
            presence_penalty: floats[3],
            frequency_penalty: floats[4],
            repetition_penalty: floats[5],
            top_k,
            seed,
            logit_bias: bias,
        };
        match raw.validate(vocab) {
            Ok(p) => {
                prop_assert!((0.0..=2.0).contains(&p.temperature));
                prop_assert!(p.top_p > 0.0 && p.top_p <= 1.0);
                prop_assert!((0.0..=1.0).contains(&p.min_p));
                prop_assert!((-2.0..=2.0).contains(&p.presence_penalty));
                prop_assert!((-2.0..=2.0).contains(&p.frequency_penalty));
                prop_assert!(p.repetition_penalty > 0.0 && p.repetition_penalty <= 10.0);
                prop_assert!(p.top_k <= vocab);
                for (id, b) in p.logit_bias {
                    prop_assert!((id as usize) < vocab && (-100.0..=100.0).contains(&b));
                }
            }
            Err(e) => {
                let known = ["temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                             "repetition_penalty", "top_k", "logit_bias"];
                prop_assert!(known.contains(&e.param.as_str()), "{:?}", e);
                prop_assert!(e.message.contains(&format!("`{}`", e.param)), "{:?}", e);
            }
        }
    }

    #[test]
    fn context_checks_never_overflow(prompt in any::<usize>(), max_tokens in any::<usize>(), limit in any::<usize>()) {
        let fits = check_context(prompt, max_tokens, limit).is_ok();
        prop_assert_eq!(fits, prompt > 0 && prompt.checked_add(max_tokens).is_some_and(|t| t <= limit));
        prop_assert_eq!(check_prompt_limit(prompt, limit).is_ok(), prompt <= limit);
    }
}

#[test]
fn the_router_still_answers_a_valid_request_after_hostile_ones() {
    let hostile: [&[u8]; 4] = [b"{\"prompt\": NaN}", b"\xff\xfe\x00", b"[[[[[[", b"{\"n\": 1e999}"];
    let tally = Tally::default();
    for body in hostile {
        call(
            &tally,
            "POST",
            "/v1/completions",
            Some("application/json"),
            body.to_vec(),
        )
        .unwrap();
    }
    assert_eq!(tally.client_error.load(Ordering::Relaxed), hostile.len());
    let body = json!({"model": MODEL, "prompt": "hi", "max_tokens": 1})
        .to_string()
        .into_bytes();
    let reply = runtime().block_on(send_typed(
        router(state()),
        "POST",
        "/v1/completions",
        Some(KEY),
        None,
        body,
    ));
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json()["object"], "text_completion");
}
