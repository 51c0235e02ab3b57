//! One generation as a state machine: give it the logits of each step; it samples, stops, detokenizes and emits.
//!
//! The single-stream loop ([`super::generate`]) and the batch scheduler ([`super::batch`]) drive the same machine, so a
//! batched generation makes exactly the choices a lone one would.

use super::detok::DetokStream;
use super::generate::{Delta, FinishReason, Generation, GenerationRequest, Timings, TokenLogprob, TopLogprob, Usage};
use super::model::{ModelError, ModelInfo, TokenDecoder};
use super::sampling::{logprobs, LogitsProcessor};
use super::stop::{StopMatcher, StopScan};
use std::collections::VecDeque;
use std::ops::ControlFlow;
use std::time::{Duration, Instant};

/// Where the text of each emitted token goes: `Break` means the listener left (the generation is cancelled).
pub type Sink<'a> = dyn FnMut(Delta) -> ControlFlow<()> + 'a;

/// A generation in progress.
pub struct Sequence {
    req: GenerationRequest,
    eos: Vec<u32>,
    context: usize,
    proc: LogitsProcessor,
    /// Scratch copy of the model's logits (the processor edits them in place).
    logits: Vec<f32>,
    detok: DetokStream,
    stops: StopMatcher,
    /// Logprob entries waiting for their text to be released (stop-string or UTF-8 hold-back).
    pending: VecDeque<(usize, TokenLogprob)>,
    /// Bytes of detokenized text so far (before stop hold-back).
    produced: usize,
    text: String,
    all_logprobs: Vec<TokenLogprob>,
    token_ids: Vec<u32>,
    start: Instant,
    prefill: Duration,
    first_token: Duration,
    cached_tokens: usize,
    finish: FinishReason,
    stopped_by_string: bool,
    done: bool,
}

impl Sequence {
    /// Checks `req` against the model and prepares its state; the clock for its timings starts now.
    pub fn new(req: GenerationRequest, info: &ModelInfo) -> Result<Self, ModelError> {
        let vocab = info.vocab_size;
        if req.prompt.is_empty() {
            return Err(ModelError::InvalidInput("empty prompt".into()));
        }
        if let Some(&bad) = req.prompt.iter().find(|&&t| t as usize >= vocab) {
            return Err(ModelError::InvalidInput(format!(
                "token id {bad} is outside the vocabulary of {vocab}"
            )));
        }
        if req.prompt.len() >= info.context_length {
            return Err(ModelError::CapacityExceeded {
                requested: req.prompt.len() + 1,
                capacity: info.context_length,
            });
        }
        Ok(Self {
            proc: LogitsProcessor::new(req.sampling.clone(), vocab, &req.prompt),
            logits: Vec::with_capacity(vocab),
            detok: DetokStream::new(),
            stops: StopMatcher::new(&req.stop),
            pending: VecDeque::new(),
            produced: 0,
            text: String::new(),
            all_logprobs: Vec::new(),
            token_ids: Vec::new(),
            start: Instant::now(),
            prefill: Duration::ZERO,
            first_token: Duration::ZERO,
            cached_tokens: 0,
            finish: FinishReason::Length,
            stopped_by_string: false,
            done: false,
            eos: info.eos_ids.clone(),
            context: info.context_length,
            req,
        })
    }

    /// The prompt to prefill.
    pub fn prompt(&self) -> &[u32] {
        &self.req.prompt
    }

    /// The prefix-cache partition of this sequence.
    pub fn cache_scope(&self) -> u64 {
        self.req.cache_scope
    }

    /// Tokens the model must hold for this sequence (prompt + generated, at most the context length).
    pub fn capacity(&self) -> usize {
        (self.req.prompt.len() + self.req.max_tokens).min(self.context)
    }

    /// Records that the prompt has been processed, `cached` of its tokens from a prefix cache.
    pub fn prefilled(&mut self, cached: usize) {
        self.prefill = self.start.elapsed();
        self.cached_tokens = cached;
    }

    /// Ends the sequence as cancelled (its listener left); the next `advance` returns `None`.
    pub fn cancel(&mut self) {
        self.finish = FinishReason::Cancelled;
        self.done = true;
    }

    /// Whether the request's deadline has passed.
    pub fn expired(&self) -> bool {
        self.req.deadline.is_some_and(|d| Instant::now() >= d)
    }

    /// Takes the logits for the next position; returns the token to feed the model next, or `None` when finished.
    pub fn advance(
        &mut self,
        logits: &[f32],
        decoder: &dyn TokenDecoder,
        sink: &mut Sink<'_>,
    ) -> Result<Option<u32>, ModelError> {
        if self.done {
            return Ok(None);
        }
        if self.token_ids.len() >= self.req.max_tokens || self.expired() {
            self.done = true;
            return Ok(None);
        }
        self.proc.process(logits, &mut self.logits);
        let tok = self.proc.sample(&self.logits);
        if self.token_ids.is_empty() {
            self.first_token = self.start.elapsed();
        }
        self.proc.observe(tok);
        self.token_ids.push(tok);
        if self.eos.contains(&tok) || self.req.stop_token_ids.contains(&tok) {
            self.finish = FinishReason::Stop;
            self.done = true;
            return Ok(None);
        }
        let piece = self.detok.push(decoder, tok)?;
        if let Some(n) = self.req.logprobs {
            let (lp, top) = logprobs(&self.logits, tok, n);
            let top = top
                .into_iter()
                .map(|(id, logprob)| {
                    Ok(TopLogprob {
                        id,
                        text: decoder.decode(&[id])?,
                        logprob,
                    })
                })
                .collect::<Result<Vec<_>, ModelError>>()?;
            let entry = TokenLogprob {
                id: tok,
                text: decoder.decode(&[tok])?,
                logprob: lp,
                top,
            };
            self.pending.push_back((self.produced, entry));
        }
        self.produced += piece.len();
        let flow = match self.stops.push(&piece) {
            StopScan::Continue(t) => self.emit(t, false, sink),
            StopScan::Stopped(t) => {
                self.finish = FinishReason::Stop;
                self.stopped_by_string = true;
                self.emit(t, false, sink)
            }
        };
        if self.stopped_by_string {
            self.done = true;
            return Ok(None);
        }
        if flow.is_break() {
            self.finish = FinishReason::Cancelled;
            self.done = true;
            return Ok(None);
        }
        if self.token_ids.len() == self.req.max_tokens || self.req.prompt.len() + self.token_ids.len() >= self.context {
            self.done = true;
            return Ok(None);
        }
        Ok(Some(tok))
    }

    /// Releases what detokenization and stop matching still hold and returns the finished generation.
    pub fn finish(mut self, decoder: &dyn TokenDecoder, sink: &mut Sink<'_>) -> Result<Generation, ModelError> {
        if !self.stopped_by_string && self.finish != FinishReason::Cancelled {
            // The tail may yet complete a stop string.
            let tail = self.detok.flush(decoder)?;
            match self.stops.push(&tail) {
                StopScan::Continue(t) => {
                    let rest = t + &self.stops.flush();
                    let _ = self.emit(rest, true, sink);
                }
                StopScan::Stopped(t) => {
                    self.finish = FinishReason::Stop;
                    let _ = self.emit(t, false, sink);
                }
            }
        }
        let completion_tokens = self.token_ids.len();
        Ok(Generation {
            text: self.text,
            token_ids: self.token_ids,
            logprobs: self.all_logprobs,
            finish_reason: self.finish,
            usage: Usage {
                prompt_tokens: self.req.prompt.len(),
                completion_tokens,
                cached_tokens: self.cached_tokens,
            },
            timings: Timings {
                prefill: self.prefill,
                first_token: self.first_token,
                decode: self.start.elapsed().saturating_sub(self.prefill),
            },
        })
    }

    fn emit(&mut self, delta_text: String, release_all: bool, sink: &mut Sink<'_>) -> ControlFlow<()> {
        self.text.push_str(&delta_text);
        let lps: Vec<TokenLogprob> = if release_all {
            self.pending.drain(..).map(|(_, t)| t).collect()
        } else {
            let emitted = self.text.len();
            let mut out = Vec::new();
            while self.pending.front().is_some_and(|(start, _)| *start < emitted) {
                out.extend(self.pending.pop_front().map(|(_, t)| t));
            }
            out
        };
        self.all_logprobs.extend(lps.iter().cloned());
        if delta_text.is_empty() && lps.is_empty() {
            return ControlFlow::Continue(());
        }
        sink(Delta {
            text: delta_text,
            logprobs: lps,
        })
    }
}
