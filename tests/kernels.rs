//! lambda-llm's Q4_1 kernel (model.fast.onnx) against ONNX Runtime's (model.onnx) on the real model: the same
//! next-token choices teacher-forced over the fidelity prompts, the same greedy generations; and what the explicit
//! bfloat16 and int8 variants (`KERNELS=bf16`, `KERNELS=int8`) give up.

use lambda_llm::core::{generate, GenerationRequest, Model, SamplingParams};
use lambda_llm::engine::{ChatMessage, Engine, EngineOptions, Kernels};
use lambda_llm_kernels::q4_1::Isa;
use std::ops::ControlFlow;
use std::path::PathBuf;

fn load(kernels: Kernels) -> Engine {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("model-artifacts/smollm2-135m-instruct");
    Engine::load(
        &dir,
        &EngineOptions {
            kernels,
            ..EngineOptions::default()
        },
    )
    .unwrap_or_else(|e| panic!("cannot load {} (run `make setup`): {e}", dir.display()))
}

/// The converter's fidelity prompts (model-artifacts/measure.py), 32 tokens each.
const PROMPTS: [&str; 4] = [
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined movable \
     metal type with an oil-based ink and a wooden screw press. Within a few decades, printed books spread across \
     Europe.",
    "La Révolution française est une période de bouleversements politiques et sociaux en France, qui commence en \
     1789 avec la convocation des états généraux et s'achève avec le coup d'État de Napoléon Bonaparte.",
    "北京是中华人民共和国的首都，也是全国的政治中心和文化中心。长城是中国古代的军事防御工程，全长两万多公里。",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    a, b = 0, 1\n    for _ in range(n):\n        \
     a, b = b, a + b\n    return a\n\n\nprint([fibonacci(i) for i in range(10)])\n",
];

/// Next-token logits at every position: prefixes of 1..8 tokens as prompts (prefill), then one token per step.
fn teacher_forced(e: &mut Engine, ids: &[u32]) -> Vec<Vec<f32>> {
    let mut rows = Vec::new();
    for n in 1..=8 {
        e.model.reset(ids.len()).unwrap();
        rows.push(e.model.forward(&ids[..n]).unwrap().to_vec());
    }
    for &t in &ids[8..] {
        rows.push(e.model.forward(&[t]).unwrap().to_vec());
    }
    rows
}

fn argmax(v: &[f32]) -> usize {
    lambda_llm::core::sampling::argmax(v) as usize
}

#[test]
fn the_kernel_is_used_where_the_cpu_has_avx512_or_avx2_and_onnx_runtime_elsewhere() {
    let fast = load(Kernels::Auto);
    let ort = load(Kernels::Ort);
    let bf16 = load(Kernels::Bf16);
    let int8 = load(Kernels::Int8);
    assert_eq!(ort.model.kernels(), "onnxruntime (model.onnx)");
    let exact = match Isa::detect() {
        Isa::Avx512 => "lambda-llm q4_1 avx512 (model.fast.onnx)",
        Isa::Avx2 => "lambda-llm q4_1 avx2 (model.fast.onnx)",
        _ => "onnxruntime (model.onnx)",
    };
    assert_eq!(fast.model.kernels(), exact);
    // Only on request, and only where the CPU has the instructions; else what `auto` picks.
    match Isa::detect_bf16() {
        Some(_) => assert_eq!(bf16.model.kernels(), "lambda-llm q4_1 avx512-bf16 (model.fast.onnx)"),
        None => assert_eq!(bf16.model.kernels(), exact),
    }
    match Isa::detect_int8() {
        Some(_) => assert_eq!(int8.model.kernels(), "lambda-llm q4_1 avx2-int8 (model.fast.onnx)"),
        None => assert_eq!(int8.model.kernels(), exact),
    }
}

/// Per position of the fidelity prompts: the logits of `a` and of `b`.
fn compare(a: &mut Engine, b: &mut Engine) -> Vec<(Vec<f32>, Vec<f32>)> {
    let mut rows = Vec::new();
    for text in PROMPTS {
        let ids = a.tokenizer.encode(text).unwrap();
        let ids = &ids[..32];
        rows.extend(teacher_forced(a, ids).into_iter().zip(teacher_forced(b, ids)));
    }
    rows
}

#[test]
fn teacher_forced_choices_match_onnx_runtime_at_all_128_positions() {
    let (mut fast, mut ort) = (load(Kernels::Auto), load(Kernels::Ort));
    let (mut agree, mut total, mut max_diff, mut max_win) = (0, 0, 0f32, 0f32);
    for (x, y) in compare(&mut fast, &mut ort) {
        total += 1;
        agree += usize::from(argmax(&x) == argmax(&y));
        max_diff = x.iter().zip(&y).map(|(p, q)| (p - q).abs()).fold(max_diff, f32::max);
        // model.onnx computes its 8 largest logits exactly (the rest with int8 activations), the winner among them.
        let win = argmax(&y);
        max_win = max_win.max((x[win] - y[win]).abs());
    }
    println!(
        "fast vs onnxruntime kernels: {agree}/{total} argmax agreement, max |difference| of the winning logit \
         {max_win:.2e}, of any logit {max_diff:.2e} (model.onnx's LM head rounds its input to int8 outside its top 8)"
    );
    assert_eq!((agree, total), (128, 128));
    // Logits span about ±30; both graphs compute the winner in f32, so it differs in the last bits only.
    assert!(max_win < 1e-2, "max difference of the winning logit {max_win}");
}

/// A variant's agreement with the exact model (model.onnx, which picks the fp32 reference's token at all 128
/// positions): it must keep the bar of 125 of the 128 choices, and its winning logit must move far more than
/// the exact kernel's last bits (1e-4), or it is not the rounded kernel.
fn keeps_125_and_is_rounded(kernels: Kernels) {
    let (mut option, mut ort) = (load(kernels), load(Kernels::Ort));
    let (mut agree, mut total, mut max_win) = (0, 0, 0f32);
    for (x, y) in compare(&mut option, &mut ort) {
        total += 1;
        agree += usize::from(argmax(&x) == argmax(&y));
        let win = argmax(&y);
        max_win = max_win.max((x[win] - y[win]).abs());
    }
    println!(
        "{kernels:?} ({}) vs onnxruntime kernels: {agree}/{total} argmax agreement, max |difference| of the winning \
         logit {max_win:.2e}",
        option.model.kernels()
    );
    assert_eq!(total, 128);
    assert!(agree >= 125, "{agree}/128");
    assert!(
        max_win > 1e-2,
        "max difference of the winning logit {max_win}: not the {kernels:?} kernel?"
    );
}

/// The bfloat16 variant is not exact: it is an option, and its agreement with the exact model must stay at the issue's
/// bar of 125/128.
#[test]
fn the_bf16_option_keeps_125_of_128_choices_and_is_really_rounded() {
    if Isa::detect_bf16().is_none() {
        println!("this CPU has no AVX512_BF16: KERNELS=bf16 runs the exact kernel (checked above)");
        return;
    }
    keeps_125_and_is_rounded(Kernels::Bf16);
}

/// The int8 variant rounds the activations as llama.cpp does (llama.cpp's agreement with the fp32 reference:
/// `bench/fidelity.py`); it is an option, and it must keep the bar of 125/128 too.
#[test]
fn the_int8_option_keeps_125_of_128_choices_and_is_really_rounded() {
    if Isa::detect_int8().is_none() {
        println!("this CPU has no AVX2: KERNELS=int8 runs what auto picks (checked above)");
        return;
    }
    keeps_125_and_is_rounded(Kernels::Int8);
}

#[test]
fn greedy_generations_are_token_identical() {
    let (mut fast, mut ort) = (load(Kernels::Auto), load(Kernels::Ort));
    for text in [
        "What is the capital of France?",
        "Write a haiku about the sea.",
        "List three prime numbers.",
    ] {
        let mut tokens = Vec::new();
        for e in [&mut fast, &mut ort] {
            let prompt = e.chat_prompt(&[ChatMessage::new("user", text)]).unwrap();
            let req = GenerationRequest::new(prompt, 64, SamplingParams::greedy());
            let Engine { model, tokenizer, .. } = e;
            let g = generate(model, tokenizer, &req, &mut |_| ControlFlow::Continue(())).unwrap();
            tokens.push(g.token_ids);
        }
        assert!(!tokens[0].is_empty());
        assert_eq!(tokens[0], tokens[1], "{text}");
    }
}
