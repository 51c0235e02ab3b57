//! The real engine on the real model: ONNX Runtime, the converted SmolLM2 artifact, its tokenizer and template.

use lambda_llm::core::{generate, Delta, FinishReason, GenerationRequest, Model, SamplingParams};
use lambda_llm::engine::{ChatMessage, Engine, EngineOptions};
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard, OnceLock};

/// One engine per test binary (loading takes about a second); tests take turns.
fn engine() -> MutexGuard<'static, Engine> {
    static ENGINE: OnceLock<Mutex<Engine>> = OnceLock::new();
    ENGINE
        .get_or_init(|| {
            let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("model-artifacts/smollm2-135m-instruct");
            let engine = Engine::load(&dir, &EngineOptions::default())
                .unwrap_or_else(|e| panic!("cannot load {} (run `make setup`): {e}", dir.display()));
            Mutex::new(engine)
        })
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

fn run(engine: &mut Engine, req: &GenerationRequest) -> (lambda_llm::core::Generation, Vec<Delta>) {
    let mut deltas = Vec::new();
    let Engine { model, tokenizer, .. } = engine;
    let g = generate(model, tokenizer, req, &mut |d| {
        deltas.push(d);
        ControlFlow::Continue(())
    })
    .expect("generation");
    (g, deltas)
}

fn chat(engine: &Engine, text: &str) -> Vec<u32> {
    engine.chat_prompt(&[ChatMessage::new("user", text)]).unwrap()
}

#[test]
fn capital_of_france_is_paris_and_stops_at_im_end() {
    let mut e = engine();
    let prompt = chat(&e, "What is the capital of France?");
    let (g, deltas) = run(&mut e, &GenerationRequest::new(prompt, 64, SamplingParams::greedy()));
    assert!(g.text.contains("Paris"), "{:?}", g.text);
    assert_eq!(g.finish_reason, FinishReason::Stop);
    assert_eq!(g.token_ids.last(), Some(&2), "ends with <|im_end|>");
    assert!(!g.text.contains("<|im_end|>"));
    assert_eq!(deltas.iter().map(|d| d.text.as_str()).collect::<String>(), g.text);
}

#[test]
fn max_tokens_five_gives_five_tokens_and_length() {
    let mut e = engine();
    let prompt = e.tokenizer.encode("Once upon a time").unwrap();
    let (g, _) = run(
        &mut e,
        &GenerationRequest::new(prompt.clone(), 5, SamplingParams::greedy()),
    );
    assert_eq!(g.usage.completion_tokens, 5);
    assert_eq!(g.token_ids.len(), 5);
    assert_eq!(g.finish_reason, FinishReason::Length);
    assert_eq!(g.usage.prompt_tokens, prompt.len());
}

#[test]
fn same_seed_same_text_and_greedy_is_deterministic() {
    let mut e = engine();
    let prompt = chat(&e, "Write a short poem about the sea.");
    let sampled = |e: &mut Engine, seed| {
        let s = SamplingParams {
            temperature: 1.0,
            top_p: 0.95,
            seed: Some(seed),
            ..SamplingParams::default()
        };
        run(e, &GenerationRequest::new(prompt.clone(), 24, s)).0
    };
    let a = sampled(&mut e, 1234);
    let b = sampled(&mut e, 1234);
    let c = sampled(&mut e, 99);
    assert_eq!(a.token_ids, b.token_ids);
    assert_eq!(a.text, b.text);
    assert_ne!(a.token_ids, c.token_ids, "another seed should sample differently");
    let g1 = run(
        &mut e,
        &GenerationRequest::new(prompt.clone(), 16, SamplingParams::greedy()),
    )
    .0;
    let g2 = run(
        &mut e,
        &GenerationRequest::new(prompt.clone(), 16, SamplingParams::greedy()),
    )
    .0;
    assert_eq!(g1.token_ids, g2.token_ids);
}

#[test]
fn chinese_and_emoji_stream_without_broken_characters() {
    let mut e = engine();
    let prompt = chat(&e, "请用中文介绍一下北京，并加上一个表情符号 😀");
    let (g, deltas) = run(&mut e, &GenerationRequest::new(prompt, 48, SamplingParams::greedy()));
    assert!(
        g.text.chars().any(|c| ('\u{4e00}'..='\u{9fff}').contains(&c)),
        "{:?}",
        g.text
    );
    for d in &deltas {
        assert!(
            !d.text.contains('\u{FFFD}'),
            "delta with a broken character: {:?}",
            d.text
        );
    }
    assert_eq!(deltas.iter().map(|d| d.text.as_str()).collect::<String>(), g.text);
}

#[test]
fn stop_string_is_not_emitted_on_the_real_model() {
    let mut e = engine();
    let prompt = chat(&e, "Count from 1 to 10, separated by commas.");
    let greedy = run(
        &mut e,
        &GenerationRequest::new(prompt.clone(), 40, SamplingParams::greedy()),
    )
    .0;
    assert!(greedy.text.contains('5'), "{:?}", greedy.text);
    let mut req = GenerationRequest::new(prompt, 40, SamplingParams::greedy());
    req.stop = vec!["5".into()];
    let (g, deltas) = run(&mut e, &req);
    assert_eq!(g.finish_reason, FinishReason::Stop);
    assert_eq!(g.text, greedy.text[..greedy.text.find('5').unwrap()]);
    assert!(deltas.iter().all(|d| !d.text.contains('5')));
}

#[test]
fn logprobs_are_reported_for_each_token() {
    let mut e = engine();
    let prompt = chat(&e, "Say hello.");
    let mut req = GenerationRequest::new(prompt, 6, SamplingParams::greedy());
    req.logprobs = Some(3);
    let (g, _) = run(&mut e, &req);
    assert!(!g.logprobs.is_empty());
    for t in &g.logprobs {
        assert!(t.logprob <= 0.0 && t.logprob.is_finite());
        assert_eq!(t.top.len(), 3);
        // Greedy: the chosen token is the most likely one.
        assert_eq!(t.top[0].id, t.id);
        assert!((t.top[0].logprob - t.logprob).abs() < 1e-5);
    }
}

#[test]
fn kv_cache_path_matches_a_full_recompute() {
    // Decoding with the cache must give the next-token logits of running the whole sequence at once: the very bits
    // on lambda-llm's graph (every row computed on its own), within ONNX Runtime's rounding on its own kernels.
    let mut e = engine();
    let ids = e.tokenizer.encode("The quick brown fox jumps over the lazy").unwrap();
    e.model.reset(ids.len()).unwrap();
    let full = e.model.forward(&ids).unwrap().to_vec();
    let mut paths = Vec::new();
    for split in [1, 2, 5] {
        let (head, tail) = ids.split_at(ids.len() - split);
        e.model.reset(ids.len()).unwrap();
        e.model.forward(head).unwrap();
        paths.push((
            format!("the last {split} apart"),
            e.model.forward(tail).unwrap().to_vec(),
        ));
    }
    e.model.reset(ids.len()).unwrap();
    let mut one_by_one = Vec::new();
    for &t in &ids {
        one_by_one = e.model.forward(&[t]).unwrap().to_vec();
    }
    paths.push(("one token at a time".into(), one_by_one));
    let row_by_row = e.model.kernels().contains("model.fast.onnx");
    for (how, logits) in paths {
        let max_diff = logits
            .iter()
            .zip(&full)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        if row_by_row {
            assert!(
                logits.iter().zip(&full).all(|(a, b)| a.to_bits() == b.to_bits()),
                "{how}: {max_diff}"
            );
        } else {
            assert!(max_diff < 1e-2, "{how}: max logit difference {max_diff}");
        }
        assert_eq!(
            lambda_llm::core::sampling::argmax(&logits),
            lambda_llm::core::sampling::argmax(&full),
            "{how}"
        );
    }
}

#[test]
fn a_sequence_longer_than_the_first_cache_grows_it() {
    let mut e = engine();
    let text = "word ".repeat(400);
    let prompt = e.tokenizer.encode(&text).unwrap();
    assert!(prompt.len() > 256);
    let (g, _) = run(&mut e, &GenerationRequest::new(prompt, 4, SamplingParams::greedy()));
    assert_eq!(g.usage.completion_tokens, 4);
}

#[test]
fn manifest_drives_the_shapes() {
    let e = engine();
    let m = &e.manifest;
    assert_eq!(m.id, "smollm2-135m-instruct");
    assert_eq!((m.layers, m.heads, m.kv_heads, m.head_dim), (30, 9, 3, 64));
    assert_eq!(m.vocab_size, 49152);
    assert_eq!(m.eos_ids, vec![2]);
    assert_eq!(e.model.info().context_length, 8192);
}
