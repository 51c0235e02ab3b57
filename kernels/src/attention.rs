//! Causal self-attention over a KV cache, one query row at a time: rotary embedding (interleaved pairs), then
//! `softmax(q·Kᵀ·scale)·V` per head over the row's positions. A row's operations depend only on its query and the
//! cache, never on the rows computed beside it, so a prompt run whole, in chunks or one token at a time, alone or in a
//! batch, gets the same bits.

#[cfg(target_arch = "x86_64")]
use crate::exp::exp_avx512;
use crate::exp::{exp, LANES};

/// Rotates the interleaved pairs `(x[2i], x[2i + 1])` of one head by the angles whose cosines and sines are `cos[i]`,
/// `sin[i]` (one position's row of the rotary caches, `x.len() / 2` each).
pub fn rotate(x: &mut [f32], cos: &[f32], sin: &[f32]) {
    debug_assert!(x.len() == 2 * cos.len() && cos.len() == sin.len());
    for ((pair, &c), &s) in x.chunks_exact_mut(2).zip(cos).zip(sin) {
        let (a, b) = (pair[0], pair[1]);
        pair[0] = a * c - b * s;
        pair[1] = a * s + b * c;
    }
}

/// One head of one query row: `out = Σ_j p_j·v_j` with `p = softmax(scale·q·k_j)` over positions `0..n` of `keys` and
/// `values` (`[n][head_dim]` each, `head_dim` a multiple of 16). `scores` is working memory.
pub fn attend(q: &[f32], keys: &[f32], values: &[f32], n: usize, scale: f32, scores: &mut Vec<f32>, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has the instructions.
        return unsafe { attend_avx512(q, keys, values, n, scale, scores, out) };
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has the instructions.
        return unsafe { attend_avx2(q.len(), q, keys, values, n, scale, scores, out) };
    }
    attend_any(q, keys, values, n, scale, scores, out)
}

/// `attend` for each of the heads of `d` floats in `qs` that share one key/value head (grouped-query attention), into
/// the same places of `outs`, with the same bits. On AVX2 the heads take their turns over each chunk of keys, then of
/// values, while it is in the first-level cache, so the cache is read once for all of them (`CHUNK_KEYS`); elsewhere
/// each head runs `attend` in turn.
#[allow(clippy::too_many_arguments)]
pub fn attend_group(
    d: usize,
    qs: &[f32],
    keys: &[f32],
    values: &[f32],
    n: usize,
    scale: f32,
    scores: &mut Vec<f32>,
    outs: &mut [f32],
) {
    assert!(d > 0 && qs.len() == outs.len() && qs.len().is_multiple_of(d));
    #[cfg(target_arch = "x86_64")]
    if !std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
    {
        // SAFETY: the CPU has the instructions.
        return unsafe { attend_avx2(d, qs, keys, values, n, scale, scores, outs) };
    }
    for (q, out) in qs.chunks_exact(d).zip(outs.chunks_exact_mut(d)) {
        attend(q, keys, values, n, scale, scores, out);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn attend_avx512(
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    n: usize,
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let d = q.len();
    prepare(q.len(), q, keys, values, n, out, scores);
    let whole = if d == 4 * LANES { n - n % LANES } else { 0 };
    // 16 keys at a time (heads of 64): each key's 16 partial sums, then one butterfly of shuffles that adds every
    // key's lanes in `sum`'s order (lane i + lane i + 8, then + 4, + 2, + 1), so a key's score has the same bits here
    // and in `score`. Other head sizes take `score` for every key.
    if whole > 0 {
        let qv: [__m512; 4] = std::array::from_fn(|c| unsafe { _mm512_loadu_ps(q.as_ptr().add(c * LANES)) });
        let order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
        for (chunk, dst) in scores[..whole].chunks_exact_mut(LANES).enumerate() {
            let base = unsafe { keys.as_ptr().add(chunk * LANES * d) };
            let mut p = [_mm512_setzero_ps(); LANES];
            for (l, v) in p.iter_mut().enumerate() {
                for (c, qc) in qv.iter().enumerate() {
                    *v = _mm512_fmadd_ps(*qc, unsafe { _mm512_loadu_ps(base.add(l * d + c * LANES)) }, *v);
                }
            }
            let halves = |a: __m512, b: __m512| {
                _mm512_add_ps(_mm512_shuffle_f32x4::<0x44>(a, b), _mm512_shuffle_f32x4::<0xEE>(a, b))
            };
            let quarters = |a: __m512, b: __m512| {
                _mm512_add_ps(_mm512_shuffle_f32x4::<0x88>(a, b), _mm512_shuffle_f32x4::<0xDD>(a, b))
            };
            let pairs =
                |a: __m512, b: __m512| _mm512_add_ps(_mm512_shuffle_ps::<0x44>(a, b), _mm512_shuffle_ps::<0xEE>(a, b));
            let ones =
                |a: __m512, b: __m512| _mm512_add_ps(_mm512_shuffle_ps::<0x88>(a, b), _mm512_shuffle_ps::<0xDD>(a, b));
            let h: [__m512; 8] = std::array::from_fn(|m| halves(p[2 * m], p[2 * m + 1]));
            let r: [__m512; 4] = std::array::from_fn(|m| quarters(h[2 * m], h[2 * m + 1]));
            // Lane 4c + e of `t` holds key c + 4e.
            let t = ones(pairs(r[0], r[1]), pairs(r[2], r[3]));
            let sums = _mm512_permutexvar_ps(order, t);
            unsafe { _mm512_storeu_ps(dst.as_mut_ptr(), _mm512_mul_ps(sums, _mm512_set1_ps(scale))) };
        }
    }
    for j in whole..n {
        scores[j] = score(q, &keys[j * d..(j + 1) * d], scale);
    }
    unsafe { softmax_times_values_avx512(values, n, scores, out) }
}

/// Keys per chunk of the AVX2 body: every head of a group scores one chunk of keys (16 KB for heads of 64), and
/// then weighs one chunk of values, before the next chunk (30 layers × 9 heads in groups of 3 against one at a time,
/// one thread: 100 positions 224 against 252 µs, 1000 positions 3.1 against 3.8 ms, 2000 positions 7.2 against 8.1).
const CHUNK_KEYS: usize = 64;

/// The AVX-512 body's scheme in AVX2 registers, for the heads of `d` floats in `qs` (one for `attend`, a group for
/// `attend_group`): each key's 16 lanes as two vectors, 8 keys at a time summed by one butterfly in `sum`'s order
/// (`score_keys_avx2`), the softmax (`softmax_avx2`), the values' weighted sum (`weigh_values_avx2`); each head's
/// operations are those of `attend_any` in its order, so it gets the portable bits, alone or in a group.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn attend_avx2(
    d: usize,
    qs: &[f32],
    keys: &[f32],
    values: &[f32],
    n: usize,
    scale: f32,
    scores: &mut Vec<f32>,
    outs: &mut [f32],
) {
    let padded = prepare(d, qs, keys, values, n, outs, scores);
    let whole = if d == 4 * LANES { n - n % 8 } else { 0 };
    for c0 in (0..whole).step_by(CHUNK_KEYS) {
        let c1 = (c0 + CHUNK_KEYS).min(whole);
        for (q, s) in qs.chunks_exact(d).zip(scores.chunks_exact_mut(padded)) {
            unsafe { score_keys_avx2(q, &keys[c0 * d..c1 * d], scale, &mut s[c0..c1]) };
        }
    }
    for (q, s) in qs.chunks_exact(d).zip(scores.chunks_exact_mut(padded)) {
        for j in whole..n {
            s[j] = score(q, &keys[j * d..(j + 1) * d], scale);
        }
        unsafe { softmax_avx2(n, s) };
    }
    outs.fill(0.0);
    for j0 in (0..n).step_by(CHUNK_KEYS) {
        let j1 = (j0 + CHUNK_KEYS).min(n);
        for (p, out) in scores.chunks_exact(padded).zip(outs.chunks_exact_mut(d)) {
            unsafe { weigh_values_avx2(&values[j0 * d..j1 * d], &p[j0..j1], out) };
        }
    }
}

/// `scale·q·k` of each key of 64 floats in `keys` (a multiple of 8 of them) into `dst`: key l's lanes 0–7 and 8–15
/// (`score`'s 16 lanes), then one butterfly for 8 keys that adds lane i + lane i + 8, then + 4, + 2, + 1.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn score_keys_avx2(q: &[f32], keys: &[f32], scale: f32, dst: &mut [f32]) {
    use std::arch::x86_64::*;
    let d = q.len();
    let qv: [__m256; 8] = std::array::from_fn(|c| unsafe { _mm256_loadu_ps(q.as_ptr().add(c * 8)) });
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (chunk, dst) in dst.chunks_exact_mut(8).enumerate() {
        let base = unsafe { keys.as_ptr().add(chunk * 8 * d) };
        let p: [__m256; 8] = std::array::from_fn(|l| {
            let mut acc = [_mm256_setzero_ps(); 2];
            for (c, qc) in qv.iter().enumerate() {
                acc[c % 2] = _mm256_fmadd_ps(*qc, unsafe { _mm256_loadu_ps(base.add(l * d + c * 8)) }, acc[c % 2]);
            }
            _mm256_add_ps(acc[0], acc[1])
        });
        // + 4: keys 2m and 2m + 1 in the low and high halves.
        let h: [__m256; 4] = std::array::from_fn(|m| {
            let (a, b) = (p[2 * m], p[2 * m + 1]);
            _mm256_add_ps(
                _mm256_permute2f128_ps::<0x20>(a, b),
                _mm256_permute2f128_ps::<0x31>(a, b),
            )
        });
        // + 2, then + 1: the low halves hold keys 0, 2, 4, 6, the high ones 1, 3, 5, 7.
        let r: [__m256; 2] = std::array::from_fn(|m| {
            let (a, b) = (h[2 * m], h[2 * m + 1]);
            _mm256_add_ps(_mm256_shuffle_ps::<0x44>(a, b), _mm256_shuffle_ps::<0xEE>(a, b))
        });
        let t = _mm256_add_ps(
            _mm256_shuffle_ps::<0x88>(r[0], r[1]),
            _mm256_shuffle_ps::<0xDD>(r[0], r[1]),
        );
        let sums = _mm256_permutevar8x32_ps(t, order);
        unsafe { _mm256_storeu_ps(dst.as_mut_ptr(), _mm256_mul_ps(sums, _mm256_set1_ps(scale))) };
    }
}

/// `softmax_times_values`' softmax in AVX2 registers, lane for lane the same operations (each 16-lane step as two
/// vectors): the maximum, `exp` of each score less it, their sum, and the probabilities `e·(1/sum)` stored over the
/// scores (the first `n` of them; whole vectors, padded with −∞).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_avx2(n: usize, scores: &mut [f32]) {
    use crate::q4_1::reduce8;
    use std::arch::x86_64::*;
    let vectors = scores.len() / 8;
    let base = scores.as_mut_ptr();
    let at = |c: usize| unsafe { base.add(c * 8) };
    // `max(score, top)` keeps `top` for a NaN score, as `f32::max` does.
    let mut top = _mm256_set1_ps(f32::NEG_INFINITY);
    for c in 0..vectors {
        top = _mm256_max_ps(unsafe { _mm256_loadu_ps(at(c)) }, top);
    }
    let top = _mm_max_ps(_mm256_castps256_ps128(top), _mm256_extractf128_ps::<1>(top));
    let top = _mm_max_ps(top, _mm_movehl_ps(top, top));
    let top = _mm256_set1_ps(_mm_cvtss_f32(_mm_max_ss(top, _mm_movehdup_ps(top))));
    // Lanes 0–7 and 8–15 of the portable sum.
    let mut total = [_mm256_setzero_ps(); 2];
    for c in 0..vectors {
        let e = crate::exp::exp_avx2(_mm256_sub_ps(unsafe { _mm256_loadu_ps(at(c)) }, top));
        // The padding past `n` (−∞ − top) weighs nothing.
        let live = n.saturating_sub(c * 8).min(8) as i32;
        let keep = _mm256_castsi256_ps(_mm256_cmpgt_epi32(
            _mm256_set1_epi32(live),
            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
        ));
        let e = _mm256_and_ps(e, keep);
        unsafe { _mm256_storeu_ps(at(c), e) };
        total[c % 2] = _mm256_add_ps(total[c % 2], e);
    }
    let inv = _mm256_set1_ps(1.0 / reduce8(_mm256_add_ps(total[0], total[1])));
    for c in 0..vectors {
        unsafe { _mm256_storeu_ps(at(c), _mm256_mul_ps(_mm256_loadu_ps(at(c)), inv)) };
    }
}

/// `out += Σ_j p_j·v_j` over the keys of `probs` and their rows of `values`, up to 8 vectors of the output at a time
/// kept in registers: each output float's chain continues in key order from the value `out` holds, so a head weighed
/// chunk after chunk of keys (from zeros) gets the bits of `weighted`'s one pass.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn weigh_values_avx2(values: &[f32], probs: &[f32], out: &mut [f32]) {
    let d = out.len();
    let mut start = 0;
    while start < d {
        let width = ((d - start) / 8).min(8);
        unsafe {
            match width {
                8 => weigh_avx2::<8>(values, probs, out, start),
                7 => weigh_avx2::<7>(values, probs, out, start),
                6 => weigh_avx2::<6>(values, probs, out, start),
                5 => weigh_avx2::<5>(values, probs, out, start),
                4 => weigh_avx2::<4>(values, probs, out, start),
                3 => weigh_avx2::<3>(values, probs, out, start),
                2 => weigh_avx2::<2>(values, probs, out, start),
                _ => weigh_avx2::<1>(values, probs, out, start),
            }
        }
        start += width * 8;
    }
}

/// `W` vectors of `weigh_values_avx2` from float `start` of the output on (a width known when compiled, so the loop
/// over the keys runs its `W` FMAs without a test between them: 30 layers × 9 heads in groups of 3 at 300 positions,
/// one thread, 647 → 621 µs).
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn weigh_avx2<const W: usize>(values: &[f32], probs: &[f32], out: &mut [f32], start: usize) {
    use std::arch::x86_64::*;
    let d = out.len();
    let o = unsafe { out.as_mut_ptr().add(start) };
    let mut acc: [__m256; W] = std::array::from_fn(|c| unsafe { _mm256_loadu_ps(o.add(c * 8)) });
    for (j, &pj) in probs.iter().enumerate() {
        let pj = _mm256_set1_ps(pj);
        let v = unsafe { values.as_ptr().add(j * d + start) };
        for (c, a) in acc.iter_mut().enumerate() {
            *a = _mm256_fmadd_ps(pj, unsafe { _mm256_loadu_ps(v.add(c * 8)) }, *a);
        }
    }
    for (c, a) in acc.iter().enumerate() {
        unsafe { _mm256_storeu_ps(o.add(c * 8), *a) };
    }
}

/// `softmax_times_values` in AVX-512 registers, lane for lane the same operations (so the same bits): the maximum,
/// `exp` of each score less it, their sum, the probabilities `e·(1/sum)` stored over the scores, then each output
/// vector's chain over the keys with the probability broadcast from memory.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn softmax_times_values_avx512(values: &[f32], n: usize, scores: &mut [f32], out: &mut [f32]) {
    use std::arch::x86_64::*;
    let d = out.len();
    let chunks = scores.len() / LANES;
    let base = scores.as_mut_ptr();
    let at = |c: usize| unsafe { base.add(c * LANES) };
    // `max(score, top)` keeps `top` for a NaN score, as `f32::max` does (a zero's sign cannot change `exp`).
    let mut top = _mm512_set1_ps(f32::NEG_INFINITY);
    for c in 0..chunks {
        top = _mm512_max_ps(unsafe { _mm512_loadu_ps(at(c)) }, top);
    }
    let top = _mm512_set1_ps(_mm512_reduce_max_ps(top));
    let mut total = _mm512_setzero_ps();
    for c in 0..chunks {
        let e = exp_avx512(_mm512_sub_ps(unsafe { _mm512_loadu_ps(at(c)) }, top));
        // The padding past `n` (−∞ − top) weighs nothing.
        let live = n.saturating_sub(c * LANES).min(LANES);
        let e = _mm512_maskz_mov_ps(((1u32 << live) - 1) as u16, e);
        unsafe { _mm512_storeu_ps(at(c), e) };
        total = _mm512_add_ps(total, e);
    }
    let inv = _mm512_set1_ps(1.0 / _mm512_reduce_add_ps(total));
    for c in 0..chunks {
        unsafe { _mm512_storeu_ps(at(c), _mm512_mul_ps(_mm512_loadu_ps(at(c)), inv)) };
    }
    let p = base.cast_const();
    let mut start = 0;
    while start < d {
        let width = ((d - start) / LANES).min(4);
        let mut acc = [_mm512_setzero_ps(); 4];
        for j in 0..n {
            let pj = _mm512_set1_ps(unsafe { *p.add(j) });
            let v = unsafe { values.as_ptr().add(j * d + start) };
            for (c, a) in acc.iter_mut().enumerate().take(width) {
                *a = _mm512_fmadd_ps(pj, unsafe { _mm512_loadu_ps(v.add(c * LANES)) }, *a);
            }
        }
        for (c, a) in acc.iter().enumerate().take(width) {
            unsafe { _mm512_storeu_ps(out.as_mut_ptr().add(start + c * LANES), *a) };
        }
        start += width * LANES;
    }
}

/// The portable body: `score` for every key, then the shared softmax and weighted sum.
#[inline(always)]
fn attend_any(q: &[f32], keys: &[f32], values: &[f32], n: usize, scale: f32, scores: &mut Vec<f32>, out: &mut [f32]) {
    let d = q.len();
    prepare(q.len(), q, keys, values, n, out, scores);
    for j in 0..n {
        scores[j] = score(q, &keys[j * d..(j + 1) * d], scale);
    }
    softmax_times_values(values, n, scores, out)
}

/// Checks the lengths for the heads of `d` floats in `qs` (and `outs`) and sizes `scores` to whole vectors per head,
/// padded with −∞; returns the floats of scores per head.
#[inline(always)]
fn prepare(d: usize, qs: &[f32], keys: &[f32], values: &[f32], n: usize, outs: &[f32], scores: &mut Vec<f32>) -> usize {
    assert!(
        d.is_multiple_of(LANES)
            && outs.len() == qs.len()
            && qs.len().is_multiple_of(d)
            && keys.len() >= n * d
            && values.len() >= n * d
            && n > 0
    );
    let padded = n.next_multiple_of(LANES);
    scores.clear();
    scores.resize(qs.len() / d * padded, f32::NEG_INFINITY);
    padded
}

/// `scale·q·k`: 16 lanes of products summed along the head, then across lanes by `sum`.
#[inline(always)]
fn score(q: &[f32], k: &[f32], scale: f32) -> f32 {
    let mut acc = [0f32; LANES];
    for (qc, kc) in q.chunks_exact(LANES).zip(k.chunks_exact(LANES)) {
        for l in 0..LANES {
            acc[l] = qc[l].mul_add(kc[l], acc[l]);
        }
    }
    sum(acc) * scale
}

/// `out = Σ_j softmax(scores)_j·v_j` over the first `n` of `scores` (whole vectors, padded with −∞).
#[inline(always)]
fn softmax_times_values(values: &[f32], n: usize, scores: &mut [f32], out: &mut [f32]) {
    let d = out.len();
    let mut top = [f32::NEG_INFINITY; LANES];
    for c in scores.chunks_exact(LANES) {
        for l in 0..LANES {
            top[l] = top[l].max(c[l]);
        }
    }
    let top = top.into_iter().fold(f32::NEG_INFINITY, f32::max);
    for c in scores.chunks_exact_mut(LANES) {
        let mut x = [0f32; LANES];
        for l in 0..LANES {
            x[l] = c[l] - top;
        }
        let e = exp(x);
        c.copy_from_slice(&e);
    }
    scores[n..].fill(0.0); // the padding's −∞ − top
    let mut total = [0f32; LANES];
    for c in scores.chunks_exact(LANES) {
        for l in 0..LANES {
            total[l] += c[l];
        }
    }
    let inv = 1.0 / sum(total);
    // Up to 4 vectors of the output at a time, kept in registers over the keys.
    let mut start = 0;
    while start < d {
        let chunks = ((d - start) / LANES).min(4);
        let p = &scores[..n];
        match chunks {
            4 => weighted::<4>(p, inv, values, d, start, out),
            3 => weighted::<3>(p, inv, values, d, start, out),
            2 => weighted::<2>(p, inv, values, d, start, out),
            _ => weighted::<1>(p, inv, values, d, start, out),
        }
        start += chunks * LANES;
    }
}

/// `out[start..start + 16·C] = Σ_j (e_j·inv)·v_j[start..start + 16·C]`, one FMA chain per lane in key order.
#[inline(always)]
fn weighted<const C: usize>(e: &[f32], inv: f32, values: &[f32], d: usize, start: usize, out: &mut [f32]) {
    let mut acc = [[0f32; LANES]; C];
    for (j, &e) in e.iter().enumerate() {
        let p = e * inv;
        let v = &values[j * d + start..][..C * LANES];
        for c in 0..C {
            for l in 0..LANES {
                acc[c][l] = p.mul_add(v[c * LANES + l], acc[c][l]);
            }
        }
    }
    for (o, a) in out[start..start + C * LANES].chunks_exact_mut(LANES).zip(acc) {
        o.copy_from_slice(&a);
    }
}

/// The 16 lanes summed in a fixed tree (halves, then quarters, …).
#[inline(always)]
fn sum(mut v: [f32; LANES]) -> f32 {
    let mut width = LANES / 2;
    while width > 0 {
        for l in 0..width {
            v[l] += v[l + width];
        }
        width /= 2;
    }
    v[0]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rng(seed: &mut u64) -> f32 {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        (*seed % 20001) as f32 / 10000.0 - 1.0
    }

    /// A query, `n` keys and `n` values of `d` floats.
    fn case(seed: &mut u64, n: usize, d: usize) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let q = (0..d).map(|_| rng(seed) * 2.0).collect();
        let k = (0..n * d).map(|_| rng(seed) * 2.0).collect();
        let v = (0..n * d).map(|_| rng(seed)).collect();
        (q, k, v)
    }

    #[test]
    fn rotation_turns_each_pair_by_its_angle() {
        let mut x = [1.0, 0.0, 0.0, 2.0];
        let (a, b) = (0.3f32, 1.2f32);
        rotate(&mut x, &[a.cos(), b.cos()], &[a.sin(), b.sin()]);
        assert!((x[0] - a.cos()).abs() < 1e-7 && (x[1] - a.sin()).abs() < 1e-7);
        assert!((x[2] + 2.0 * b.sin()).abs() < 1e-6 && (x[3] - 2.0 * b.cos()).abs() < 1e-6);
    }

    /// The butterfly adds each key's lanes in `score`'s order: the AVX-512 body (16 keys at a time) and the portable
    /// one (a key at a time) give the same bits, for every count of keys.
    #[test]
    fn sixteen_keys_at_a_time_give_the_bits_of_one_at_a_time() {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("fma") {
            let mut seed = 11u64;
            let d = 64;
            for n in [1, 15, 16, 17, 33, 64, 129] {
                let (q, k, v) = case(&mut seed, n, d);
                let (mut fast, mut slow) = (vec![0f32; d], vec![0f32; d]);
                unsafe { attend_avx512(&q, &k, &v, n, 0.125, &mut Vec::new(), &mut fast) };
                attend_any(&q, &k, &v, n, 0.125, &mut Vec::new(), &mut slow);
                let bits = |x: &[f32]| x.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&fast), bits(&slow), "{n} keys");
            }
            return;
        }
        println!("no AVX-512 here: one body only");
    }

    /// The AVX2 body (8 keys at a time, other head sizes a key at a time) gives the portable body's bits.
    #[test]
    fn eight_keys_at_a_time_in_avx2_give_the_bits_of_one_at_a_time() {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            let mut seed = 13u64;
            for (n, d) in [(1, 64), (17, 64), (129, 64), (40, 32), (5, 48)] {
                let (q, k, v) = case(&mut seed, n, d);
                let (mut fast, mut slow) = (vec![0f32; d], vec![0f32; d]);
                unsafe { attend_avx2(d, &q, &k, &v, n, 0.125, &mut Vec::new(), &mut fast) };
                attend_any(&q, &k, &v, n, 0.125, &mut Vec::new(), &mut slow);
                let bits = |x: &[f32]| x.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&fast), bits(&slow), "{n} keys of {d}");
            }
            return;
        }
        println!("no AVX2 here: one body only");
    }

    /// The heads of a group, taking their turns over chunks of keys and values, get the bits each gets alone.
    #[test]
    fn a_group_of_heads_gets_the_bits_of_each_head_alone() {
        let mut seed = 17u64;
        let cases = [
            (1, 64),
            (63, 64),
            (64, 64),
            (65, 64),
            (200, 64),
            (300, 64),
            (70, 32),
            (5, 48),
        ];
        for (n, d) in cases {
            let heads = 3;
            let (_, k, v) = case(&mut seed, n, d);
            let qs: Vec<f32> = (0..heads * d).map(|_| rng(&mut seed) * 2.0).collect();
            let mut together = vec![f32::NAN; heads * d];
            attend_group(d, &qs, &k, &v, n, 0.125, &mut Vec::new(), &mut together);
            for h in 0..heads {
                let mut alone = vec![f32::NAN; d];
                attend(&qs[h * d..(h + 1) * d], &k, &v, n, 0.125, &mut Vec::new(), &mut alone);
                let bits = |x: &[f32]| x.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    bits(&together[h * d..(h + 1) * d]),
                    bits(&alone),
                    "{n} keys of {d}, head {h}"
                );
            }
        }
    }

    #[test]
    fn attention_matches_an_f64_softmax_of_the_scores() {
        let mut seed = 7u64;
        let d = 64;
        for n in [1, 2, 15, 16, 17, 40, 300] {
            let (q, k, v) = case(&mut seed, n, d);
            let mut out = vec![f32::NAN; d];
            attend(&q, &k, &v, n, 0.125, &mut Vec::new(), &mut out);
            let s: Vec<f64> = (0..n)
                .map(|j| 0.125 * (0..d).map(|i| q[i] as f64 * k[j * d + i] as f64).sum::<f64>())
                .collect();
            let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
            let total: f64 = e.iter().sum();
            for i in 0..d {
                let want: f64 = (0..n).map(|j| e[j] / total * v[j * d + i] as f64).sum();
                assert!(
                    (out[i] as f64 - want).abs() < 1e-5,
                    "n={n} dim {i}: {} vs {want}",
                    out[i]
                );
            }
        }
    }
}
