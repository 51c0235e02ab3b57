//! Continuous batching and the prefix cache on the real model: every batched or prefix-cached greedy generation is
//! token-identical to the same request run alone.

use lambda_llm::core::{generate, Batcher, Delta, Generation, GenerationRequest, Listener, ModelError, SamplingParams};
use lambda_llm::engine::{ChatMessage, Engine, EngineOptions, Kernels};
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

fn load(prefix_cache_bytes: usize) -> Engine {
    load_with(prefix_cache_bytes, Kernels::Auto)
}

fn load_with(prefix_cache_bytes: usize, kernels: Kernels) -> Engine {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("model-artifacts/smollm2-135m-instruct");
    let options = EngineOptions {
        prefix_cache_bytes,
        kernels,
        ..EngineOptions::default()
    };
    Engine::load(&dir, &options).unwrap_or_else(|e| panic!("cannot load {} (run `make setup`): {e}", dir.display()))
}

/// An explicit option's engine: where the CPU has the option's instructions, its own kernel must be the one loaded.
fn load_option(prefix_cache_bytes: usize, kernels: Kernels) -> Engine {
    use lambda_llm_kernels::q4_1::Isa;
    let engine = load_with(prefix_cache_bytes, kernels);
    let (own, word) = match kernels {
        Kernels::Bf16 => (Isa::detect_bf16().is_some(), "bf16"),
        Kernels::Int8 => (Isa::detect_int8().is_some(), "int8"),
        other => panic!("{other:?} is not an explicit option"),
    };
    if own {
        assert!(engine.model.kernels().contains(word), "{}", engine.model.kernels());
    }
    engine
}

fn chat(engine: &Engine, turns: &[(&str, &str)]) -> Vec<u32> {
    let messages: Vec<ChatMessage> = turns.iter().map(|&(role, text)| ChatMessage::new(role, text)).collect();
    engine.chat_prompt(&messages).unwrap()
}

fn greedy(prompt: Vec<u32>, max_tokens: usize) -> GenerationRequest {
    GenerationRequest::new(prompt, max_tokens, SamplingParams::greedy())
}

/// The request run alone through the single-sequence path (no batch, no prefix cache).
fn alone(engine: &mut Engine, req: &GenerationRequest) -> Generation {
    let Engine { model, tokenizer, .. } = engine;
    generate(model, tokenizer, req, &mut |_| ControlFlow::Continue(())).expect("generation")
}

type Results = Arc<Mutex<Vec<(usize, Generation, String)>>>;

struct Collect(usize, String, Results);

impl Listener for Collect {
    fn delta(&mut self, delta: Delta) -> ControlFlow<()> {
        self.1.push_str(&delta.text);
        ControlFlow::Continue(())
    }
    fn done(self: Box<Self>, result: Result<Generation, ModelError>) {
        self.2
            .lock()
            .unwrap()
            .push((self.0, result.expect("generation"), self.1));
    }
}

fn prompts(engine: &Engine) -> Vec<GenerationRequest> {
    let text = |s: &str| engine.tokenizer.encode(s).unwrap();
    vec![
        greedy(chat(engine, &[("user", "What is the capital of France?")]), 24),
        greedy(text("def fibonacci(n):\n    "), 40),
        greedy(chat(engine, &[("user", "Écris un haïku sur la mer.")]), 32),
        greedy(text("The three primary colours are"), 16),
        greedy(chat(engine, &[("user", "用一句话介绍长城。")]), 28),
        greedy(
            chat(
                engine,
                &[("system", "You answer in one word."), ("user", "Opposite of hot?")],
            ),
            8,
        ),
        greedy(text("1, 2, 3, 4, 5,"), 36),
        greedy(chat(engine, &[("user", "List three fruits.")]), 30),
    ]
}

#[test]
fn eight_streams_joining_and_leaving_generate_exactly_what_each_would_alone() {
    eight_streams(load(0));
}

/// The bfloat16 option (where the CPU has it) keeps the same promise: a row's bits do not depend on its neighbours.
#[test]
fn eight_streams_on_the_bf16_option_generate_exactly_what_each_would_alone() {
    let engine = load_option(0, Kernels::Bf16);
    eight_streams(engine);
}

/// The int8 option (where the CPU has AVX2) too: its integer sums do not depend on the rows beside them.
#[test]
fn eight_streams_on_the_int8_option_generate_exactly_what_each_would_alone() {
    let engine = load_option(0, Kernels::Int8);
    eight_streams(engine);
}

fn eight_streams(mut engine: Engine) {
    let reqs = prompts(&engine);
    let expected: Vec<Generation> = reqs.iter().map(|r| alone(&mut engine, r)).collect();
    let results = Results::default();
    let Engine { model, tokenizer, .. } = &mut engine;
    let mut batcher = Batcher::new(model, tokenizer.clone(), 8);
    // Half start together; the others join one by one while the first ones decode (and some leave).
    for (i, r) in reqs.iter().enumerate().take(4) {
        batcher.start(r.clone(), Box::new(Collect(i, String::new(), results.clone())));
    }
    let mut widest = batcher.running();
    for (i, r) in reqs.iter().enumerate().skip(4) {
        for _ in 0..3 {
            batcher.step();
        }
        batcher.start(r.clone(), Box::new(Collect(i, String::new(), results.clone())));
        widest = widest.max(batcher.running());
    }
    while batcher.running() > 0 {
        batcher.step();
    }
    assert!(widest >= 6, "requests really decoded together ({widest} at most)");
    let results = results.lock().unwrap();
    assert_eq!(results.len(), reqs.len());
    for (i, g, streamed) in results.iter() {
        assert_eq!(
            g.token_ids, expected[*i].token_ids,
            "request {i}: {:?} vs {:?}",
            g.text, expected[*i].text
        );
        assert_eq!(g.text, expected[*i].text);
        assert_eq!(*streamed, g.text);
        assert_eq!(g.finish_reason, expected[*i].finish_reason);
        assert_eq!(g.usage.cached_tokens, 0, "the prefix cache is off");
    }
}

fn run_batched(engine: &mut Engine, req: &GenerationRequest) -> Generation {
    let results = Results::default();
    let Engine { model, tokenizer, .. } = engine;
    let mut batcher = Batcher::new(model, tokenizer.clone(), 8);
    batcher.start(req.clone(), Box::new(Collect(0, String::new(), results.clone())));
    while batcher.running() > 0 {
        batcher.step();
    }
    let mut results = results.lock().unwrap();
    results.pop().expect("one result").1
}

#[test]
fn a_growing_chat_reuses_its_prefix_and_generates_exactly_what_it_would_alone() {
    growing_chat(load(64 << 20));
}

/// The same on the bfloat16 option (where the CPU has it): prompt rows and decode rows of a sequence get the same bits.
#[test]
fn a_growing_chat_on_the_bf16_option_reuses_its_prefix_and_generates_exactly_what_it_would_alone() {
    let engine = load_option(64 << 20, Kernels::Bf16);
    growing_chat(engine);
}

/// The same on the int8 option (where the CPU has AVX2).
#[test]
fn a_growing_chat_on_the_int8_option_reuses_its_prefix_and_generates_exactly_what_it_would_alone() {
    let engine = load_option(64 << 20, Kernels::Int8);
    growing_chat(engine);
}

fn growing_chat(mut engine: Engine) {
    let system = "You are a helpful assistant who answers briefly and precisely.";
    let turn1 = greedy(
        chat(&engine, &[("system", system), ("user", "Name a large city in Japan.")]),
        24,
    );
    let first = run_batched(&mut engine, &turn1);
    assert_eq!(first.usage.cached_tokens, 0, "nothing cached yet");
    assert_eq!(first.token_ids, alone(&mut engine, &turn1).token_ids);

    // The second turn's prompt starts with the first turn and its answer: that state is reused.
    let turn2 = greedy(
        chat(
            &engine,
            &[
                ("system", system),
                ("user", "Name a large city in Japan."),
                ("assistant", first.text.as_str()),
                ("user", "And one in France?"),
            ],
        ),
        24,
    );
    let turn2 = GenerationRequest {
        logprobs: Some(0),
        ..turn2
    };
    let second = run_batched(&mut engine, &turn2);
    assert!(
        second.usage.cached_tokens >= turn1.prompt.len(),
        "{} cached of {} (turn 1 prompt {})",
        second.usage.cached_tokens,
        turn2.prompt.len(),
        turn1.prompt.len()
    );
    assert!(second.usage.cached_tokens < turn2.prompt.len());
    let expected = alone(&mut engine, &turn2);
    assert_eq!(
        second.token_ids, expected.token_ids,
        "{:?} vs {:?}",
        second.text, expected.text
    );

    // The same prompt again: everything but the last two tokens comes from the cache, with the very bits of the
    // first time (those two run as a prompt of two rows, as they did then).
    let again = run_batched(&mut engine, &turn2);
    assert_eq!(again.usage.cached_tokens, turn2.prompt.len() - 2);
    assert_eq!(again.token_ids, expected.token_ids);
    let bits = |g: &Generation| g.logprobs.iter().map(|t| t.logprob.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&again).len(), again.token_ids.len());
    assert_eq!(bits(&again), bits(&second));

    // Another API key (cache scope) sending the very same prompt reuses nothing: the cache is per key.
    let mut other_key = turn2.clone();
    other_key.cache_scope = 99;
    let theirs = run_batched(&mut engine, &other_key);
    assert_eq!(theirs.usage.cached_tokens, 0);
    assert_eq!(theirs.token_ids, expected.token_ids);

    // Another system prompt shares only the template's first tokens (too short to reuse).
    let other = greedy(chat(&engine, &[("system", "Be terse."), ("user", "Hi")]), 8);
    let g = run_batched(&mut engine, &other);
    assert!(g.usage.cached_tokens < 8, "{}", g.usage.cached_tokens);
    assert_eq!(g.token_ids, alone(&mut engine, &other).token_ids);
}

/// ONNX Runtime's kernels (`KERNELS=ort`) sum a one-row forward's attention in another order than a prompt's; the
/// prefix cache leaves two prompt tokens to compute, so a prompt sent again still gets the bits of the first time.
#[test]
fn a_prompt_sent_again_on_onnx_runtime_kernels_gets_the_bits_of_the_first_time() {
    let mut engine = load_with(64 << 20, Kernels::Ort);
    let req = GenerationRequest {
        logprobs: Some(0),
        ..greedy(chat(&engine, &[("user", "Name a large city in Japan.")]), 16)
    };
    let first = run_batched(&mut engine, &req);
    let again = run_batched(&mut engine, &req);
    assert_eq!(
        (first.usage.cached_tokens, again.usage.cached_tokens),
        (0, req.prompt.len() - 2)
    );
    let bits = |g: &Generation| g.logprobs.iter().map(|t| t.logprob.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&first).len(), 16);
    assert_eq!(bits(&again), bits(&first));
}

#[test]
fn a_prefix_cache_too_small_for_a_sequence_keeps_nothing() {
    let mut engine = load(1 << 20); // about 22 tokens of state
    let req = greedy(chat(&engine, &[("user", "What is the capital of France?")]), 12);
    run_batched(&mut engine, &req);
    let g = run_batched(&mut engine, &req);
    assert_eq!(g.usage.cached_tokens, 0);
    assert_eq!(engine.model.prefix_cache_bytes(), 0);
}

/// Records every listener's deltas and ends in one order: `(index, None)` per delta, `(index, Some(text))` at the end.
type Timeline = Arc<Mutex<Vec<(usize, Option<Generation>)>>>;

struct Record(usize, Timeline);

impl Listener for Record {
    fn delta(&mut self, _: Delta) -> ControlFlow<()> {
        self.1.lock().unwrap().push((self.0, None));
        ControlFlow::Continue(())
    }
    fn done(self: Box<Self>, result: Result<Generation, ModelError>) {
        self.1.lock().unwrap().push((self.0, Some(result.expect("generation"))));
    }
}

/// A long prompt that joins running streams goes in seven tokens at a time, one slice after each of their steps: they
/// keep streaming meanwhile, one of them ends while it goes in (its row moves out of the way: the first row, then the
/// one just before the prompt's), and a later prompt that starts with it joins the stream still running, takes that
/// part from the prefix cache and slices the rest. Every generation is token-identical to the same request run alone.
/// On ONNX Runtime's kernels (a CPU without AVX2) prompts go in whole, with the same results.
#[test]
fn a_long_prompt_goes_in_slices_while_others_decode_and_leave_and_generates_exactly_what_it_would_alone() {
    let mut engine = load(64 << 20);
    let text = |s: &str| engine.tokenizer.encode(s).unwrap();
    let story = "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg, a \
                 goldsmith from Mainz, combined movable metal type, oil-based ink and a wooden screw press into one \
                 system. Books had been copied by hand for centuries, slowly and at great cost, so that only \
                 monasteries, universities and the very rich could own them. Within fifty years printing shops \
                 had opened in more than two hundred European towns.";
    let reqs = [
        greedy(chat(&engine, &[("user", "Opposite of hot?")]), 3),
        greedy(text("1, 2, 3, 4, 5,"), 60),
        greedy(text(story), 12),
        greedy(text(&format!("{story} Summarise this in one sentence:")), 12),
    ];
    assert!(reqs[2].prompt.len() > 70, "{} tokens", reqs[2].prompt.len());
    let expected: Vec<Generation> = reqs.iter().map(|r| alone(&mut engine, r)).collect();
    let sliced = engine.model.slices();
    for short_first in [true, false] {
        engine.model.clear_prefix_cache();
        let timeline = Timeline::default();
        let Engine { model, tokenizer, .. } = &mut engine;
        let mut batcher = Batcher::new(model, tokenizer.clone(), 8).prefill_chunk(7);
        let order = if short_first { [0, 1] } else { [1, 0] };
        for i in order {
            batcher.start(reqs[i].clone(), Box::new(Record(i, timeline.clone())));
        }
        batcher.start(reqs[2].clone(), Box::new(Record(2, timeline.clone())));
        while timeline
            .lock()
            .unwrap()
            .iter()
            .all(|(i, end)| !(*i == 2 && end.is_some()))
        {
            batcher.step();
        }
        batcher.start(reqs[3].clone(), Box::new(Record(3, timeline.clone())));
        assert_eq!(batcher.running(), 2, "it joins the stream still running");
        while batcher.running() > 0 {
            batcher.step();
        }

        let timeline = timeline.lock().unwrap();
        let first = |i: usize| timeline.iter().position(|(j, _)| *j == i).expect("some output");
        let ended = |i: usize| {
            timeline
                .iter()
                .position(|(j, end)| *j == i && end.is_some())
                .expect("an end")
        };
        let streamed = timeline[..first(2)]
            .iter()
            .filter(|(j, end)| *j == 1 && end.is_none())
            .count();
        if sliced {
            assert!(
                ended(0) < first(2),
                "the short stream ended while the long prompt went in"
            );
            assert!(streamed >= 10, "the running stream kept streaming: {streamed} tokens");
        } else {
            assert!(streamed <= 1, "on ONNX Runtime's kernels the prompt went in whole");
        }
        for (i, want) in expected.iter().enumerate() {
            let got = timeline[ended(i)].1.as_ref().unwrap();
            assert_eq!(
                got.token_ids, want.token_ids,
                "request {i}: {:?} vs {:?}",
                got.text, want.text
            );
            assert_eq!(got.text, want.text);
        }
        let cached = timeline[ended(3)].1.as_ref().unwrap().usage.cached_tokens;
        assert!(
            cached >= reqs[2].prompt.len() - 1 && cached < reqs[3].prompt.len(),
            "{cached} cached"
        );
    }
}
