//! `POST /v1/completions`: the legacy completions endpoint (`openai.Completion.create`).

use super::auth::Tokens;
use super::error::ApiError;
use super::extract::AppJson;
use super::params::{self, Plan, ResponseMeta};
use super::sse::{self, ChunkFormat, StreamPlan};
use super::{AppState, Deadline};
use crate::core::{Delta, Generation, RawSampling, TokenLogprob};
use crate::keys::AuthorizedKey;
use crate::openai::{CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse, Prompt, Usage};
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use std::collections::BTreeMap;

/// OpenAI's default for `max_tokens` on this endpoint.
const DEFAULT_MAX_TOKENS: usize = 16;
/// Most alternatives per position for `logprobs`.
const MAX_LOGPROBS: i64 = 5;

/// Creates a completion.
#[utoipa::path(post, path = "/v1/completions", request_body = CompletionRequest,
    responses((status = 200, description = "A completion (or an SSE stream of chunks)", body = CompletionResponse),
              (status = "4XX", description = "Invalid request", body = crate::openai::ErrorResponse)),
    security(("api_key" = [])))]
pub async fn create(
    State(state): State<AppState>,
    Extension(key): Extension<AuthorizedKey>,
    deadline: Option<Extension<Deadline>>,
    AppJson(req): AppJson<CompletionRequest>,
) -> Result<Response, ApiError> {
    let model = params::resolve_model(&state, req.model.as_deref(), &key)?;
    if req.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::invalid("suffix", "`suffix` is not supported by this model."));
    }
    let stream = req.stream.unwrap_or(false);
    let n = params::count("n", req.n, 1, state.limits.max_n)?;
    let best_of = params::count("best_of", req.best_of, n, state.limits.max_n)?;
    if best_of < n {
        return Err(ApiError::invalid(
            "best_of",
            format!("`best_of` ({best_of}) must be >= `n` ({n})"),
        ));
    }
    if stream && best_of > n {
        return Err(ApiError::invalid("best_of", "`best_of` cannot be used with `stream`"));
    }
    let logprobs = match req.logprobs {
        None => None,
        Some(k) if (0..=MAX_LOGPROBS).contains(&k) => Some(k as usize),
        Some(k) => {
            return Err(ApiError::invalid(
                "logprobs",
                format!("`logprobs` must be between 0 and 5, got {k}"),
            ))
        }
    };
    let echo = req.echo.unwrap_or(false);
    if echo && logprobs.is_some() {
        return Err(ApiError::invalid(
            "echo",
            "`echo` together with `logprobs` is not supported yet.",
        ));
    }
    let sampling = raw_sampling(&req).validate(state.model.vocab_size)?;
    let prompts = prompt_tokens(&state, req.prompt)?;
    let plan = Plan {
        prompts,
        max_tokens: params::max_tokens(
            "max_tokens",
            req.max_tokens,
            DEFAULT_MAX_TOKENS,
            state.limits.max_completion_tokens,
        )?,
        sampling,
        stop: params::stops(req.stop, state.limits.max_stop)?,
        per_prompt: best_of,
        // best_of ranks candidates by their summed logprob, so it needs the chosen tokens' logprobs.
        logprobs: logprobs.or((best_of > n).then_some(0)),
    };
    let requests = plan.requests(&state, &key, "prompt", deadline.map(|Extension(d)| d))?;
    let echoes: Vec<String> = if echo {
        plan.prompts
            .iter()
            .map(|p| state.model.tokenizer.decode_with(p, false))
            .collect::<Result<_, _>>()?
    } else {
        Vec::new()
    };
    let jobs = params::submit(&state, requests)?;
    let base = ResponseMeta::new(&state, "cmpl-", model);
    if stream {
        let include_usage = req.stream_options.and_then(|o| o.include_usage).unwrap_or(false);
        let format = Chunks {
            base,
            echoes,
            per_prompt: n,
            want_logprobs: logprobs.is_some(),
        };
        return Ok(sse::respond(
            state,
            key,
            jobs,
            format,
            StreamPlan {
                per_prompt: n,
                include_usage,
            },
        ));
    }
    let generations = params::collect(&state, jobs, plan.prompts.len() * best_of).await?;
    let prompt_tokens: usize = plan.prompts.iter().map(Vec::len).sum();
    let completion_tokens: usize = generations.iter().map(|g| g.usage.completion_tokens).sum();
    params::charge(&state, &key, prompt_tokens + completion_tokens);
    let mut choices = Vec::new();
    for (p, candidates) in generations.chunks(best_of).enumerate() {
        for g in pick_best(candidates, n) {
            let prefix = echoes.get(p).map_or("", String::as_str);
            choices.push(CompletionChoice {
                text: format!("{prefix}{}", g.text),
                index: choices.len() as u32,
                logprobs: logprobs.map(|_| legacy_logprobs(&g.logprobs, prefix.chars().count())),
                finish_reason: Some(g.finish_reason.as_str().to_owned()),
            });
        }
    }
    let body = CompletionResponse {
        id: base.id,
        object: "text_completion".into(),
        created: base.created,
        model: base.model,
        system_fingerprint: base.fingerprint,
        choices,
        usage: Some(
            Usage::new(prompt_tokens, completion_tokens).with_cached(params::cached_tokens(&generations, best_of)),
        ),
    };
    let mut resp = Json(body).into_response();
    resp.extensions_mut().insert(Tokens {
        prompt: prompt_tokens,
        completion: completion_tokens,
    });
    Ok(resp)
}

fn raw_sampling(req: &CompletionRequest) -> RawSampling {
    RawSampling {
        temperature: req.temperature,
        top_p: req.top_p,
        top_k: req.top_k,
        min_p: req.min_p,
        seed: req.seed,
        presence_penalty: req.presence_penalty,
        frequency_penalty: req.frequency_penalty,
        repetition_penalty: req.repetition_penalty,
        logit_bias: req.logit_bias.clone(),
    }
}

/// Every accepted prompt shape as token ids.
fn prompt_tokens(state: &AppState, prompt: Option<Prompt>) -> Result<Vec<Vec<u32>>, ApiError> {
    let vocab = state.model.vocab_size;
    let ids = |list: Vec<i64>| -> Result<Vec<u32>, ApiError> {
        list.into_iter()
            .map(|t| {
                u32::try_from(t).ok().filter(|&t| (t as usize) < vocab).ok_or_else(|| {
                    ApiError::invalid("prompt", format!("token id {t} is outside the vocabulary (0..{vocab})"))
                })
            })
            .collect()
    };
    let encode = |text: String| state.model.tokenizer.encode(&text).map_err(ApiError::from);
    let prompts = match prompt.ok_or_else(|| ApiError::invalid("prompt", "You must provide a `prompt`."))? {
        Prompt::Text(t) => vec![encode(t)?],
        Prompt::Texts(ts) => ts.into_iter().map(encode).collect::<Result<_, _>>()?,
        Prompt::Tokens(t) => vec![ids(t)?],
        Prompt::TokenLists(ls) => ls.into_iter().map(ids).collect::<Result<_, _>>()?,
    };
    if prompts.is_empty() {
        return Err(ApiError::invalid("prompt", "`prompt` must not be an empty list."));
    }
    Ok(prompts)
}

/// The `n` candidates with the highest summed logprob (all of them when there are only `n`), in that order.
fn pick_best(candidates: &[Generation], n: usize) -> Vec<&Generation> {
    let mut ranked: Vec<&Generation> = candidates.iter().collect();
    if ranked.len() > n {
        let score = |g: &Generation| g.logprobs.iter().map(|t| f64::from(t.logprob)).sum::<f64>();
        ranked.sort_by(|a, b| score(b).total_cmp(&score(a)));
        ranked.truncate(n);
    }
    ranked
}

/// The legacy logprobs object; offsets count characters from the start of the choice text.
fn legacy_logprobs(tokens: &[TokenLogprob], start: usize) -> CompletionLogprobs {
    let mut out = CompletionLogprobs::default();
    let mut offset = start;
    for t in tokens {
        out.tokens.push(t.text.clone());
        out.token_logprobs.push(Some(t.logprob));
        out.top_logprobs.push(Some(
            t.top
                .iter()
                .map(|a| (a.text.clone(), a.logprob))
                .collect::<BTreeMap<_, _>>(),
        ));
        out.text_offset.push(offset);
        offset += t.text.chars().count();
    }
    out
}

/// Stream chunks of this endpoint.
struct Chunks {
    base: ResponseMeta,
    echoes: Vec<String>,
    per_prompt: usize,
    want_logprobs: bool,
}

impl Chunks {
    /// One chunk with this response's id, time, model and fingerprint.
    fn chunk(&self, choices: Vec<CompletionChoice>, usage: Option<Usage>) -> String {
        let c = CompletionResponse {
            id: self.base.id.clone(),
            object: "text_completion".into(),
            created: self.base.created,
            model: self.base.model.clone(),
            system_fingerprint: self.base.fingerprint.clone(),
            choices,
            usage,
        };
        serde_json::to_string(&c).unwrap_or_default()
    }
}

impl ChunkFormat for Chunks {
    fn start(&mut self, choice: usize) -> Vec<String> {
        match self.echoes.get(choice / self.per_prompt.max(1)) {
            Some(echo) => vec![self.chunk(vec![text_choice(choice, echo.clone(), None, None)], None)],
            None => Vec::new(),
        }
    }

    fn delta(&mut self, choice: usize, delta: Delta) -> Vec<String> {
        let logprobs = self.want_logprobs.then(|| legacy_logprobs(&delta.logprobs, 0));
        vec![self.chunk(vec![text_choice(choice, delta.text, logprobs, None)], None)]
    }

    fn finish(&mut self, choice: usize, g: &Generation) -> Vec<String> {
        let reason = Some(g.finish_reason.as_str().to_owned());
        vec![self.chunk(vec![text_choice(choice, String::new(), None, reason)], None)]
    }

    fn usage(&mut self, usage: Usage) -> String {
        self.chunk(Vec::new(), Some(usage))
    }
}

fn text_choice(
    index: usize,
    text: String,
    logprobs: Option<CompletionLogprobs>,
    finish: Option<String>,
) -> CompletionChoice {
    CompletionChoice {
        text,
        index: index as u32,
        logprobs,
        finish_reason: finish,
    }
}
