//! `POST /v1/completions`: the legacy completions request, response and stream chunk.

use super::common::{Stop, StreamOptions, Usage};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use utoipa::ToSchema;

/// `prompt`: text, texts, token ids, or lists of token ids.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, ToSchema)]
#[serde(untagged)]
pub enum Prompt {
    /// One text prompt.
    Text(String),
    /// Several text prompts (one choice set each).
    Texts(Vec<String>),
    /// One prompt as token ids.
    Tokens(Vec<i64>),
    /// Several prompts as token ids.
    TokenLists(Vec<Vec<i64>>),
}

/// A completions request as sent by clients (all fields loosely typed; validated later).
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, ToSchema)]
pub struct CompletionRequest {
    /// Model id or alias.
    pub model: Option<String>,
    /// The prompt(s).
    pub prompt: Option<Prompt>,
    /// Maximum new tokens (default 16).
    pub max_tokens: Option<i64>,
    /// Sampling temperature, 0–2 (default 1).
    pub temperature: Option<f64>,
    /// Nucleus mass, (0, 1] (default 1).
    pub top_p: Option<f64>,
    /// Choices per prompt, 1–`MAX_N` (16 unless configured; default 1).
    pub n: Option<i64>,
    /// Stream server-sent events.
    pub stream: Option<bool>,
    /// Streaming options.
    pub stream_options: Option<StreamOptions>,
    /// Return logprobs of this many most likely tokens (0–5).
    pub logprobs: Option<i64>,
    /// Return the prompt before the completion.
    pub echo: Option<bool>,
    /// Up to `MAX_STOP` stop strings (4 unless configured).
    pub stop: Option<Stop>,
    /// −2–2.
    pub presence_penalty: Option<f64>,
    /// −2–2.
    pub frequency_penalty: Option<f64>,
    /// Token id → bias (−100–100).
    pub logit_bias: Option<BTreeMap<String, f64>>,
    /// Seed for reproducible sampling.
    pub seed: Option<i64>,
    /// End-user id (logged at debug level only).
    pub user: Option<String>,
    /// Text after the completion (not supported: rejected with 400).
    pub suffix: Option<String>,
    /// Candidates generated server-side per choice (≥ n; not with stream).
    pub best_of: Option<i64>,
    /// Extension: keep the k most likely tokens.
    pub top_k: Option<i64>,
    /// Extension: minimum probability relative to the top token.
    pub min_p: Option<f64>,
    /// Extension: repetition penalty (1 = off).
    pub repetition_penalty: Option<f64>,
}

/// Legacy logprobs object of a completion choice.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, ToSchema)]
pub struct CompletionLogprobs {
    /// Token texts.
    pub tokens: Vec<String>,
    /// Log-probability of each token (`null` for the first echoed prompt token).
    pub token_logprobs: Vec<Option<f32>>,
    /// The most likely alternatives at each position.
    pub top_logprobs: Vec<Option<BTreeMap<String, f32>>>,
    /// Character offset of each token in the choice text.
    pub text_offset: Vec<usize>,
}

/// One completion choice.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, ToSchema)]
pub struct CompletionChoice {
    /// Generated text (with the prompt first when `echo`).
    pub text: String,
    /// Position in `choices`.
    pub index: u32,
    /// Logprobs when asked for.
    pub logprobs: Option<CompletionLogprobs>,
    /// `stop` or `length`; `null` in stream chunks before the last.
    pub finish_reason: Option<String>,
}

/// A completions response, or (`object` = `text_completion` too) one stream chunk.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, ToSchema)]
pub struct CompletionResponse {
    /// `cmpl-…`.
    pub id: String,
    /// Always `text_completion`.
    pub object: String,
    /// Unix seconds.
    pub created: u64,
    /// The model id as requested.
    pub model: String,
    /// Build and model fingerprint.
    pub system_fingerprint: String,
    /// The choices.
    pub choices: Vec<CompletionChoice>,
    /// Token counts (stream chunks: only in the usage chunk).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn prompt_takes_all_four_shapes() {
        let p = |v| serde_json::from_value::<Prompt>(v).unwrap();
        assert_eq!(p(json!("hi")), Prompt::Text("hi".into()));
        assert_eq!(p(json!(["a", "b"])), Prompt::Texts(vec!["a".into(), "b".into()]));
        assert_eq!(p(json!([1, 2])), Prompt::Tokens(vec![1, 2]));
        assert_eq!(p(json!([[1], [2, 3]])), Prompt::TokenLists(vec![vec![1], vec![2, 3]]));
    }

    #[test]
    fn unknown_fields_are_ignored_and_everything_is_optional() {
        let r: CompletionRequest =
            serde_json::from_value(json!({"model": "m", "prompt": "x", "frobnicate": true, "max_tokens": 3})).unwrap();
        assert_eq!(r.max_tokens, Some(3));
        let empty: CompletionRequest = serde_json::from_value(json!({})).unwrap();
        assert_eq!(empty, CompletionRequest::default());
    }

    #[test]
    fn response_serializes_like_openai() {
        let r = CompletionResponse {
            id: "cmpl-1".into(),
            object: "text_completion".into(),
            created: 1,
            model: "m".into(),
            system_fingerprint: "fp".into(),
            choices: vec![CompletionChoice {
                text: "x".into(),
                index: 0,
                logprobs: None,
                finish_reason: Some("length".into()),
            }],
            usage: Some(Usage::new(1, 1)),
        };
        assert_eq!(
            serde_json::to_value(&r).unwrap(),
            json!({"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m", "system_fingerprint": "fp",
                   "choices": [{"text": "x", "index": 0, "logprobs": null, "finish_reason": "length"}],
                   "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})
        );
    }
}
