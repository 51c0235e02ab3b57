//! `lambda-llm`: the command-line entry point (complete, chat, bench).

use anyhow::Result;
use clap::Parser;
use lambda_llm::cli::{self, Cli};
use lambda_llm::config::Config;

fn main() -> Result<()> {
    let cli = Cli::parse();
    let config = Config::from_env()?;
    lambda_llm::telemetry::init(config.log_format);
    cli::run(cli, config)
}
