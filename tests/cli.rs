//! The `lambda-llm` binary's start-up errors: clear messages and a non-zero exit, never a panic.

use std::process::Command;

fn lambda_llm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_lambda-llm"))
}

#[test]
fn a_missing_onnx_runtime_library_is_a_clear_error() {
    let out = lambda_llm()
        .args(["complete", "hi", "--max-tokens", "1"])
        .env("ORT_DYLIB_PATH", "/nonexistent/libonnxruntime.so")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("cannot load ONNX Runtime"), "{stderr}");
    assert!(stderr.contains("ORT_DYLIB_PATH"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn a_missing_model_directory_is_a_clear_error() {
    let out = lambda_llm()
        .args(["complete", "hi", "--model-dir", "/nonexistent/model"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("/nonexistent/model/manifest.json"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn a_bad_environment_value_is_a_clear_error() {
    let out = lambda_llm()
        .args(["complete", "hi"])
        .env("LOG_FORMAT", "xml")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("LOG_FORMAT"), "{stderr}");
}
