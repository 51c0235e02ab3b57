//! Sampling: logit bias, penalties, temperature, top-k, min-p, top-p, seeded draws, and logprobs.

use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};
use std::cmp::Ordering;
use std::hash::{BuildHasher, Hasher};

/// Validated sampling settings (see [`crate::core::validate`] for the ranges).
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy (argmax); otherwise logits are divided by it.
    pub temperature: f32,
    /// Nucleus sampling mass in (0, 1]; 1 disables it.
    pub top_p: f32,
    /// Keep only the k most likely tokens; 0 disables it.
    pub top_k: usize,
    /// Drop tokens whose probability is below `min_p` × the top probability; 0 disables it.
    pub min_p: f32,
    /// Seed for the random draws; the same seed and request give the same tokens.
    pub seed: Option<u64>,
    /// Subtracted once from the logit of every token already generated (OpenAI semantics).
    pub presence_penalty: f32,
    /// Subtracted from a token's logit once per time it was generated (OpenAI semantics).
    pub frequency_penalty: f32,
    /// Divides positive / multiplies negative logits of tokens seen in prompt or output (1 disables it).
    pub repetition_penalty: f32,
    /// Added to the logits of the given token ids before anything else.
    pub logit_bias: Vec<(u32, f32)>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            seed: None,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            logit_bias: Vec::new(),
        }
    }
}

impl SamplingParams {
    /// Greedy decoding with no penalties.
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Self::default()
        }
    }
}

/// Applies [`SamplingParams`] to logits and draws tokens; holds the per-sequence state (RNG, token counts).
#[derive(Debug, Clone)]
pub struct LogitsProcessor {
    params: SamplingParams,
    rng: ChaCha8Rng,
    /// How often each token was generated so far (indexed by id), for presence/frequency penalties.
    output_counts: Vec<u32>,
    /// Token ids seen in prompt or output, each once, for the repetition penalty.
    seen: Vec<u32>,
    seen_mask: Vec<bool>,
    generated: Vec<u32>,
    /// Reused per step so the hot path does not allocate.
    scratch: Vec<(u32, f32)>,
}

impl LogitsProcessor {
    /// A processor for one sequence over a vocabulary of `vocab_size`, given the prompt's tokens.
    pub fn new(params: SamplingParams, vocab_size: usize, prompt: &[u32]) -> Self {
        let seed = params.seed.unwrap_or_else(random_seed);
        let mut p = Self {
            params,
            rng: ChaCha8Rng::seed_from_u64(seed),
            output_counts: vec![0; vocab_size],
            seen: Vec::new(),
            seen_mask: vec![false; vocab_size],
            generated: Vec::new(),
            scratch: Vec::with_capacity(vocab_size),
        };
        for &t in prompt {
            p.mark_seen(t);
        }
        p
    }

    /// The settings in use.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    fn mark_seen(&mut self, t: u32) {
        if let Some(m) = self.seen_mask.get_mut(t as usize) {
            if !*m {
                *m = true;
                self.seen.push(t);
            }
        }
    }

    /// Records a generated token (for the penalties of later steps).
    pub fn observe(&mut self, token: u32) {
        if let Some(c) = self.output_counts.get_mut(token as usize) {
            if *c == 0 {
                self.generated.push(token);
            }
            *c += 1;
        }
        self.mark_seen(token);
    }

    /// The model's logits `raw` into `logits` with logit bias and penalties applied; NaN logits become −∞ so they
    /// can never be chosen (one pass copies and replaces them).
    pub fn process(&self, raw: &[f32], logits: &mut Vec<f32>) {
        logits.clear();
        logits.extend(raw.iter().map(|&l| if l.is_nan() { f32::NEG_INFINITY } else { l }));
        for &(id, bias) in &self.params.logit_bias {
            if let Some(l) = logits.get_mut(id as usize) {
                *l += bias;
            }
        }
        let rp = self.params.repetition_penalty;
        if rp != 1.0 {
            for &t in &self.seen {
                let l = &mut logits[t as usize];
                *l = if *l > 0.0 { *l / rp } else { *l * rp };
            }
        }
        let (pp, fp) = (self.params.presence_penalty, self.params.frequency_penalty);
        if pp != 0.0 || fp != 0.0 {
            for &t in &self.generated {
                let count = self.output_counts[t as usize] as f32;
                logits[t as usize] -= pp + fp * count;
            }
        }
    }

    /// Draws the next token from processed logits.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let t = self.params.temperature;
        if t <= 0.0 || self.params.top_k == 1 {
            return argmax(logits);
        }
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if !max.is_finite() {
            return argmax(logits);
        }
        // Unnormalised probabilities relative to the top token (which gets exactly 1.0).
        let cands = &mut self.scratch;
        cands.clear();
        cands.extend(
            logits
                .iter()
                .enumerate()
                .map(|(i, &l)| (i as u32, ((l - max) / t).exp()))
                .filter(|&(_, p)| p > 0.0),
        );
        let k = self.params.top_k;
        if k > 0 && k < cands.len() {
            cands.select_nth_unstable_by(k - 1, by_prob_desc);
            cands.truncate(k);
        }
        if self.params.min_p > 0.0 {
            let floor = self.params.min_p; // the top probability is 1.0 here
            cands.retain(|&(_, p)| p >= floor);
        }
        let sorted = self.params.top_p < 1.0;
        if sorted {
            nucleus(cands, self.params.top_p);
        } else {
            // Id order, so a draw depends on the seed only, not on the sort algorithm.
            cands.sort_unstable_by_key(|&(id, _)| id);
        }
        let total: f64 = cands.iter().map(|&(_, p)| p as f64).sum();
        let mut u = uniform(&mut self.rng) * total;
        for &(id, p) in cands.iter() {
            u -= p as f64;
            if u < 0.0 {
                return id;
            }
        }
        cands.last().map_or_else(|| argmax(logits), |&(id, _)| id)
    }
}

fn by_prob_desc(a: &(u32, f32), b: &(u32, f32)) -> Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

/// Keeps the smallest set of most likely tokens whose mass reaches `top_p`, sorted by probability.
///
/// Sorting the whole vocabulary every step is slow, so candidates above a falling threshold are tried first: every
/// token above the threshold is more likely than every token below it, so if their mass already reaches `top_p`
/// the nucleus lies among them. Exact, and usually a sort of a few dozen entries.
fn nucleus(cands: &mut Vec<(u32, f32)>, top_p: f32) {
    let total: f64 = cands.iter().map(|&(_, p)| p as f64).sum();
    let target = top_p as f64 * total;
    let mut threshold = 0.1f32;
    while threshold > 1e-30 {
        let above: f64 = cands
            .iter()
            .filter(|&&(_, p)| p >= threshold)
            .map(|&(_, p)| p as f64)
            .sum();
        if above >= target {
            cands.retain(|&(_, p)| p >= threshold);
            break;
        }
        threshold *= 0.01;
    }
    cands.sort_unstable_by(by_prob_desc);
    let mut acc = 0.0f64;
    let mut keep = cands.len();
    for (i, &(_, p)) in cands.iter().enumerate() {
        acc += p as f64;
        if acc >= target {
            keep = i + 1;
            break;
        }
    }
    cands.truncate(keep.max(1));
}

/// Index of the largest logit; the lowest id wins ties, NaN never wins.
pub fn argmax(logits: &[f32]) -> u32 {
    // The maximum over 16 lanes (a comparison NaN never wins, so the compiler's vector max keeps this meaning), then
    // its first position: 2 vector passes instead of one branchy scalar one.
    const LANES: usize = 16;
    let chunks = logits.chunks_exact(LANES);
    let keep = |m: f32, v: f32| if v > m { v } else { m };
    let mut max = chunks.remainder().iter().fold(f32::NEG_INFINITY, |m, &v| keep(m, v));
    let mut lanes = [f32::NEG_INFINITY; LANES];
    for chunk in chunks {
        for (m, &v) in lanes.iter_mut().zip(chunk) {
            *m = keep(*m, v);
        }
    }
    max = lanes.into_iter().fold(max, keep);
    if max == f32::NEG_INFINITY {
        // Nothing above −∞ (or all NaN): the first id, as a scan keeping the first strictly greater value gives.
        return 0;
    }
    logits.iter().position(|&v| v == max).unwrap_or(0) as u32
}

/// A uniform draw in [0, 1) with 53 bits of precision.
fn uniform(rng: &mut ChaCha8Rng) -> f64 {
    (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// A seed from the OS-seeded hasher keys, for requests that did not ask for one.
fn random_seed() -> u64 {
    std::collections::hash_map::RandomState::new().build_hasher().finish()
}

/// Log-probability of `chosen` and the `top` most likely tokens, from processed logits (before temperature).
pub fn logprobs(logits: &[f32], chosen: u32, top: usize) -> (f32, Vec<(u32, f32)>) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = max + logits.iter().map(|&l| (l - max).exp()).sum::<f32>().ln();
    let chosen_lp = logits.get(chosen as usize).map_or(f32::NEG_INFINITY, |&l| l - lse);
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(top + 1);
    if top > 0 {
        for (i, &l) in logits.iter().enumerate() {
            if best.len() < top || l > best[best.len() - 1].1 {
                let pos = best.partition_point(|&(_, v)| v >= l);
                best.insert(pos, (i as u32, l));
                best.truncate(top);
            }
        }
    }
    (chosen_lp, best.into_iter().map(|(i, l)| (i, l - lse)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn draws(params: SamplingParams, logits: &[f32], n: usize) -> Vec<u32> {
        let mut p = LogitsProcessor::new(params, logits.len(), &[]);
        (0..n).map(|_| p.sample(logits)).collect()
    }

    fn seeded(seed: u64) -> SamplingParams {
        SamplingParams {
            seed: Some(seed),
            ..SamplingParams::default()
        }
    }

    /// The scan `argmax` replaced: the first strictly greater value wins, NaN never does.
    fn scan(logits: &[f32]) -> u32 {
        let (mut best, mut best_v) = (0, f32::NEG_INFINITY);
        for (i, &v) in logits.iter().enumerate() {
            if v > best_v {
                (best, best_v) = (i, v);
            }
        }
        best as u32
    }

    #[test]
    fn argmax_of_a_vocabulary_is_the_first_maximum() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        for n in [1, 15, 16, 17, 49_152, 49_157] {
            for _ in 0..20 {
                let mut v: Vec<f32> = (0..n).map(|_| (uniform(&mut rng) * 40.0 - 20.0) as f32).collect();
                // The maximum again at later places (ties across lanes and in the tail), and some NaN.
                let top = v.iter().copied().fold(f32::MIN, f32::max);
                for _ in 0..3 {
                    let i = (rng.next_u64() % n as u64) as usize;
                    v[i] = top;
                }
                let i = (rng.next_u64() % n as u64) as usize;
                v[i] = f32::NAN;
                assert_eq!(argmax(&v), scan(&v), "n = {n}");
            }
        }
        for v in [
            vec![f32::NAN, f32::NEG_INFINITY],
            vec![f32::NEG_INFINITY; 40],
            vec![f32::NAN; 33],
        ] {
            assert_eq!(argmax(&v), scan(&v));
        }
    }

    #[test]
    fn greedy_takes_argmax_and_lowest_id_on_ties() {
        assert_eq!(
            draws(SamplingParams::greedy(), &[0.1, 3.0, 3.0, -1.0], 3),
            vec![1, 1, 1]
        );
        assert_eq!(argmax(&[f32::NAN, 1.0, 0.5]), 1);
    }

    #[test]
    fn seeded_draws_are_exact_and_reproducible() {
        let logits = [1.0, 2.0, 3.0, 4.0];
        let a = draws(seeded(42), &logits, 12);
        assert_eq!(a, draws(seeded(42), &logits, 12));
        assert_ne!(a, draws(seeded(43), &logits, 12));
        // Pinned sequence: a change in RNG, draw or ordering shows up here.
        assert_eq!(a, vec![3, 3, 3, 3, 2, 2, 2, 3, 3, 2, 3, 3]);
    }

    #[test]
    fn draw_frequencies_follow_the_softmax() {
        let logits = [0.0f32, 1.0, 2.0];
        let n = 20_000;
        let d = draws(seeded(7), &logits, n);
        let z: f32 = logits.iter().map(|l| l.exp()).sum();
        for (id, &l) in logits.iter().enumerate() {
            let freq = d.iter().filter(|&&t| t == id as u32).count() as f32 / n as f32;
            assert!((freq - l.exp() / z).abs() < 0.015, "token {id}: {freq}");
        }
    }

    #[test]
    fn top_k_top_p_and_min_p_truncate() {
        let logits = [5.0, 4.0, 1.0, 0.0, -1.0];
        let only = |params: SamplingParams| {
            let mut d = draws(params, &logits, 2000);
            d.sort();
            d.dedup();
            d
        };
        assert_eq!(only(SamplingParams { top_k: 2, ..seeded(1) }), vec![0, 1]);
        assert_eq!(
            only(SamplingParams {
                top_p: 0.5,
                ..seeded(1)
            }),
            vec![0]
        );
        // p(0)≈0.72, p(1)≈0.26: 0.9 needs both, not more.
        assert_eq!(
            only(SamplingParams {
                top_p: 0.9,
                ..seeded(1)
            }),
            vec![0, 1]
        );
        // min_p 0.1: exp(1-5)=0.018 < 0.1, exp(4-5)=0.37 kept.
        assert_eq!(
            only(SamplingParams {
                min_p: 0.1,
                ..seeded(1)
            }),
            vec![0, 1]
        );
        assert_eq!(
            only(SamplingParams {
                temperature: 100.0,
                ..seeded(1)
            }),
            vec![0, 1, 2, 3, 4]
        );
    }

    #[test]
    fn nucleus_threshold_search_matches_a_full_sort() {
        // Many small tokens: the nucleus needs thresholds well below the first guess.
        let mut cands: Vec<(u32, f32)> = (0..5000).map(|i| (i, 1.0 / (1.0 + i as f32))).collect();
        let mut full = cands.clone();
        nucleus(&mut cands, 0.8);
        full.sort_unstable_by(by_prob_desc);
        let total: f64 = full.iter().map(|c| c.1 as f64).sum();
        let mut acc = 0.0;
        let n = full.iter().position(|c| {
            acc += c.1 as f64;
            acc >= 0.8 * total
        });
        assert_eq!(cands.len(), n.unwrap() + 1);
        assert_eq!(cands, full[..cands.len()]);
    }

    #[test]
    fn penalties_and_bias_change_the_right_logits() {
        let params = SamplingParams {
            presence_penalty: 0.5,
            frequency_penalty: 0.25,
            repetition_penalty: 2.0,
            logit_bias: vec![(4, -100.0), (0, 1.0)],
            ..SamplingParams::default()
        };
        // Prompt has token 1; output has token 2 twice and token 3 once.
        let mut p = LogitsProcessor::new(params, 5, &[1]);
        for t in [2, 3, 2] {
            p.observe(t);
        }
        let mut logits = Vec::new();
        p.process(&[1.0, 2.0, -2.0, 4.0, 3.0], &mut logits);
        assert_eq!(logits[0], 2.0); // bias only
        assert_eq!(logits[1], 1.0); // repetition (prompt): 2 / 2
        assert_eq!(logits[2], -4.0 - 0.5 - 0.5); // repetition ×2, presence, frequency × 2
        assert_eq!(logits[3], 2.0 - 0.5 - 0.25); // repetition /2, presence, frequency × 1
        assert_eq!(logits[4], -97.0); // bias only
    }

    #[test]
    fn nan_logits_are_never_chosen() {
        let p = LogitsProcessor::new(seeded(3), 3, &[]);
        let mut logits = Vec::new();
        p.process(&[f32::NAN, 0.0, f32::NAN], &mut logits);
        assert_eq!(draws(seeded(3), &logits, 50), vec![1; 50]);
    }

    #[test]
    fn logprobs_are_normalised_and_ranked() {
        let logits = [0.0f32, (2.0f32).ln(), (5.0f32).ln()];
        let (lp, top) = logprobs(&logits, 1, 2);
        assert!((lp - (0.25f32).ln()).abs() < 1e-6);
        assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![2, 1]);
        assert!((top[0].1 - (5.0f32 / 8.0).ln()).abs() < 1e-6);
    }
}
