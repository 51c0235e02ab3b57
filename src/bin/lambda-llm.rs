//! `lambda-llm`: the command-line entry point (complete, chat, bench, tokenize, keys).

use clap::Parser;
use lambda_llm::cli::{self, Cli};
use lambda_llm::config::Config;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = Config::from_env().map_err(anyhow::Error::from).and_then(|config| {
        lambda_llm::telemetry::init(config.log_format);
        cli::run(cli, config)
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The whole cause chain on one line; no backtrace, whatever RUST_BACKTRACE says.
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
