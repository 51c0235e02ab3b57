//! `http-function`: the AWS Lambda entry point — cold start (config, Secrets Manager client, engine), then the
//! router under the Lambda Runtime API, streamed or buffered.

use lambda_llm::config::{Config, InvokeMode};
use lambda_llm::engine::Engine;
use lambda_llm::http::AppState;
use lambda_llm::keys::secrets::SecretsManagerKeyStore;
use lambda_llm::keys::KeyStore;
use std::sync::Arc;
use std::time::Instant;

/// Transport failures with the Runtime API tolerated before the process gives up.
const MAX_RUNTIME_RESTARTS: u32 = 5;

#[tokio::main]
async fn main() -> Result<(), lambda_http::Error> {
    let start = Instant::now();
    let config = Config::from_env()?;
    lambda_llm::telemetry::init(config.log_format);
    let secret_id = config
        .api_keys_secret_id
        .clone()
        .ok_or("API_KEYS_SECRET_ID is not set: the function needs the Secrets Manager secret holding the API keys")?;
    let store = SecretsManagerKeyStore::from_env(secret_id, config.keys_cache_ttl).await;
    let options = config.engine_options();
    let dir = config.model_dir.clone();
    // Loading keys and the model overlap: the secret is fetched while ONNX Runtime builds the session.
    let engine = tokio::task::spawn_blocking(move || Engine::load(&dir, &options));
    if let Err(e) = store.refresh().await {
        // Fail closed but stay up: every keyed route answers 503 until the secret can be read.
        tracing::warn!(error = %e, "API keys could not be loaded at start");
    }
    let engine = engine.await??;
    tracing::info!(
        model = %engine.manifest.id,
        load_ms = engine.load_time.as_millis() as u64,
        warm_up_ms = engine.warm_up_time.as_millis() as u64,
        "model loaded"
    );
    let mut state = AppState::new(engine, Arc::new(store), &config);
    let name: Arc<str> = Arc::from(config.function_name.as_deref().unwrap_or("http-function"));
    state.metrics = Some(name.clone());
    lambda_llm::telemetry::emf(
        &name,
        &[("InitDuration", start.elapsed().as_secs_f64() * 1e3, "Milliseconds")],
    );
    let app = lambda_llm::lambda::app(state);
    let mut failures = 0u32;
    loop {
        let started = Instant::now();
        let result = match config.invoke_mode {
            InvokeMode::Streaming => lambda_http::run_with_streaming_response(app.clone()).await,
            InvokeMode::Buffered => lambda_http::run(app.clone()).await,
        };
        // The runtime loop only returns on a transport error with the Runtime API (e.g. a response stream cut
        // when the caller went away). The model is loaded and warm: poll for the next invocation again rather
        // than exit into a new cold start.
        let Err(e) = result else { return Ok(()) };
        // Failures count only while they come in quick succession; a loop that ran a while was healthy.
        failures = if started.elapsed() > std::time::Duration::from_secs(60) {
            1
        } else {
            failures + 1
        };
        if failures > MAX_RUNTIME_RESTARTS {
            return Err(e); // the Runtime API is gone for good (the sandbox is shutting down)
        }
        tracing::warn!(error = %e, failures, "Lambda runtime loop ended; polling for the next invocation");
        tokio::time::sleep(std::time::Duration::from_millis(100 << failures.min(4))).await;
    }
}
