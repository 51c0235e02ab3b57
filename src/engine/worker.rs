//! The model on its own thread behind a bounded FIFO queue, decoding many requests together (continuous batching).
//!
//! Generation is CPU-bound and `Session::run` takes `&mut self`, so one thread owns the model. Jobs wait in arrival
//! order (nobody starves) and join the running batch between decode steps, as long as the batch has a free place and
//! the model has memory; a full queue is refused at once so callers can answer 503 with `Retry-After` instead of
//! piling up. Events go out on unbounded channels so a slow reader never stalls the batch; a job whose receiver is
//! gone (client disconnected) stops at its next token (or its prompt's next slice), and one still waiting is dropped
//! unstarted.

use crate::core::{BatchModel, Batcher, Delta, Generation, GenerationRequest, Listener, ModelError, TokenDecoder};
use std::collections::VecDeque;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use tokio::sync::mpsc;

/// What a job reports back: `Started`, then per choice any number of `Delta`s and then `Done` or `Failed`; the
/// choices of one job run side by side, so their events interleave.
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
    /// Choice `choice` failed.
    Failed {
        /// Index of the generation within the job.
        choice: usize,
        /// Why.
        error: ModelError,
    },
}

/// The receiving end of a job's events.
pub type JobEvents = mpsc::UnboundedReceiver<JobEvent>;

/// The queue is full; retry later.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the model queue is full ({capacity} waiting)")]
pub struct QueueFull {
    /// Queue capacity.
    pub capacity: usize,
}

struct Job {
    requests: Vec<GenerationRequest>,
    events: mpsc::UnboundedSender<JobEvent>,
}

/// One choice of a job waiting for a place in the batch.
struct Waiting {
    choice: usize,
    request: GenerationRequest,
    events: mpsc::UnboundedSender<JobEvent>,
}

/// Sends one choice's output to its job's channel.
struct ChoiceListener {
    choice: usize,
    events: mpsc::UnboundedSender<JobEvent>,
}

impl Listener for ChoiceListener {
    fn delta(&mut self, delta: Delta) -> ControlFlow<()> {
        let choice = self.choice;
        match self.events.send(JobEvent::Delta { choice, delta }) {
            Ok(()) => ControlFlow::Continue(()),
            Err(_) => ControlFlow::Break(()),
        }
    }

    fn done(self: Box<Self>, result: Result<Generation, ModelError>) {
        let choice = self.choice;
        let _ = self.events.send(match result {
            Ok(generation) => JobEvent::Done { choice, generation },
            Err(error) => JobEvent::Failed { choice, error },
        });
    }
    fn cancelled(&self) -> bool {
        self.events.is_closed()
    }
}

/// Handle to the model thread; cheap to clone.
#[derive(Clone)]
pub struct Worker {
    tx: Sender<Job>,
    queued: Arc<AtomicUsize>,
    capacity: usize,
    max_batch: usize,
    alive: Arc<AtomicBool>,
}

impl Worker {
    /// Starts the model thread: at most `capacity` jobs wait, at most `max_batch` sequences decode together.
    pub fn spawn<M, D>(model: M, decoder: D, capacity: usize, max_batch: usize) -> Self
    where
        M: BatchModel + Send + 'static,
        D: TokenDecoder + Send + 'static,
    {
        let capacity = capacity.max(1);
        let (tx, rx) = channel::<Job>();
        let queued = Arc::new(AtomicUsize::new(0));
        let alive = Arc::new(AtomicBool::new(true));
        let (q, a) = (queued.clone(), alive.clone());
        std::thread::Builder::new()
            .name("model".into())
            .spawn(move || {
                serve(Batcher::new(model, decoder, max_batch), &rx, &q);
                a.store(false, Ordering::SeqCst);
            })
            .expect("the OS refused to start the model thread");
        Self {
            tx,
            queued,
            capacity,
            max_batch: max_batch.max(1),
            alive,
        }
    }

    /// Most sequences decoding together.
    pub fn max_batch(&self) -> usize {
        self.max_batch
    }

    /// Queues `requests` (the choices of one job); events arrive on the returned receiver.
    pub fn submit(&self, requests: Vec<GenerationRequest>) -> Result<JobEvents, QueueFull> {
        let full = QueueFull {
            capacity: self.capacity,
        };
        if self.queued.fetch_add(1, Ordering::SeqCst) >= self.capacity {
            self.queued.fetch_sub(1, Ordering::SeqCst);
            return Err(full);
        }
        let (events, rx) = mpsc::unbounded_channel();
        if self.tx.send(Job { requests, events }).is_err() {
            self.queued.fetch_sub(1, Ordering::SeqCst);
            return Err(full);
        }
        Ok(rx)
    }

    /// Jobs waiting (not counting running ones).
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::SeqCst)
    }

    /// Whether the model thread is still running.
    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::SeqCst)
    }
}

/// The model thread: take jobs, let waiting choices join the batch in order, step the batch; until every sender is
/// gone and the work is done.
fn serve<M: BatchModel, D: TokenDecoder>(mut batcher: Batcher<M, D>, rx: &Receiver<Job>, queued: &AtomicUsize) {
    let mut waiting: VecDeque<Waiting> = VecDeque::new();
    let mut open = true;
    loop {
        if open && batcher.running() == 0 && waiting.is_empty() {
            match rx.recv() {
                Ok(job) => enqueue(&mut waiting, job, queued),
                Err(_) => open = false,
            }
        }
        while let Ok(job) = rx.try_recv() {
            enqueue(&mut waiting, job, queued);
        }
        while let Some(next) = waiting.front() {
            if next.events.is_closed() {
                // The caller left while waiting: drop the job unstarted.
                if next.choice == 0 {
                    queued.fetch_sub(1, Ordering::SeqCst);
                }
                waiting.pop_front();
                continue;
            }
            if !batcher.has_room(&next.request) {
                break;
            }
            let Waiting {
                choice,
                request,
                events,
            } = waiting.pop_front().expect("front exists");
            if choice == 0 {
                queued.fetch_sub(1, Ordering::SeqCst);
                let _ = events.send(JobEvent::Started);
            }
            batcher.start(request, Box::new(ChoiceListener { choice, events }));
        }
        if batcher.running() == 0 && waiting.is_empty() && !open {
            return;
        }
        batcher.step();
    }
}

fn enqueue(waiting: &mut VecDeque<Waiting>, job: Job, queued: &AtomicUsize) {
    if job.requests.is_empty() {
        queued.fetch_sub(1, Ordering::SeqCst); // nothing to run: the receiver just sees the end
        return;
    }
    for (choice, request) in job.requests.into_iter().enumerate() {
        waiting.push_back(Waiting {
            choice,
            request,
            events: job.events.clone(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::{ModelInfo, SamplingParams, SeqId, Started};
    use std::time::Duration;

    /// Emits token 1 ("a") forever, slowly enough for queue tests; id 0 is EOS. Records the largest batch. Takes a
    /// prompt in slices when asked (each as slow as a step), and counts them.
    struct Slow {
        info: ModelInfo,
        logits: Vec<f32>,
        delay: Duration,
        running: Vec<SeqId>,
        next: SeqId,
        widest: Arc<AtomicUsize>,
        /// The sequence whose prompt is going in, and its tokens still to go.
        pending: Option<(SeqId, usize)>,
        slices: Arc<AtomicUsize>,
    }

    impl BatchModel for Slow {
        fn info(&self) -> &ModelInfo {
            &self.info
        }
        fn has_room(&self, _: usize) -> bool {
            true
        }
        fn start(&mut self, prompt: &[u32], _: usize, _: u64, limit: usize) -> Result<Started, ModelError> {
            self.next += 1;
            self.running.push(self.next);
            let done = limit >= prompt.len();
            if !done {
                self.pending = Some((self.next, prompt.len()));
            }
            Ok(Started {
                id: self.next,
                cached: 0,
                done,
            })
        }
        fn resume(&mut self, id: SeqId, limit: usize) -> Result<bool, ModelError> {
            let (pending, left) = self.pending.take().expect("a prompt going in");
            assert_eq!(pending, id);
            self.slices.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(self.delay);
            let left = left.saturating_sub(limit);
            if left > 0 {
                self.pending = Some((id, left));
            }
            Ok(left == 0)
        }
        fn step(&mut self, feeds: &[(SeqId, u32)]) -> Result<(), ModelError> {
            self.widest.fetch_max(feeds.len(), Ordering::SeqCst);
            std::thread::sleep(self.delay);
            Ok(())
        }
        fn logits(&self, _: SeqId) -> &[f32] {
            &self.logits
        }
        fn finish(&mut self, id: SeqId) {
            self.running.retain(|&r| r != id);
            if self.pending.is_some_and(|p| p.0 == id) {
                self.pending = None;
            }
        }
    }

    struct Letters;
    impl TokenDecoder for Letters {
        fn decode(&self, ids: &[u32]) -> Result<String, ModelError> {
            Ok(ids.iter().map(|&i| if i == 1 { 'a' } else { '?' }).collect())
        }
    }

    fn slow(ms: u64) -> (Slow, Arc<AtomicUsize>) {
        let widest = Arc::new(AtomicUsize::new(0));
        let info = ModelInfo {
            id: "slow".into(),
            vocab_size: 2,
            context_length: 1000,
            eos_ids: vec![0],
        };
        let model = Slow {
            info,
            logits: vec![0.0, 1.0],
            delay: Duration::from_millis(ms),
            running: Vec::new(),
            next: 0,
            widest: widest.clone(),
            pending: None,
            slices: Arc::new(AtomicUsize::new(0)),
        };
        (model, widest)
    }

    fn req(n: usize) -> GenerationRequest {
        GenerationRequest::new(vec![1], n, SamplingParams::greedy())
    }

    async fn texts(rx: &mut JobEvents, choices: usize) -> Vec<String> {
        assert!(matches!(rx.recv().await, Some(JobEvent::Started)));
        let mut texts = vec![String::new(); choices];
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
        assert_eq!(done, choices);
        texts
    }

    #[tokio::test]
    async fn a_job_streams_deltas_then_done_for_each_choice() {
        let (model, _) = slow(0);
        let w = Worker::spawn(model, Letters, 4, 8);
        let mut rx = w.submit(vec![req(3), req(2)]).unwrap();
        assert_eq!(texts(&mut rx, 2).await, vec!["aaa", "aa"]);
    }

    #[tokio::test]
    async fn concurrent_jobs_decode_in_one_batch() {
        let (model, widest) = slow(2);
        let w = Worker::spawn(model, Letters, 8, 4);
        let mut jobs: Vec<_> = (0..3).map(|_| w.submit(vec![req(30)]).unwrap()).collect();
        for rx in &mut jobs {
            assert_eq!(texts(rx, 1).await, vec!["a".repeat(30)]);
        }
        assert_eq!(widest.load(Ordering::SeqCst), 3, "the three jobs shared steps");
    }

    #[tokio::test]
    async fn a_full_queue_is_refused_and_a_dropped_receiver_cancels() {
        let (model, _) = slow(20);
        let w = Worker::spawn(model, Letters, 1, 1);
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
        assert_eq!(w.queued(), 0);
    }

    #[tokio::test]
    async fn a_dropped_receiver_stops_a_prompt_going_in_at_its_next_slice() {
        let (model, _) = slow(5);
        let slices = model.slices.clone();
        let w = Worker::spawn(model, Letters, 4, 4);
        let running = w.submit(vec![req(1000)]).unwrap();
        while w.queued() > 0 {
            tokio::task::yield_now().await;
        }
        // 14 slices of 64 tokens, one after each step of the running job.
        let long = GenerationRequest::new(vec![1; 14 * 64], 5, SamplingParams::greedy());
        let mut joining = w.submit(vec![long]).unwrap();
        assert!(matches!(joining.recv().await, Some(JobEvent::Started)));
        drop(joining);
        let pause = Duration::from_millis(150);
        tokio::time::sleep(pause).await;
        let after = slices.load(Ordering::SeqCst);
        tokio::time::sleep(pause).await;
        assert_eq!(
            slices.load(Ordering::SeqCst),
            after,
            "slices went on after the receiver left"
        );
        assert!(after < 13, "{after} slices");
        drop(running);
        assert!(w.is_alive());
    }
}
