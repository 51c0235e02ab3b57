//! Batch jobs on S3 and SQS: an uploaded file is split into chunk messages; each chunk becomes one part file; the
//! last part assembles the output and errors files exactly once.
//!
//! Layout (DESIGN.md): `batches/input/NAME.jsonl` → `batches/output/NAME/part-NNNNN.jsonl`, then
//! `batches/output/NAME.jsonl`, `NAME.errors.jsonl` and `NAME.status.json`.

use super::store::{ChunkQueue, ObjectStore, StoreError};
use super::{BatchRunner, OutputLine};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Where uploaded batch files are picked up.
pub const INPUT_PREFIX: &str = "batches/input/";
/// Where results go.
pub const OUTPUT_PREFIX: &str = "batches/output/";

/// One chunk of an input file: the work of one SQS message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chunk {
    /// Bucket of the input.
    pub bucket: String,
    /// Key of the input.
    pub key: String,
    /// ETag of the input when it was split (a replaced file is a new job).
    pub etag: String,
    /// Input file name without `.jsonl`.
    pub name: String,
    /// Chunk number, from 0.
    pub part: usize,
    /// Number of chunks.
    pub parts: usize,
    /// First request of the chunk (1-based, counting non-blank lines).
    pub first_line: usize,
    /// Last request of the chunk (inclusive).
    pub last_line: usize,
    /// Requests in the file.
    pub total_lines: usize,
}

/// `NAME.status.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// `in_progress` or `completed`.
    pub state: String,
    /// The input object.
    pub input: String,
    /// Requests in the file.
    pub total: usize,
    /// Chunks.
    pub parts: usize,
    /// 200 answers (in `NAME.jsonl`), when completed.
    pub succeeded: Option<usize>,
    /// Error lines (in `NAME.errors.jsonl`), when completed.
    pub failed: Option<usize>,
    /// Unix seconds the file was split.
    pub created_at: u64,
    /// Unix seconds it was assembled.
    pub completed_at: Option<u64>,
}

/// Why a chunk was not done; the message goes back to the queue (or to the dead-letter queue after N tries).
#[derive(Debug, thiserror::Error)]
pub enum ChunkError {
    /// The message is not a chunk.
    #[error("not a chunk message: {0}")]
    BadMessage(String),
    /// Not enough time left in this invocation to finish the chunk; nothing was written.
    #[error("deadline: stopped before line {0} of the chunk; the chunk will be redone")]
    Deadline(usize),
    /// S3 or SQS failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Non-blank lines with their 1-based physical line numbers.
fn request_lines(bytes: &[u8]) -> Vec<(usize, String)> {
    String::from_utf8_lossy(bytes)
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| (i + 1, l.to_owned()))
        .collect()
}

fn to_jsonl(lines: &[OutputLine]) -> Vec<u8> {
    let mut out = Vec::new();
    for l in lines {
        out.extend(serde_json::to_vec(l).unwrap_or_default());
        out.push(b'\n');
    }
    out
}

/// The batch job logic over an object store and a queue.
pub struct BatchJobs {
    runner: BatchRunner,
    store: Arc<dyn ObjectStore>,
    queue: Arc<dyn ChunkQueue>,
    chunk_lines: usize,
    /// Time kept for writing the part after the last line.
    pub margin: Duration,
}

impl BatchJobs {
    /// Jobs running requests with `runner`, splitting files into chunks of `chunk_lines` requests.
    pub fn new(
        runner: BatchRunner,
        store: Arc<dyn ObjectStore>,
        queue: Arc<dyn ChunkQueue>,
        chunk_lines: usize,
    ) -> Self {
        Self {
            runner,
            store,
            queue,
            chunk_lines: chunk_lines.max(1),
            margin: Duration::from_secs(5),
        }
    }

    /// An uploaded input file: count its requests, send one message per chunk, write the status. Objects outside
    /// `batches/input/*.jsonl` are ignored (returns `Ok(0)`); returns the number of chunks.
    pub async fn on_upload(&self, bucket: &str, key: &str) -> Result<usize, StoreError> {
        let Some(name) = key.strip_prefix(INPUT_PREFIX).and_then(|k| k.strip_suffix(".jsonl")) else {
            tracing::info!(key, "not a batch input; ignored");
            return Ok(0);
        };
        let name = name.replace('/', "_");
        let Some(input) = self.store.get(bucket, key).await? else {
            tracing::warn!(key, "batch input vanished before it was read");
            return Ok(0);
        };
        let total = request_lines(&input.bytes).len();
        let parts = total.div_ceil(self.chunk_lines).max(1);
        let status = Status {
            state: "in_progress".into(),
            input: key.to_owned(),
            total,
            parts,
            succeeded: None,
            failed: None,
            created_at: now(),
            completed_at: None,
        };
        let status_key = format!("{OUTPUT_PREFIX}{name}.status.json");
        self.store
            .put(
                bucket,
                &status_key,
                serde_json::to_vec_pretty(&status).unwrap_or_default(),
            )
            .await?;
        for part in 0..parts {
            let chunk = Chunk {
                bucket: bucket.to_owned(),
                key: key.to_owned(),
                etag: input.etag.clone(),
                name: name.clone(),
                part,
                parts,
                first_line: part * self.chunk_lines + 1,
                last_line: ((part + 1) * self.chunk_lines).min(total),
                total_lines: total,
            };
            self.queue
                .send(serde_json::to_string(&chunk).unwrap_or_default())
                .await?;
        }
        tracing::info!(key, total, parts, "batch split");
        Ok(parts)
    }

    /// One chunk message: runs its requests and writes its part once; the last part assembles the results.
    pub async fn on_chunk(&self, body: &str, deadline: Option<Instant>) -> Result<(), ChunkError> {
        let chunk: Chunk = serde_json::from_str(body).map_err(|e| ChunkError::BadMessage(e.to_string()))?;
        let dir = format!("{OUTPUT_PREFIX}{}/", chunk.name);
        let part_key = format!("{dir}part-{:05}.jsonl", chunk.part);
        if self.store.get(&chunk.bucket, &part_key).await?.is_none() {
            let Some(input) = self.store.get(&chunk.bucket, &chunk.key).await? else {
                tracing::warn!(key = chunk.key, "batch input is gone; chunk dropped");
                return Ok(());
            };
            if input.etag != chunk.etag {
                tracing::warn!(
                    key = chunk.key,
                    "batch input was replaced; chunk of the old file dropped"
                );
                return Ok(());
            }
            let lines = request_lines(&input.bytes);
            // Lines run concurrently (the model decodes them in one batch); results come back in input order.
            let mut results = futures_util::stream::iter(
                lines
                    .iter()
                    .enumerate()
                    .take(chunk.last_line)
                    .skip(chunk.first_line - 1),
            )
            .map(|(i, (line_no, raw))| async move {
                if deadline.is_some_and(|d| Instant::now() + self.margin >= d) {
                    return Err(ChunkError::Deadline(i + 1));
                }
                Ok(self.runner.run(*line_no, raw).await)
            })
            .buffered(self.runner.concurrency());
            let mut out = Vec::new();
            while let Some(line) = results.next().await {
                out.push(line?);
            }
            // A part appears whole or not at all; a redelivered chunk finds it and does nothing twice.
            self.store.create(&chunk.bucket, &part_key, to_jsonl(&out)).await?;
        }
        self.assemble(&chunk, &dir).await?;
        Ok(())
    }

    /// When every part exists, writes the output and errors files in input order, exactly once, and the status.
    async fn assemble(&self, chunk: &Chunk, dir: &str) -> Result<(), StoreError> {
        let parts = self.store.list(&chunk.bucket, dir).await?;
        let mut parts: Vec<String> = parts.into_iter().filter(|k| k.ends_with(".jsonl")).collect();
        if parts.len() < chunk.parts {
            return Ok(());
        }
        parts.sort();
        let (mut ok, mut failed) = (Vec::new(), Vec::new());
        for key in &parts {
            let Some(obj) = self.store.get(&chunk.bucket, key).await? else {
                return Ok(());
            };
            for line in String::from_utf8_lossy(&obj.bytes).lines().filter(|l| !l.is_empty()) {
                let parsed: OutputLine = serde_json::from_str(line).map_err(|e| StoreError(format!("{key}: {e}")))?;
                if parsed.succeeded() {
                    ok.push(parsed);
                } else {
                    failed.push(parsed);
                }
            }
        }
        let base = format!("{OUTPUT_PREFIX}{}", chunk.name);
        // The output file is created once; whoever creates it also writes the errors file and the status.
        if !self
            .store
            .create(&chunk.bucket, &format!("{base}.jsonl"), to_jsonl(&ok))
            .await?
        {
            return Ok(());
        }
        self.store
            .put(&chunk.bucket, &format!("{base}.errors.jsonl"), to_jsonl(&failed))
            .await?;
        let status_key = format!("{base}.status.json");
        let created_at = match self.store.get(&chunk.bucket, &status_key).await? {
            Some(o) => serde_json::from_slice::<Status>(&o.bytes).map_or(0, |s| s.created_at),
            None => 0,
        };
        let status = Status {
            state: "completed".into(),
            input: chunk.key.clone(),
            total: chunk.total_lines,
            parts: chunk.parts,
            succeeded: Some(ok.len()),
            failed: Some(failed.len()),
            created_at,
            completed_at: Some(now()),
        };
        self.store
            .put(
                &chunk.bucket,
                &status_key,
                serde_json::to_vec_pretty(&status).unwrap_or_default(),
            )
            .await?;
        tracing::info!(
            name = chunk.name,
            succeeded = ok.len(),
            failed = failed.len(),
            "batch completed"
        );
        Ok(())
    }
}
