//! Server-sent events: job events become OpenAI chunks, then an optional usage chunk, then `data: [DONE]`.

use super::auth::StreamTally;
use super::error::ApiError;
use super::params::charge;
use super::AppState;
use crate::core::{Delta, Generation};
use crate::engine::worker::{JobEvent, JobEvents};
use crate::keys::AuthorizedKey;
use crate::openai::Usage;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;

/// How one endpoint shapes its chunks (completions and chat differ).
pub trait ChunkFormat: Send + 'static {
    /// Chunks to send when choice `choice` starts (chat: the role chunk).
    fn start(&mut self, choice: usize) -> Vec<String>;
    /// Chunks for new text.
    fn delta(&mut self, choice: usize, delta: Delta) -> Vec<String>;
    /// Chunks when the choice finished (the finish reason).
    fn finish(&mut self, choice: usize, generation: &Generation) -> Vec<String>;
    /// The usage chunk.
    fn usage(&mut self, usage: Usage) -> String;
}

/// Options of one stream.
pub struct StreamPlan {
    /// Generations per prompt (prompt tokens are counted once per prompt).
    pub per_prompt: usize,
    /// Send the usage chunk before `[DONE]`.
    pub include_usage: bool,
}

/// Turns a job's events into an SSE response; keep-alive comments flow while the prompt is queued or processed.
///
/// A task pumps events into the response; when the client disconnects the response stream is dropped, the pump sees
/// it (at once, even while the job waits or its prompt goes in), drops the job's receiver, and the model thread drops
/// the job if it still waits, or stops it at its next token or prompt slice.
pub fn respond<F: ChunkFormat>(
    state: AppState,
    key: AuthorizedKey,
    mut jobs: JobEvents,
    mut format: F,
    plan: StreamPlan,
) -> Response {
    let (tx, rx) = mpsc::channel::<String>(32);
    let keep_alive = state.limits.keep_alive;
    let tally = Arc::new(StreamTally::default());
    let counts = tally.clone();
    tokio::spawn(async move {
        let mut started = Vec::new();
        let (mut prompt_tokens, mut completion_tokens) = (0usize, 0usize);
        let mut cached = std::collections::BTreeMap::<usize, usize>::new(); // prompt index → cached tokens
        let mut failed = None;
        'events: loop {
            let ev = tokio::select! {
                ev = jobs.recv() => match ev {
                    Some(ev) => ev,
                    None => break 'events,
                },
                () = tx.closed() => break 'events, // client gone: dropping `jobs` cancels the generation
            };
            let mut out = Vec::new();
            match ev {
                JobEvent::Started => {}
                JobEvent::Delta { choice, delta } => {
                    if !started.contains(&choice) {
                        started.push(choice);
                        out.extend(format.start(choice));
                    }
                    out.extend(format.delta(choice, delta));
                }
                JobEvent::Done { choice, generation } => {
                    if !started.contains(&choice) {
                        started.push(choice);
                        out.extend(format.start(choice));
                    }
                    let per_prompt = plan.per_prompt.max(1);
                    if choice % per_prompt == 0 {
                        prompt_tokens += generation.usage.prompt_tokens;
                    }
                    let c = cached.entry(choice / per_prompt).or_default();
                    *c = (*c).max(generation.usage.cached_tokens);
                    completion_tokens += generation.usage.completion_tokens;
                    counts.prompt.store(prompt_tokens, Ordering::Relaxed);
                    counts.completion.store(completion_tokens, Ordering::Relaxed);
                    super::record_metrics(&state, &generation);
                    out.extend(format.finish(choice, &generation));
                }
                JobEvent::Failed { error, .. } => {
                    failed = Some(ApiError::from(error));
                    break 'events;
                }
            }
            for chunk in out {
                if tx.send(chunk).await.is_err() {
                    break 'events; // client gone: dropping `jobs` cancels the generation
                }
            }
        }
        drop(jobs);
        charge(&state, &key, prompt_tokens + completion_tokens);
        let mut tail = Vec::new();
        match failed {
            Some(e) => tail.push(e.sse_data()),
            None if plan.include_usage => {
                tail.push(format.usage(Usage::new(prompt_tokens, completion_tokens).with_cached(cached.values().sum())))
            }
            None => {}
        }
        tail.push("[DONE]".to_owned());
        for chunk in tail {
            if tx.send(chunk).await.is_err() {
                break;
            }
        }
    });
    let events = ReceiverStream::new(rx).map(|data| Ok::<_, Infallible>(Event::default().data(data)));
    Sse::new(events)
        .keep_alive(KeepAlive::new().interval(keep_alive).text("keep-alive"))
        .into_response()
}
