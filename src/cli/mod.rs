//! The `lambda-llm` command line: argument parsing and the commands that run the engine locally.

mod batch;
mod bench;
mod keys;
mod profile;
mod serve;

use crate::config::Config;
use crate::core::{generate, GenerationRequest, RawSampling};
use crate::engine::{ChatMessage, Engine, EngineOptions};
use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use std::io::Write;
use std::ops::ControlFlow;
use std::path::PathBuf;

/// An OpenAI-compatible LLM API on a quantized ONNX model.
#[derive(Debug, Parser)]
#[command(name = "lambda-llm", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run an OpenAI Batch file (JSONL) on the local model: results in input order, resumable.
    Batch(batch::BatchArgs),
    /// Serve the OpenAI-compatible HTTP API on this machine.
    Serve(serve::ServeArgs),
    /// Complete a prompt (raw text, no chat template), streaming to the terminal.
    Complete(CompleteArgs),
    /// Send one chat message (with the model's chat template), streaming the answer.
    Chat(ChatArgs),
    /// Measure load time, prefill and decode speed, time to first token and peak memory.
    Bench(bench::BenchArgs),
    /// Manage API keys: `keys new`, `keys list`, `keys revoke ID`.
    Keys(keys::KeysArgs),
    /// Print the token ids of TEXT as a JSON array; with no TEXT, read one JSON string per stdin line.
    Tokenize(TokenizeArgs),
}

/// `tokenize [TEXT]`.
#[derive(Debug, Args)]
pub struct TokenizeArgs {
    /// Text to tokenize (special tokens such as `<|im_start|>` are recognised).
    pub text: Option<String>,
    #[command(flatten)]
    model: ModelArgs,
}

/// Options shared by the commands that load a model.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// Model artifact directory (default: `MODEL_DIR`, else model-artifacts/smollm2-135m-instruct).
    #[arg(long)]
    pub model_dir: Option<PathBuf>,
}

impl ModelArgs {
    /// Loads the engine from the flag, else the config.
    pub fn load(&self, config: &Config) -> Result<Engine> {
        self.load_with(config, config.engine_options())
    }

    /// Loads the engine from the flag, else the config, with `options`.
    pub fn load_with(&self, config: &Config, options: EngineOptions) -> Result<Engine> {
        let dir = self.model_dir.clone().unwrap_or_else(|| config.model_dir.clone());
        let engine = Engine::load(&dir, &options).with_context(|| format!("loading model from {}", dir.display()))?;
        tracing::info!(
            model = %engine.manifest.id,
            library = %engine.library.display(),
            threads = engine.model.threads(),
            kernels = engine.model.kernels(),
            load_ms = engine.load_time.as_millis() as u64,
            warm_up_ms = engine.warm_up_time.as_millis() as u64,
            "model loaded"
        );
        Ok(engine)
    }
}

/// Generation options of `complete` and `chat`.
#[derive(Debug, Clone, Args)]
pub struct GenArgs {
    /// Maximum new tokens.
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// Nucleus sampling mass.
    #[arg(long)]
    pub top_p: Option<f64>,
    /// Keep only the k most likely tokens.
    #[arg(long)]
    pub top_k: Option<i64>,
    /// Minimum probability relative to the top token.
    #[arg(long)]
    pub min_p: Option<f64>,
    /// Seed for reproducible sampling.
    #[arg(long)]
    pub seed: Option<i64>,
    /// Repetition penalty (1 = off).
    #[arg(long)]
    pub repetition_penalty: Option<f64>,
    /// Stop string (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    #[command(flatten)]
    model: ModelArgs,
}

/// `complete PROMPT`.
#[derive(Debug, Args)]
pub struct CompleteArgs {
    /// The prompt text.
    pub prompt: String,
    #[command(flatten)]
    gen: GenArgs,
}

/// `chat MESSAGE`.
#[derive(Debug, Args)]
pub struct ChatArgs {
    /// The user's message.
    pub message: String,
    /// A system prompt replacing the template's default.
    #[arg(long)]
    pub system: Option<String>,
    #[command(flatten)]
    gen: GenArgs,
}

/// Runs the parsed command.
pub fn run(cli: Cli, config: Config) -> Result<()> {
    match cli.command {
        Command::Complete(a) => {
            let engine = a.gen.model.load(&config)?;
            let prompt = engine.tokenizer.encode(&a.prompt)?;
            stream(engine, prompt, &a.gen)
        }
        Command::Chat(a) => {
            let engine = a.gen.model.load(&config)?;
            let mut messages = Vec::new();
            if let Some(s) = a.system {
                messages.push(ChatMessage::new("system", s));
            }
            messages.push(ChatMessage::new("user", a.message));
            let prompt = engine.chat_prompt(&messages)?;
            stream(engine, prompt, &a.gen)
        }
        Command::Bench(a) => bench::run(&a, &config),
        Command::Serve(a) => serve::run(&a, &config),
        Command::Batch(a) => batch::run(&a, &config),
        Command::Keys(a) => keys::run(&a, &config),
        Command::Tokenize(a) => tokenize(&a, &config),
    }
}

/// Tokenizes one argument, or JSON-string lines from stdin (for cross-checks against other tokenizers).
fn tokenize(a: &TokenizeArgs, config: &Config) -> Result<()> {
    let dir = a.model.model_dir.clone().unwrap_or_else(|| config.model_dir.clone());
    let manifest = crate::engine::Manifest::load(&dir)?;
    let bos = manifest.bos_id.filter(|_| manifest.add_bos);
    let tokenizer = crate::engine::TextTokenizer::load(&dir.join(&manifest.files.tokenizer), bos)?;
    let mut out = std::io::stdout().lock();
    match &a.text {
        Some(text) => writeln!(out, "{}", serde_json::to_string(&tokenizer.encode(text)?)?)?,
        None => {
            for line in std::io::stdin().lines() {
                let text: String = serde_json::from_str(&line?).context("each stdin line must be a JSON string")?;
                writeln!(out, "{}", serde_json::to_string(&tokenizer.encode(&text)?)?)?;
            }
        }
    }
    Ok(())
}

/// Generates and prints text as it arrives; a summary goes to stderr.
fn stream(mut engine: Engine, prompt: Vec<u32>, a: &GenArgs) -> Result<()> {
    let sampling = RawSampling {
        temperature: Some(a.temperature),
        top_p: a.top_p,
        top_k: a.top_k,
        min_p: a.min_p,
        seed: a.seed,
        repetition_penalty: a.repetition_penalty,
        ..RawSampling::default()
    }
    .validate(engine.manifest.vocab_size)?;
    crate::core::validate::check_context(prompt.len(), a.max_tokens, engine.manifest.context_length)?;
    let mut req = GenerationRequest::new(prompt, a.max_tokens, sampling);
    req.stop = a.stop.clone();
    let mut out = std::io::stdout().lock();
    let g = generate(&mut engine.model, &engine.tokenizer, &req, &mut |d| {
        let ok = out.write_all(d.text.as_bytes()).and_then(|_| out.flush()).is_ok();
        if ok {
            ControlFlow::Continue(())
        } else {
            ControlFlow::Break(())
        }
    })?;
    let _ = writeln!(out);
    let decode_tps = g.usage.completion_tokens.saturating_sub(1) as f64 / g.timings.decode.as_secs_f64().max(1e-9);
    eprintln!(
        "[{} prompt + {} completion tokens, finish {}, first token {:.0} ms, {:.1} tok/s]",
        g.usage.prompt_tokens,
        g.usage.completion_tokens,
        g.finish_reason.as_str(),
        g.timings.first_token.as_secs_f64() * 1e3,
        decode_tps
    );
    Ok(())
}
