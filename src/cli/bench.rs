//! `lambda-llm bench`: load time, prefill and decode speed, time to first token and peak RSS of this engine.

use super::profile::{self, Profile};
use super::ModelArgs;
use crate::config::Config;
use crate::core::sampling::argmax;
use crate::core::{Batcher, Delta, Generation, GenerationRequest, Listener, Model, ModelError, SamplingParams};
use crate::engine::session::OnnxModel;
use crate::engine::{ChatMessage, Engine};
use anyhow::{Context, Result};
use clap::Args;
use serde::Serialize;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Questions for the concurrent streams (each its own chat prompt, like separate users).
const QUESTIONS: [&str; 8] = [
    "What is the capital of France?",
    "Explain photosynthesis to a child.",
    "Write a limerick about a cat.",
    "How do vaccines work?",
    "Give me three tips for learning Rust.",
    "Why is the sky blue?",
    "Describe the water cycle.",
    "What causes the seasons on Earth?",
];

/// A ~200-token prompt: prefill speed on a realistic document.
const LONG_PROMPT: &str = "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg \
combined movable metal type, oil-based inks and a wooden press adapted from wine making. Before this, books were copied \
by hand in monasteries and workshops, a slow and expensive process that kept literacy rare. Within fifty years, \
printing shops had spread to more than two hundred cities across Europe, producing millions of volumes. Prices fell, \
pamphlets and newspapers appeared, and ideas travelled faster than ever before. Scholars could compare identical \
copies of a text, which encouraged the standardisation of spelling and grammar. The Reformation, the scientific \
revolution and the growth of universities all owed something to cheap printed material. Summarise the main effects \
of the printing press on European society in a few sentences, and explain which of them you consider the most \
important and why.";

/// Options of `bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// New tokens per run (greedy, EOS ignored so every run decodes the same count).
    #[arg(long, default_value_t = 128)]
    pub new_tokens: usize,
    /// Runs per prompt; medians are reported.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Concurrent streams for the batching measurement (0 skips it and the prefix-cache one).
    #[arg(long, default_value_t = 8)]
    pub streams: usize,
    /// Record ONNX Runtime's per-operator profile of every run into a file named from this prefix (slows every node)
    /// and report where a decode step (every later one-token run of one sequence) and the chat prompt spend their
    /// time, per operator type.
    #[arg(long, value_name = "PREFIX")]
    pub profile: Option<PathBuf>,
    #[command(flatten)]
    model: ModelArgs,
}

/// Results for one prompt.
#[derive(Debug, Serialize)]
struct PromptResult {
    name: &'static str,
    prompt_tokens: usize,
    new_tokens: usize,
    prefill_tok_s: f64,
    decode_tok_s: f64,
    ttft_ms: f64,
    /// The exact prompt, so other engines can be driven with the same tokens.
    prompt_ids: Vec<u32>,
}

/// The whole report.
#[derive(Debug, Serialize)]
struct Report {
    engine: &'static str,
    model: String,
    /// Which kernels ran the linear layers (`KERNELS`, the CPU).
    kernels: &'static str,
    threads: usize,
    load_ms: f64,
    warm_up_ms: f64,
    ready_ms: Option<f64>,
    peak_rss_mib: Option<f64>,
    rounds: usize,
    prompts: Vec<PromptResult>,
    /// Throughput of one stream against `streams` concurrent ones (continuous batching).
    batching: Option<BatchResult>,
    /// Time to first token of a chat's second turn with and without the prefix cache.
    prefix_cache: Option<PrefixResult>,
    /// A long prompt joining a running stream: that stream's longest wait for a token, prompt in slices and whole.
    joining: Option<JoinResult>,
    /// Peak RSS after the batching and prefix-cache runs (before the joining one).
    peak_rss_many_mib: Option<f64>,
    /// With `--profile`: where a decode step and the chat prompt spend their time.
    #[serde(skip_serializing_if = "Option::is_none")]
    profile: Option<Profile>,
}

/// One stream against many.
#[derive(Debug, Serialize)]
struct BatchResult {
    streams: usize,
    new_tokens: usize,
    /// Generated tokens per second of wall time (prompt processing included), one stream.
    single_tok_s: f64,
    /// The same with `streams` concurrent streams.
    batch_tok_s: f64,
    /// `batch_tok_s / single_tok_s`.
    speedup: f64,
    /// Median over streams of each stream's decode time per token.
    per_stream_decode_ms: f64,
    /// The same for the lone stream.
    single_decode_ms: f64,
}

/// A growing chat.
#[derive(Debug, Serialize)]
struct PrefixResult {
    prompt_tokens: usize,
    cached_tokens: usize,
    ttft_cold_ms: f64,
    ttft_cached_ms: f64,
}

/// A long prompt that joins a running stream, going in slices of [`crate::core::PREFILL_CHUNK`] tokens between its
/// steps (the default) or whole (as before slices).
#[derive(Debug, Serialize)]
struct JoinResult {
    prompt_tokens: usize,
    /// Tokens per slice (0: the kernels take a prompt whole).
    slice_tokens: usize,
    /// The running stream's longest wait between two of its tokens while the prompt went in, ms.
    gap_sliced_ms: f64,
    gap_whole_ms: f64,
    /// The newcomer's time to first token (its prompt sharing the steps), ms.
    ttft_sliced_ms: f64,
    ttft_whole_ms: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Greedy prefill + `new` decode steps; returns (prefill s, time to first token s, decode s).
fn run_once(engine: &mut Engine, prompt: &[u32], new: usize) -> Result<(f64, f64, f64)> {
    let model = &mut engine.model;
    model.reset(prompt.len() + new)?;
    let t0 = Instant::now();
    let mut tok = argmax(model.forward(prompt)?);
    let prefill = t0.elapsed().as_secs_f64();
    let ttft = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    for _ in 1..new {
        tok = argmax(model.forward(&[tok])?);
    }
    Ok((prefill, ttft, t1.elapsed().as_secs_f64()))
}

/// Runs the benchmark and prints the report.
pub fn run(a: &BenchArgs, config: &Config) -> Result<()> {
    let mut options = config.engine_options();
    if let Some(prefix) = &a.profile {
        // ONNX Runtime opens the trace file when it builds the session, and does not create its directory.
        let dir = if prefix
            .as_os_str()
            .to_string_lossy()
            .ends_with(std::path::MAIN_SEPARATOR)
        {
            prefix.as_path()
        } else {
            prefix.parent().unwrap_or(Path::new(""))
        };
        if !dir.as_os_str().is_empty() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
    }
    options.profile = a.profile.clone();
    let mut engine = a.model.load_with(config, options)?;
    let ready_ms = process_age_ms();
    // The 30-token chat prompt of the performance targets (a short system prompt instead of the template's default).
    let chat = engine.chat_prompt(&[
        ChatMessage::new("system", "You are a helpful assistant. Be concise."),
        ChatMessage::new("user", "What is the capital of France?"),
    ])?;
    let chat_tokens = chat.len();
    let long = engine.tokenizer.encode(LONG_PROMPT)?;
    let rounds = a.rounds.max(1);
    let new = a.new_tokens.max(2);
    let mut prompts = Vec::new();
    for (name, prompt) in [("chat-short", chat), ("long", long)] {
        let (mut p, mut f, mut d) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..rounds {
            let (prefill, ttft, decode) = run_once(&mut engine, &prompt, new)?;
            p.push(prompt.len() as f64 / prefill);
            f.push(ttft * 1e3);
            d.push((new - 1) as f64 / decode);
        }
        prompts.push(PromptResult {
            name,
            prompt_tokens: prompt.len(),
            new_tokens: new,
            prefill_tok_s: median(p),
            decode_tok_s: median(d),
            ttft_ms: median(f),
            prompt_ids: prompt,
        });
    }
    let rss_one_stream = peak_rss_mib();
    let (batching, prefix_cache) = if a.streams > 0 {
        let batching = batch_throughput(&mut engine, a.streams, new)?;
        (Some(batching), Some(prefix_ttft(&mut engine)?))
    } else {
        (None, None)
    };
    let rss_many = peak_rss_mib();
    // Last: its long prompt's KV cache would count in the peak RSS above.
    let joining = if a.streams > 0 {
        Some(joining(&mut engine)?)
    } else {
        None
    };
    let report = Report {
        engine: "lambda-llm (ort)",
        model: engine.manifest.id.clone(),
        kernels: engine.model.kernels(),
        threads: engine.model.threads(),
        load_ms: engine.load_time.as_secs_f64() * 1e3,
        warm_up_ms: engine.warm_up_time.as_secs_f64() * 1e3,
        ready_ms,
        peak_rss_mib: rss_one_stream,
        rounds,
        prompts,
        batching,
        prefix_cache,
        joining,
        peak_rss_many_mib: rss_many,
        profile: match a.profile {
            Some(_) => Some(profile::summarise(
                &engine.model.end_profiling()?,
                OnnxModel::WARM_UP_RUNS,
                chat_tokens,
            )?),
            None => None,
        },
    };
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "{} on {} threads, kernels {}: load {:.0} ms (+ warm-up {:.0} ms), peak RSS {:.0} MiB",
            report.model,
            report.threads,
            report.kernels,
            report.load_ms,
            report.warm_up_ms,
            report.peak_rss_mib.unwrap_or(f64::NAN)
        );
        println!(
            "{:<12} {:>7} {:>14} {:>13} {:>9}",
            "prompt", "tokens", "prefill tok/s", "decode tok/s", "TTFT ms"
        );
        for p in &report.prompts {
            println!(
                "{:<12} {:>7} {:>14.0} {:>13.1} {:>9.1}",
                p.name, p.prompt_tokens, p.prefill_tok_s, p.decode_tok_s, p.ttft_ms
            );
        }
        if let Some(b) = &report.batching {
            println!(
                "{} streams: {:.1} tok/s in all vs {:.1} tok/s alone ({:.2}x); per-stream decode {:.1} ms/token \
                 (alone {:.1})",
                b.streams, b.batch_tok_s, b.single_tok_s, b.speedup, b.per_stream_decode_ms, b.single_decode_ms
            );
        }
        if let Some(p) = &report.prefix_cache {
            println!(
                "second chat turn ({} tokens, {} cached): TTFT {:.1} ms cached vs {:.1} ms cold",
                p.prompt_tokens, p.cached_tokens, p.ttft_cached_ms, p.ttft_cold_ms
            );
        }
        if let Some(j) = &report.joining {
            println!(
                "a {}-token prompt joining a running stream: its longest wait for a token {:.0} ms in slices of {} \
                 ({:.0} ms whole); the newcomer's TTFT {:.0} ms ({:.0} ms whole)",
                j.prompt_tokens, j.gap_sliced_ms, j.slice_tokens, j.gap_whole_ms, j.ttft_sliced_ms, j.ttft_whole_ms
            );
        }
        if let Some(p) = &report.profile {
            print!("{}", profile::render(p));
        }
    }
    Ok(())
}

/// Collects generations.
struct Keep(Arc<Mutex<Vec<Generation>>>);

impl Listener for Keep {
    fn delta(&mut self, _: Delta) -> ControlFlow<()> {
        ControlFlow::Continue(())
    }
    fn done(self: Box<Self>, result: Result<Generation, ModelError>) {
        if let Ok(g) = result {
            self.0.lock().unwrap_or_else(|e| e.into_inner()).push(g);
        }
    }
}

/// Runs `requests` together through the batch scheduler; returns the wall time and the generations.
fn run_batch(engine: &mut Engine, requests: Vec<GenerationRequest>) -> Result<(f64, Vec<Generation>)> {
    let n = requests.len();
    let done = Arc::new(Mutex::new(Vec::new()));
    let Engine { model, tokenizer, .. } = engine;
    let mut batcher = Batcher::new(model, tokenizer.clone(), n);
    let t = Instant::now();
    for r in requests {
        batcher.start(r, Box::new(Keep(done.clone())));
    }
    while batcher.running() > 0 {
        batcher.step();
    }
    let wall = t.elapsed().as_secs_f64();
    let gens = std::mem::take(&mut *done.lock().unwrap_or_else(|e| e.into_inner()));
    anyhow::ensure!(gens.len() == n, "{} of {n} generations failed", n - gens.len());
    Ok((wall, gens))
}

/// Greedy, `new` tokens, end-of-sequence suppressed so every stream decodes the same count.
fn fixed_length(prompt: Vec<u32>, new: usize, eos: &[u32]) -> GenerationRequest {
    let mut sampling = SamplingParams::greedy();
    sampling.logit_bias = eos.iter().map(|&e| (e, -100.0)).collect();
    GenerationRequest::new(prompt, new, sampling)
}

fn decode_ms_per_token(g: &Generation) -> f64 {
    g.timings.decode.as_secs_f64() * 1e3 / g.usage.completion_tokens.max(1) as f64
}

/// One stream alone, then `streams` at once.
fn batch_throughput(engine: &mut Engine, streams: usize, new: usize) -> Result<BatchResult> {
    let eos = engine.manifest.eos_ids.clone();
    let mut prompts = Vec::new();
    for i in 0..streams {
        let q = QUESTIONS[i % QUESTIONS.len()];
        prompts.push(engine.chat_prompt(&[ChatMessage::new("user", q)])?);
    }
    let (wall1, one) = run_batch(engine, vec![fixed_length(prompts[0].clone(), new, &eos)])?;
    let requests = prompts.into_iter().map(|p| fixed_length(p, new, &eos)).collect();
    let (wall_n, many) = run_batch(engine, requests).context("concurrent streams")?;
    let tokens = |gens: &[Generation]| gens.iter().map(|g| g.usage.completion_tokens).sum::<usize>() as f64;
    let single_tok_s = tokens(&one) / wall1;
    let batch_tok_s = tokens(&many) / wall_n;
    Ok(BatchResult {
        streams,
        new_tokens: new,
        single_tok_s,
        batch_tok_s,
        speedup: batch_tok_s / single_tok_s,
        per_stream_decode_ms: median(many.iter().map(decode_ms_per_token).collect()),
        single_decode_ms: decode_ms_per_token(&one[0]),
    })
}

/// A chat's second turn: time to first token when the first turn's state is cached, and when it is not.
fn prefix_ttft(engine: &mut Engine) -> Result<PrefixResult> {
    let system = "You are a careful assistant. Answer in two or three sentences, cite no sources, and keep a \
                  friendly, plain tone suitable for a general audience.";
    let q1 = "What is the tallest mountain on Earth?";
    let turn1 = engine.chat_prompt(&[ChatMessage::new("system", system), ChatMessage::new("user", q1)])?;
    let eos = engine.manifest.eos_ids.clone();
    let mut req1 = fixed_length(turn1, 48, &[]);
    req1.sampling.logit_bias.clear();
    let (_, first) = run_batch(engine, vec![req1])?;
    let answer = first[0].text.clone();
    let turn2 = engine.chat_prompt(&[
        ChatMessage::new("system", system),
        ChatMessage::new("user", q1),
        ChatMessage::new("assistant", &answer),
        ChatMessage::new("user", "And the deepest point of the ocean?"),
    ])?;
    let (_, cached) = run_batch(engine, vec![fixed_length(turn2.clone(), 1, &eos)])?;
    engine.model.clear_prefix_cache();
    let (_, cold) = run_batch(engine, vec![fixed_length(turn2.clone(), 1, &eos)])?;
    Ok(PrefixResult {
        prompt_tokens: turn2.len(),
        cached_tokens: cached[0].usage.cached_tokens,
        ttft_cold_ms: cold[0].timings.first_token.as_secs_f64() * 1e3,
        ttft_cached_ms: cached[0].timings.first_token.as_secs_f64() * 1e3,
    })
}

/// Tokens of the prompt that joins a running stream in [`joining`].
const JOINING_TOKENS: usize = 1000;

/// When each token of a stream arrived, and its result.
struct Clock(Arc<Mutex<(Vec<Instant>, Option<Generation>)>>);

impl Listener for Clock {
    fn delta(&mut self, _: Delta) -> ControlFlow<()> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).0.push(Instant::now());
        ControlFlow::Continue(())
    }
    fn done(self: Box<Self>, result: Result<Generation, ModelError>) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).1 = result.ok();
    }
}

/// A stream decodes; after its fourth token a [`JOINING_TOKENS`]-token prompt joins: the stream's longest wait between
/// two of its tokens from its last one before the newcomer to its first one after the newcomer's first token, and the
/// newcomer's time to first token; prompt in slices of `chunk` tokens.
fn join_once(
    engine: &mut Engine,
    stream: &GenerationRequest,
    long: &GenerationRequest,
    chunk: usize,
) -> Result<(f64, f64)> {
    let (a, b) = (
        Arc::new(Mutex::new((Vec::new(), None))),
        Arc::new(Mutex::new((Vec::new(), None))),
    );
    let Engine { model, tokenizer, .. } = engine;
    let mut batcher = Batcher::new(model, tokenizer.clone(), 2).prefill_chunk(chunk);
    batcher.start(stream.clone(), Box::new(Clock(a.clone())));
    while a.lock().unwrap_or_else(|e| e.into_inner()).0.len() < 4 && batcher.running() > 0 {
        batcher.step();
    }
    let joined = Instant::now();
    batcher.start(long.clone(), Box::new(Clock(b.clone())));
    while batcher.running() > 0 {
        batcher.step();
    }
    let (a, b) = (
        a.lock().unwrap_or_else(|e| e.into_inner()),
        b.lock().unwrap_or_else(|e| e.into_inner()),
    );
    let first = *b.0.first().context("the long prompt produced no token")?;
    anyhow::ensure!(a.1.is_some() && b.1.is_some(), "a generation failed");
    // The stream's tokens from its last one before the newcomer came to its first one after the newcomer's first.
    let from = a.0.iter().rposition(|&t| t <= joined).unwrap_or(0);
    let to =
        a.0.iter()
            .position(|&t| t > first)
            .context("the stream ended before the newcomer's first token")?;
    let gap = a.0[from..=to]
        .windows(2)
        .map(|w| (w[1] - w[0]).as_secs_f64())
        .fold(0.0, f64::max);
    let ttft = b.1.as_ref().map_or(f64::NAN, |g| g.timings.first_token.as_secs_f64());
    Ok((gap * 1e3, ttft * 1e3))
}

/// [`join_once`] with the prompt in slices (the default) and whole.
fn joining(engine: &mut Engine) -> Result<JoinResult> {
    let eos = engine.manifest.eos_ids.clone();
    let stream = fixed_length(
        engine.chat_prompt(&[ChatMessage::new("user", QUESTIONS[1])])?,
        128,
        &eos,
    );
    let ids = engine.tokenizer.encode(LONG_PROMPT)?;
    let long = fixed_length(ids.into_iter().cycle().take(JOINING_TOKENS).collect(), 2, &eos);
    engine.model.clear_prefix_cache();
    let (gap_sliced_ms, ttft_sliced_ms) = join_once(engine, &stream, &long, crate::core::PREFILL_CHUNK)?;
    engine.model.clear_prefix_cache();
    let (gap_whole_ms, ttft_whole_ms) = join_once(engine, &stream, &long, usize::MAX)?;
    Ok(JoinResult {
        prompt_tokens: JOINING_TOKENS,
        slice_tokens: if engine.model.slices() {
            crate::core::PREFILL_CHUNK
        } else {
            0
        },
        gap_sliced_ms,
        gap_whole_ms,
        ttft_sliced_ms,
        ttft_whole_ms,
    })
}

/// Peak resident set size of this process (Linux `VmHWM`).
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// Milliseconds since this process started (Linux: `/proc/self/stat` start time against `/proc/uptime`).
fn process_age_ms() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let after_name = &stat[stat.rfind(')')? + 2..];
    let start_ticks: f64 = after_name.split_whitespace().nth(19)?.parse().ok()?;
    let uptime: f64 = std::fs::read_to_string("/proc/uptime")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    // Linux reports start time in USER_HZ ticks, 100 on every mainstream configuration.
    Some((uptime - start_ticks / 100.0) * 1e3)
}
