//! `lambda-llm bench --profile` on the real model: ONNX Runtime's trace of the real graph, summed per operator type
//! for the decode steps and the chat prompt.

use serde_json::Value;
use std::path::PathBuf;
use std::process::Command;

#[test]
fn the_profile_names_where_a_decode_step_and_the_prompt_spend_their_time() {
    for kernels in ["auto", "ort"] {
        profile_with(kernels);
    }
}

fn profile_with(kernels: &str) {
    let dir = std::env::temp_dir().join(format!("lambda-llm-bench-profile-{kernels}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let model = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("model-artifacts/smollm2-135m-instruct");
    let out = Command::new(env!("CARGO_BIN_EXE_lambda-llm"))
        .args([
            "bench",
            "--json",
            "--rounds",
            "1",
            "--new-tokens",
            "3",
            "--streams",
            "0",
            "--model-dir",
        ])
        .arg(&model)
        .arg("--profile")
        .arg(dir.join("nested/trace")) // a directory that does not exist yet
        .env("MODEL_THREADS", "1")
        .env("KERNELS", kernels)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let profile = &report["profile"];
    let file = PathBuf::from(profile["file"].as_str().unwrap());
    assert!(file.starts_with(dir.join("nested")), "{file:?}");
    let trace: Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    assert!(trace.as_array().is_some_and(|events| events.len() > 1000));
    std::fs::remove_dir_all(&dir).unwrap();

    // The linear layers' and attention's operators are the kernels the engine says it runs: ours (the LM head is
    // MatMulQ8_0) or ONNX Runtime's (the LM head is a MatMulNBits too).
    let (linear, count, attention) = if report["kernels"].as_str().unwrap().contains("q4_1") {
        ("MatMulQ4_1", 120, "Attention")
    } else {
        ("MatMulNBits", 121, "GroupQueryAttention")
    };
    let kinds = profile["kinds"].as_array().unwrap();
    let kind = |name: &str| {
        kinds
            .iter()
            .find(|k| k["name"] == name)
            .unwrap_or_else(|| panic!("{name}: {profile}"))
    };
    let ops = |k: &Value| -> Vec<(String, u64, f64)> {
        k["ops"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| {
                (
                    o["op"].as_str().unwrap().to_string(),
                    o["nodes"].as_u64().unwrap(),
                    o["share"].as_f64().unwrap(),
                )
            })
            .collect()
    };
    let decode = kind("decode step");
    // Two prompts, two decode steps each (the warm-up's one-token run is left out).
    assert_eq!(
        (decode["tokens"].as_u64(), decode["runs"].as_u64()),
        (Some(1), Some(4)),
        "{decode}"
    );
    let prompt = kind("prompt");
    assert_eq!(prompt["tokens"], report["prompts"][0]["prompt_tokens"], "{prompt}");
    assert_eq!(prompt["runs"].as_u64(), Some(1), "{prompt}");
    for k in [decode, prompt] {
        let ops = ops(k);
        let total: f64 = ops.iter().map(|o| o.2).sum();
        assert!(total > 0.5 && total <= 1.0, "{k}");
        assert!(k["outside_nodes_us"].as_f64().unwrap() >= 0.0, "{k}");
        let nodes = |name: &str| ops.iter().find(|o| o.0 == name).map(|o| o.1);
        // 30 layers: 4 linear layers (fused QKV, output, fused gate/up, down) and one attention each.
        assert_eq!(nodes(linear), Some(count), "{k}");
        assert_eq!(nodes(attention), Some(30), "{k}");
        // Most time first (a property of the summary, not a speed).
        assert!(ops.windows(2).all(|w| w[0].2 >= w[1].2), "{k}");
    }
}
