//! Contract tests of the generation loop on a scripted fake model.

use super::*;
use crate::core::detok::tests::ByteDecoder;
use crate::core::model::ModelInfo;

/// A model that "wants" to say `script` token by token: its logits put 10.0 on the next scripted token.
struct Scripted {
    info: ModelInfo,
    script: Vec<u32>,
    pos: usize,
    logits: Vec<f32>,
    calls: Vec<Vec<u32>>,
    capacity: usize,
}

impl Scripted {
    fn new(vocab: usize, context: usize, script: &[u32]) -> Self {
        Self {
            info: ModelInfo {
                id: "scripted".into(),
                vocab_size: vocab,
                context_length: context,
                eos_ids: vec![0],
            },
            script: script.to_vec(),
            pos: 0,
            logits: vec![0.0; vocab],
            calls: Vec::new(),
            capacity: 0,
        }
    }
}

impl Model for Scripted {
    fn info(&self) -> &ModelInfo {
        &self.info
    }
    fn reset(&mut self, capacity: usize) -> Result<(), ModelError> {
        self.pos = 0;
        self.calls.clear();
        self.capacity = capacity;
        Ok(())
    }
    fn forward(&mut self, tokens: &[u32]) -> Result<&[f32], ModelError> {
        self.calls.push(tokens.to_vec());
        self.logits.iter_mut().for_each(|l| *l = 0.0);
        let next = self.script.get(self.pos).copied().unwrap_or(0);
        self.logits[next as usize] = 10.0;
        self.pos += 1;
        Ok(&self.logits)
    }
}

/// id 0 = EOS (empty), then words and single bytes of multi-byte characters.
fn decoder() -> ByteDecoder {
    let mut t: Vec<Vec<u8>> = vec![vec![]];
    for w in ["Hello", ",", " wor", "ld", "\n", "\nUs", "er:", " again", "!"] {
        t.push(w.as_bytes().to_vec());
    }
    t.extend("😀".bytes().map(|b| vec![b])); // ids 10..=13
    ByteDecoder(t)
}

fn run(model: &mut Scripted, req: &GenerationRequest) -> (Generation, Vec<Delta>) {
    let mut deltas = Vec::new();
    let g = generate(model, &decoder(), req, &mut |d| {
        deltas.push(d);
        ControlFlow::Continue(())
    })
    .unwrap();
    (g, deltas)
}

fn greedy(prompt: &[u32], max_tokens: usize) -> GenerationRequest {
    GenerationRequest::new(prompt.to_vec(), max_tokens, SamplingParams::greedy())
}

#[test]
fn eos_ends_with_stop_and_is_not_emitted() {
    let mut m = Scripted::new(14, 64, &[1, 2, 3, 4, 0, 9]);
    let (g, deltas) = run(&mut m, &greedy(&[5], 16));
    assert_eq!(g.text, "Hello, world");
    assert_eq!(g.finish_reason, FinishReason::Stop);
    assert_eq!(g.token_ids, vec![1, 2, 3, 4, 0]);
    assert_eq!(
        g.usage,
        Usage {
            prompt_tokens: 1,
            completion_tokens: 5,
            cached_tokens: 0,
        }
    );
    assert_eq!(deltas.iter().map(|d| d.text.as_str()).collect::<String>(), g.text);
    // Prompt once, then one token per step; never a forward after EOS.
    assert_eq!(m.calls, vec![vec![5], vec![1], vec![2], vec![3], vec![4]]);
}

#[test]
fn max_tokens_gives_exactly_that_many_and_length() {
    let mut m = Scripted::new(14, 64, &[1, 2, 3, 4, 9, 9, 9]);
    let (g, _) = run(&mut m, &greedy(&[5], 5));
    assert_eq!(g.token_ids.len(), 5);
    assert_eq!(g.finish_reason, FinishReason::Length);
    assert_eq!(g.text, "Hello, world!");
    assert_eq!(m.calls.len(), 5, "no forward pass after the last token");
    assert_eq!(m.capacity, 6);
}

#[test]
fn stop_string_across_tokens_is_never_emitted() {
    let mut m = Scripted::new(14, 64, &[1, 5, 6, 7, 8, 9]);
    let mut req = greedy(&[2], 16);
    req.stop = vec!["\n\nUser:".into()];
    let (g, deltas) = run(&mut m, &req);
    assert_eq!(g.text, "Hello");
    assert_eq!(g.finish_reason, FinishReason::Stop);
    assert!(deltas.iter().all(|d| !d.text.contains('\n')));
}

#[test]
fn a_held_stop_prefix_is_released_when_it_does_not_match() {
    let mut m = Scripted::new(14, 64, &[1, 5, 8, 0]);
    let mut req = greedy(&[2], 16);
    req.stop = vec!["\n\nUser:".into()];
    let (g, deltas) = run(&mut m, &req);
    assert_eq!(g.text, "Hello\n again");
    assert_eq!(
        deltas.iter().map(|d| d.text.as_str()).collect::<Vec<_>>(),
        vec!["Hello", "\n again"]
    );
}

#[test]
fn emoji_split_over_byte_tokens_streams_whole() {
    let mut m = Scripted::new(14, 64, &[1, 10, 11, 12, 13, 9, 0]);
    let (g, deltas) = run(&mut m, &greedy(&[2], 16));
    assert_eq!(g.text, "Hello😀!");
    assert_eq!(
        deltas.iter().map(|d| d.text.as_str()).collect::<Vec<_>>(),
        vec!["Hello", "😀", "!"]
    );
}

#[test]
fn context_length_caps_generation() {
    let mut m = Scripted::new(14, 6, &[9; 20]);
    let (g, _) = run(&mut m, &greedy(&[1, 2, 3], 100));
    assert_eq!(g.token_ids.len(), 3);
    assert_eq!(g.finish_reason, FinishReason::Length);
    assert_eq!(m.capacity, 6);
}

#[test]
fn a_prompt_that_fills_the_context_is_refused() {
    let mut m = Scripted::new(14, 3, &[9]);
    let err = generate(&mut m, &decoder(), &greedy(&[1, 2, 3], 1), &mut |_| {
        ControlFlow::Continue(())
    })
    .unwrap_err();
    assert!(matches!(err, ModelError::CapacityExceeded { .. }));
    let err = generate(
        &mut m,
        &decoder(),
        &greedy(&[99], 1),
        &mut |_| ControlFlow::Continue(()),
    )
    .unwrap_err();
    assert!(matches!(err, ModelError::InvalidInput(_)));
}

#[test]
fn a_sink_that_breaks_cancels_generation() {
    let mut m = Scripted::new(14, 64, &[1, 2, 3, 4, 9, 9]);
    let g = generate(&mut m, &decoder(), &greedy(&[5], 16), &mut |_| ControlFlow::Break(())).unwrap();
    assert_eq!(g.finish_reason, FinishReason::Cancelled);
    assert_eq!(g.token_ids, vec![1]);
    assert_eq!(m.calls.len(), 1);
}

#[test]
fn a_passed_deadline_ends_with_length() {
    let mut m = Scripted::new(14, 64, &[1, 2, 3]);
    let mut req = greedy(&[5], 16);
    req.deadline = Some(Instant::now());
    let (g, _) = run(&mut m, &req);
    assert_eq!(g.finish_reason, FinishReason::Length);
    assert!(g.token_ids.is_empty());
}

#[test]
fn logprobs_follow_their_text_and_stop_at_the_stop_string() {
    let mut m = Scripted::new(14, 64, &[1, 2, 5, 6, 9]);
    let mut req = greedy(&[3], 16);
    req.logprobs = Some(2);
    req.stop = vec!["\nUs".into()];
    let (g, deltas) = run(&mut m, &req);
    // Tokens "Hello" "," "\n" "\nUs": the stop begins at the second newline, inside the fourth token.
    assert_eq!(g.text, "Hello,\n");
    let ids: Vec<u32> = g.logprobs.iter().map(|t| t.id).collect();
    assert_eq!(ids, vec![1, 2, 5]);
    assert_eq!(
        deltas
            .iter()
            .flat_map(|d| d.logprobs.iter().map(|t| t.id))
            .collect::<Vec<_>>(),
        ids
    );
    let first = &g.logprobs[0];
    assert_eq!(first.text, "Hello");
    assert_eq!(first.top.len(), 2);
    assert_eq!(first.top[0].id, 1);
    assert!(first.logprob < 0.0 && first.logprob > -0.01);
}

/// A model with equal logits for every word token (ids 1..=9) and no EOS: sampling decides everything.
struct Flat(ModelInfo, Vec<f32>);

impl Model for Flat {
    fn info(&self) -> &ModelInfo {
        &self.0
    }
    fn reset(&mut self, _capacity: usize) -> Result<(), ModelError> {
        Ok(())
    }
    fn forward(&mut self, _tokens: &[u32]) -> Result<&[f32], ModelError> {
        Ok(&self.1)
    }
}

#[test]
fn same_seed_gives_the_same_tokens_and_another_seed_differs() {
    let sample = |seed| {
        let mut logits = vec![f32::NEG_INFINITY; 14];
        logits[1..=9].iter_mut().for_each(|l| *l = 0.0);
        let mut m = Flat(
            ModelInfo {
                id: "flat".into(),
                vocab_size: 14,
                context_length: 64,
                eos_ids: vec![0],
            },
            logits,
        );
        let sampling = SamplingParams {
            seed: Some(seed),
            ..SamplingParams::default()
        };
        let req = GenerationRequest::new(vec![1], 20, sampling);
        generate(&mut m, &decoder(), &req, &mut |_| ControlFlow::Continue(()))
            .unwrap()
            .token_ids
    };
    assert_eq!(sample(11), sample(11));
    assert_ne!(sample(11), sample(12));
    assert!(sample(11).iter().all(|t| (1..=9).contains(t)));
}
