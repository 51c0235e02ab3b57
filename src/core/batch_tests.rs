//! Contract tests of the batch scheduler on a fake model: batched generations equal lone ones, whoever joins when.

use super::*;
use crate::core::generate::{generate, FinishReason};
use crate::core::model::Model;
use crate::core::sampling::SamplingParams;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

const VOCAB: usize = 40;

/// The next token is a function of the whole sequence so far, so any mix-up of sequences changes the output.
fn next_logits(tokens: &[u32], out: &mut Vec<f32>) {
    out.clear();
    out.resize(VOCAB, 0.0);
    let h = tokens
        .iter()
        .fold(7u64, |h, &t| h.wrapping_mul(31).wrapping_add(u64::from(t)));
    out[1 + (h % (VOCAB as u64 - 1)) as usize] = 5.0;
    out[(h % 5) as usize + 1] += 1.0; // a runner-up, so sampling with a seed has a real choice
}

fn info() -> ModelInfo {
    ModelInfo {
        id: "mix".into(),
        vocab_size: VOCAB,
        context_length: 64,
        eos_ids: vec![0],
    }
}

/// One sequence at a time (the `Model` trait), for the reference runs.
struct Lone(ModelInfo, Vec<u32>, Vec<f32>);

impl Model for Lone {
    fn info(&self) -> &ModelInfo {
        &self.0
    }
    fn reset(&mut self, _: usize) -> Result<(), ModelError> {
        self.1.clear();
        Ok(())
    }
    fn forward(&mut self, tokens: &[u32]) -> Result<&[f32], ModelError> {
        self.1.extend_from_slice(tokens);
        next_logits(&self.1, &mut self.2);
        Ok(&self.2)
    }
}

/// Many sequences; records each step's batch size, and every call that moves a sequence on (`Step(batch size)`,
/// `Prompt(tokens)`), in order.
#[derive(Default)]
struct Many {
    seqs: HashMap<SeqId, (Vec<u32>, Vec<f32>)>,
    /// The sequence whose prompt is going in, and its tokens still to go.
    pending: Option<(SeqId, Vec<u32>)>,
    next_id: SeqId,
    batch_sizes: Vec<usize>,
    log: Vec<Call>,
    fail_steps: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Call {
    Step(usize),
    Prompt(usize),
}

impl Many {
    /// Feeds `limit` tokens at most of `todo` to `id`; its logits once `todo` is empty.
    fn feed(&mut self, id: SeqId, mut todo: Vec<u32>, limit: usize) -> bool {
        let now = todo.len().min(limit);
        if now > 0 {
            self.log.push(Call::Prompt(now));
        }
        let (tokens, logits) = self.seqs.get_mut(&id).expect("a started sequence");
        tokens.extend(todo.drain(..now));
        if todo.is_empty() {
            next_logits(tokens, logits);
            true
        } else {
            self.pending = Some((id, todo));
            false
        }
    }
}

impl BatchModel for Many {
    fn info(&self) -> &ModelInfo {
        static INFO: std::sync::OnceLock<ModelInfo> = std::sync::OnceLock::new();
        INFO.get_or_init(info)
    }
    fn has_room(&self, _: usize) -> bool {
        true
    }
    fn start(&mut self, prompt: &[u32], _: usize, _: u64, limit: usize) -> Result<Started, ModelError> {
        assert!(self.pending.is_none(), "one prompt goes in at a time");
        self.next_id += 1;
        let id = self.next_id;
        self.seqs.insert(id, (Vec::new(), Vec::new()));
        let done = self.feed(id, prompt.to_vec(), limit);
        Ok(Started { id, cached: 0, done })
    }
    fn resume(&mut self, id: SeqId, limit: usize) -> Result<bool, ModelError> {
        let (pending, todo) = self.pending.take().expect("a prompt going in");
        assert_eq!(pending, id);
        Ok(self.feed(id, todo, limit))
    }
    fn step(&mut self, feeds: &[(SeqId, u32)]) -> Result<(), ModelError> {
        if self.fail_steps {
            return Err(ModelError::Backend("device lost".into()));
        }
        self.batch_sizes.push(feeds.len());
        self.log.push(Call::Step(feeds.len()));
        for &(id, tok) in feeds {
            assert!(
                self.pending.as_ref().is_none_or(|p| p.0 != id),
                "a prompt going in was fed"
            );
            let (tokens, logits) = self.seqs.get_mut(&id).expect("a fed sequence exists");
            tokens.push(tok);
            next_logits(tokens, logits);
        }
        Ok(())
    }
    fn logits(&self, id: SeqId) -> &[f32] {
        &self.seqs[&id].1
    }
    fn finish(&mut self, id: SeqId) {
        assert!(self.seqs.remove(&id).is_some(), "finished twice");
        if self.pending.as_ref().is_some_and(|p| p.0 == id) {
            self.pending = None;
        }
    }
}

struct Letters;
impl TokenDecoder for Letters {
    fn decode(&self, ids: &[u32]) -> Result<String, ModelError> {
        Ok(ids.iter().map(|&i| char::from(b'a' + (i % 26) as u8)).collect())
    }
}

type Results = Arc<Mutex<Vec<(usize, String, Result<Generation, ModelError>)>>>;

/// Collects the text it is sent and the final result under its index; cancels after `cancel_after` deltas.
struct Collect {
    index: usize,
    text: String,
    deltas: usize,
    cancel_after: Option<usize>,
    results: Results,
}

impl Listener for Collect {
    fn delta(&mut self, delta: Delta) -> ControlFlow<()> {
        self.text.push_str(&delta.text);
        self.deltas += 1;
        match self.cancel_after {
            Some(n) if self.deltas >= n => ControlFlow::Break(()),
            _ => ControlFlow::Continue(()),
        }
    }
    fn done(self: Box<Self>, result: Result<Generation, ModelError>) {
        self.results.lock().unwrap().push((self.index, self.text, result));
    }
}

fn listener(index: usize, results: &Results) -> Box<dyn Listener> {
    Box::new(Collect {
        index,
        text: String::new(),
        deltas: 0,
        cancel_after: None,
        results: results.clone(),
    })
}

fn requests() -> Vec<GenerationRequest> {
    let mut seeded = SamplingParams::greedy();
    seeded.temperature = 1.0;
    seeded.seed = Some(42);
    vec![
        GenerationRequest::new(vec![3, 1, 4], 12, SamplingParams::greedy()),
        GenerationRequest::new(vec![2, 7], 5, SamplingParams::greedy()),
        GenerationRequest::new(vec![9, 9, 9, 9, 9], 20, seeded),
        GenerationRequest::new(vec![1], 1, SamplingParams::greedy()),
    ]
}

fn lone(req: &GenerationRequest) -> Generation {
    let mut m = Lone(info(), Vec::new(), Vec::new());
    generate(&mut m, &Letters, req, &mut |_| ControlFlow::Continue(())).unwrap()
}

#[test]
fn sequences_joining_at_different_steps_generate_exactly_what_they_would_alone() {
    let results = Results::default();
    let mut b = Batcher::new(Many::default(), Letters, 8);
    let reqs = requests();
    b.start(reqs[0].clone(), listener(0, &results));
    b.step();
    b.step();
    b.start(reqs[1].clone(), listener(1, &results));
    b.step();
    b.start(reqs[2].clone(), listener(2, &results));
    b.start(reqs[3].clone(), listener(3, &results));
    while b.running() > 0 {
        b.step();
    }
    let results = results.lock().unwrap();
    assert_eq!(results.len(), 4);
    for (i, text, result) in results.iter() {
        let g = result.as_ref().unwrap();
        let alone = lone(&reqs[*i]);
        assert_eq!(g.token_ids, alone.token_ids, "request {i}");
        assert_eq!(g.text, alone.text);
        assert_eq!(*text, g.text, "streamed text = final text");
        assert_eq!(g.finish_reason, alone.finish_reason);
    }
    // Sequences really shared steps: some step carried three of them.
    assert!(b.model.batch_sizes.contains(&3), "{:?}", b.model.batch_sizes);
    assert!(b.model.seqs.is_empty(), "every sequence was finished in the model");
}

#[test]
fn the_batch_is_capped_and_a_full_one_has_no_room() {
    let results = Results::default();
    let mut b = Batcher::new(Many::default(), Letters, 2);
    let reqs = requests();
    assert!(b.has_room(&reqs[0]));
    b.start(reqs[0].clone(), listener(0, &results));
    b.start(reqs[2].clone(), listener(2, &results));
    assert!(!b.has_room(&reqs[1]));
    while b.running() > 0 {
        b.step();
    }
    assert!(b.model.batch_sizes.iter().all(|&n| n <= 2));
    assert!(b.has_room(&reqs[1]));
}

#[test]
fn a_listener_that_leaves_cancels_only_its_own_sequence() {
    let results = Results::default();
    let mut b = Batcher::new(Many::default(), Letters, 8);
    let reqs = requests();
    b.start(
        reqs[2].clone(),
        Box::new(Collect {
            index: 2,
            text: String::new(),
            deltas: 0,
            cancel_after: Some(3),
            results: results.clone(),
        }),
    );
    b.start(reqs[0].clone(), listener(0, &results));
    while b.running() > 0 {
        b.step();
    }
    let results = results.lock().unwrap();
    let by = |i: usize| results.iter().find(|r| r.0 == i).unwrap().2.as_ref().unwrap();
    assert_eq!(by(2).finish_reason, FinishReason::Cancelled);
    assert_eq!(by(2).token_ids.len(), 3);
    assert_eq!(by(0).token_ids, lone(&reqs[0]).token_ids);
}

#[test]
fn a_failed_step_fails_every_running_sequence_and_a_bad_request_only_itself() {
    let results = Results::default();
    let mut b = Batcher::new(Many::default(), Letters, 8);
    let reqs = requests();
    b.start(
        GenerationRequest::new(vec![VOCAB as u32], 3, SamplingParams::greedy()),
        listener(9, &results),
    );
    b.start(reqs[0].clone(), listener(0, &results));
    b.start(reqs[2].clone(), listener(2, &results));
    b.step(); // the second prompt goes in after this step: both decode at the next one
    b.model.fail_steps = true;
    b.step();
    assert_eq!(b.running(), 0);
    let results = results.lock().unwrap();
    assert_eq!(results.len(), 3);
    assert!(
        matches!(results[0].2, Err(ModelError::InvalidInput(_))),
        "{:?}",
        results[0].2
    );
    assert!(results[1..].iter().all(|r| matches!(r.2, Err(ModelError::Backend(_)))));
    assert!(b.model.seqs.is_empty());
}

#[test]
fn a_prompt_joining_running_sequences_goes_in_slices_between_their_steps() {
    let results = Results::default();
    let mut b = Batcher::new(Many::default(), Letters, 8).prefill_chunk(3);
    let long = GenerationRequest::new(vec![5, 3, 8, 1, 2, 7, 7, 4, 6, 9], 6, SamplingParams::greedy());
    let reqs = requests();
    b.start(reqs[2].clone(), listener(2, &results));
    b.step();
    b.start(long.clone(), listener(7, &results));
    assert_eq!(b.running(), 2, "the newcomer holds its place while its prompt goes in");
    while b.running() > 0 {
        b.step();
    }
    // Nothing ran before: the first prompt went in whole. Then 3 + 3 + 3 + 1 tokens of the newcomer, each slice after
    // a step of the running sequence (one slice between two of its tokens), which joined it once its prompt was in.
    use Call::{Prompt, Step};
    let want = [
        Prompt(5),
        Step(1),
        Step(1),
        Prompt(3),
        Step(1),
        Prompt(3),
        Step(1),
        Prompt(3),
        Step(1),
        Prompt(1),
        Step(2),
    ];
    assert_eq!(b.model.log[..11], want);
    let results = results.lock().unwrap();
    assert_eq!(results.len(), 2);
    for (i, text, result) in results.iter() {
        let g = result.as_ref().unwrap();
        let alone = lone(if *i == 7 { &long } else { &reqs[*i] });
        assert_eq!(g.token_ids, alone.token_ids, "request {i}");
        assert_eq!(*text, g.text);
    }
    assert!(b.model.seqs.is_empty());
}

#[test]
fn a_second_newcomer_waits_for_the_prompt_going_in_and_a_direct_start_finishes_it_first() {
    let results = Results::default();
    let mut b = Batcher::new(Many::default(), Letters, 8).prefill_chunk(2);
    let reqs = requests();
    b.start(reqs[0].clone(), listener(0, &results));
    b.start(reqs[2].clone(), listener(2, &results));
    assert!(!b.has_room(&reqs[1]), "one prompt goes in at a time");
    // A caller that starts anyway gets the pending prompt finished at once; its own goes in after the next step.
    b.start(reqs[1].clone(), listener(1, &results));
    use Call::{Prompt, Step};
    assert_eq!(b.model.log, [Prompt(3), Prompt(5)]);
    b.step();
    assert_eq!(b.model.log[2..], [Step(2), Prompt(2)]);
    while b.running() > 0 {
        b.step();
    }
    let results = results.lock().unwrap();
    assert_eq!(results.len(), 3);
    for (i, _, result) in results.iter() {
        assert_eq!(
            result.as_ref().unwrap().token_ids,
            lone(&reqs[*i]).token_ids,
            "request {i}"
        );
    }
}

/// A listener that has left (its client gone) before any token.
struct Gone(Results);

impl Listener for Gone {
    fn delta(&mut self, _: Delta) -> ControlFlow<()> {
        ControlFlow::Break(())
    }
    fn done(self: Box<Self>, result: Result<Generation, ModelError>) {
        self.0.lock().unwrap().push((5, String::new(), result));
    }
    fn cancelled(&self) -> bool {
        true
    }
}

#[test]
fn a_prompt_going_in_stops_at_the_next_slice_when_its_listener_leaves_or_its_deadline_passes() {
    let long = vec![5, 3, 8, 1, 2, 7, 7, 4, 6, 9];
    for gone in [true, false] {
        let results = Results::default();
        let mut b = Batcher::new(Many::default(), Letters, 8).prefill_chunk(3);
        let reqs = requests();
        b.start(reqs[2].clone(), listener(2, &results));
        let mut req = GenerationRequest::new(long.clone(), 6, SamplingParams::greedy());
        if gone {
            b.start(req, Box::new(Gone(results.clone())));
        } else {
            req.deadline = Some(std::time::Instant::now());
            b.start(req, listener(5, &results));
        }
        b.step();
        assert_eq!(b.running(), 1, "only the running sequence is left");
        assert_eq!(b.model.log[1..], [Call::Step(1)], "no slice went in");
        while b.running() > 0 {
            b.step();
        }
        let results = results.lock().unwrap();
        let ended = results.iter().find(|r| r.0 == 5).unwrap().2.as_ref().unwrap();
        let want = if gone {
            FinishReason::Cancelled
        } else {
            FinishReason::Length
        };
        assert_eq!(ended.finish_reason, want);
        assert!(ended.token_ids.is_empty());
        let other = results.iter().find(|r| r.0 == 2).unwrap().2.as_ref().unwrap();
        assert_eq!(other.token_ids, lone(&reqs[2]).token_ids);
        assert!(b.model.seqs.is_empty(), "the model forgot both");
    }
}

#[test]
fn a_failed_step_while_a_prompt_goes_in_fails_the_running_ones_and_the_prompt_goes_on() {
    let results = Results::default();
    let mut b = Batcher::new(Many::default(), Letters, 8).prefill_chunk(2);
    let reqs = requests();
    b.start(reqs[0].clone(), listener(0, &results));
    b.start(reqs[2].clone(), listener(2, &results));
    b.model.fail_steps = true;
    b.step();
    b.model.fail_steps = false;
    while b.running() > 0 {
        b.step();
    }
    let results = results.lock().unwrap();
    let by = |i: usize| &results.iter().find(|r| r.0 == i).unwrap().2;
    assert!(matches!(by(0), Err(ModelError::Backend(_))), "{:?}", by(0));
    assert_eq!(by(2).as_ref().unwrap().token_ids, lone(&reqs[2]).token_ids);
    use Call::Prompt;
    // Nothing ran once the step failed: the rest of the prompt went in whole.
    assert_eq!(b.model.log[..2], [Prompt(3), Prompt(5)]);
    assert!(b.model.seqs.is_empty());
}
