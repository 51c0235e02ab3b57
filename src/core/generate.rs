//! The generation loop: prefill, then sample → check stops → detokenize → emit, one token per step.

use super::detok::DetokStream;
use super::model::{Model, ModelError, TokenDecoder};
use super::sampling::{logprobs, LogitsProcessor, SamplingParams};
use super::stop::{StopMatcher, StopScan};
use std::collections::VecDeque;
use std::ops::ControlFlow;
use std::time::{Duration, Instant};

/// One validated generation: prompt tokens in, at most `max_tokens` out.
#[derive(Debug, Clone)]
pub struct GenerationRequest {
    /// Prompt token ids (non-empty).
    pub prompt: Vec<u32>,
    /// Upper bound on generated tokens.
    pub max_tokens: usize,
    /// How to pick each token.
    pub sampling: SamplingParams,
    /// Stop strings: generation ends before the first match, which is not emitted.
    pub stop: Vec<String>,
    /// Token ids that end generation besides the model's own EOS ids.
    pub stop_token_ids: Vec<u32>,
    /// `Some(n)`: report each token's logprob and its `n` most likely alternatives.
    pub logprobs: Option<usize>,
    /// Generation ends with `length` when this instant passes (request deadline, Lambda time left).
    pub deadline: Option<Instant>,
}

impl GenerationRequest {
    /// A request with default sampling and no stops.
    pub fn new(prompt: Vec<u32>, max_tokens: usize, sampling: SamplingParams) -> Self {
        Self {
            prompt,
            max_tokens,
            sampling,
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            logprobs: None,
            deadline: None,
        }
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An EOS token or a stop string.
    Stop,
    /// `max_tokens`, the context length, or the deadline.
    Length,
    /// The caller stopped listening (client disconnected).
    Cancelled,
}

impl FinishReason {
    /// The OpenAI spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
        }
    }
}

/// An alternative token at one position.
#[derive(Debug, Clone, PartialEq)]
pub struct TopLogprob {
    /// Token id.
    pub id: u32,
    /// The token's own text (lossy for partial UTF-8).
    pub text: String,
    /// Natural-log probability.
    pub logprob: f32,
}

/// The chosen token at one position, with its logprob and alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    /// Token id.
    pub id: u32,
    /// The token's own text (lossy for partial UTF-8).
    pub text: String,
    /// Natural-log probability of the chosen token.
    pub logprob: f32,
    /// The most likely tokens at this position, best first.
    pub top: Vec<TopLogprob>,
}

/// A piece of output as it becomes safe to show.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Delta {
    /// New text (never half a character, never part of a stop string).
    pub text: String,
    /// Logprobs of the tokens this text completes, when asked for.
    pub logprobs: Vec<TokenLogprob>,
}

/// Token counts, as OpenAI reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// Tokens in the prompt.
    pub prompt_tokens: usize,
    /// Tokens sampled (including a final EOS).
    pub completion_tokens: usize,
}

/// Where the time went.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Timings {
    /// Prompt processing.
    pub prefill: Duration,
    /// From the start to the first sampled token.
    pub first_token: Duration,
    /// Everything after prefill.
    pub decode: Duration,
}

/// The finished generation.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// All emitted text.
    pub text: String,
    /// All sampled token ids (including a final EOS or the tokens of a stop string).
    pub token_ids: Vec<u32>,
    /// Logprobs of the emitted tokens, when asked for.
    pub logprobs: Vec<TokenLogprob>,
    /// Why it ended.
    pub finish_reason: FinishReason,
    /// Token counts.
    pub usage: Usage,
    /// Durations.
    pub timings: Timings,
}

/// Logprob entries waiting for their text to be released (stop-string or UTF-8 hold-back).
struct Pending {
    queue: VecDeque<(usize, TokenLogprob)>,
}

impl Pending {
    /// Entries whose text starts before `emitted` bytes of output.
    fn release(&mut self, emitted: usize) -> Vec<TokenLogprob> {
        let mut out = Vec::new();
        while self.queue.front().is_some_and(|(start, _)| *start < emitted) {
            out.extend(self.queue.pop_front().map(|(_, t)| t));
        }
        out
    }
}

/// Runs one generation on `model`, calling `sink` with each safe-to-show delta.
///
/// `sink` returning `ControlFlow::Break` cancels the generation (finish reason `Cancelled`).
pub fn generate<M, D>(
    model: &mut M,
    decoder: &D,
    req: &GenerationRequest,
    sink: &mut dyn FnMut(Delta) -> ControlFlow<()>,
) -> Result<Generation, ModelError>
where
    M: Model + ?Sized,
    D: TokenDecoder + ?Sized,
{
    let start = Instant::now();
    let (vocab, context, eos) = {
        let info = model.info();
        (info.vocab_size, info.context_length, info.eos_ids.clone())
    };
    if req.prompt.is_empty() {
        return Err(ModelError::InvalidInput("empty prompt".into()));
    }
    if let Some(&bad) = req.prompt.iter().find(|&&t| t as usize >= vocab) {
        return Err(ModelError::InvalidInput(format!(
            "token id {bad} is outside the vocabulary of {vocab}"
        )));
    }
    if req.prompt.len() >= context {
        return Err(ModelError::CapacityExceeded {
            requested: req.prompt.len() + 1,
            capacity: context,
        });
    }
    let capacity = (req.prompt.len() + req.max_tokens).min(context);
    model.reset(capacity)?;

    let mut proc = LogitsProcessor::new(req.sampling.clone(), vocab, &req.prompt);
    let mut logits: Vec<f32> = Vec::with_capacity(vocab);
    logits.extend_from_slice(model.forward(&req.prompt)?);
    let prefill = start.elapsed();

    let mut detok = DetokStream::new();
    let mut stops = StopMatcher::new(&req.stop);
    let mut pending = Pending { queue: VecDeque::new() };
    let mut produced = 0usize; // bytes of detokenized text so far (before stop hold-back)
    let mut text = String::new();
    let mut all_logprobs = Vec::new();
    let mut token_ids = Vec::new();
    let mut first_token = Duration::ZERO;
    let mut finish = FinishReason::Length;
    let mut stopped_by_string = false;

    let mut emit = |delta_text: String, release_all: bool, pending: &mut Pending, text: &mut String| {
        text.push_str(&delta_text);
        let lps = if release_all {
            pending.queue.drain(..).map(|(_, t)| t).collect()
        } else {
            pending.release(text.len())
        };
        all_logprobs.extend(lps.iter().cloned());
        if delta_text.is_empty() && lps.is_empty() {
            return ControlFlow::Continue(());
        }
        sink(Delta {
            text: delta_text,
            logprobs: lps,
        })
    };

    for step in 0..req.max_tokens {
        if req.deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
        proc.process(&mut logits);
        let tok = proc.sample(&logits);
        if step == 0 {
            first_token = start.elapsed();
        }
        proc.observe(tok);
        token_ids.push(tok);
        if eos.contains(&tok) || req.stop_token_ids.contains(&tok) {
            finish = FinishReason::Stop;
            break;
        }
        let piece = detok.push(decoder, tok)?;
        if let Some(n) = req.logprobs {
            let (lp, top) = logprobs(&logits, tok, n);
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
            pending.queue.push_back((
                produced,
                TokenLogprob {
                    id: tok,
                    text: decoder.decode(&[tok])?,
                    logprob: lp,
                    top,
                },
            ));
        }
        produced += piece.len();
        let flow = match stops.push(&piece) {
            StopScan::Continue(t) => emit(t, false, &mut pending, &mut text),
            StopScan::Stopped(t) => {
                finish = FinishReason::Stop;
                stopped_by_string = true;
                emit(t, false, &mut pending, &mut text)
            }
        };
        if stopped_by_string {
            break;
        }
        if flow.is_break() {
            finish = FinishReason::Cancelled;
            break;
        }
        if step + 1 == req.max_tokens || req.prompt.len() + token_ids.len() >= context {
            break;
        }
        logits.clear();
        logits.extend_from_slice(model.forward(&[tok])?);
    }

    if !stopped_by_string && finish != FinishReason::Cancelled {
        // Release what detokenization and stop matching still hold; the tail may yet complete a stop string.
        let tail = detok.flush(decoder)?;
        match stops.push(&tail) {
            StopScan::Continue(t) => {
                let rest = t + &stops.flush();
                let _ = emit(rest, true, &mut pending, &mut text);
            }
            StopScan::Stopped(t) => {
                finish = FinishReason::Stop;
                let _ = emit(t, false, &mut pending, &mut text);
            }
        }
    }

    let completion_tokens = token_ids.len();
    Ok(Generation {
        text,
        token_ids,
        logprobs: all_logprobs,
        finish_reason: finish,
        usage: Usage {
            prompt_tokens: req.prompt.len(),
            completion_tokens,
        },
        timings: Timings {
            prefill,
            first_token,
            decode: start.elapsed().saturating_sub(prefill),
        },
    })
}

#[cfg(test)]
#[path = "generate_tests.rs"]
mod tests;
