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
    /// `KEYS_CACHE_TTL_SECONDS`: how long a loaded keys document is trusted before it is read again (default 60).
    pub keys_cache_ttl: Duration,
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
        let threads = match get("MODEL_THREADS") {
            None => None,
            Some(v) => Some(v.trim().parse::<usize>().ok().filter(|&n| n > 0).ok_or(ConfigError {
                name: "MODEL_THREADS",
                value: v.clone(),
                reason: "expected a positive integer",
            })?),
        };
        let keys_cache_ttl = match get("KEYS_CACHE_TTL_SECONDS") {
            None => crate::keys::DEFAULT_CACHE_TTL,
            Some(v) => Duration::from_secs(v.trim().parse::<u64>().map_err(|_| ConfigError {
                name: "KEYS_CACHE_TTL_SECONDS",
                value: v.clone(),
                reason: "expected a whole number of seconds (0 or more)",
            })?),
        };
        Ok(Self {
            model_dir: get("MODEL_DIR").map_or_else(|| PathBuf::from(DEFAULT_MODEL_DIR), PathBuf::from),
            ort_dylib_path: get("ORT_DYLIB_PATH").map(PathBuf::from),
            log_format,
            threads,
            api_keys_file: get("API_KEYS_FILE").map(PathBuf::from),
            keys_cache_ttl,
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
    fn keys_variables_are_read_and_checked() {
        let c = cfg(&[("API_KEYS_FILE", "/etc/keys.json"), ("KEYS_CACHE_TTL_SECONDS", " 0 ")]).unwrap();
        assert_eq!(c.api_keys_file, Some(PathBuf::from("/etc/keys.json")));
        assert_eq!(c.keys_cache_ttl, Duration::ZERO);
        assert_eq!(
            cfg(&[("KEYS_CACHE_TTL_SECONDS", "300")]).unwrap().keys_cache_ttl,
            Duration::from_secs(300)
        );
        for bad in ["-1", "1.5", "soon"] {
            let e = cfg(&[("KEYS_CACHE_TTL_SECONDS", bad)]).unwrap_err();
            assert_eq!(e.name, "KEYS_CACHE_TTL_SECONDS");
        }
    }
}
