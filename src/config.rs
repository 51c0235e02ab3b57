//! The one place that reads the environment: raw variables become a validated [`Config`] at start.

use std::path::PathBuf;
use std::time::Duration;

/// Default model artifact directory, relative to the working directory (the repository when run locally).
pub const DEFAULT_MODEL_DIR: &str = "model-artifacts/smollm2-135m-instruct";

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines (local default).
    Text,
    /// One JSON object per line (Lambda, log pipelines).
    Json,
}

/// How the Lambda function answers (`LAMBDA_INVOKE_MODE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InvokeMode {
    /// Response streaming (Function URL with `InvokeMode: RESPONSE_STREAM`, REST API `STREAM`): SSE token by token.
    Streaming,
    /// Buffered responses (API Gateway HTTP API): a stream is delivered whole, still correctly framed.
    Buffered,
}

/// Everything configurable, read once.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// `MODEL_DIR`: the model artifact directory.
    pub model_dir: PathBuf,
    /// `ORT_DYLIB_PATH`: explicit ONNX Runtime library, overriding the search beside the executable.
    pub ort_dylib_path: Option<PathBuf>,
    /// `LOG_FORMAT`: `text` or `json`.
    pub log_format: LogFormat,
    /// `MODEL_THREADS`: intra-op threads for the model (default: all available cores).
    pub threads: Option<usize>,
    /// `API_KEYS_FILE`: the local keys file (a `--keys-file` flag overrides it; unset: `keys::DEFAULT_KEYS_FILE`).
    pub api_keys_file: Option<PathBuf>,
    /// `AWS_ENDPOINT_URL`: an endpoint override (a local moto); the SDK reads it itself, this only switches S3 to
    /// path-style addressing, which such endpoints need.
    pub aws_endpoint_url: Option<String>,
    /// `BATCH_QUEUE_URL`: the SQS queue of batch chunks.
    pub batch_queue_url: Option<String>,
    /// `BATCH_CHUNK_LINES`: requests per chunk message (default 20).
    pub batch_chunk_lines: usize,
    /// `AWS_LAMBDA_FUNCTION_NAME` (set by Lambda): names the function in metrics.
    pub function_name: Option<String>,
    /// `LAMBDA_INVOKE_MODE`: `streaming` (default) or `buffered`.
    pub invoke_mode: InvokeMode,
    /// `API_KEYS_SECRET_ID`: the Secrets Manager secret (name or ARN) holding the keys document (Lambda).
    pub api_keys_secret_id: Option<String>,
    /// `KEYS_CACHE_TTL_SECONDS`: how long a loaded keys document is trusted before it is read again (default 60).
    pub keys_cache_ttl: Duration,
    /// `MODEL_ALIASES`: `(alias, model id)` pairs, e.g. `text-davinci-003=smollm2-135m-instruct`.
    pub model_aliases: Vec<(String, String)>,
    /// `MAX_BODY_BYTES`, `REQUEST_TIMEOUT_SECONDS`, `MAX_STOP`, `MAX_N`, `MAX_PROMPT_TOKENS`,
    /// `MAX_COMPLETION_TOKENS`: limits of the HTTP API.
    pub limits: crate::http::Limits,
    /// `MAX_QUEUE`: requests that may wait for the model before new ones get 503 (default 64).
    pub max_queue: usize,
    /// Most requests decoding together in one batched step (`MAX_BATCH`).
    pub max_batch: usize,
    /// Memory for the prefix cache in bytes (`PREFIX_CACHE_MB`; 0 disables it).
    pub prefix_cache_bytes: usize,
    /// `KERNELS=auto|bf16|int8|ort`: our exact Q4_1 kernels where the CPU has AVX-512 or AVX2 (default), a faster
    /// variant (not exact) rounding the activations to bfloat16 where the CPU has AVX512_BF16 or to 8-bit integers
    /// where it has AVX2, or ONNX Runtime's everywhere.
    pub kernels: crate::engine::Kernels,
}

/// Requests per batch chunk by default.
pub const DEFAULT_BATCH_CHUNK_LINES: usize = 20;

/// Requests that may wait for the model by default.
pub const DEFAULT_MAX_QUEUE: usize = 64;

/// Default `MAX_BATCH`.
pub const DEFAULT_MAX_BATCH: usize = 8;

/// Default `PREFIX_CACHE_MB`: about 1,400 tokens of SmolLM2-135M state.
pub const DEFAULT_PREFIX_CACHE_MB: usize = 64;

/// `a=b,c=d` → `[(a, b), (c, d)]`; `None` if a pair is malformed.
fn parse_aliases(v: &str) -> Option<Vec<(String, String)>> {
    v.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|pair| {
            let (alias, id) = pair.split_once('=')?;
            let (alias, id) = (alias.trim(), id.trim());
            (!alias.is_empty() && !id.is_empty()).then(|| (alias.to_owned(), id.to_owned()))
        })
        .collect()
}

/// An environment variable with an unusable value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("environment variable {name}={value:?}: {reason}")]
pub struct ConfigError {
    /// Variable name.
    pub name: &'static str,
    /// Its value.
    pub value: String,
    /// What was expected.
    pub reason: &'static str,
}

impl Config {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// How to load the engine.
    pub fn engine_options(&self) -> crate::engine::EngineOptions {
        crate::engine::EngineOptions {
            ort_dylib_path: self.ort_dylib_path.clone(),
            threads: self.threads,
            max_batch: self.max_batch,
            prefix_cache_bytes: self.prefix_cache_bytes,
            kernels: self.kernels,
            profile: None,
        }
    }

    /// Reads variables through `var` (tests pass a map instead of the process environment).
    pub fn from_lookup(var: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let get = |k: &str| var(k).filter(|v| !v.trim().is_empty());
        let log_format = match get("LOG_FORMAT").as_deref().map(str::trim) {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => {
                return Err(ConfigError {
                    name: "LOG_FORMAT",
                    value: other.into(),
                    reason: "expected text or json",
                })
            }
        };
        let number = |name: &'static str, min: u64| -> Result<Option<u64>, ConfigError> {
            match get(name) {
                None => Ok(None),
                Some(v) => v
                    .trim()
                    .parse::<u64>()
                    .ok()
                    .filter(|&n| n >= min)
                    .map(Some)
                    .ok_or(ConfigError {
                        name,
                        value: v.clone(),
                        reason: if min == 0 {
                            "expected a whole number (0 or more)"
                        } else {
                            "expected a positive integer"
                        },
                    }),
            }
        };
        let threads = number("MODEL_THREADS", 1)?.map(|n| n as usize);
        let keys_cache_ttl =
            number("KEYS_CACHE_TTL_SECONDS", 0)?.map_or(crate::keys::DEFAULT_CACHE_TTL, Duration::from_secs);
        let model_aliases = match get("MODEL_ALIASES") {
            None => Vec::new(),
            Some(v) => parse_aliases(&v).ok_or(ConfigError {
                name: "MODEL_ALIASES",
                value: v.clone(),
                reason: "expected alias=model-id pairs separated by commas",
            })?,
        };
        let defaults = crate::http::Limits::default();
        let size = |n: u64| usize::try_from(n).unwrap_or(usize::MAX);
        let limits = crate::http::Limits {
            max_body_bytes: number("MAX_BODY_BYTES", 1)?.map_or(defaults.max_body_bytes, size),
            request_timeout: number("REQUEST_TIMEOUT_SECONDS", 1)?
                .map_or(defaults.request_timeout, Duration::from_secs),
            max_stop: number("MAX_STOP", 0)?.map_or(defaults.max_stop, size),
            max_n: number("MAX_N", 1)?.map_or(defaults.max_n, size),
            max_prompt_tokens: number("MAX_PROMPT_TOKENS", 1)?.map(size),
            max_completion_tokens: number("MAX_COMPLETION_TOKENS", 1)?.map(size),
            ..defaults
        };
        let max_queue = number("MAX_QUEUE", 1)?.map_or(DEFAULT_MAX_QUEUE, size);
        let max_batch = number("MAX_BATCH", 1)?.map_or(DEFAULT_MAX_BATCH, size);
        let prefix_cache_bytes = number("PREFIX_CACHE_MB", 0)?
            .map_or(DEFAULT_PREFIX_CACHE_MB, size)
            .saturating_mul(1 << 20);
        let kernels = match get("KERNELS").as_deref().map(str::trim) {
            None | Some("auto") => crate::engine::Kernels::Auto,
            Some("ort") => crate::engine::Kernels::Ort,
            Some("bf16") => crate::engine::Kernels::Bf16,
            Some("int8") => crate::engine::Kernels::Int8,
            Some(other) => {
                return Err(ConfigError {
                    name: "KERNELS",
                    value: other.into(),
                    reason: "expected auto, bf16, int8 or ort",
                })
            }
        };
        Ok(Self {
            model_dir: get("MODEL_DIR").map_or_else(|| PathBuf::from(DEFAULT_MODEL_DIR), PathBuf::from),
            ort_dylib_path: get("ORT_DYLIB_PATH").map(PathBuf::from),
            log_format,
            threads,
            api_keys_file: get("API_KEYS_FILE").map(PathBuf::from),
            aws_endpoint_url: get("AWS_ENDPOINT_URL"),
            batch_queue_url: get("BATCH_QUEUE_URL"),
            batch_chunk_lines: number("BATCH_CHUNK_LINES", 1)?.map_or(DEFAULT_BATCH_CHUNK_LINES, |n| n as usize),
            function_name: get("AWS_LAMBDA_FUNCTION_NAME"),
            invoke_mode: match get("LAMBDA_INVOKE_MODE").as_deref().map(str::trim) {
                None | Some("streaming") => InvokeMode::Streaming,
                Some("buffered") => InvokeMode::Buffered,
                Some(other) => {
                    return Err(ConfigError {
                        name: "LAMBDA_INVOKE_MODE",
                        value: other.into(),
                        reason: "expected streaming or buffered",
                    })
                }
            },
            api_keys_secret_id: get("API_KEYS_SECRET_ID").map(|v| v.trim().to_owned()),
            keys_cache_ttl,
            model_aliases,
            limits,
            max_queue,
            max_batch,
            prefix_cache_bytes,
            kernels,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn cfg(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Config::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn defaults_without_variables() {
        let c = cfg(&[]).unwrap();
        assert_eq!(c.model_dir, PathBuf::from(DEFAULT_MODEL_DIR));
        assert_eq!(c.ort_dylib_path, None);
        assert_eq!(c.log_format, LogFormat::Text);
        assert_eq!(c.threads, None);
        assert_eq!(c.api_keys_file, None);
        assert_eq!(c.api_keys_secret_id, None);
        assert_eq!(c.invoke_mode, InvokeMode::Streaming);
        assert_eq!(
            cfg(&[("LAMBDA_INVOKE_MODE", "buffered")]).unwrap().invoke_mode,
            InvokeMode::Buffered
        );
        assert_eq!(
            cfg(&[("LAMBDA_INVOKE_MODE", "x")]).unwrap_err().name,
            "LAMBDA_INVOKE_MODE"
        );
        assert_eq!(c.keys_cache_ttl, Duration::from_secs(60));
    }

    #[test]
    fn variables_are_read_and_checked() {
        let c = cfg(&[
            ("MODEL_DIR", "/opt/model"),
            ("ORT_DYLIB_PATH", "/x/lib.so"),
            ("LOG_FORMAT", "json"),
            ("MODEL_THREADS", "2"),
        ])
        .unwrap();
        assert_eq!(c.model_dir, PathBuf::from("/opt/model"));
        assert_eq!(c.ort_dylib_path, Some(PathBuf::from("/x/lib.so")));
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(c.threads, Some(2));
        assert_eq!(cfg(&[("LOG_FORMAT", "xml")]).unwrap_err().name, "LOG_FORMAT");
        assert_eq!(cfg(&[("MODEL_THREADS", "0")]).unwrap_err().name, "MODEL_THREADS");
    }

    #[test]
    fn kernels_default_to_auto_and_can_be_pinned_to_onnx_runtime_or_bfloat16() {
        use crate::engine::Kernels;
        assert_eq!(cfg(&[]).unwrap().kernels, Kernels::Auto);
        assert_eq!(
            cfg(&[("KERNELS", "auto")]).unwrap().engine_options().kernels,
            Kernels::Auto
        );
        assert_eq!(
            cfg(&[("KERNELS", " ort ")]).unwrap().engine_options().kernels,
            Kernels::Ort
        );
        assert_eq!(cfg(&[("KERNELS", "bf16")]).unwrap().kernels, Kernels::Bf16);
        assert_eq!(cfg(&[("KERNELS", "int8")]).unwrap().kernels, Kernels::Int8);
        let e = cfg(&[("KERNELS", "gpu")]).unwrap_err();
        assert_eq!((e.name, e.reason), ("KERNELS", "expected auto, bf16, int8 or ort"));
    }

    #[test]
    fn aliases_and_limits_are_read_and_checked() {
        let c = cfg(&[
            (
                "MODEL_ALIASES",
                "text-davinci-003=smollm2-135m-instruct, gpt-3.5-turbo = smollm2-135m-instruct",
            ),
            ("MAX_BODY_BYTES", "1000"),
            ("REQUEST_TIMEOUT_SECONDS", "7"),
            ("MAX_QUEUE", "3"),
        ])
        .unwrap();
        assert_eq!(
            c.model_aliases,
            vec![
                ("text-davinci-003".to_string(), "smollm2-135m-instruct".to_string()),
                ("gpt-3.5-turbo".to_string(), "smollm2-135m-instruct".to_string())
            ]
        );
        assert_eq!(c.limits.max_body_bytes, 1000);
        assert_eq!(c.limits.request_timeout, Duration::from_secs(7));
        assert_eq!(c.max_queue, 3);
        assert_eq!(cfg(&[("MODEL_ALIASES", "nonsense")]).unwrap_err().name, "MODEL_ALIASES");
        assert_eq!(cfg(&[("MAX_QUEUE", "0")]).unwrap_err().name, "MAX_QUEUE");
        assert_eq!(cfg(&[]).unwrap().max_queue, DEFAULT_MAX_QUEUE);
        let c = cfg(&[("MAX_BATCH", "3"), ("PREFIX_CACHE_MB", "0")]).unwrap();
        assert_eq!((c.max_batch, c.prefix_cache_bytes), (3, 0));
        let d = cfg(&[]).unwrap();
        assert_eq!(
            (d.max_batch, d.prefix_cache_bytes),
            (DEFAULT_MAX_BATCH, DEFAULT_PREFIX_CACHE_MB << 20)
        );
        assert_eq!(cfg(&[("MAX_BATCH", "0")]).unwrap_err().name, "MAX_BATCH");
        assert_eq!(cfg(&[]).unwrap().batch_chunk_lines, DEFAULT_BATCH_CHUNK_LINES);
        assert_eq!(cfg(&[("BATCH_CHUNK_LINES", "5")]).unwrap().batch_chunk_lines, 5);
        assert_eq!(
            cfg(&[("BATCH_CHUNK_LINES", "0")]).unwrap_err().name,
            "BATCH_CHUNK_LINES"
        );
    }

    #[test]
    fn request_limits_default_to_the_old_behaviour() {
        let l = cfg(&[]).unwrap().limits;
        assert_eq!(l, crate::http::Limits::default());
        assert_eq!((l.max_stop, l.max_n), (4, 16));
        assert_eq!((l.max_prompt_tokens, l.max_completion_tokens), (None, None));
        assert_eq!(l.max_body_bytes, 1 << 20);
        assert_eq!(l.request_timeout, Duration::from_secs(300));
    }

    #[test]
    fn request_limits_are_read_and_checked() {
        let l = cfg(&[
            ("MAX_STOP", "2"),
            ("MAX_N", "3"),
            ("MAX_PROMPT_TOKENS", "100"),
            ("MAX_COMPLETION_TOKENS", " 50 "),
        ])
        .unwrap()
        .limits;
        assert_eq!((l.max_stop, l.max_n), (2, 3));
        assert_eq!((l.max_prompt_tokens, l.max_completion_tokens), (Some(100), Some(50)));
        // No stop strings at all is a valid policy; zero choices or tokens is not.
        assert_eq!(cfg(&[("MAX_STOP", "0")]).unwrap().limits.max_stop, 0);
        for name in ["MAX_N", "MAX_PROMPT_TOKENS", "MAX_COMPLETION_TOKENS"] {
            assert_eq!(cfg(&[(name, "0")]).unwrap_err().name, name);
        }
        for name in ["MAX_STOP", "MAX_N", "MAX_PROMPT_TOKENS", "MAX_COMPLETION_TOKENS"] {
            for bad in ["-1", "2.5", "many", "99999999999999999999999"] {
                let e = cfg(&[(name, bad)]).unwrap_err();
                assert_eq!((e.name, e.value.as_str()), (name, bad));
            }
        }
    }

    #[test]
    fn keys_variables_are_read_and_checked() {
        let c = cfg(&[("API_KEYS_FILE", "/etc/keys.json"), ("KEYS_CACHE_TTL_SECONDS", " 0 ")]).unwrap();
        assert_eq!(c.api_keys_file, Some(PathBuf::from("/etc/keys.json")));
        assert_eq!(c.keys_cache_ttl, Duration::ZERO);
        assert_eq!(
            cfg(&[("KEYS_CACHE_TTL_SECONDS", "300")]).unwrap().keys_cache_ttl,
            Duration::from_secs(300)
        );
        let arn = "arn:aws:secretsmanager:us-east-1:123456789012:secret:lambda-llm/keys-AbCdEf";
        let c = cfg(&[("API_KEYS_SECRET_ID", &format!(" {arn} "))]).unwrap();
        assert_eq!(c.api_keys_secret_id.as_deref(), Some(arn));
        assert_eq!(cfg(&[("API_KEYS_SECRET_ID", "  ")]).unwrap().api_keys_secret_id, None);
        for bad in ["-1", "1.5", "soon"] {
            let e = cfg(&[("KEYS_CACHE_TTL_SECONDS", bad)]).unwrap_err();
            assert_eq!(e.name, "KEYS_CACHE_TTL_SECONDS");
        }
    }
}
