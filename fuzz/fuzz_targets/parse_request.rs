//! Fuzz target: bytes through the router's request parsing and validation (completions, chat, tokenize,
//! detokenize) on the real tokenizer and chat template. A panic, a 5xx, or a 4xx outside OpenAI's error envelope is
//! a crash. The first byte picks the route; the rest is the body.
//!
//! The model thread runs a stand-in that ends every choice at once, so a valid request costs one sampling step.
//! Configuration is the server's own (`MODEL_DIR`, `ORT_DYLIB_PATH`, limits), read by `Config::from_env`.

#![no_main]

use axum::body::Body;
use axum::http::{header, Request};
use http_body_util::BodyExt;
use lambda_llm::config::Config;
use lambda_llm::core::{Model, ModelError, ModelInfo};
use lambda_llm::engine::worker::Worker;
use lambda_llm::engine::Engine;
use lambda_llm::http::{router, AppState};
use lambda_llm::keys::{hash_key, KeyRecord, KeysDocument, MemoryKeyStore};
use libfuzzer_sys::fuzz_target;
use std::sync::{Arc, OnceLock};
use tower::ServiceExt;

const KEY: &str = "sk-llm-FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF";
const PATHS: [&str; 4] = ["/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"];
/// End-of-sequence of the default model (`<|im_end|>`).
const EOS: usize = 2;

/// Puts all weight on end-of-sequence: no request setting can make another token win.
struct EosModel {
    info: ModelInfo,
    logits: Vec<f32>,
}

impl Model for EosModel {
    fn info(&self) -> &ModelInfo {
        &self.info
    }
    fn reset(&mut self, _: usize) -> Result<(), ModelError> {
        Ok(())
    }
    fn forward(&mut self, _: &[u32]) -> Result<&[f32], ModelError> {
        Ok(&self.logits)
    }
}

struct Harness {
    runtime: tokio::runtime::Runtime,
    state: AppState,
}

fn harness() -> &'static Harness {
    static H: OnceLock<Harness> = OnceLock::new();
    H.get_or_init(|| {
        let config = Config::from_env().expect("configuration");
        let mut options = config.engine_options();
        options.threads = Some(1);
        let engine = Engine::load(&config.model_dir, &options).expect("model artifact (set MODEL_DIR)");
        let keys = KeysDocument {
            keys: vec![KeyRecord::new("key_fuzz", "fuzz", hash_key(KEY))],
            ..Default::default()
        };
        let state = AppState::new(engine, Arc::new(MemoryKeyStore::new(keys)), &config);
        let mut logits = vec![0.0; state.model.vocab_size];
        logits[EOS] = 10_000.0;
        let info = ModelInfo {
            id: state.model.id.clone(),
            vocab_size: state.model.vocab_size,
            context_length: state.model.context_length,
            eos_ids: vec![EOS as u32],
        };
        let model = lambda_llm::core::OneAtATime::new(EosModel { info, logits });
        let worker = Worker::spawn(model, state.model.tokenizer.clone(), 64, 1);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        Harness {
            runtime,
            state: AppState { worker, ..state },
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&route, body)) = data.split_first() else {
        return;
    };
    let h = harness();
    let path = PATHS[usize::from(route) % PATHS.len()];
    let req = Request::post(path)
        .header(header::AUTHORIZATION, format!("Bearer {KEY}"))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_vec()))
        .expect("request");
    let (status, bytes) = h.runtime.block_on(async {
        let resp = router(h.state.clone()).oneshot(req).await.expect("infallible");
        let status = resp.status();
        let bytes = resp.into_body().collect().await.expect("body").to_bytes();
        (status, bytes)
    });
    let text = String::from_utf8_lossy(&bytes);
    assert!(
        status.is_success() || status.is_client_error(),
        "{path}: {status}: {text}"
    );
    if status.is_client_error() {
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{e}: {text}"));
        let e = &v["error"];
        assert!(
            e["message"].as_str().is_some_and(|m| !m.is_empty())
                && e["type"].is_string()
                && e.get("param").is_some()
                && e.get("code").is_some(),
            "{path}: not the error envelope: {text}"
        );
    } else if !text.ends_with("data: [DONE]\n\n") {
        assert!(
            serde_json::from_slice::<serde_json::Value>(&bytes).is_ok(),
            "{path}: {text}"
        );
    }
});
