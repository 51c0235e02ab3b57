//! Finding and loading the ONNX Runtime shared library (`load-dynamic`: nothing is linked or downloaded at build).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The library's file name, as `make setup` places it and as the Lambda package ships it.
pub const LIBRARY_NAME: &str = "libonnxruntime.so";

/// ONNX Runtime could not be loaded.
#[derive(Debug, Clone, thiserror::Error)]
#[error("cannot load ONNX Runtime: {0}")]
pub struct RuntimeError(pub String);

static ENVIRONMENT: OnceLock<Result<(PathBuf, ort::environment::Environment), RuntimeError>> = OnceLock::new();

/// Where the library is looked for, in order: an explicit path (`ORT_DYLIB_PATH`), beside the executable, one level
/// up (cargo's test binaries live in `deps/`), then the system's dlopen path (`LD_LIBRARY_PATH`, `/opt/lib` on
/// Lambda).
pub fn candidates(explicit: Option<&Path>) -> Vec<PathBuf> {
    if let Some(p) = explicit {
        return vec![p.to_path_buf()];
    }
    let mut out = Vec::new();
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
    {
        out.push(dir.join(LIBRARY_NAME));
        if let Some(up) = dir.parent() {
            out.push(up.join(LIBRARY_NAME));
        }
    }
    out.push(PathBuf::from(LIBRARY_NAME));
    out
}

/// Loads ONNX Runtime once per process and returns the path it came from and the shared environment.
pub fn environment(
    explicit: Option<&Path>,
) -> Result<(&'static Path, &'static ort::environment::Environment), RuntimeError> {
    let loaded = ENVIRONMENT.get_or_init(|| load(explicit));
    match loaded {
        Ok((p, env)) => Ok((p.as_path(), env)),
        Err(e) => Err(e.clone()),
    }
}

fn load(explicit: Option<&Path>) -> Result<(PathBuf, ort::environment::Environment), RuntimeError> {
    let mut tried = Vec::new();
    for path in candidates(explicit) {
        // A bare file name goes to dlopen's search path; a path must exist to be worth trying.
        if path.components().count() > 1 && !path.exists() {
            tried.push(format!("{} (missing)", path.display()));
            continue;
        }
        // ort reports most failures as errors but can panic on a library of the wrong version: contain that.
        let attempt = std::panic::catch_unwind(|| ort::init_from(&path).map(|b| b.with_name("lambda-llm").build()));
        match attempt {
            Ok(Ok(Ok(env))) => return Ok((path, env)),
            Ok(Ok(Err(e))) => tried.push(format!("{} ({e})", path.display())),
            Ok(Err(e)) => tried.push(format!("{} ({e})", path.display())),
            Err(_) => tried.push(format!("{} (panicked while loading)", path.display())),
        }
        if explicit.is_some() {
            break;
        }
    }
    Err(RuntimeError(format!(
        "tried {}. Run `make setup` (it places {LIBRARY_NAME} beside the binaries) or set ORT_DYLIB_PATH",
        tried.join("; ")
    )))
}
