//! `lambda-llm batch` on the real model: one result line per input line, in order, bad lines as error lines, and a
//! run cut short resumes without losing or repeating a line.

use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;

fn model_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("model-artifacts/smollm2-135m-instruct")
}

/// Ten lines: good chat and completion requests mixed with every kind of broken line.
fn input() -> Vec<String> {
    let chat = |id: &str, q: &str| {
        json!({"custom_id": id, "method": "POST", "url": "/v1/chat/completions",
               "body": {"model": "smollm2-135m-instruct", "max_tokens": 12, "temperature": 0,
                        "messages": [{"role": "user", "content": q}]}})
        .to_string()
    };
    let completion = |id: &str, body: Value| {
        json!({"custom_id": id, "method": "POST", "url": "/v1/completions", "body": body}).to_string()
    };
    let ok = json!({"model": "smollm2-135m-instruct", "prompt": "The capital of France is", "max_tokens": 3});
    vec![
        chat("c1", "What is the capital of France?"),
        completion("p1", ok.clone()),
        "{not json".to_string(),
        json!({"method": "POST", "url": "/v1/completions", "body": ok}).to_string(),
        json!({"custom_id": "u1", "method": "POST", "url": "/v1/embeddings", "body": ok}).to_string(),
        completion(
            "t1",
            json!({"model": "smollm2-135m-instruct", "prompt": "x", "temperature": 5}),
        ),
        completion(
            "ctx",
            json!({"model": "smollm2-135m-instruct", "prompt": "x", "max_tokens": 9000}),
        ),
        completion(
            "s1",
            json!({"model": "smollm2-135m-instruct", "prompt": "x", "stream": true}),
        ),
        chat("c2", "Name a colour."),
        completion(
            "p2",
            json!({"model": "smollm2-135m-instruct", "prompt": [1, 2, 3], "max_tokens": 2}),
        ),
    ]
}

fn batch(dir: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_lambda-llm"))
        .args(["batch", "in.jsonl", "-o", "out.jsonl", "--model-dir"])
        .arg(model_dir())
        .current_dir(dir)
        .output()
        .unwrap()
}

fn read(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn tempdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lambda-llm-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn every_line_gets_exactly_one_result_in_input_order() {
    let dir = tempdir("batch");
    std::fs::write(dir.join("in.jsonl"), input().join("\n") + "\n\n").unwrap();
    let run = batch(&dir);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let out = read(&dir.join("out.jsonl"));
    let err = read(&dir.join("out.errors.jsonl"));
    assert_eq!(out.len() + err.len(), 10);
    let ids = |v: &[Value]| {
        v.iter()
            .map(|l| l["custom_id"].as_str().map(str::to_owned))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        ids(&out),
        vec![
            Some("c1".into()),
            Some("p1".into()),
            Some("c2".into()),
            Some("p2".into())
        ]
    );
    for l in &out {
        assert!(l["id"].as_str().unwrap().starts_with("batch_req_"));
        assert_eq!(l["response"]["status_code"], 200);
        assert!(l["response"]["request_id"].as_str().unwrap().starts_with("req_"));
        assert!(l["response"]["body"]["choices"][0].is_object());
        assert!(l["error"].is_null());
    }
    assert!(out[0]["response"]["body"]["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .contains("Paris"));
    // Errors, in input order: bad JSON and missing custom_id name their line; API refusals keep their envelope.
    let codes: Vec<String> = err
        .iter()
        .map(|l| match l["error"]["code"].as_str() {
            Some(c) => c.to_owned(),
            None => format!("http {}", l["response"]["status_code"]),
        })
        .collect();
    assert_eq!(
        codes,
        [
            "invalid_json",
            "missing_custom_id",
            "invalid_url",
            "http 400",
            "http 400",
            "invalid_body"
        ]
    );
    assert!(err[0]["error"]["message"].as_str().unwrap().starts_with("line 3:"));
    assert!(err[1]["error"]["message"].as_str().unwrap().starts_with("line 4:"));
    assert_eq!(err[3]["response"]["body"]["error"]["param"], "temperature");
    assert_eq!(err[4]["response"]["body"]["error"]["code"], "context_length_exceeded");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_interrupted_run_resumes_without_losing_or_repeating_lines() {
    let dir = tempdir("batch-resume");
    std::fs::write(dir.join("in.jsonl"), input().join("\n") + "\n").unwrap();
    assert!(batch(&dir).status.success());
    let full_out = std::fs::read_to_string(dir.join("out.jsonl")).unwrap();
    let full_err = std::fs::read_to_string(dir.join("out.errors.jsonl")).unwrap();
    // As if killed after 4 results (c1, p1 in the output; two error lines), mid-way through writing a fifth.
    let first = |s: &str, n: usize| s.lines().take(n).map(|l| format!("{l}\n")).collect::<String>();
    std::fs::write(dir.join("out.jsonl"), first(&full_out, 2)).unwrap();
    std::fs::write(
        dir.join("out.errors.jsonl"),
        first(&full_err, 2) + "{\"id\":\"batch_req_torn",
    )
    .unwrap();
    let run = batch(&dir);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    assert!(String::from_utf8_lossy(&run.stderr).contains("4 done by an earlier run"));
    let custom = |p: &str| {
        read(&dir.join(p))
            .iter()
            .map(|l| l["custom_id"].clone())
            .collect::<Vec<_>>()
    };
    let expected_out: Vec<Value> = full_out
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["custom_id"].clone())
        .collect();
    let expected_err: Vec<Value> = full_err
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["custom_id"].clone())
        .collect();
    assert_eq!(custom("out.jsonl"), expected_out);
    assert_eq!(custom("out.errors.jsonl"), expected_err);
    let _ = std::fs::remove_dir_all(&dir);
}
