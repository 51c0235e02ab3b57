//! Continuous batching: running sequences decode together, one batched model step per token; a sequence joins
//! (prompt processed on its own) and leaves between steps, so nobody waits for a whole other generation. While others
//! decode, a newcomer's prompt goes in slices of [`PREFILL_CHUNK`] tokens, one slice after each step, so a long prompt
//! never stalls the running streams for its whole prefill.

use super::generate::{Delta, Generation, GenerationRequest};
use super::model::{Model, ModelError, ModelInfo, TokenDecoder};
use super::sequence::Sequence;
use std::ops::ControlFlow;

/// Identifies a sequence inside a [`BatchModel`].
pub type SeqId = u64;

/// Prompt tokens a newcomer processes between two decode steps of the running sequences: each slice costs them one
/// slice's wait, where the whole prompt at once would cost its whole prefill. A 1,000-token prompt joining a stream on
/// two cores (`lambda-llm bench`, two runs each; its time to first token whole 2.05–2.25 s): slices of 32 tokens, the
/// stream's longest wait 110–117 ms and the newcomer's first token after 2.59–2.99 s; 64: 187–190 ms, 2.40–2.42 s;
/// 128: 319–341 ms, 2.27–2.38 s; 256: 601–607 ms, 2.15–2.26 s.
pub const PREFILL_CHUNK: usize = 64;

/// What [`BatchModel::start`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Started {
    /// The new sequence.
    pub id: SeqId,
    /// Prompt tokens whose state came from a cached prefix.
    pub cached: usize,
    /// Whether the whole prompt is processed (its next-token logits ready); if not, [`BatchModel::resume`] goes on.
    pub done: bool,
}

/// A causal language model holding the state (KV cache) of several sequences at once.
pub trait BatchModel {
    /// Static facts about the model.
    fn info(&self) -> &ModelInfo;

    /// Whether a sequence of up to `capacity` tokens can start now beside the running ones (memory permitting).
    fn has_room(&self, capacity: usize) -> bool;

    /// Starts a sequence of at most `capacity` tokens and processes `prompt`, reusing the state of a cached prefix
    /// of the same `scope` when the model holds one, and at most `limit` of the other prompt tokens now (a model may
    /// take them all). Once the whole prompt is processed, the next-token logits are at [`BatchModel::logits`]. Only
    /// one sequence's prompt may be unfinished at a time.
    fn start(&mut self, prompt: &[u32], capacity: usize, scope: u64, limit: usize) -> Result<Started, ModelError>;

    /// Processes at most `limit` more prompt tokens of `id`, whose prompt [`BatchModel::start`] left unfinished;
    /// `true` once the whole prompt is processed.
    fn resume(&mut self, id: SeqId, limit: usize) -> Result<bool, ModelError>;

    /// Appends one token to each listed sequence, all in one batched step: every sequence whose prompt is processed.
    fn step(&mut self, feeds: &[(SeqId, u32)]) -> Result<(), ModelError>;

    /// The next-token logits of `id` after its last `start`, `resume` or `step` (unspecified while its prompt is still
    /// going in).
    fn logits(&self, id: SeqId) -> &[f32];

    /// Ends `id` and frees its room (its state may be kept as a cached prefix).
    fn finish(&mut self, id: SeqId);
}

impl<M: BatchModel + ?Sized> BatchModel for &mut M {
    fn info(&self) -> &ModelInfo {
        (**self).info()
    }
    fn has_room(&self, capacity: usize) -> bool {
        (**self).has_room(capacity)
    }
    fn start(&mut self, prompt: &[u32], capacity: usize, scope: u64, limit: usize) -> Result<Started, ModelError> {
        (**self).start(prompt, capacity, scope, limit)
    }
    fn resume(&mut self, id: SeqId, limit: usize) -> Result<bool, ModelError> {
        (**self).resume(id, limit)
    }
    fn step(&mut self, feeds: &[(SeqId, u32)]) -> Result<(), ModelError> {
        (**self).step(feeds)
    }
    fn logits(&self, id: SeqId) -> &[f32] {
        (**self).logits(id)
    }
    fn finish(&mut self, id: SeqId) {
        (**self).finish(id)
    }
}

/// Receives one generation's output.
pub trait Listener: Send {
    /// New text; `Break` means nobody listens any more (the generation is cancelled).
    fn delta(&mut self, delta: Delta) -> ControlFlow<()>;
    /// The end: the generation or why it failed.
    fn done(self: Box<Self>, result: Result<Generation, ModelError>);
    /// Whether nobody listens any more, asked while a prompt goes in (before any delta); `false` unless overridden.
    fn cancelled(&self) -> bool {
        false
    }
}

/// A sequence that finished during a step, waiting for the model to forget it and its listener to hear.
type Ended = (SeqId, Box<dyn Listener>, Result<Generation, ModelError>);

struct Running {
    id: SeqId,
    seq: Sequence,
    listener: Box<dyn Listener>,
    next: u32,
}

/// A newcomer whose prompt is still going in, slice by slice.
struct Prefilling {
    id: SeqId,
    seq: Sequence,
    listener: Box<dyn Listener>,
    cached: usize,
}

/// Drives the sequences of a [`BatchModel`]: start them, step them together, hand results to their listeners.
pub struct Batcher<M, D> {
    model: M,
    decoder: D,
    max_batch: usize,
    /// Prompt tokens per slice while others decode.
    chunk: usize,
    running: Vec<Running>,
    prefilling: Option<Prefilling>,
    /// The other half of `running`'s double buffer (empty between steps).
    spare: Vec<Running>,
    feeds: Vec<(SeqId, u32)>,
}

impl<M: BatchModel, D: TokenDecoder> Batcher<M, D> {
    /// At most `max_batch` sequences decode together.
    pub fn new(model: M, decoder: D, max_batch: usize) -> Self {
        Self {
            model,
            decoder,
            max_batch: max_batch.max(1),
            chunk: PREFILL_CHUNK,
            running: Vec::new(),
            prefilling: None,
            spare: Vec::new(),
            feeds: Vec::new(),
        }
    }

    /// Prompt tokens per slice while other sequences decode (at least 1; [`PREFILL_CHUNK`] unless set).
    pub fn prefill_chunk(mut self, tokens: usize) -> Self {
        self.chunk = tokens.max(1);
        self
    }

    /// Sequences in the batch: decoding, or with their prompt going in.
    pub fn running(&self) -> usize {
        self.running.len() + usize::from(self.prefilling.is_some())
    }

    /// Whether `req` can start now (a free place in the batch, room in the model, no other prompt going in).
    pub fn has_room(&self, req: &GenerationRequest) -> bool {
        let context = self.model.info().context_length;
        let capacity = (req.prompt.len() + req.max_tokens).min(context);
        self.running() == 0
            || (self.prefilling.is_none() && self.running.len() < self.max_batch && self.model.has_room(capacity))
    }

    /// Starts `req`: validates it and processes its prompt, all of it when nothing else runs; else its prompt goes in
    /// slice by slice, one after each [`Batcher::step`], so the running sequences wait for one slice between two of
    /// their tokens, never more. Once the prompt is in, picks its first token. A prompt still going in from before is
    /// finished first. Failures go to `listener`.
    pub fn start(&mut self, req: GenerationRequest, listener: Box<dyn Listener>) {
        let seq = match Sequence::new(req, self.model.info()) {
            Ok(seq) => seq,
            Err(e) => return listener.done(Err(e)),
        };
        self.finish_prefill();
        // With others running, only the cached prefix now: the first slice comes after their next step.
        let limit = if self.running.is_empty() { usize::MAX } else { 0 };
        let started = match self.model.start(seq.prompt(), seq.capacity(), seq.cache_scope(), limit) {
            Ok(started) => started,
            Err(e) => return listener.done(Err(e)),
        };
        let prefilling = Prefilling {
            id: started.id,
            seq,
            listener,
            cached: started.cached,
        };
        if started.done {
            self.join(prefilling);
        } else {
            self.prefilling = Some(prefilling);
        }
    }

    /// One batched decode step for every running sequence (finished ones leave the batch), then the next slice of a
    /// prompt going in.
    pub fn step(&mut self) {
        self.decode();
        let limit = self.slice();
        self.prefill(limit);
    }

    /// Prompt tokens a newcomer may process now: all of them when no sequence waits for its next token.
    fn slice(&self) -> usize {
        if self.running.is_empty() {
            usize::MAX
        } else {
            self.chunk
        }
    }

    /// Processes the rest of a prompt going in, at once.
    fn finish_prefill(&mut self) {
        while self.prefilling.is_some() {
            self.prefill(usize::MAX);
        }
    }

    /// Up to `limit` more tokens of the prompt going in; once it is all in, its sequence joins the batch. A listener
    /// gone or a deadline passed ends it instead (cancelled, or `length` with no token).
    fn prefill(&mut self, limit: usize) {
        let Some(mut p) = self.prefilling.take() else { return };
        if p.listener.cancelled() {
            p.seq.cancel();
            return self.join(p);
        }
        if p.seq.expired() {
            return self.join(p); // its first `advance` sees the deadline
        }
        match self.model.resume(p.id, limit) {
            Ok(true) => self.join(p),
            Ok(false) => self.prefilling = Some(p),
            Err(e) => self.end(vec![(p.id, p.listener, Err(e))]),
        }
    }

    /// A sequence whose prompt is in (or that ends before it is): picks its first token and joins the running ones,
    /// or ends.
    fn join(&mut self, p: Prefilling) {
        let Prefilling {
            id,
            mut seq,
            mut listener,
            cached,
        } = p;
        seq.prefilled(cached);
        let step = seq.advance(self.model.logits(id), &self.decoder, &mut |d| listener.delta(d));
        let mut ended = Vec::new();
        self.settle(id, seq, listener, step, &mut ended);
        self.end(ended);
    }

    /// One batched decode step for every running sequence; finished ones leave the batch.
    fn decode(&mut self) {
        if self.running.is_empty() {
            return;
        }
        self.feeds.clear();
        self.feeds.extend(self.running.iter().map(|r| (r.id, r.next)));
        if let Err(e) = self.model.step(&self.feeds) {
            let message = e.to_string();
            for r in std::mem::take(&mut self.running) {
                self.model.finish(r.id);
                r.listener.done(Err(ModelError::Backend(message.clone())));
            }
            return;
        }
        let mut ended = Vec::new();
        // Swap in the spare list (its capacity kept from earlier steps) so a step allocates nothing.
        let mut stepped = std::mem::take(&mut self.spare);
        std::mem::swap(&mut self.running, &mut stepped);
        for mut r in stepped.drain(..) {
            let step = r
                .seq
                .advance(self.model.logits(r.id), &self.decoder, &mut |d| r.listener.delta(d));
            self.settle(r.id, r.seq, r.listener, step, &mut ended);
        }
        self.spare = stepped;
        self.end(ended);
    }

    /// Keeps a sequence that goes on, or finishes it; the model forgets finished ones only after every logits read.
    fn settle(
        &mut self,
        id: SeqId,
        seq: Sequence,
        mut listener: Box<dyn Listener>,
        step: Result<Option<u32>, ModelError>,
        ended: &mut Vec<Ended>,
    ) {
        match step {
            Ok(Some(next)) => self.running.push(Running {
                id,
                seq,
                listener,
                next,
            }),
            Ok(None) => {
                let result = seq.finish(&self.decoder, &mut |d| listener.delta(d));
                ended.push((id, listener, result));
            }
            Err(e) => ended.push((id, listener, Err(e))),
        }
    }

    fn end(&mut self, ended: Vec<Ended>) {
        for (id, listener, result) in ended {
            self.model.finish(id);
            listener.done(result);
        }
    }
}

/// A [`BatchModel`] over a single-sequence [`Model`]: one sequence at a time (for models that cannot batch).
pub struct OneAtATime<M> {
    model: M,
    current: Option<SeqId>,
    next: SeqId,
    logits: Vec<f32>,
}

impl<M: Model> OneAtATime<M> {
    /// Wraps `model`.
    pub fn new(model: M) -> Self {
        Self {
            model,
            current: None,
            next: 0,
            logits: Vec::new(),
        }
    }

    fn keep(&mut self, result: Result<(), ModelError>) -> Result<(), ModelError> {
        if result.is_err() {
            self.current = None;
        }
        result
    }
}

impl<M: Model> BatchModel for OneAtATime<M> {
    fn info(&self) -> &ModelInfo {
        self.model.info()
    }
    fn has_room(&self, _: usize) -> bool {
        self.current.is_none()
    }
    /// Processes the whole prompt at once, whatever the `limit`.
    fn start(&mut self, prompt: &[u32], capacity: usize, _: u64, _: usize) -> Result<Started, ModelError> {
        self.next += 1;
        self.current = Some(self.next);
        let r = self.model.reset(capacity).and_then(|()| {
            let logits = self.model.forward(prompt)?;
            self.logits.clear();
            self.logits.extend_from_slice(logits);
            Ok(())
        });
        self.keep(r)?;
        Ok(Started {
            id: self.next,
            cached: 0,
            done: true,
        })
    }
    fn resume(&mut self, _: SeqId, _: usize) -> Result<bool, ModelError> {
        Err(ModelError::InvalidInput("no prompt is going in".into()))
    }
    fn step(&mut self, feeds: &[(SeqId, u32)]) -> Result<(), ModelError> {
        let r = match feeds {
            [(id, tok)] if Some(*id) == self.current => self.model.forward(&[*tok]).map(|logits| {
                self.logits.clear();
                self.logits.extend_from_slice(logits);
            }),
            _ => Err(ModelError::InvalidInput("one sequence at a time".into())),
        };
        self.keep(r)
    }
    fn logits(&self, _: SeqId) -> &[f32] {
        &self.logits
    }
    fn finish(&mut self, id: SeqId) {
        if self.current == Some(id) {
            self.current = None;
        }
    }
}

#[cfg(test)]
#[path = "batch_tests.rs"]
mod tests;
