//! `GET /v1/models`, `POST /tokenize`, `POST /detokenize` and `GET /health` bodies.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A model entry.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, ToSchema)]
pub struct ModelCard {
    /// Model id or alias.
    pub id: String,
    /// Always `model`.
    pub object: String,
    /// Unix seconds.
    pub created: u64,
    /// Owner.
    pub owned_by: String,
}

/// `GET /v1/models`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, ToSchema)]
pub struct ModelList {
    /// Always `list`.
    pub object: String,
    /// The models.
    pub data: Vec<ModelCard>,
}

/// `POST /tokenize`: a text prompt or chat messages.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, ToSchema)]
pub struct TokenizeRequest {
    /// Model id or alias (optional: the served model).
    pub model: Option<String>,
    /// Text to tokenize.
    pub prompt: Option<String>,
    /// Chat messages, rendered with the chat template first.
    pub messages: Option<Vec<super::chat::ChatMessageIn>>,
}

/// `POST /tokenize` response.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, ToSchema)]
pub struct TokenizeResponse {
    /// Token ids.
    pub tokens: Vec<u32>,
    /// Their number.
    pub count: usize,
    /// The model's context length.
    pub max_model_len: usize,
}

/// `POST /detokenize`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize, ToSchema)]
pub struct DetokenizeRequest {
    /// Model id or alias (optional).
    pub model: Option<String>,
    /// Token ids.
    pub tokens: Option<Vec<i64>>,
}

/// `POST /detokenize` response.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, ToSchema)]
pub struct DetokenizeResponse {
    /// The decoded text.
    pub prompt: String,
}

/// `GET /health`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, ToSchema)]
pub struct Health {
    /// `ok` when the model is loaded.
    pub status: String,
    /// The served model id.
    pub model: String,
    /// Whether the model is loaded and answering.
    pub model_loaded: bool,
}
