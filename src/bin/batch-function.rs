//! `batch-function`: the Lambda that runs OpenAI Batch files — S3 uploads are split into SQS chunk messages, and
//! chunk messages are run through the same router as the HTTP API.

use lambda_http::lambda_runtime::{self, service_fn, LambdaEvent};
use lambda_llm::batch::events::handle;
use lambda_llm::batch::jobs::BatchJobs;
use lambda_llm::batch::s3::{S3Store, SqsQueue};
use lambda_llm::batch::BatchRunner;
use lambda_llm::config::Config;
use lambda_llm::engine::Engine;
use lambda_llm::http::AppState;
use lambda_llm::keys::MemoryKeyStore;
use serde_json::Value;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    let start = Instant::now();
    let config = Config::from_env()?;
    lambda_llm::telemetry::init(config.log_format);
    let queue_url = config
        .batch_queue_url
        .clone()
        .ok_or("BATCH_QUEUE_URL is not set: the batch function needs its chunk queue")?;
    let options = config.engine_options();
    let dir = config.model_dir.clone();
    let engine = tokio::task::spawn_blocking(move || Engine::load(&dir, &options));
    let sdk = aws_config::defaults(aws_config::BehaviorVersion::latest()).load().await;
    let store = Arc::new(S3Store::new(&sdk, config.aws_endpoint_url.is_some()));
    let queue = Arc::new(SqsQueue::new(&sdk, queue_url));
    let engine = engine.await??;
    let state = AppState::new(engine, Arc::new(MemoryKeyStore::default()), &config);
    let jobs = Arc::new(BatchJobs::new(
        BatchRunner::new(state)?,
        store,
        queue,
        config.batch_chunk_lines,
    ));
    let name = config.function_name.clone().unwrap_or_else(|| "batch-function".into());
    lambda_llm::telemetry::emf(
        &name,
        &[("InitDuration", start.elapsed().as_secs_f64() * 1e3, "Milliseconds")],
    );
    lambda_runtime::run(service_fn(move |event: LambdaEvent<Value>| {
        let jobs = jobs.clone();
        async move {
            let deadline = lambda_llm::lambda::deadline(event.context.deadline, SystemTime::now());
            handle(&jobs, event.payload, deadline)
                .await
                .map_err(lambda_runtime::Error::from)
        }
    }))
    .await
}
