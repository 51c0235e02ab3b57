//! Batch jobs over the real S3 and SQS wire protocol (a local moto server): a 200-line file is split into chunk
//! messages, the chunks are delivered shuffled and one twice, and exactly one result line per input line comes out,
//! in input order; a chunk cut short by its deadline is redone without duplicates.

use aws_config::SdkConfig;
use lambda_llm::batch::events::handle;
use lambda_llm::batch::jobs::{BatchJobs, Status};
use lambda_llm::batch::s3::{S3Store, SqsQueue};
use lambda_llm::batch::BatchRunner;
use lambda_llm::config::Config;
use lambda_llm::engine::{Engine, EngineOptions};
use lambda_llm::http::AppState;
use lambda_llm::keys::MemoryKeyStore;
use moto::{sdk_config, Moto};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

#[path = "support/moto.rs"]
mod moto;

const BUCKET: &str = "lambda-llm-batch";

fn state() -> AppState {
    static STATE: OnceLock<AppState> = OnceLock::new();
    STATE
        .get_or_init(|| {
            let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("model-artifacts/smollm2-135m-instruct");
            let engine = Engine::load(&dir, &EngineOptions::default()).expect("model (run `make setup`)");
            AppState::new(
                engine,
                Arc::new(MemoryKeyStore::default()),
                &Config::from_lookup(|_| None).unwrap(),
            )
        })
        .clone()
}

/// Moto with the bucket and the queue, and the job logic wired to them.
async fn setup(chunk_lines: usize) -> (Moto, SdkConfig, String, BatchJobs) {
    let moto = Moto::start();
    let sdk = sdk_config(&moto.endpoint()).await;
    let s3 = aws_sdk_s3::Client::from_conf(aws_sdk_s3::config::Builder::from(&sdk).force_path_style(true).build());
    s3.create_bucket().bucket(BUCKET).send().await.unwrap();
    let sqs = aws_sdk_sqs::Client::new(&sdk);
    let url = sqs
        .create_queue()
        .queue_name("chunks")
        .send()
        .await
        .unwrap()
        .queue_url
        .unwrap();
    let jobs = BatchJobs::new(
        BatchRunner::new(state()).unwrap(),
        Arc::new(S3Store::new(&sdk, true)),
        Arc::new(SqsQueue::new(&sdk, url.clone())),
        chunk_lines,
    );
    (moto, sdk, url, jobs)
}

fn s3_client(sdk: &SdkConfig) -> aws_sdk_s3::Client {
    aws_sdk_s3::Client::from_conf(aws_sdk_s3::config::Builder::from(sdk).force_path_style(true).build())
}

async fn upload(sdk: &SdkConfig, key: &str, lines: &[String]) {
    let body = aws_sdk_s3::primitives::ByteStream::from((lines.join("\n") + "\n").into_bytes());
    s3_client(sdk)
        .put_object()
        .bucket(BUCKET)
        .key(key)
        .body(body)
        .send()
        .await
        .unwrap();
}

async fn read(sdk: &SdkConfig, key: &str) -> Option<String> {
    let out = s3_client(sdk).get_object().bucket(BUCKET).key(key).send().await.ok()?;
    Some(String::from_utf8(out.body.collect().await.unwrap().into_bytes().to_vec()).unwrap())
}

/// An event as `sam local generate-event` shapes it (tests/fixtures), pointed at our bucket, key or message.
fn fixture(name: &str) -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn s3_event(key: &str) -> Value {
    let mut e = fixture("s3-put.json");
    e["Records"][0]["s3"]["bucket"]["name"] = json!(BUCKET);
    e["Records"][0]["s3"]["object"]["key"] = json!(key);
    e
}

fn sqs_event(id: &str, body: &str) -> Value {
    let mut e = fixture("sqs-receive-message.json");
    e["Records"][0]["messageId"] = json!(id);
    e["Records"][0]["body"] = json!(body);
    e
}

/// All chunk messages now on the queue, as (id, body).
async fn drain(sdk: &SdkConfig, url: &str) -> Vec<(String, String)> {
    let sqs = aws_sdk_sqs::Client::new(sdk);
    let mut out = Vec::new();
    loop {
        let got = sqs
            .receive_message()
            .queue_url(url)
            .max_number_of_messages(10)
            .send()
            .await
            .unwrap();
        let msgs = got.messages.unwrap_or_default();
        if msgs.is_empty() {
            return out;
        }
        for m in msgs {
            sqs.delete_message()
                .queue_url(url)
                .receipt_handle(m.receipt_handle.unwrap())
                .send()
                .await
                .unwrap();
            out.push((m.message_id.unwrap(), m.body.unwrap()));
        }
    }
}

/// 200 lines: 140 good (chat and completions, one token each) and 60 bad (broken JSON, no custom_id, too long).
fn input_200() -> Vec<String> {
    (0..200)
        .map(|i| match i % 10 {
            3 => "{broken json".to_string(),
            5 => json!({"method": "POST", "url": "/v1/completions", "body": {"model": "smollm2-135m-instruct", "prompt": "x"}}).to_string(),
            7 => json!({"custom_id": format!("r{i}"), "method": "POST", "url": "/v1/completions",
                         "body": {"model": "smollm2-135m-instruct", "prompt": "x", "max_tokens": 9000}}).to_string(),
            _ if i % 2 == 0 => json!({"custom_id": format!("r{i}"), "method": "POST", "url": "/v1/chat/completions",
                         "body": {"model": "smollm2-135m-instruct", "max_tokens": 1,
                                  "messages": [{"role": "user", "content": format!("Say {i}")}]}}).to_string(),
            _ => json!({"custom_id": format!("r{i}"), "method": "POST", "url": "/v1/completions",
                        "body": {"model": "smollm2-135m-instruct", "prompt": format!("Number {i}"), "max_tokens": 1}}).to_string(),
        })
        .collect()
}

fn lines(text: &str) -> Vec<Value> {
    text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_200_line_file_gives_exactly_one_line_per_input_in_order() {
    let (_moto, sdk, url, jobs) = setup(25).await;
    upload(&sdk, "batches/input/job.jsonl", &input_200()).await;
    assert_eq!(
        handle(&jobs, s3_event("batches/input/job.jsonl"), None).await.unwrap(),
        json!({})
    );
    let status: Status = serde_json::from_str(&read(&sdk, "batches/output/job.status.json").await.unwrap()).unwrap();
    assert_eq!(
        (status.state.as_str(), status.total, status.parts),
        ("in_progress", 200, 8)
    );

    let mut messages = drain(&sdk, &url).await;
    assert_eq!(messages.len(), 8);
    // Out of order, and one message delivered twice.
    messages.reverse();
    messages.swap(1, 5);
    messages.insert(3, messages[6].clone());
    for (id, body) in &messages {
        let resp = handle(&jobs, sqs_event(id, body), None).await.unwrap();
        assert_eq!(resp["batchItemFailures"], json!([]), "{resp}");
    }

    let out = lines(&read(&sdk, "batches/output/job.jsonl").await.expect("output file"));
    let err = lines(
        &read(&sdk, "batches/output/job.errors.jsonl")
            .await
            .expect("errors file"),
    );
    assert_eq!(out.len() + err.len(), 200);
    assert_eq!((out.len(), err.len()), (140, 60));
    let index = |l: &Value| -> usize {
        match l["custom_id"].as_str() {
            Some(id) => id[1..].parse().unwrap(),
            None => {
                l["error"]["message"].as_str().unwrap()["line ".len()..]
                    .split(':')
                    .next()
                    .unwrap()
                    .parse::<usize>()
                    .unwrap()
                    - 1
            }
        }
    };
    let out_idx: Vec<usize> = out.iter().map(index).collect();
    let err_idx: Vec<usize> = err.iter().map(index).collect();
    assert!(
        out_idx.windows(2).all(|w| w[0] < w[1]),
        "output not in input order: {out_idx:?}"
    );
    assert!(
        err_idx.windows(2).all(|w| w[0] < w[1]),
        "errors not in input order: {err_idx:?}"
    );
    let mut all: Vec<usize> = out_idx.iter().chain(&err_idx).copied().collect();
    all.sort();
    assert_eq!(all, (0..200).collect::<Vec<_>>(), "each input line exactly once");
    assert!(out.iter().all(|l| l["response"]["status_code"] == 200));
    let too_long = err.iter().find(|l| l["custom_id"] == "r7").unwrap();
    assert_eq!(too_long["response"]["body"]["error"]["code"], "context_length_exceeded");
    let status: Status = serde_json::from_str(&read(&sdk, "batches/output/job.status.json").await.unwrap()).unwrap();
    assert_eq!(status.state, "completed");
    assert_eq!((status.succeeded, status.failed), (Some(140), Some(60)));
    assert!(status.completed_at.unwrap() >= status.created_at);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_chunk_cut_short_by_its_deadline_is_redone_without_duplicates() {
    let (_moto, sdk, url, jobs) = setup(10).await;
    let input: Vec<String> = input_200()
        .into_iter()
        .filter(|l| l.contains("max_tokens\":1"))
        .take(30)
        .collect();
    upload(&sdk, "batches/input/short.jsonl", &input).await;
    handle(&jobs, s3_event("batches/input/short.jsonl"), None)
        .await
        .unwrap();
    let messages = drain(&sdk, &url).await;
    assert_eq!(messages.len(), 3);
    // The invocation has less time left than the margin: nothing may be written, the message is reported failed.
    let (id, body) = &messages[1];
    let resp = handle(
        &jobs,
        sqs_event(id, body),
        Some(Instant::now() + Duration::from_secs(1)),
    )
    .await
    .unwrap();
    assert_eq!(resp["batchItemFailures"], json!([{"itemIdentifier": id}]));
    assert!(
        read(&sdk, "batches/output/short/part-00001.jsonl").await.is_none(),
        "half a chunk written"
    );
    for (id, body) in messages.iter().chain(std::iter::once(&messages[1])) {
        let resp = handle(&jobs, sqs_event(id, body), None).await.unwrap();
        assert_eq!(resp["batchItemFailures"], json!([]));
    }
    let out = lines(&read(&sdk, "batches/output/short.jsonl").await.unwrap());
    assert_eq!(out.len(), 30);
    let ids: Vec<&str> = out.iter().map(|l| l["custom_id"].as_str().unwrap()).collect();
    let mut unique = ids.clone();
    unique.dedup();
    assert_eq!(unique.len(), 30, "{ids:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn objects_outside_the_input_prefix_are_ignored_and_unknown_events_refused() {
    let (_moto, sdk, url, jobs) = setup(10).await;
    upload(&sdk, "batches/output/x.jsonl", &["{}".to_string()]).await;
    handle(&jobs, s3_event("batches/output/x.jsonl"), None).await.unwrap();
    assert!(drain(&sdk, &url).await.is_empty(), "no recursion on the output prefix");
    assert!(handle(&jobs, json!({"hello": "world"}), None).await.is_err());
}
