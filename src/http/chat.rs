//! `POST /v1/chat/completions`: messages rendered with the model's chat template; a message or `delta` chunks out.

use super::auth::Tokens;
use super::error::ApiError;
use super::extract::AppJson;
use super::params::{self, Plan, ResponseMeta};
use super::sse::{self, ChunkFormat, StreamPlan};
use super::{AppState, Deadline};
use crate::core::{Delta, Generation, RawSampling, TokenLogprob};
use crate::engine::ChatMessage;
use crate::keys::AuthorizedKey;
use crate::openai::{
    ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse, ChatDelta,
    ChatLogprobs, ChatMessageIn, ChatMessageOut, Content, TokenLogprobOut, TopLogprobOut, Usage,
};
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};

/// Most alternatives per position for `top_logprobs` (OpenAI's limit).
const MAX_TOP_LOGPROBS: i64 = 20;

/// Creates a chat completion.
#[utoipa::path(post, path = "/v1/chat/completions", request_body = ChatCompletionRequest,
    responses((status = 200, description = "A chat completion (or an SSE stream of chunks)", body = ChatCompletionResponse),
              (status = "4XX", description = "Invalid request", body = crate::openai::ErrorResponse)),
    security(("api_key" = [])))]
pub async fn create(
    State(state): State<AppState>,
    Extension(key): Extension<AuthorizedKey>,
    deadline: Option<Extension<Deadline>>,
    AppJson(req): AppJson<ChatCompletionRequest>,
) -> Result<Response, ApiError> {
    let model = params::resolve_model(&state, req.model.as_deref(), &key)?;
    if let Some(f) = &req.response_format {
        if f.kind != "text" {
            return Err(ApiError::invalid(
                "response_format",
                format!("`response_format` type `{}` is not supported yet; use `text`.", f.kind),
            ));
        }
    }
    let n = params::count("n", req.n, 1, state.limits.max_n)?;
    let top = match (req.logprobs.unwrap_or(false), req.top_logprobs) {
        (_, Some(k)) if !(0..=MAX_TOP_LOGPROBS).contains(&k) => {
            return Err(ApiError::invalid(
                "top_logprobs",
                format!("`top_logprobs` must be between 0 and 20, got {k}"),
            ))
        }
        (false, Some(k)) if k > 0 => {
            return Err(ApiError::invalid(
                "top_logprobs",
                "`top_logprobs` requires `logprobs` to be true",
            ))
        }
        (true, k) => Some(k.unwrap_or(0) as usize),
        (false, _) => None,
    };
    let messages = messages(req.messages.as_deref())?;
    let template = state.model.chat.as_ref().ok_or_else(|| {
        ApiError::invalid(
            "messages",
            format!("The model `{model}` has no chat template; use /v1/completions."),
        )
    })?;
    let text = template
        .render(&messages, true)
        .map_err(|e| ApiError::invalid("messages", e.to_string()))?;
    let prompt = state.model.tokenizer.encode(&text)?;
    let room = state.model.context_length.saturating_sub(prompt.len());
    let cap = state.limits.max_completion_tokens;
    let limit = match req.max_completion_tokens {
        Some(_) => params::max_tokens("max_completion_tokens", req.max_completion_tokens, room, cap)?,
        None => params::max_tokens("max_tokens", req.max_tokens, room, cap)?,
    };
    let plan = Plan {
        prompts: vec![prompt],
        max_tokens: limit,
        sampling: raw_sampling(&req).validate(state.model.vocab_size)?,
        stop: params::stops(req.stop, state.limits.max_stop)?,
        per_prompt: n,
        logprobs: top,
    };
    let requests = plan.requests(&state, &key, "messages", deadline.map(|Extension(d)| d))?;
    let jobs = params::submit(&state, requests)?;
    let base = ResponseMeta::new(&state, "chatcmpl-", model);
    if req.stream.unwrap_or(false) {
        let include_usage = req.stream_options.and_then(|o| o.include_usage).unwrap_or(false);
        let format = Chunks {
            base,
            want_logprobs: top.is_some(),
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
    let generations = params::collect(&state, jobs, n).await?;
    let prompt_tokens = plan.prompts[0].len();
    let completion_tokens: usize = generations.iter().map(|g| g.usage.completion_tokens).sum();
    params::charge(&state, &key, prompt_tokens + completion_tokens);
    let choices = generations
        .iter()
        .enumerate()
        .map(|(i, g)| ChatChoice {
            index: i as u32,
            message: ChatMessageOut {
                role: "assistant".into(),
                content: g.text.clone(),
            },
            logprobs: top.map(|_| chat_logprobs(&g.logprobs)),
            finish_reason: g.finish_reason.as_str().to_owned(),
        })
        .collect();
    let body = ChatCompletionResponse {
        id: base.id,
        object: "chat.completion".into(),
        created: base.created,
        model: base.model,
        system_fingerprint: base.fingerprint,
        choices,
        usage: Usage::new(prompt_tokens, completion_tokens).with_cached(params::cached_tokens(&generations, n)),
    };
    let mut resp = Json(body).into_response();
    resp.extensions_mut().insert(Tokens {
        prompt: prompt_tokens,
        completion: completion_tokens,
    });
    Ok(resp)
}

fn raw_sampling(req: &ChatCompletionRequest) -> RawSampling {
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

/// Checks roles and flattens text parts; `developer` is treated as `system`.
pub fn messages(input: Option<&[ChatMessageIn]>) -> Result<Vec<ChatMessage>, ApiError> {
    let input = input.ok_or_else(|| ApiError::invalid("messages", "You must provide `messages`."))?;
    if input.is_empty() {
        return Err(ApiError::invalid(
            "messages",
            "`messages` must contain at least one message.",
        ));
    }
    input
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let role = match m.role.as_str() {
                "system" | "developer" => "system",
                "user" => "user",
                "assistant" => "assistant",
                other => {
                    return Err(ApiError::invalid(
                        format!("messages[{i}].role"),
                        format!("Unsupported role `{other}`; use system, user or assistant."),
                    ))
                }
            };
            let content = match &m.content {
                None => String::new(),
                Some(Content::Text(t)) => t.clone(),
                Some(Content::Parts(parts)) => {
                    let mut text = String::new();
                    for (j, p) in parts.iter().enumerate() {
                        match (p.kind.as_str(), &p.text) {
                            ("text", Some(t)) => text.push_str(t),
                            (kind, _) => {
                                return Err(ApiError::invalid(
                                    format!("messages[{i}].content[{j}]"),
                                    format!("Content part type `{kind}` is not supported; only `text` parts are."),
                                ))
                            }
                        }
                    }
                    text
                }
            };
            Ok(ChatMessage::new(role, content))
        })
        .collect()
}

fn chat_logprobs(tokens: &[TokenLogprob]) -> ChatLogprobs {
    let out = |text: &str, logprob: f32| (text.to_owned(), logprob, Some(text.as_bytes().to_vec()));
    ChatLogprobs {
        content: tokens
            .iter()
            .map(|t| {
                let (token, logprob, bytes) = out(&t.text, t.logprob);
                TokenLogprobOut {
                    token,
                    logprob,
                    bytes,
                    top_logprobs: t
                        .top
                        .iter()
                        .map(|a| {
                            let (token, logprob, bytes) = out(&a.text, a.logprob);
                            TopLogprobOut { token, logprob, bytes }
                        })
                        .collect(),
                }
            })
            .collect(),
    }
}

struct Chunks {
    base: ResponseMeta,
    want_logprobs: bool,
}

impl Chunks {
    /// One chunk with this response's id, time, model and fingerprint.
    fn chunk(&self, choices: Vec<ChatChunkChoice>, usage: Option<Usage>) -> String {
        let c = ChatCompletionChunk {
            id: self.base.id.clone(),
            object: "chat.completion.chunk".into(),
            created: self.base.created,
            model: self.base.model.clone(),
            system_fingerprint: self.base.fingerprint.clone(),
            choices,
            usage,
        };
        serde_json::to_string(&c).unwrap_or_default()
    }
}

fn choice(index: usize, delta: ChatDelta, logprobs: Option<ChatLogprobs>, finish: Option<String>) -> ChatChunkChoice {
    ChatChunkChoice {
        index: index as u32,
        delta,
        logprobs,
        finish_reason: finish,
    }
}

impl ChunkFormat for Chunks {
    fn start(&mut self, i: usize) -> Vec<String> {
        let delta = ChatDelta {
            role: Some("assistant".into()),
            content: Some(String::new()),
        };
        vec![self.chunk(vec![choice(i, delta, None, None)], None)]
    }

    fn delta(&mut self, i: usize, d: Delta) -> Vec<String> {
        let logprobs = self.want_logprobs.then(|| chat_logprobs(&d.logprobs));
        let delta = ChatDelta {
            role: None,
            content: Some(d.text),
        };
        vec![self.chunk(vec![choice(i, delta, logprobs, None)], None)]
    }

    fn finish(&mut self, i: usize, g: &Generation) -> Vec<String> {
        let reason = Some(g.finish_reason.as_str().to_owned());
        vec![self.chunk(vec![choice(i, ChatDelta::default(), None, reason)], None)]
    }

    fn usage(&mut self, usage: Usage) -> String {
        self.chunk(Vec::new(), Some(usage))
    }
}
