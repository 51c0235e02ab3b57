//! Text ↔ token ids through the artifact's `tokenizer.json` (HuggingFace `tokenizers`, byte-level BPE).

use crate::core::{ModelError, TokenDecoder};
use std::path::Path;
use tokenizers::Tokenizer;

/// The model's tokenizer, with the BOS rule from the manifest.
pub struct TextTokenizer {
    inner: Tokenizer,
    bos: Option<u32>,
}

impl TextTokenizer {
    /// Loads `path`; `bos` is prepended to every encoding when set (the manifest's `add_bos`).
    pub fn load(path: &Path, bos: Option<u32>) -> Result<Self, ModelError> {
        let inner = Tokenizer::from_file(path)
            .map_err(|e| ModelError::Backend(format!("cannot load tokenizer {}: {e}", path.display())))?;
        Ok(Self { inner, bos })
    }

    /// Token ids of `text`; special tokens written in the text (`<|im_start|>`) become their ids.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| ModelError::Backend(format!("tokenize: {e}")))?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        ids.extend(self.bos);
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// Decodes ids; `skip_special` drops control tokens such as `<|im_end|>`.
    pub fn decode_with(&self, ids: &[u32], skip_special: bool) -> Result<String, ModelError> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| ModelError::Backend(format!("detokenize: {e}")))
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The text of a single token as stored in the vocabulary, if the id exists.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }
}

impl TokenDecoder for TextTokenizer {
    fn decode(&self, ids: &[u32]) -> Result<String, ModelError> {
        self.decode_with(ids, true)
    }
}
