//! The `Model` trait: what the generation loop needs from a language model, and nothing more.

/// Static facts about a loaded model that generation and validation depend on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelInfo {
    /// Public model id, e.g. `smollm2-135m-instruct`.
    pub id: String,
    /// Number of logits per position.
    pub vocab_size: usize,
    /// Longest sequence (prompt + generated) the model supports.
    pub context_length: usize,
    /// Tokens that end generation (end-of-sequence / end-of-turn).
    pub eos_ids: Vec<u32>,
}

/// A failure inside the model or tokenizer; the generation loop passes it on unchanged.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The sequence would grow past what the model or its cache can hold.
    #[error("sequence of {requested} tokens exceeds the model's capacity of {capacity}")]
    CapacityExceeded {
        /// Tokens the caller asked for.
        requested: usize,
        /// Tokens the model can hold.
        capacity: usize,
    },
    /// An input the model cannot take (empty input, token id out of range, …).
    #[error("invalid model input: {0}")]
    InvalidInput(String),
    /// The inference backend failed.
    #[error("inference failed: {0}")]
    Backend(String),
}

/// A causal language model with a single sequence of state (its KV cache).
///
/// The generation loop calls [`Model::reset`] once per sequence, then [`Model::forward`] with the prompt and then
/// with each sampled token; every call appends to the sequence and returns the logits for the next position.
pub trait Model {
    /// Static facts about the model.
    fn info(&self) -> &ModelInfo;

    /// Starts a new, empty sequence that will hold at most `capacity` tokens (prompt + generated).
    fn reset(&mut self, capacity: usize) -> Result<(), ModelError>;

    /// Appends `tokens` to the sequence and returns the logits (length `vocab_size`) for the next token.
    fn forward(&mut self, tokens: &[u32]) -> Result<&[f32], ModelError>;
}

impl<M: Model + ?Sized> Model for &mut M {
    fn info(&self) -> &ModelInfo {
        (**self).info()
    }
    fn reset(&mut self, capacity: usize) -> Result<(), ModelError> {
        (**self).reset(capacity)
    }
    fn forward(&mut self, tokens: &[u32]) -> Result<&[f32], ModelError> {
        (**self).forward(tokens)
    }
}

/// Turns token ids back into text (special tokens skipped).
pub trait TokenDecoder {
    /// Decodes `ids` to text; incomplete UTF-8 sequences come back as U+FFFD.
    fn decode(&self, ids: &[u32]) -> Result<String, ModelError>;
}

impl<T: TokenDecoder + ?Sized> TokenDecoder for std::sync::Arc<T> {
    fn decode(&self, ids: &[u32]) -> Result<String, ModelError> {
        (**self).decode(ids)
    }
}
