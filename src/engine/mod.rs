//! The inference engine: a model artifact (manifest, ONNX graph, tokenizer, chat template) behind `core`'s traits.

mod attention_op;
pub mod bind;
pub mod chat;
pub mod custom_op;
pub mod kv;
pub mod manifest;
pub mod readahead;
pub mod runtime;
pub mod session;
pub mod tokenizer;
pub mod worker;

pub use chat::{ChatMessage, ChatTemplate};
pub use manifest::Manifest;
pub use session::{Kernels, OnnxModel, SessionOptions};
pub use tokenizer::TextTokenizer;

use crate::core::ModelError;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Why the engine could not start.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// ONNX Runtime is missing or unusable.
    #[error(transparent)]
    Runtime(#[from] runtime::RuntimeError),
    /// The artifact's manifest is missing or invalid.
    #[error(transparent)]
    Manifest(#[from] manifest::ManifestError),
    /// The graph or tokenizer failed to load.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The chat template does not compile.
    #[error(transparent)]
    Template(#[from] chat::TemplateError),
}

/// Options for [`Engine::load`].
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Explicit ONNX Runtime library (`ORT_DYLIB_PATH`).
    pub ort_dylib_path: Option<PathBuf>,
    /// Intra-op threads (default: all cores).
    pub threads: Option<usize>,
    /// Most sequences decoding together (`MAX_BATCH`).
    pub max_batch: usize,
    /// Memory for the prefix cache (`PREFIX_CACHE_MB`; 0 disables it).
    pub prefix_cache_bytes: usize,
    /// Which kernels run the Q4_1 linear layers (`KERNELS`).
    pub kernels: Kernels,
    /// ONNX Runtime's per-operator profile, into a file named from this prefix (`lambda-llm bench --profile`).
    pub profile: Option<PathBuf>,
}

impl Default for EngineOptions {
    fn default() -> Self {
        let session = SessionOptions::default();
        Self {
            ort_dylib_path: None,
            threads: None,
            max_batch: session.max_batch,
            prefix_cache_bytes: session.prefix_cache_bytes,
            kernels: session.kernels,
            profile: None,
        }
    }
}

/// A loaded model artifact: graph, tokenizer, chat template.
pub struct Engine {
    /// The artifact's manifest.
    pub manifest: Manifest,
    /// The decoder.
    pub model: OnnxModel,
    /// Its tokenizer (shared with request handlers, which tokenize off the model's thread).
    pub tokenizer: Arc<TextTokenizer>,
    /// Its chat template, if the artifact has one.
    pub chat: Option<Arc<ChatTemplate>>,
    /// Where ONNX Runtime was loaded from.
    pub library: PathBuf,
    /// Time to load library, session and tokenizer.
    pub load_time: Duration,
    /// Time of the warm-up run.
    pub warm_up_time: Duration,
}

impl Engine {
    /// Loads the artifact in `dir` and warms the session up.
    ///
    /// The tokenizer and chat template load on a second thread while ONNX Runtime builds the session (which is
    /// mostly single-threaded), so a cold start pays for the slower of the two, not their sum.
    pub fn load(dir: &Path, options: &EngineOptions) -> Result<Self, EngineError> {
        let start = Instant::now();
        let manifest = Manifest::load(dir)?;
        let text_side = {
            let manifest = manifest.clone();
            let dir = dir.to_path_buf();
            std::thread::Builder::new()
                .name("tokenizer-load".into())
                .spawn(move || load_text_side(&dir, &manifest))
                .map_err(|e| ModelError::Backend(format!("cannot start the tokenizer thread: {e}")))?
        };
        let (library, env) = runtime::environment(options.ort_dylib_path.as_deref())?;
        let session_options = SessionOptions {
            threads: options.threads,
            max_batch: options.max_batch,
            prefix_cache_bytes: options.prefix_cache_bytes,
            kernels: options.kernels,
            profile: options.profile.clone(),
        };
        let mut model = OnnxModel::load(dir, manifest.clone(), env, &session_options)?;
        let (tokenizer, chat) = text_side
            .join()
            .map_err(|_| ModelError::Backend("the tokenizer thread panicked".into()))??;
        let load_time = start.elapsed();
        let warm_up_time = model.warm_up()?;
        Ok(Self {
            manifest,
            model,
            tokenizer,
            chat,
            library: library.to_path_buf(),
            load_time,
            warm_up_time,
        })
    }

    /// Renders chat messages with the model's template and tokenizes them.
    pub fn chat_prompt(&self, messages: &[ChatMessage]) -> Result<Vec<u32>, EngineError> {
        let template = self
            .chat
            .as_ref()
            .ok_or_else(|| chat::TemplateError(format!("model {} has no chat template", self.manifest.id)))?;
        let text = template.render(messages, true)?;
        Ok(self.tokenizer.encode(&text)?)
    }
}

/// The tokenizer and the compiled chat template of the artifact in `dir`.
fn load_text_side(
    dir: &Path,
    manifest: &Manifest,
) -> Result<(Arc<TextTokenizer>, Option<Arc<ChatTemplate>>), EngineError> {
    let bos = manifest.bos_id.filter(|_| manifest.add_bos);
    let tokenizer = TextTokenizer::load(&dir.join(&manifest.files.tokenizer), bos)?;
    let token_text = |id: Option<u32>| id.and_then(|i| tokenizer.id_to_token(i)).unwrap_or_default();
    let chat = match &manifest.chat_template {
        Some(src) => Some(Arc::new(ChatTemplate::new(
            src,
            &token_text(manifest.bos_id),
            &token_text(manifest.eos_ids.first().copied()),
        )?)),
        None => None,
    };
    Ok((Arc::new(tokenizer), chat))
}
