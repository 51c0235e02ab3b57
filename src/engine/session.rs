//! The ONNX decoder as a [`Model`]: one ORT session, IOBinding, and a KV cache in buffers shared by past and present.

use super::manifest::{IoNames, Manifest};
use crate::core::{Model, ModelError, ModelInfo};
use ort::memory::Allocator;
use ort::session::builder::GraphOptimizationLevel;
use ort::session::{IoBinding, Session};
use ort::value::Tensor;
use std::path::Path;
use std::time::{Duration, Instant};

/// Smallest KV allocation; later requests that need more grow it (never past the context length).
const MIN_KV_CAPACITY: usize = 256;

/// Options for building the session.
#[derive(Debug, Clone, Default)]
pub struct SessionOptions {
    /// Intra-op threads; `None` uses every core the process may run on.
    pub threads: Option<usize>,
}

/// A failure while building or running the session.
fn backend(e: impl std::fmt::Display) -> ModelError {
    ModelError::Backend(e.to_string())
}

/// The decoder graph plus its per-sequence state.
pub struct OnnxModel {
    info: ModelInfo,
    manifest: Manifest,
    session: Session,
    /// Owns the bound tensors, including each layer's key and value buffers `[1, kv_heads, capacity, head_dim]`,
    /// bound as both past input and present output so GroupQueryAttention appends in place (no per-token copy).
    binding: IoBinding,
    capacity: usize,
    len: usize,
    logits: Tensor<f32>,
    threads: usize,
}

impl OnnxModel {
    /// Builds the session from `DIR/<manifest.files.model>` with `env` and binds the logits and a first cache.
    pub fn load(
        dir: &Path,
        manifest: Manifest,
        env: &ort::environment::Environment,
        options: &SessionOptions,
    ) -> Result<Self, ModelError> {
        let threads = options
            .threads
            .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1))
            .max(1);
        let path = dir.join(&manifest.files.model);
        let session = Session::builder(env)
            .map_err(backend)?
            .with_optimization_level(GraphOptimizationLevel::All)
            .map_err(backend)?
            .with_intra_threads(threads)
            .map_err(backend)?
            .with_inter_threads(1)
            .map_err(backend)?
            .commit_from_file(&path)
            .map_err(|e| ModelError::Backend(format!("cannot load {}: {e}", path.display())))?;
        let mut binding = session.create_binding().map_err(backend)?;
        // The logits are bound first: ORT returns outputs in bind order.
        let mut logits =
            Tensor::<f32>::new(&Allocator::default(), [1usize, 1, manifest.vocab_size]).map_err(backend)?;
        binding.bind_output(&manifest.io.logits, &mut logits).map_err(backend)?;
        let info = ModelInfo {
            id: manifest.id.clone(),
            vocab_size: manifest.vocab_size,
            context_length: manifest.context_length,
            eos_ids: manifest.eos_ids.clone(),
        };
        let mut model = Self {
            info,
            manifest,
            session,
            binding,
            capacity: 0,
            len: 0,
            logits,
            threads,
        };
        model.ensure_capacity(MIN_KV_CAPACITY.min(model.manifest.context_length))?;
        Ok(model)
    }

    /// Threads the session runs with.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Runs a short sequence through the graph so the first real request does not pay for lazy initialisation.
    pub fn warm_up(&mut self) -> Result<Duration, ModelError> {
        let t = Instant::now();
        self.reset(8)?;
        self.forward(&[0, 0])?;
        self.forward(&[0])?;
        self.reset(0)?;
        Ok(t.elapsed())
    }

    /// Makes the KV buffers hold at least `needed` tokens; reallocates (and rebinds) only to grow.
    fn ensure_capacity(&mut self, needed: usize) -> Result<(), ModelError> {
        if needed <= self.capacity {
            return Ok(());
        }
        let m = &self.manifest;
        let capacity = needed
            .next_power_of_two()
            .clamp(MIN_KV_CAPACITY, m.context_length)
            .max(needed);
        let shape = [1usize, m.kv_heads, capacity, m.head_dim];
        // Unbinding drops the old buffers first, so peak memory is one cache, not two.
        self.binding.clear();
        self.binding
            .bind_output(&m.io.logits, &mut self.logits)
            .map_err(backend)?;
        for i in 0..m.layers {
            let mut key = Tensor::<f32>::new(&Allocator::default(), shape).map_err(backend)?;
            let mut value = Tensor::<f32>::new(&Allocator::default(), shape).map_err(backend)?;
            let io: &IoNames = &m.io;
            self.binding
                .bind_input(IoNames::layer(&io.past_key, i), &key)
                .map_err(backend)?;
            self.binding
                .bind_input(IoNames::layer(&io.past_value, i), &value)
                .map_err(backend)?;
            self.binding
                .bind_output(IoNames::layer(&io.present_key, i), &mut key)
                .map_err(backend)?;
            self.binding
                .bind_output(IoNames::layer(&io.present_value, i), &mut value)
                .map_err(backend)?;
        }
        self.capacity = capacity;
        Ok(())
    }
}

impl Model for OnnxModel {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn reset(&mut self, capacity: usize) -> Result<(), ModelError> {
        if capacity > self.manifest.context_length {
            return Err(ModelError::CapacityExceeded {
                requested: capacity,
                capacity: self.manifest.context_length,
            });
        }
        self.ensure_capacity(capacity)?;
        self.len = 0;
        Ok(())
    }

    fn forward(&mut self, tokens: &[u32]) -> Result<&[f32], ModelError> {
        if tokens.is_empty() {
            return Err(ModelError::InvalidInput("forward needs at least one token".into()));
        }
        let total = self.len + tokens.len();
        if total > self.capacity {
            return Err(ModelError::CapacityExceeded {
                requested: total,
                capacity: self.capacity,
            });
        }
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= self.info.vocab_size) {
            return Err(ModelError::InvalidInput(format!(
                "token id {bad} is outside the vocabulary"
            )));
        }
        let ids: Vec<i64> = tokens.iter().map(|&t| i64::from(t)).collect();
        let input_ids = Tensor::from_array(([1usize, ids.len()], ids)).map_err(backend)?;
        let mask = Tensor::from_array(([1usize, total], vec![1i64; total])).map_err(backend)?;
        let io = &self.manifest.io;
        self.binding.bind_input(&io.input_ids, &input_ids).map_err(backend)?;
        self.binding.bind_input(&io.attention_mask, &mask).map_err(backend)?;
        self.session.run_binding(&self.binding).map_err(backend)?;
        self.len = total;
        let (_, data) = self.logits.extract_tensor();
        Ok(data)
    }
}
