//! `manifest.json`: what the converter tells the engine about a model artifact.

use serde::Deserialize;
use std::path::{Path, PathBuf};

/// Tensor names of the decoder graph; `{i}` stands for the layer index.
#[derive(Debug, Clone, Deserialize)]
pub struct IoNames {
    /// Token ids, int64 [batch, seq].
    pub input_ids: String,
    /// Attention mask, int64 [batch, total].
    pub attention_mask: String,
    /// Past keys per layer.
    pub past_key: String,
    /// Past values per layer.
    pub past_value: String,
    /// Present keys per layer.
    pub present_key: String,
    /// Present values per layer.
    pub present_value: String,
    /// Last-position logits, f32 [batch, 1, vocab].
    pub logits: String,
}

impl IoNames {
    /// A per-layer name with `{i}` replaced.
    pub fn layer(pattern: &str, i: usize) -> String {
        pattern.replace("{i}", &i.to_string())
    }
}

/// Files of the artifact, relative to its directory.
#[derive(Debug, Clone, Deserialize)]
pub struct ArtifactFiles {
    /// The ONNX graph.
    pub model: String,
    /// The graph's external weights, when it has them (ONNX Runtime reads and maps them itself).
    #[serde(default)]
    pub weights: Option<String>,
    /// The `tokenizers` JSON.
    pub tokenizer: String,
    /// The same graph with its Q4_1 linear layers as `ai.lambda_llm.MatMulQ4_1` (our kernel), reading the packed
    /// nibbles from `weights`.
    #[serde(default)]
    pub fast_model: Option<String>,
    /// The fast graph's own tensors (each block's scale and minimum as f16).
    #[serde(default)]
    pub fast_weights: Option<String>,
}

impl ArtifactFiles {
    /// The first listed file that is missing or empty in `dir` (a partial copy of an artifact).
    pub fn first_missing(&self, dir: &Path) -> Option<&str> {
        [
            Some(&self.model),
            self.weights.as_ref(),
            Some(&self.tokenizer),
            self.fast_model.as_ref(),
            self.fast_weights.as_ref(),
        ]
        .into_iter()
        .flatten()
        .map(String::as_str)
        .find(|f| std::fs::metadata(dir.join(f)).map_or(true, |m| !m.is_file() || m.len() == 0))
    }
}

/// Where the weights came from.
#[derive(Debug, Clone, Deserialize)]
pub struct Source {
    /// File name of the GGUF.
    pub file: String,
    /// Its SHA-256 (hex).
    pub sha256: String,
}

/// The parsed `manifest.json`.
#[derive(Debug, Clone, Deserialize)]
pub struct Manifest {
    /// Public model id.
    pub id: String,
    /// Architecture family (`llama`).
    pub architecture: String,
    /// Decoder layers.
    pub layers: usize,
    /// Attention heads.
    pub heads: usize,
    /// Key/value heads (GQA).
    pub kv_heads: usize,
    /// Size of one head.
    pub head_dim: usize,
    /// Vocabulary size (logits per position).
    pub vocab_size: usize,
    /// Longest supported sequence.
    pub context_length: usize,
    /// Beginning-of-sequence token, if any.
    pub bos_id: Option<u32>,
    /// Whether prompts start with the BOS token.
    pub add_bos: bool,
    /// Tokens that end generation.
    pub eos_ids: Vec<u32>,
    /// The model's Jinja chat template.
    pub chat_template: Option<String>,
    /// Quantization description (free-form).
    #[serde(default)]
    pub quantization: serde_json::Value,
    /// Source file facts.
    pub source: Source,
    /// Version of the converter that wrote the artifact.
    pub converter_version: String,
    /// ONNX Runtime version the artifact was built and checked with.
    pub ort_version: String,
    /// File names.
    pub files: ArtifactFiles,
    /// The graph was optimized by ONNX Runtime when the artifact was built (its weights in an external file), so
    /// loading skips graph optimization.
    #[serde(default)]
    pub graph_optimized: bool,
    /// Graph tensor names.
    pub io: IoNames,
}

/// Why an artifact could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The file is missing or unreadable.
    #[error("cannot read {path}: {error}")]
    Read {
        /// The manifest path.
        path: PathBuf,
        /// The I/O error (part of the message, not a separate cause, so it is printed once).
        error: std::io::Error,
    },
    /// The JSON does not match the expected shape.
    #[error("invalid manifest {path}: {error}")]
    Parse {
        /// The manifest path.
        path: PathBuf,
        /// The JSON error.
        error: serde_json::Error,
    },
    /// A field has an impossible value.
    #[error("invalid manifest {path}: {message}")]
    Invalid {
        /// The manifest path.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

impl Manifest {
    /// Reads and checks `DIR/manifest.json`.
    pub fn load(dir: &Path) -> Result<Self, ManifestError> {
        let path = dir.join("manifest.json");
        let text = std::fs::read_to_string(&path).map_err(|error| ManifestError::Read {
            path: path.clone(),
            error,
        })?;
        let m: Manifest = serde_json::from_str(&text).map_err(|error| ManifestError::Parse {
            path: path.clone(),
            error,
        })?;
        let invalid = |message: String| ManifestError::Invalid {
            path: path.clone(),
            message,
        };
        if m.layers == 0 || m.kv_heads == 0 || m.head_dim == 0 || m.vocab_size == 0 || m.context_length == 0 {
            return Err(invalid(
                "layers, kv_heads, head_dim, vocab_size and context_length must be > 0".into(),
            ));
        }
        if !m.heads.is_multiple_of(m.kv_heads) {
            return Err(invalid(format!(
                "heads ({}) must be a multiple of kv_heads ({})",
                m.heads, m.kv_heads
            )));
        }
        if let Some(&bad) = m.eos_ids.iter().find(|&&e| e as usize >= m.vocab_size) {
            return Err(invalid(format!("eos id {bad} is outside the vocabulary")));
        }
        Ok(m)
    }
}
