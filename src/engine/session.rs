//! The ONNX decoder as a [`Model`] (one sequence) and a [`BatchModel`] (continuous batching with a prefix cache).
//!
//! One ORT session; every sequence's KV state lives in buffers we own ([`KvBuffers`]), bound as both past input and
//! present output so the attention (lambda-llm's `Attention`, or `GroupQueryAttention` in model.onnx) appends in
//! place: no per-token copy of the cache, no per-token allocation. A prompt is processed on its own row (batch 1),
//! whole or in slices between decode steps (then its row is the last one); decode steps run every other row together,
//! each with its own length in the attention mask (the attention derives positions from it).

use super::bind::{backend, c_name, Side, ViewBinding};
use super::custom_op;
use super::kv::{KvBuffers, KvLayout, PrefixCache};
use super::manifest::{IoNames, Manifest};
use crate::core::{BatchModel, Model, ModelError, ModelInfo, SeqId, Started};
use lambda_llm_kernels::q4_1::Isa;
use ort::session::builder::GraphOptimizationLevel;
use ort::session::Session;
use std::collections::HashMap;
use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Smallest KV allocation per sequence; longer sequences grow it (never past the context length).
const MIN_KV_CAPACITY: usize = 256;

/// Most KV memory the batch may reserve; a sequence that needs more waits until the batch drains.
const KV_BUDGET_BYTES: usize = 1 << 30;

/// The id of the one sequence of single-stream ([`Model`]) use; batch ids start at 1.
const SINGLE: SeqId = 0;

/// Held while a session is built. ONNX Runtime adds a custom operator domain to ONNX's process-wide domain map with
/// an unlocked check-then-insert, so two sessions built at once (two engines in one process) could both insert
/// `ai.lambda_llm` and the second fails to load ("the domain is already exist"); other builds read that map.
static SESSION_BUILD: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Options for building the session.
#[derive(Debug, Clone)]
pub struct SessionOptions {
    /// Intra-op threads; `None` uses every core the process may run on.
    pub threads: Option<usize>,
    /// Most sequences decoding together.
    pub max_batch: usize,
    /// Memory for finished sequences' states reused by later prompts (0 disables the prefix cache).
    pub prefix_cache_bytes: usize,
    /// Which kernels run the Q4_1 linear layers.
    pub kernels: Kernels,
    /// Record ONNX Runtime's per-operator profile into a file named from this prefix (see
    /// [`OnnxModel::end_profiling`]); every node pays for the recording.
    pub profile: Option<PathBuf>,
}

/// Which kernels run the Q4_1 linear layers (`KERNELS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Kernels {
    /// Our exact kernels (`model.fast.onnx`), AVX-512 or AVX2, when the CPU and the artifact allow it, else ONNX
    /// Runtime's.
    #[default]
    Auto,
    /// ONNX Runtime's `MatMulNBits` (`model.onnx`) everywhere.
    Ort,
    /// Asked for: our AVX-512 kernel with bfloat16 dot products (the activations rounded to bfloat16: faster, not
    /// exact) where the CPU has AVX512_BF16, else as `Auto`.
    Bf16,
    /// Asked for: our AVX2 kernel with 8-bit integer dot products (the activations rounded to 8 bits per block of 32,
    /// as llama.cpp rounds them: faster, not exact) where the CPU has AVX2, FMA and F16C, else as `Auto`.
    Int8,
}

impl Kernels {
    /// The graph file and, for the fast graph, the instructions of its kernel.
    pub fn choose(self, manifest: &Manifest) -> (&str, Option<Isa>) {
        match (self, manifest.files.fast_model.as_deref(), Isa::detect()) {
            (Kernels::Bf16, Some(fast), Isa::Avx512) => (fast, Some(Isa::detect_bf16().unwrap_or(Isa::Avx512))),
            (Kernels::Int8, Some(fast), Isa::Avx512 | Isa::Avx2) => (fast, Isa::detect_int8()),
            (Kernels::Auto | Kernels::Bf16, Some(fast), isa @ (Isa::Avx512 | Isa::Avx2)) => (fast, Some(isa)),
            _ => (&manifest.files.model, None),
        }
    }
}

impl Default for SessionOptions {
    fn default() -> Self {
        Self {
            threads: None,
            max_batch: 8,
            prefix_cache_bytes: 0,
            kernels: Kernels::Auto,
            profile: None,
        }
    }
}

/// Graph names as C strings, made once.
struct Names {
    input_ids: CString,
    mask: CString,
    logits: CString,
    /// Per layer: past key, past value, present key, present value.
    layers: Vec<[CString; 4]>,
}

/// A running sequence: its row in the KV buffers is its index in `OnnxModel::rows`.
struct Row {
    id: SeqId,
    /// Prefix-cache partition.
    scope: u64,
    len: usize,
    /// Every token fed (kept for the prefix cache only).
    tokens: Vec<u32>,
    /// Prompt tokens still to go in (a prompt processed in slices); such a row is always the last one, and decode
    /// steps run the rows before it.
    todo: Vec<u32>,
}

/// The decoder graph plus the state of its running sequences.
pub struct OnnxModel {
    // Declared first so they drop before the memory they view.
    bindings: HashMap<(usize, usize), ViewBinding>,
    info: ModelInfo,
    session: Session,
    names: Names,
    layout: KvLayout,
    kv: KvBuffers,
    logits: Vec<f32>,
    ids: Vec<i64>,
    mask: Vec<i64>,
    rows: Vec<Row>,
    prefix: PrefixCache,
    max_batch: usize,
    next_id: SeqId,
    threads: usize,
    kernels: &'static str,
    /// Whether a prompt may go in slices: our kernels give its rows the bits of a whole prompt; ONNX Runtime's
    /// attention sums a one-row forward in another order than a prompt's, so on its kernels a prompt goes in whole.
    slices: bool,
    profiling: bool,
}

impl OnnxModel {
    /// Builds the session from `DIR/<manifest.files.model>` with `env`.
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
        if let Some(f) = manifest.files.first_missing(dir) {
            return Err(ModelError::Backend(format!(
                "model artifact {}: {f} is missing or empty (manifest.json lists it)",
                dir.display()
            )));
        }
        let (file, isa) = options.kernels.choose(&manifest);
        let own_weights = if isa.is_some() {
            manifest.files.fast_weights.as_deref()
        } else {
            None
        };
        super::readahead::start(
            dir,
            [Some(file), manifest.files.weights.as_deref(), own_weights]
                .into_iter()
                .flatten(),
        );
        let path = dir.join(file);
        let guard = SESSION_BUILD.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut builder = Session::builder(env).map_err(backend)?;
        if let Some(isa) = isa {
            builder = builder
                .with_operators(custom_op::domain(isa, threads).map_err(backend)?)
                .map_err(backend)?;
        }
        if let Some(prefix) = &options.profile {
            builder = builder.with_profiling(prefix).map_err(backend)?;
        }
        let session = builder
            .with_optimization_level(if manifest.graph_optimized {
                GraphOptimizationLevel::Disable
            } else {
                GraphOptimizationLevel::All
            })
            .map_err(backend)?
            .with_intra_threads(threads)
            .map_err(backend)?
            .with_inter_threads(1)
            .map_err(backend)?
            .commit_from_file(&path)
            .map_err(|e| ModelError::Backend(format!("cannot load {}: {e}", path.display())))?;
        drop(guard);
        let io: &IoNames = &manifest.io;
        let names = Names {
            input_ids: c_name(&io.input_ids)?,
            mask: c_name(&io.attention_mask)?,
            logits: c_name(&io.logits)?,
            layers: (0..manifest.layers)
                .map(|i| {
                    Ok([
                        c_name(&IoNames::layer(&io.past_key, i))?,
                        c_name(&IoNames::layer(&io.past_value, i))?,
                        c_name(&IoNames::layer(&io.present_key, i))?,
                        c_name(&IoNames::layer(&io.present_value, i))?,
                    ])
                })
                .collect::<Result<_, ModelError>>()?,
        };
        let layout = KvLayout {
            layers: manifest.layers,
            kv_heads: manifest.kv_heads,
            head_dim: manifest.head_dim,
        };
        let capacity = MIN_KV_CAPACITY.min(manifest.context_length);
        let info = ModelInfo {
            id: manifest.id.clone(),
            vocab_size: manifest.vocab_size,
            context_length: manifest.context_length,
            eos_ids: manifest.eos_ids.clone(),
        };
        Ok(Self {
            bindings: HashMap::new(),
            logits: vec![0.0; info.vocab_size],
            ids: vec![0; capacity],
            mask: vec![1; capacity],
            info,
            session,
            names,
            layout,
            kv: KvBuffers::new(layout, 1, capacity),
            rows: Vec::new(),
            prefix: PrefixCache::new(options.prefix_cache_bytes / std::mem::size_of::<f32>()),
            max_batch: options.max_batch.max(1),
            next_id: 0,
            threads,
            kernels: match isa {
                Some(Isa::Avx512Bf16) => "lambda-llm q4_1 avx512-bf16 (model.fast.onnx)",
                Some(Isa::Avx2) => "lambda-llm q4_1 avx2 (model.fast.onnx)",
                Some(Isa::Avx2Int8) => "lambda-llm q4_1 avx2-int8 (model.fast.onnx)",
                Some(_) => "lambda-llm q4_1 avx512 (model.fast.onnx)",
                None => "onnxruntime (model.onnx)",
            },
            slices: isa.is_some(),
            profiling: options.profile.is_some(),
        })
    }

    /// Which kernels run the linear layers, and from which graph file.
    pub fn kernels(&self) -> &'static str {
        self.kernels
    }

    /// Whether a prompt joining running sequences goes in slices (our kernels) or whole (ONNX Runtime's).
    pub fn slices(&self) -> bool {
        self.slices
    }

    /// Stops the profiler that `SessionOptions::profile` started and returns the file ONNX Runtime wrote (a Chrome
    /// trace: one event per run and per node, with its operator type and input shapes).
    pub fn end_profiling(&mut self) -> Result<PathBuf, ModelError> {
        if !std::mem::take(&mut self.profiling) {
            return Err(ModelError::Backend("the session is not profiling".into()));
        }
        self.session.end_profiling().map(PathBuf::from).map_err(backend)
    }

    /// Threads the session runs with.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Bytes held by the prefix cache.
    pub fn prefix_cache_bytes(&self) -> usize {
        self.prefix.used() * std::mem::size_of::<f32>()
    }

    /// Forgets every cached prefix.
    pub fn clear_prefix_cache(&mut self) {
        self.prefix.clear();
    }

    /// Graph runs `warm_up` makes (a 2-token prompt, then one token), the first runs of every session.
    pub const WARM_UP_RUNS: usize = 2;

    /// Runs a short sequence through the graph so the first real request does not pay for lazy initialisation.
    pub fn warm_up(&mut self) -> Result<Duration, ModelError> {
        let t = Instant::now();
        self.reset(8)?;
        self.forward(&[0, 0])?;
        self.forward(&[0])?;
        self.rows.clear();
        Ok(t.elapsed())
    }

    /// Makes room for `slots` sequences of `capacity` positions, keeping the running rows; grows only.
    fn ensure(&mut self, slots: usize, capacity: usize) -> Result<(), ModelError> {
        if slots <= self.kv.slots() && capacity <= self.kv.capacity() {
            return Ok(());
        }
        let context = self.info.context_length;
        if capacity > context {
            return Err(ModelError::CapacityExceeded {
                requested: capacity,
                capacity: context,
            });
        }
        let capacity = capacity
            .next_power_of_two()
            .clamp(MIN_KV_CAPACITY, context)
            .max(capacity)
            .max(self.kv.capacity());
        let slots = slots.max(self.kv.slots());
        // Bindings view the old memory: drop them before it goes.
        self.bindings.clear();
        let lens: Vec<usize> = self.rows.iter().map(|r| r.len).collect();
        self.kv = if lens.is_empty() {
            drop(std::mem::replace(&mut self.kv, KvBuffers::new(self.layout, 0, 0)));
            KvBuffers::new(self.layout, slots, capacity)
        } else {
            self.kv.grown(slots, capacity, &lens)
        };
        self.logits.resize(slots * self.info.vocab_size, 0.0);
        self.ids.resize(slots.max(capacity), 0);
        self.mask.resize(slots * capacity, 0);
        Ok(())
    }

    /// Runs rows `first..first + n` on the token ids and mask already written to `ids` (`n × seq_len`) and `mask`
    /// (`n × width`); the logits land in the same rows of `logits`.
    fn run(&mut self, first: usize, n: usize, seq_len: usize, width: usize) -> Result<(), ModelError> {
        if !self.bindings.contains_key(&(first, n)) {
            let b = self.bind_rows(first, n)?;
            self.bindings.insert((first, n), b);
        }
        let b = self.bindings.get_mut(&(first, n)).expect("inserted above");
        // SAFETY: `ids` and `mask` are not resized while bound: `ensure` runs before a run writes them, and every run
        // binds them afresh.
        unsafe {
            b.bind_i64_input(0, &self.names.input_ids, self.ids.as_mut_ptr(), &[n, seq_len])?;
            b.bind_i64_input(1, &self.names.mask, self.mask.as_mut_ptr(), &[n, width])?;
        }
        b.run(&mut self.session)
    }

    /// A binding of rows `first..first + n` of every KV buffer (past and present) and of the logits.
    fn bind_rows(&mut self, first: usize, n: usize) -> Result<ViewBinding, ModelError> {
        let mut b = ViewBinding::new(&self.session)?;
        let shape = [n, self.layout.kv_heads, self.kv.capacity(), self.layout.head_dim];
        let vocab = self.info.vocab_size;
        // SAFETY: the views cover rows that exist (`slot_ptr` checks), and `ensure` drops every binding before it
        // replaces the buffers; `logits` is resized only there too.
        unsafe {
            b.bind_f32(
                &self.names.logits,
                self.logits[first * vocab..].as_mut_ptr(),
                &[n, 1, vocab],
                Side::Output,
            )?;
            for (layer, [pk, pv, k, v]) in self.names.layers.iter().enumerate() {
                let key = self.kv.slot_ptr(2 * layer, first);
                let value = self.kv.slot_ptr(2 * layer + 1, first);
                b.bind_f32(pk, key, &shape, Side::Input)?;
                b.bind_f32(pv, value, &shape, Side::Input)?;
                b.bind_f32(k, key, &shape, Side::Output)?;
                b.bind_f32(v, value, &shape, Side::Output)?;
            }
        }
        Ok(b)
    }

    /// Appends `tokens` to row `r` (one batch-1 run) and leaves its next-token logits in row `r` of `logits`.
    fn extend_row(&mut self, r: usize, tokens: &[u32]) -> Result<(), ModelError> {
        if tokens.is_empty() {
            return Err(ModelError::InvalidInput("forward needs at least one token".into()));
        }
        let vocab = self.info.vocab_size;
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(ModelError::InvalidInput(format!(
                "token id {bad} is outside the vocabulary"
            )));
        }
        let total = self.rows[r].len + tokens.len();
        if total > self.kv.capacity() {
            return Err(ModelError::CapacityExceeded {
                requested: total,
                capacity: self.kv.capacity(),
            });
        }
        for (slot, &t) in self.ids.iter_mut().zip(tokens) {
            *slot = i64::from(t);
        }
        self.mask[..total].fill(1);
        self.run(r, 1, tokens.len(), total)?;
        self.rows[r].len = total;
        Ok(())
    }

    fn row_of(&self, id: SeqId) -> Option<usize> {
        self.rows.iter().position(|r| r.id == id)
    }

    /// The row whose prompt is still going in (always the last one), if any.
    fn prefilling(&self) -> Option<usize> {
        let last = self.rows.len().checked_sub(1)?;
        (!self.rows[last].todo.is_empty()).then_some(last)
    }

    /// Moves row `from`'s state (KV, logits) into slot `to` and swaps the two rows' bookkeeping, so the row that was
    /// at `to` is now at `from` (to be dropped or overwritten; its slot there still holds the moved row's state);
    /// nothing moves when they are the same row.
    fn move_row(&mut self, from: usize, to: usize) {
        if from == to {
            return;
        }
        self.kv.copy_slot(from, to, self.rows[from].len);
        let vocab = self.info.vocab_size;
        self.logits.copy_within(from * vocab..(from + 1) * vocab, to * vocab);
        self.rows.swap(from, to);
    }

    /// Slots the buffers need for one more sequence. A lone sequence keeps one row; once several run, room for the
    /// whole batch is reserved at once (untouched pages cost nothing) so joining later needs no copy.
    fn slots_with_one_more(&self) -> usize {
        if self.rows.is_empty() {
            1
        } else {
            self.max_batch.max(self.rows.len() + 1)
        }
    }

    /// KV bytes a batch of `slots` sequences of `capacity` positions reserves.
    fn kv_bytes(&self, slots: usize, capacity: usize) -> usize {
        slots * capacity * self.layout.floats_per_token() * std::mem::size_of::<f32>()
    }
}

impl Model for OnnxModel {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// Starts the one sequence of single-stream use (any batch rows are dropped).
    fn reset(&mut self, capacity: usize) -> Result<(), ModelError> {
        self.rows.clear();
        self.ensure(1, capacity.max(1))?;
        self.rows.push(Row {
            id: SINGLE,
            scope: 0,
            len: 0,
            tokens: Vec::new(),
            todo: Vec::new(),
        });
        Ok(())
    }

    fn forward(&mut self, tokens: &[u32]) -> Result<&[f32], ModelError> {
        if self.rows.is_empty() {
            return Err(ModelError::InvalidInput("forward before reset".into()));
        }
        self.extend_row(0, tokens)?;
        Ok(&self.logits[..self.info.vocab_size])
    }
}

impl BatchModel for OnnxModel {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn has_room(&self, capacity: usize) -> bool {
        if self.rows.iter().all(|r| r.id == SINGLE) {
            return true;
        }
        let capacity = capacity.next_power_of_two().max(self.kv.capacity());
        self.rows.len() < self.max_batch && self.kv_bytes(self.slots_with_one_more(), capacity) <= KV_BUDGET_BYTES
    }

    fn start(&mut self, prompt: &[u32], capacity: usize, scope: u64, limit: usize) -> Result<Started, ModelError> {
        if prompt.len() > capacity {
            return Err(ModelError::CapacityExceeded {
                requested: prompt.len(),
                capacity,
            });
        }
        if self.prefilling().is_some() {
            return Err(ModelError::InvalidInput(
                "another sequence's prompt is still going in".into(),
            ));
        }
        if self.rows.first().is_some_and(|r| r.id == SINGLE) {
            self.rows.clear(); // what single-stream use left behind
        }
        self.ensure(self.slots_with_one_more(), capacity)?;
        let r = self.rows.len();
        self.next_id += 1;
        let id = self.next_id;
        let cached = match self.prefix.lookup(scope, prompt) {
            Some((state, len)) => {
                self.kv.load(r, state, len);
                len
            }
            None => 0,
        };
        self.rows.push(Row {
            id,
            scope,
            len: cached,
            tokens: if self.prefix.enabled() {
                prompt.to_vec()
            } else {
                Vec::new()
            },
            todo: Vec::new(),
        });
        let rest = &prompt[cached..];
        let now = if self.slices { rest.len().min(limit) } else { rest.len() };
        if now > 0 || rest.is_empty() {
            if let Err(e) = self.extend_row(r, &rest[..now]) {
                self.rows.pop();
                return Err(e);
            }
        }
        self.rows[r].todo = rest[now..].to_vec();
        Ok(Started {
            id,
            cached,
            done: now == rest.len(),
        })
    }

    fn resume(&mut self, id: SeqId, limit: usize) -> Result<bool, ModelError> {
        let r = match self.prefilling() {
            Some(r) if self.rows[r].id == id => r,
            _ => {
                return Err(ModelError::InvalidInput(format!(
                    "sequence {id} has no prompt going in"
                )))
            }
        };
        let now = self.rows[r].todo.len().min(limit.max(1));
        let todo = std::mem::take(&mut self.rows[r].todo);
        let result = self.extend_row(r, &todo[..now]);
        self.rows[r].todo = todo;
        result?;
        self.rows[r].todo.drain(..now);
        Ok(self.rows[r].todo.is_empty())
    }

    fn step(&mut self, feeds: &[(SeqId, u32)]) -> Result<(), ModelError> {
        // A prompt going in is the last row; the step runs the rows before it.
        let n = self.prefilling().unwrap_or(self.rows.len());
        if feeds.len() != n {
            return Err(ModelError::InvalidInput(format!(
                "a step feeds every running sequence: {} fed, {n} running",
                feeds.len()
            )));
        }
        let width = self.rows[..n].iter().map(|r| r.len).max().unwrap_or(0) + 1;
        if width > self.kv.capacity() {
            return Err(ModelError::CapacityExceeded {
                requested: width,
                capacity: self.kv.capacity(),
            });
        }
        for (r, row) in self.rows[..n].iter().enumerate() {
            let tok = feeds
                .iter()
                .find(|(id, _)| *id == row.id)
                .map(|&(_, t)| t)
                .ok_or_else(|| ModelError::InvalidInput(format!("sequence {} was not fed", row.id)))?;
            if tok as usize >= self.info.vocab_size {
                return Err(ModelError::InvalidInput(format!(
                    "token id {tok} is outside the vocabulary"
                )));
            }
            self.ids[r] = i64::from(tok);
            let mask = &mut self.mask[r * width..(r + 1) * width];
            mask[..=row.len].fill(1);
            mask[row.len + 1..].fill(0);
        }
        self.run(0, n, 1, width)?;
        let keep_tokens = self.prefix.enabled();
        for (row, &id) in self.rows[..n].iter_mut().zip(&self.ids) {
            row.len += 1;
            if keep_tokens {
                row.tokens.push(id as u32); // the token written above, checked to be in the vocabulary
            }
        }
        Ok(())
    }

    fn logits(&self, id: SeqId) -> &[f32] {
        let vocab = self.info.vocab_size;
        match self.row_of(id) {
            Some(r) => &self.logits[r * vocab..(r + 1) * vocab],
            None => &[],
        }
    }

    fn finish(&mut self, id: SeqId) {
        let Some(r) = self.row_of(id) else { return };
        if self.prefix.enabled() {
            let row = &self.rows[r];
            let len = row.len.min(row.tokens.len());
            let state = self.kv.save(r, len);
            let tokens = row.tokens[..len].to_vec();
            self.prefix.insert(row.scope, tokens, state);
        }
        let last = self.rows.len() - 1;
        if r != last && self.prefilling() == Some(last) {
            // Keep the running rows contiguous and the prompt going in last: the last running row moves into the
            // gap, then the prompt's row into the last running row's place.
            self.move_row(last - 1, r);
            self.move_row(last, last - 1);
        } else {
            // Keep the rows contiguous: the last one moves into the gap.
            self.move_row(last, r);
        }
        self.rows.pop();
    }
}
