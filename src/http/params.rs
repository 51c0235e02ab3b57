//! Request checks shared by completions and chat: model, n, stop, max_tokens, and turning them into generations.

use super::error::ApiError;
use super::{AppState, Deadline};
use crate::core::validate::{check_completion_limit, check_context, check_prompt_limit};
use crate::core::{Generation, GenerationRequest, SamplingParams, ValidationError};
use crate::engine::worker::{JobEvent, JobEvents, QueueFull};
use crate::keys::{AuthError, AuthorizedKey};
use crate::openai::Stop;
use std::time::Instant;

/// The requested model name, checked to exist and to be allowed for `key`.
pub fn resolve_model(state: &AppState, requested: Option<&str>, key: &AuthorizedKey) -> Result<String, ApiError> {
    let requested = requested
        .filter(|m| !m.trim().is_empty())
        .ok_or_else(|| ApiError::invalid("model", "You must provide a model parameter."))?;
    let id = state
        .model
        .resolve(requested)
        .ok_or_else(|| ApiError::model_not_found(requested))?;
    if !(key.allows_model(requested) || key.allows_model(id)) {
        return Err(AuthError::ModelNotAllowed {
            model: requested.to_owned(),
        }
        .into());
    }
    Ok(requested.to_owned())
}

/// `n` (or `best_of`) in 1..=max.
pub fn count(param: &str, v: Option<i64>, default: usize, max: usize) -> Result<usize, ApiError> {
    match v {
        None => Ok(default),
        Some(n) if n >= 1 && n as u64 <= max as u64 => Ok(n as usize),
        Some(n) => Err(ApiError::invalid(
            param,
            format!("`{param}` must be >= 1 and <= {max}, got {n}"),
        )),
    }
}

/// `stop`: at most `max` strings; empty strings are dropped.
pub fn stops(stop: Option<Stop>, max: usize) -> Result<Vec<String>, ApiError> {
    let list: Vec<String> = stop.map(Stop::into_vec).unwrap_or_default();
    if list.len() > max {
        return Err(ApiError::invalid(
            "stop",
            format!("`stop` takes at most {max} strings, got {}", list.len()),
        ));
    }
    Ok(list.into_iter().filter(|s| !s.is_empty()).collect())
}

/// `max_tokens` in 0..=`cap` (`MAX_COMPLETION_TOKENS`; `None`: no cap but the context), or the default (capped).
pub fn max_tokens(param: &str, v: Option<i64>, default: usize, cap: Option<usize>) -> Result<usize, ApiError> {
    let cap = cap.unwrap_or(usize::MAX);
    match v {
        None => Ok(default.min(cap)),
        Some(n) if n >= 0 => {
            let n = usize::try_from(n).unwrap_or(usize::MAX);
            check_completion_limit(param, n, cap)?;
            Ok(n)
        }
        Some(n) => Err(ApiError::invalid(param, format!("`{param}` must be >= 0, got {n}"))),
    }
}

/// Everything needed to expand prompts into generation requests.
pub struct Plan {
    /// Tokens per prompt.
    pub prompts: Vec<Vec<u32>>,
    /// New tokens per choice.
    pub max_tokens: usize,
    /// Sampling settings (the seed is varied per choice).
    pub sampling: SamplingParams,
    /// Stop strings.
    pub stop: Vec<String>,
    /// Generations per prompt.
    pub per_prompt: usize,
    /// Logprob alternatives, when asked for.
    pub logprobs: Option<usize>,
}

impl Plan {
    /// Checks each prompt against `MAX_PROMPT_TOKENS` and the context, and expands to `prompts × per_prompt`
    /// requests, prompt-major.
    ///
    /// Choice `i` of a seeded request uses `seed + i`, so choices differ yet the whole response is reproducible.
    pub fn requests(
        &self,
        state: &AppState,
        key: &AuthorizedKey,
        param: &str,
        platform: Option<Deadline>,
    ) -> Result<Vec<GenerationRequest>, ApiError> {
        let scope = cache_scope(key);
        // Checked: a `REQUEST_TIMEOUT_SECONDS` past what `Instant` can hold means no timeout, not a panic.
        let own = Instant::now().checked_add(state.limits.request_timeout);
        let deadline = [own, platform.map(|Deadline(d)| d)].into_iter().flatten().min();
        let mut out = Vec::with_capacity(self.prompts.len() * self.per_prompt);
        // Errors about "the prompt" name the request field that carried it (`prompt` or `messages`).
        let named = |e: ValidationError| {
            let mut e = ApiError::from(e);
            if e.param.as_deref() == Some("prompt") {
                e.param = Some(param.to_owned());
            }
            e
        };
        for prompt in &self.prompts {
            if let Some(max) = state.limits.max_prompt_tokens {
                check_prompt_limit(prompt.len(), max).map_err(named)?;
            }
            check_context(prompt.len(), self.max_tokens, state.model.context_length).map_err(named)?;
            for i in 0..self.per_prompt {
                let mut sampling = self.sampling.clone();
                sampling.seed = sampling.seed.map(|s| s.wrapping_add(i as u64));
                let mut req = GenerationRequest::new(prompt.clone(), self.max_tokens, sampling);
                req.stop = self.stop.clone();
                req.logprobs = self.logprobs;
                req.deadline = deadline;
                req.cache_scope = scope;
                out.push(req);
            }
        }
        Ok(out)
    }
}

/// The prefix-cache partition of `key`: prompts reuse only state computed for the same key.
fn cache_scope(key: &AuthorizedKey) -> u64 {
    use std::hash::{Hash, Hasher};
    // SipHash with fixed keys: the same id maps to the same scope for the life of the process.
    let mut h = std::collections::hash_map::DefaultHasher::new();
    key.id.hash(&mut h);
    h.finish()
}

/// Queues a job; a full queue is 503 with `Retry-After`.
pub fn submit(state: &AppState, requests: Vec<GenerationRequest>) -> Result<JobEvents, ApiError> {
    state.worker.submit(requests).map_err(|QueueFull { capacity }| {
        ApiError::unavailable(
            format!("The server is busy ({capacity} requests are waiting); retry shortly."),
            1,
        )
    })
}

/// Waits for every choice of a job (non-streamed responses).
pub async fn collect(state: &AppState, mut rx: JobEvents, choices: usize) -> Result<Vec<Generation>, ApiError> {
    let mut out: Vec<Option<Generation>> = vec![None; choices];
    while let Some(ev) = rx.recv().await {
        match ev {
            JobEvent::Done { choice, generation } => {
                super::record_metrics(state, &generation);
                if let Some(slot) = out.get_mut(choice) {
                    *slot = Some(generation);
                }
            }
            JobEvent::Failed { error, .. } => return Err(error.into()),
            JobEvent::Started | JobEvent::Delta { .. } => {}
        }
    }
    out.into_iter()
        .map(|g| g.ok_or_else(|| ApiError::internal("The model stopped before finishing the request.")))
        .collect()
}

/// Prompt tokens served from the prefix cache: per prompt, the most any of its choices reused.
pub fn cached_tokens(generations: &[Generation], per_prompt: usize) -> usize {
    generations
        .chunks(per_prompt.max(1))
        .map(|c| c.iter().map(|g| g.usage.cached_tokens).max().unwrap_or(0))
        .sum()
}

/// Fields every response and stream chunk of one request repeats.
pub struct ResponseMeta {
    /// `cmpl-…` / `chatcmpl-…`.
    pub id: String,
    /// Unix seconds.
    pub created: u64,
    /// The model name as requested.
    pub model: String,
    /// `system_fingerprint`.
    pub fingerprint: String,
}

impl ResponseMeta {
    /// A fresh id with `prefix`, now, the requested model name and the served model's fingerprint.
    pub fn new(state: &AppState, prefix: &str, model: String) -> Self {
        Self {
            id: super::request_id(prefix),
            created: super::unix_now(),
            model,
            fingerprint: state.model.fingerprint.clone(),
        }
    }
}

/// Charges the key's tokens-per-minute budget.
pub fn charge(state: &AppState, key: &AuthorizedKey, tokens: usize) {
    state
        .limiter
        .record_tokens(&key.id, key.limits, tokens as u64, Instant::now());
}
