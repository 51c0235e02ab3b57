//! `lambda-llm bench`: load time, prefill and decode speed, time to first token and peak RSS of this engine.

use super::ModelArgs;
use crate::config::Config;
use crate::core::sampling::argmax;
use crate::core::Model;
use crate::engine::{ChatMessage, Engine};
use anyhow::Result;
use clap::Args;
use serde::Serialize;
use std::time::Instant;

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
    threads: usize,
    load_ms: f64,
    warm_up_ms: f64,
    ready_ms: Option<f64>,
    peak_rss_mib: Option<f64>,
    rounds: usize,
    prompts: Vec<PromptResult>,
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
    let mut engine = a.model.load(config)?;
    let ready_ms = process_age_ms();
    let chat = engine.chat_prompt(&[ChatMessage::new("user", "What is the capital of France?")])?;
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
    let report = Report {
        engine: "lambda-llm (ort)",
        model: engine.manifest.id.clone(),
        threads: engine.model.threads(),
        load_ms: engine.load_time.as_secs_f64() * 1e3,
        warm_up_ms: engine.warm_up_time.as_secs_f64() * 1e3,
        ready_ms,
        peak_rss_mib: peak_rss_mib(),
        rounds,
        prompts,
    };
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "{} on {} threads: load {:.0} ms (+ warm-up {:.0} ms), peak RSS {:.0} MiB",
            report.model,
            report.threads,
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
    }
    Ok(())
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
