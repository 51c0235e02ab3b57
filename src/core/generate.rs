//! The generation types and the single-stream loop: prefill, then one token per step through a [`Sequence`].

use super::model::{Model, ModelError, TokenDecoder};
use super::sampling::SamplingParams;
use super::sequence::Sequence;
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
    /// Prefix-cache partition (the API key): a prompt reuses only state computed for the same scope, so nobody can
    /// learn from `cached_tokens` or timing what another key sent.
    pub cache_scope: u64,
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
            cache_scope: 0,
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
    /// Prompt tokens whose state came from the prefix cache instead of being computed.
    pub cached_tokens: usize,
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
    D: TokenDecoder,
{
    let mut seq = Sequence::new(req.clone(), model.info())?;
    model.reset(seq.capacity())?;
    let logits = model.forward(&req.prompt)?;
    seq.prefilled(0);
    let mut next = seq.advance(logits, decoder, sink)?;
    while let Some(tok) = next {
        let logits = model.forward(&[tok])?;
        next = seq.advance(logits, decoder, sink)?;
    }
    seq.finish(decoder, sink)
}

#[cfg(test)]
#[path = "generate_tests.rs"]
mod tests;
