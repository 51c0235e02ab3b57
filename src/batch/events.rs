//! The batch function's Lambda events: S3 `ObjectCreated` (split a file) and SQS (run chunks, report failures).

use super::jobs::BatchJobs;
use aws_lambda_events::event::s3::S3Event;
use aws_lambda_events::event::sqs::{BatchItemFailure, SqsBatchResponse, SqsEvent};
use serde_json::Value;
use std::time::Instant;

/// An event this function does not handle.
#[derive(Debug, thiserror::Error)]
#[error("unsupported event: {0}")]
pub struct UnsupportedEvent(String);

fn source(payload: &Value) -> Option<&str> {
    payload["Records"]
        .get(0)
        .and_then(|r| r["eventSource"].as_str().or(r["EventSource"].as_str()))
}

/// Handles one invocation: S3 records split their files (an error fails the invocation, so S3 retries it); SQS
/// records run their chunks, and only the failed messages are reported for redelivery.
pub async fn handle(jobs: &BatchJobs, payload: Value, deadline: Option<Instant>) -> Result<Value, UnsupportedEvent> {
    match source(&payload) {
        Some("aws:s3") => {
            let event: S3Event = serde_json::from_value(payload).map_err(|e| UnsupportedEvent(e.to_string()))?;
            for record in event.records {
                let bucket = record.s3.bucket.name.unwrap_or_default();
                let raw = record.s3.object.key.unwrap_or_default();
                // S3 event keys are URL-encoded, with spaces as '+'.
                let key = percent_encoding::percent_decode_str(&raw.replace('+', " "))
                    .decode_utf8_lossy()
                    .into_owned();
                if let Err(e) = jobs.on_upload(&bucket, &key).await {
                    return Err(UnsupportedEvent(format!("splitting s3://{bucket}/{key} failed: {e}")));
                }
            }
            Ok(serde_json::json!({}))
        }
        Some("aws:sqs") => {
            let event: SqsEvent = serde_json::from_value(payload).map_err(|e| UnsupportedEvent(e.to_string()))?;
            let mut response = SqsBatchResponse::default();
            for record in event.records {
                let id = record.message_id.clone().unwrap_or_default();
                if let Err(e) = jobs
                    .on_chunk(record.body.as_deref().unwrap_or_default(), deadline)
                    .await
                {
                    tracing::warn!(message_id = id, error = %e, "chunk not done; it will be redelivered");
                    let mut failure = BatchItemFailure::default();
                    failure.item_identifier = id;
                    response.batch_item_failures.push(failure);
                }
            }
            serde_json::to_value(response).map_err(|e| UnsupportedEvent(e.to_string()))
        }
        other => Err(UnsupportedEvent(format!("event source {other:?}"))),
    }
}
