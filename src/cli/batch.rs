//! `lambda-llm batch IN.jsonl -o OUT.jsonl`: an OpenAI Batch file on the local model, with a progress bar.

use super::ModelArgs;
use crate::batch::{local, BatchRunner};
use crate::config::Config;
use crate::http::AppState;
use crate::keys::MemoryKeyStore;
use anyhow::{Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Options of `batch`.
#[derive(Debug, Args)]
pub struct BatchArgs {
    /// Input: one `{"custom_id","method":"POST","url","body"}` request per line.
    pub input: PathBuf,
    /// Output: one result line per successful request, in input order.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Failed requests (default: OUT with `.errors.jsonl`).
    #[arg(long)]
    pub errors: Option<PathBuf>,
    #[command(flatten)]
    model: ModelArgs,
}

/// `OUT.jsonl` → `OUT.errors.jsonl`.
fn errors_path(output: &Path) -> PathBuf {
    let s = output.to_string_lossy();
    PathBuf::from(match s.strip_suffix(".jsonl") {
        Some(stem) => format!("{stem}.errors.jsonl"),
        None => format!("{s}.errors.jsonl"),
    })
}

/// Runs the batch; an interrupted run resumes where it stopped when started again with the same files.
pub fn run(a: &BatchArgs, config: &Config) -> Result<()> {
    let errors = a.errors.clone().unwrap_or_else(|| errors_path(&a.output));
    let engine = a.model.load(config)?;
    let state = AppState::new(engine, Arc::new(MemoryKeyStore::default()), config);
    let runner = BatchRunner::new(state)?;
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} requests, {msg} [{elapsed_precise}, eta {eta}]")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let summary = runtime
        .block_on(local::run(&runner, &a.input, &a.output, &errors, |s, elapsed| {
            bar.set_length(s.total as u64);
            bar.set_position((s.resumed + s.succeeded + s.failed) as u64);
            let tps = s.completion_tokens as f64 / elapsed.as_secs_f64().max(1e-3);
            bar.set_message(format!("{} failed, {tps:.0} tok/s", s.failed));
        }))
        .with_context(|| format!("batch {}", a.input.display()))?;
    bar.finish_and_clear();
    eprintln!(
        "{} requests: {} succeeded, {} failed{} → {} and {}; {} completion tokens",
        summary.total,
        summary.succeeded,
        summary.failed,
        if summary.resumed > 0 {
            format!(", {} done by an earlier run", summary.resumed)
        } else {
            String::new()
        },
        a.output.display(),
        errors.display(),
        summary.completion_tokens
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_file_sits_beside_the_output() {
        assert_eq!(
            errors_path(Path::new("out/res.jsonl")),
            PathBuf::from("out/res.errors.jsonl")
        );
        assert_eq!(errors_path(Path::new("res")), PathBuf::from("res.errors.jsonl"));
    }
}
