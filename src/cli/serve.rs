//! `lambda-llm serve`: the HTTP API on this machine, with a local keys file.

use super::ModelArgs;
use crate::config::Config;
use crate::http::{router, AppState};
use crate::keys::{self, FileKeyStore, KeyStore};
use anyhow::{Context, Result};
use clap::Args;
use std::path::PathBuf;
use std::sync::Arc;

/// Options of `serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on.
    #[arg(long, default_value_t = 3000)]
    pub port: u16,
    /// Keys file (default: `API_KEYS_FILE`, else ./lambda-llm-keys.json); created with a dev key if missing.
    #[arg(long)]
    pub keys_file: Option<PathBuf>,
    /// Replace the key named `dev` with a fresh one and print it (what `make run` does; only hashes are stored,
    /// so a key cannot be shown again later).
    #[arg(long)]
    pub dev_key: bool,
    #[command(flatten)]
    model: ModelArgs,
}

/// Runs the server until Ctrl-C.
pub fn run(a: &ServeArgs, config: &Config) -> Result<()> {
    let keys_file = a
        .keys_file
        .clone()
        .or_else(|| config.api_keys_file.clone())
        .unwrap_or_else(|| PathBuf::from(keys::DEFAULT_KEYS_FILE));
    let dev_key = if a.dev_key {
        Some(keys::file::replace_named_key(&keys_file, "dev")?)
    } else {
        keys::create_with_first_key(&keys_file, "dev")?
    };
    let engine = a.model.load(config)?;
    let store = FileKeyStore::new(keys_file.clone(), config.keys_cache_ttl);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        store.refresh().await.with_context(|| format!("reading keys file {}", keys_file.display()))?;
        let state = AppState::new(engine, Arc::new(store), config);
        let model = state.model.id.clone();
        let addr = format!("{}:{}", a.host, a.port);
        let listener = tokio::net::TcpListener::bind(&addr).await.with_context(|| format!("listening on {addr}"))?;
        let url = format!("http://{}", listener.local_addr()?);
        tracing::info!(%url, model, keys_file = %keys_file.display(), "serving");
        println!("lambda-llm is serving {model} on {url} (keys: {})", keys_file.display());
        match dev_key {
            Some(key) => {
                println!("New dev API key (shown once; only its hash is stored): {key}");
                println!(
                    "Try:\n  curl -s {url}/v1/chat/completions -H 'Authorization: Bearer {key}' \
                     -H 'Content-Type: application/json' \
                     -d '{{\"model\":\"{model}\",\"messages\":[{{\"role\":\"user\",\"content\":\"What is the capital of France?\"}}]}}'"
                );
            }
            None => println!("Create a key with: lambda-llm keys new --name me --keys-file {}", keys_file.display()),
        }
        axum::serve(listener, router(state))
            .with_graceful_shutdown(async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await?;
        Ok(())
    })
}
