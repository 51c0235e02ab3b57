//! `POST /v1/chat/completions`: messages in, a message or `delta` chunks out.

use super::common::{Stop, StreamOptions, Usage};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use utoipa::ToSchema;

/// A content part of a message (only `text` parts are supported).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, ToSchema)]
pub struct ContentPart {
    /// Part type: `text` (others are rejected).
    #[serde(rename = "type")]
    pub kind: String,
    /// The text of a `text` part.
    pub text: Option<String>,
}

/// Message content: a string or a list of parts.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, ToSchema)]
#[serde(untagged)]
pub enum Content {
    /// Plain text.
    Text(String),
    /// Content parts.
    Parts(Vec<ContentPart>),
}

/// A message as clients send it.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, ToSchema)]
pub struct ChatMessageIn {
    /// `system`, `developer`, `user` or `assistant`.
    pub role: String,
    /// The content (may be null for assistant messages).
    pub content: Option<Content>,
    /// Optional participant name.
    pub name: Option<String>,
}

/// `response_format`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, ToSchema)]
pub struct ResponseFormat {
    /// `text` (supported) or `json_object` / `json_schema` (not yet).
    #[serde(rename = "type")]
    pub kind: String,
}

/// A chat completions request (loosely typed; validated later).
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, ToSchema)]
pub struct ChatCompletionRequest {
    /// Model id or alias.
    pub model: Option<String>,
    /// The conversation.
    pub messages: Option<Vec<ChatMessageIn>>,
    /// Maximum new tokens (deprecated name).
    pub max_tokens: Option<i64>,
    /// Maximum new tokens.
    pub max_completion_tokens: Option<i64>,
    /// 0–2.
    pub temperature: Option<f64>,
    /// (0, 1].
    pub top_p: Option<f64>,
    /// Choices, 1–`MAX_N` (16 unless configured).
    pub n: Option<i64>,
    /// Stream `chat.completion.chunk` events.
    pub stream: Option<bool>,
    /// Streaming options.
    pub stream_options: Option<StreamOptions>,
    /// Up to `MAX_STOP` stop strings (4 unless configured).
    pub stop: Option<Stop>,
    /// −2–2.
    pub presence_penalty: Option<f64>,
    /// −2–2.
    pub frequency_penalty: Option<f64>,
    /// Token id → bias.
    pub logit_bias: Option<BTreeMap<String, f64>>,
    /// Return logprobs of the chosen tokens.
    pub logprobs: Option<bool>,
    /// Alternatives per position (0–20), needs `logprobs`.
    pub top_logprobs: Option<i64>,
    /// Output format.
    pub response_format: Option<ResponseFormat>,
    /// Seed for reproducible sampling.
    pub seed: Option<i64>,
    /// End-user id.
    pub user: Option<String>,
    /// Extension: top-k.
    pub top_k: Option<i64>,
    /// Extension: min-p.
    pub min_p: Option<f64>,
    /// Extension: repetition penalty.
    pub repetition_penalty: Option<f64>,
}

/// An alternative token in chat logprobs.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, ToSchema)]
pub struct TopLogprobOut {
    /// Token text.
    pub token: String,
    /// Log-probability.
    pub logprob: f32,
    /// UTF-8 bytes of the token.
    pub bytes: Option<Vec<u8>>,
}

/// A chosen token in chat logprobs.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, ToSchema)]
pub struct TokenLogprobOut {
    /// Token text.
    pub token: String,
    /// Log-probability.
    pub logprob: f32,
    /// UTF-8 bytes of the token.
    pub bytes: Option<Vec<u8>>,
    /// Most likely alternatives.
    pub top_logprobs: Vec<TopLogprobOut>,
}

/// `choices[].logprobs` of chat.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, ToSchema)]
pub struct ChatLogprobs {
    /// One entry per generated token.
    pub content: Vec<TokenLogprobOut>,
}

/// The assistant's message.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, ToSchema)]
pub struct ChatMessageOut {
    /// Always `assistant`.
    pub role: String,
    /// The generated text.
    pub content: String,
}

/// One chat choice.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, ToSchema)]
pub struct ChatChoice {
    /// Position in `choices`.
    pub index: u32,
    /// The answer.
    pub message: ChatMessageOut,
    /// Logprobs when asked for.
    pub logprobs: Option<ChatLogprobs>,
    /// `stop` or `length`.
    pub finish_reason: String,
}

/// A chat completion.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, ToSchema)]
pub struct ChatCompletionResponse {
    /// `chatcmpl-…`.
    pub id: String,
    /// Always `chat.completion`.
    pub object: String,
    /// Unix seconds.
    pub created: u64,
    /// The model id as requested.
    pub model: String,
    /// Build and model fingerprint.
    pub system_fingerprint: String,
    /// The choices.
    pub choices: Vec<ChatChoice>,
    /// Token counts.
    pub usage: Usage,
}

/// The incremental message of a stream chunk.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, ToSchema)]
pub struct ChatDelta {
    /// `assistant`, in the first chunk of each choice only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// New text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

/// One choice of a stream chunk.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, ToSchema)]
pub struct ChatChunkChoice {
    /// Position in `choices`.
    pub index: u32,
    /// The increment.
    pub delta: ChatDelta,
    /// Logprobs of the tokens in this increment.
    pub logprobs: Option<ChatLogprobs>,
    /// Set in the last chunk of the choice.
    pub finish_reason: Option<String>,
}

/// A `chat.completion.chunk` event.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, ToSchema)]
pub struct ChatCompletionChunk {
    /// Same id for every chunk of a response.
    pub id: String,
    /// Always `chat.completion.chunk`.
    pub object: String,
    /// Unix seconds.
    pub created: u64,
    /// The model id as requested.
    pub model: String,
    /// Build and model fingerprint.
    pub system_fingerprint: String,
    /// Choices in this chunk (empty in the usage chunk).
    pub choices: Vec<ChatChunkChoice>,
    /// Only in the final usage chunk (`stream_options.include_usage`); `null` otherwise.
    pub usage: Option<Usage>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn content_is_a_string_or_text_parts() {
        let m: ChatMessageIn = serde_json::from_value(json!({"role": "user", "content": "hi"})).unwrap();
        assert_eq!(m.content, Some(Content::Text("hi".into())));
        let m: ChatMessageIn =
            serde_json::from_value(json!({"role": "user", "content": [{"type": "text", "text": "a"}]})).unwrap();
        assert_eq!(
            m.content,
            Some(Content::Parts(vec![ContentPart {
                kind: "text".into(),
                text: Some("a".into())
            }]))
        );
        let m: ChatMessageIn = serde_json::from_value(json!({"role": "assistant", "content": null})).unwrap();
        assert_eq!(m.content, None);
    }

    #[test]
    fn first_chunk_carries_the_role_and_later_ones_only_content() {
        let first = ChatDelta {
            role: Some("assistant".into()),
            content: Some(String::new()),
        };
        let later = ChatDelta {
            role: None,
            content: Some("Hi".into()),
        };
        assert_eq!(
            serde_json::to_value(first).unwrap(),
            json!({"role": "assistant", "content": ""})
        );
        assert_eq!(serde_json::to_value(later).unwrap(), json!({"content": "Hi"}));
        assert_eq!(serde_json::to_value(ChatDelta::default()).unwrap(), json!({}));
    }
}
