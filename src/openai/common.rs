//! Wire types shared by the endpoints: stop lists, stream options, usage, the error envelope.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// `stop`: one string or a list of strings.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, ToSchema)]
#[serde(untagged)]
pub enum Stop {
    /// A single stop string.
    One(String),
    /// Several stop strings (at most `MAX_STOP`).
    Many(Vec<String>),
}

impl Stop {
    /// The stop strings as a list.
    pub fn into_vec(self) -> Vec<String> {
        match self {
            Stop::One(s) => vec![s],
            Stop::Many(v) => v,
        }
    }
}

/// `stream_options`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, ToSchema)]
pub struct StreamOptions {
    /// Send a final chunk with `usage` (and empty `choices`) before `[DONE]`.
    #[serde(default)]
    pub include_usage: Option<bool>,
}

/// Prompt-token details.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, ToSchema)]
pub struct PromptTokensDetails {
    /// Prompt tokens served from a cache.
    pub cached_tokens: u32,
}

/// Token counts.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, ToSchema)]
pub struct Usage {
    /// Tokens in the prompt(s).
    pub prompt_tokens: u32,
    /// Tokens generated.
    pub completion_tokens: u32,
    /// Sum of both.
    pub total_tokens: u32,
    /// Details of the prompt tokens.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_tokens_details: Option<PromptTokensDetails>,
}

impl Usage {
    /// Usage from prompt and completion counts.
    pub fn new(prompt_tokens: usize, completion_tokens: usize) -> Self {
        let p = u32::try_from(prompt_tokens).unwrap_or(u32::MAX);
        let c = u32::try_from(completion_tokens).unwrap_or(u32::MAX);
        Self {
            prompt_tokens: p,
            completion_tokens: c,
            total_tokens: p.saturating_add(c),
            prompt_tokens_details: None,
        }
    }

    /// The same usage reporting `cached` prompt tokens served from the prefix cache.
    pub fn with_cached(mut self, cached: usize) -> Self {
        self.prompt_tokens_details = Some(PromptTokensDetails {
            cached_tokens: u32::try_from(cached).unwrap_or(u32::MAX),
        });
        self
    }
}

/// The body of every error response: `{"error": {...}}`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, ToSchema)]
pub struct ErrorResponse {
    /// The error.
    pub error: ErrorBody,
}

/// OpenAI's error object.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, ToSchema)]
pub struct ErrorBody {
    /// Human-readable explanation.
    pub message: String,
    /// Error class, e.g. `invalid_request_error`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The request field at fault, if any.
    pub param: Option<String>,
    /// Machine-readable code, e.g. `invalid_api_key`, `model_not_found`.
    pub code: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn stop_accepts_a_string_or_a_list() {
        let one: Stop = serde_json::from_value(json!("\n")).unwrap();
        let many: Stop = serde_json::from_value(json!(["a", "b"])).unwrap();
        assert_eq!(one.into_vec(), vec!["\n"]);
        assert_eq!(many.into_vec(), vec!["a", "b"]);
        assert!(serde_json::from_value::<Stop>(json!(3)).is_err());
    }

    #[test]
    fn error_envelope_has_the_openai_shape() {
        let e = ErrorResponse {
            error: ErrorBody {
                message: "bad".into(),
                kind: "invalid_request_error".into(),
                param: Some("top_p".into()),
                code: None,
            },
        };
        assert_eq!(
            serde_json::to_value(&e).unwrap(),
            json!({"error": {"message": "bad", "type": "invalid_request_error", "param": "top_p", "code": null}})
        );
    }

    #[test]
    fn usage_totals_and_omits_empty_details() {
        let u = Usage::new(3, 4);
        assert_eq!(
            serde_json::to_value(&u).unwrap(),
            json!({"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7})
        );
        assert_eq!(
            serde_json::to_value(u.with_cached(2)).unwrap(),
            json!({"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7,
                   "prompt_tokens_details": {"cached_tokens": 2}})
        );
    }
}
