//! The model on its own thread behind a bounded FIFO queue: async handlers submit jobs and receive events.
//!
//! Generation is CPU-bound and `Session::run` takes `&mut self`, so one thread owns the model and serves jobs in
//! arrival order (fair: nobody starves). A full queue is refused at once so callers can answer 429/503 with
//! `Retry-After` instead of piling up. A job whose receiver is gone (client disconnected) stops at the next token.

use crate::core::{generate, Delta, Generation, GenerationRequest, Model, ModelError, TokenDecoder};
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::Arc;
use tokio::sync::mpsc;

/// What a job reports back, in order: per choice any number of `Delta`s, then `Done` or `Failed`.
#[derive(Debug)]
pub enum JobEvent {
    /// The model picked the job up (the prompt is being processed).
    Started,
    /// New text for choice `choice`.
    Delta {
        /// Index of the generation within the job.
        choice: usize,
        /// The text and logprobs.
        delta: Delta,
    },
    /// Choice `choice` finished.
    Done {
        /// Index of the generation within the job.
        choice: usize,
        /// The full result.
        generation: Generation,
    },
    /// Choice `choice` failed; the job goes on with the next choice only if the caller is still listening.
    Failed {
        /// Index of the generation within the job.
        choice: usize,
        /// Why.
        error: ModelError,
    },
}

/// The queue is full; retry later.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the model queue is full ({capacity} waiting)")]
pub struct QueueFull {
    /// Queue capacity.
    pub capacity: usize,
}

struct Job {
    requests: Vec<GenerationRequest>,
    events: mpsc::Sender<JobEvent>,
}

/// Handle to the model thread; cheap to clone.
#[derive(Clone)]
pub struct Worker {
    tx: SyncSender<Job>,
    queued: Arc<AtomicUsize>,
    capacity: usize,
    alive: Arc<AtomicBool>,
}

/// Events buffered per job before the model thread waits for a slow reader.
const EVENT_BUFFER: usize = 64;

impl Worker {
    /// Starts the model thread; at most `capacity` jobs wait behind the running one.
    pub fn spawn<M, D>(mut model: M, decoder: D, capacity: usize) -> Self
    where
        M: Model + Send + 'static,
        D: TokenDecoder + Send + 'static,
    {
        let capacity = capacity.max(1);
        let (tx, rx) = sync_channel::<Job>(capacity);
        let queued = Arc::new(AtomicUsize::new(0));
        let alive = Arc::new(AtomicBool::new(true));
        let (q, a) = (queued.clone(), alive.clone());
        std::thread::Builder::new()
            .name("model".into())
            .spawn(move || {
                for job in rx {
                    q.fetch_sub(1, Ordering::SeqCst);
                    run_job(&mut model, &decoder, job);
                }
                a.store(false, Ordering::SeqCst);
            })
            .expect("the OS refused to start the model thread");
        Self {
            tx,
            queued,
            capacity,
            alive,
        }
    }

    /// Queues `requests` (run back to back as one job); events arrive on the returned receiver.
    pub fn submit(&self, requests: Vec<GenerationRequest>) -> Result<mpsc::Receiver<JobEvent>, QueueFull> {
        let (events, rx) = mpsc::channel(EVENT_BUFFER);
        self.queued.fetch_add(1, Ordering::SeqCst);
        match self.tx.try_send(Job { requests, events }) {
            Ok(()) => Ok(rx),
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.queued.fetch_sub(1, Ordering::SeqCst);
                Err(QueueFull {
                    capacity: self.capacity,
                })
            }
        }
    }

    /// Jobs waiting (not counting the running one).
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::SeqCst)
    }

    /// Whether the model thread is still running.
    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::SeqCst)
    }
}

fn run_job<M: Model, D: TokenDecoder>(model: &mut M, decoder: &D, job: Job) {
    let Job { requests, events } = job;
    if events.blocking_send(JobEvent::Started).is_err() {
        return; // the caller left while the job was queued
    }
    for (choice, req) in requests.iter().enumerate() {
        let mut sink = |delta: Delta| match events.blocking_send(JobEvent::Delta { choice, delta }) {
            Ok(()) => ControlFlow::Continue(()),
            Err(_) => ControlFlow::Break(()),
        };
        let event = match generate(model, decoder, req, &mut sink) {
            Ok(generation) => JobEvent::Done { choice, generation },
            Err(error) => JobEvent::Failed { choice, error },
        };
        if events.blocking_send(event).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::{ModelInfo, SamplingParams};

    /// Emits token 1 ("a") forever, slowly enough for queue tests; id 0 is EOS.
    struct Slow(ModelInfo, Vec<f32>, std::time::Duration);

    impl Model for Slow {
        fn info(&self) -> &ModelInfo {
            &self.0
        }
        fn reset(&mut self, _: usize) -> Result<(), ModelError> {
            Ok(())
        }
        fn forward(&mut self, _: &[u32]) -> Result<&[f32], ModelError> {
            std::thread::sleep(self.2);
            Ok(&self.1)
        }
    }

    struct Letters;
    impl TokenDecoder for Letters {
        fn decode(&self, ids: &[u32]) -> Result<String, ModelError> {
            Ok(ids.iter().map(|&i| if i == 1 { 'a' } else { '?' }).collect())
        }
    }

    fn slow(ms: u64) -> Slow {
        let info = ModelInfo {
            id: "slow".into(),
            vocab_size: 2,
            context_length: 1000,
            eos_ids: vec![0],
        };
        Slow(info, vec![0.0, 1.0], std::time::Duration::from_millis(ms))
    }

    fn req(n: usize) -> GenerationRequest {
        GenerationRequest::new(vec![1], n, SamplingParams::greedy())
    }

    #[tokio::test]
    async fn a_job_streams_deltas_then_done_for_each_choice() {
        let w = Worker::spawn(slow(0), Letters, 4);
        let mut rx = w.submit(vec![req(3), req(2)]).unwrap();
        assert!(matches!(rx.recv().await, Some(JobEvent::Started)));
        let mut texts = vec![String::new(), String::new()];
        let mut done = 0;
        while let Some(ev) = rx.recv().await {
            match ev {
                JobEvent::Delta { choice, delta } => texts[choice].push_str(&delta.text),
                JobEvent::Done { choice, generation } => {
                    assert_eq!(generation.text, texts[choice]);
                    done += 1;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(texts, vec!["aaa", "aa"]);
        assert_eq!(done, 2);
    }

    #[tokio::test]
    async fn a_full_queue_is_refused_and_a_dropped_receiver_cancels() {
        let w = Worker::spawn(slow(20), Letters, 1);
        let running = w.submit(vec![req(1000)]).unwrap();
        // Wait until the model thread has taken the first job, so exactly one can wait.
        while w.queued() > 0 {
            tokio::task::yield_now().await;
        }
        let waiting = w.submit(vec![req(1)]).unwrap();
        assert_eq!(w.submit(vec![req(1)]).unwrap_err(), QueueFull { capacity: 1 });
        // Dropping the running job's receiver stops it; the waiting job then runs to completion.
        drop(running);
        let mut waiting = waiting;
        let mut finished = false;
        while let Some(ev) = waiting.recv().await {
            finished |= matches!(ev, JobEvent::Done { .. });
        }
        assert!(finished);
        assert!(w.is_alive());
    }
}
