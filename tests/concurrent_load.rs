//! Engines built at the same moment in one process all load.
//!
//! ONNX Runtime adds our operator domain to a process-wide map when the first fast-graph session of a process is
//! built, so only a process's first builds can collide: the test runs them in fresh processes (this test binary,
//! started again with `CONCURRENT_LOAD_CHILD`), eight builds at once in each, and every build of every process must
//! succeed. Without the lock in `OnnxModel::load`, 5 of 6 runs of this test failed here ("the domain is already
//! exist"); with it, none of 3.

use lambda_llm::engine::{runtime, Kernels, Manifest, OnnxModel, SessionOptions};
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Barrier};

const PROCESSES: usize = 24;
const BUILDS: usize = 8;

/// In a child process: `BUILDS` sessions, a quarter on ONNX Runtime's kernels, started from one barrier once the
/// manifest and the runtime are ready, so the builds reach ONNX Runtime together.
fn build_at_once() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("model-artifacts/smollm2-135m-instruct");
    let manifest =
        Manifest::load(&dir).unwrap_or_else(|e| panic!("cannot read {} (run `make setup`): {e}", dir.display()));
    let (_, env) = runtime::environment(None).unwrap();
    let start = Arc::new(Barrier::new(BUILDS));
    let builds: Vec<_> = (0..BUILDS)
        .map(|i| {
            let (dir, manifest, start) = (dir.clone(), manifest.clone(), start.clone());
            let kernels = if i % 4 == 3 { Kernels::Ort } else { Kernels::Auto };
            std::thread::spawn(move || {
                let options = SessionOptions {
                    kernels,
                    threads: Some(1),
                    ..SessionOptions::default()
                };
                start.wait();
                OnnxModel::load(&dir, manifest, env, &options)
                    .map(|m| m.kernels())
                    .map_err(|e| e.to_string())
            })
        })
        .collect();
    for build in builds {
        let result = build.join().expect("a build thread panicked");
        assert!(result.is_ok(), "a session failed to build beside others: {result:?}");
    }
}

#[test]
fn engines_built_at_once_all_load() {
    if std::env::var_os("CONCURRENT_LOAD_CHILD").is_some() {
        return build_at_once();
    }
    let me = std::env::current_exe().unwrap();
    for run in 0..PROCESSES {
        let out = Command::new(&me)
            .args([
                "--exact",
                "engines_built_at_once_all_load",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("CONCURRENT_LOAD_CHILD", "1")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "process {run} of {PROCESSES}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
