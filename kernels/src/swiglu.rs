//! SwiGLU's product `silu(g)·u = g·σ(g)·u` over a row's gate and up columns, on [`crate::exp`] (of `−|g|` only, so
//! nothing overflows): the same operations per element in AVX-512 or AVX2 registers and portably, so the same bits.

use crate::exp::{exp_lane, LANES};

/// `out[i] = silu(gate[i])·up[i]`: with `e = e^−|g|`, `g/(1 + e)` for `g ≥ 0`, `g·e/(1 + e)` below, and 0 below −87
/// (where `e` would underflow; the true value is under 1.5e-36), times `u`.
pub fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
    assert!(gate.len() == out.len() && up.len() == out.len());
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has the instructions; the lengths are checked above.
        done = unsafe { silu_mul_avx512(gate, up, out) };
    } else if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: as above.
        return unsafe { silu_mul_avx2(gate, up, out) };
    }
    silu_mul_rest(gate, up, out, done);
}

/// Elements `done..` of [`silu_mul`], one at a time.
#[inline(always)]
fn silu_mul_rest(gate: &[f32], up: &[f32], out: &mut [f32], done: usize) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up).skip(done) {
        *o = silu_mul_lane(g, u);
    }
}

/// [`silu_mul`] in AVX2 registers, 8 lanes at a time (the AVX-512 body's operations, masks as blends), then the
/// tail one at a time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn silu_mul_avx2(gate: &[f32], up: &[f32], out: &mut [f32]) {
    use std::arch::x86_64::*;
    let whole = out.len() / 8 * 8;
    for i in (0..whole).step_by(8) {
        let (g, u) = unsafe {
            (
                _mm256_loadu_ps(gate.as_ptr().add(i)),
                _mm256_loadu_ps(up.as_ptr().add(i)),
            )
        };
        let e = crate::exp::exp_avx2(_mm256_or_ps(g, _mm256_set1_ps(-0.0)));
        let negative = _mm256_cmp_ps::<_CMP_NGE_UQ>(g, _mm256_setzero_ps());
        let below = _mm256_cmp_ps::<_CMP_LT_OQ>(g, _mm256_set1_ps(-87.0));
        let num = _mm256_andnot_ps(below, _mm256_blendv_ps(g, _mm256_mul_ps(g, e), negative));
        let y = _mm256_mul_ps(_mm256_div_ps(num, _mm256_add_ps(_mm256_set1_ps(1.0), e)), u);
        unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(i), y) };
    }
    silu_mul_rest(gate, up, out, whole)
}

/// One element of [`silu_mul`].
#[inline(always)]
fn silu_mul_lane(g: f32, u: f32) -> f32 {
    let e = exp_lane(-g.abs());
    let num = if g >= 0.0 {
        g
    } else if g < -87.0 {
        0.0
    } else {
        g * e
    };
    num / (1.0 + e) * u
}

/// Whole vectors of [`silu_mul`]; returns how many elements it wrote.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn silu_mul_avx512(gate: &[f32], up: &[f32], out: &mut [f32]) -> usize {
    use std::arch::x86_64::*;
    let whole = out.len() / LANES * LANES;
    for i in (0..whole).step_by(LANES) {
        let (g, u) = unsafe {
            (
                _mm512_loadu_ps(gate.as_ptr().add(i)),
                _mm512_loadu_ps(up.as_ptr().add(i)),
            )
        };
        let minus_abs = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(g), _mm512_set1_epi32(i32::MIN)));
        let e = crate::exp::exp_avx512(minus_abs);
        let negative = _mm512_cmp_ps_mask::<_CMP_NGE_UQ>(g, _mm512_setzero_ps());
        let below = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(g, _mm512_set1_ps(-87.0));
        let num = _mm512_mask_mov_ps(_mm512_mask_mul_ps(g, negative, g, e), below, _mm512_setzero_ps());
        let y = _mm512_mul_ps(_mm512_div_ps(num, _mm512_add_ps(_mm512_set1_ps(1.0), e)), u);
        unsafe { _mm512_storeu_ps(out.as_mut_ptr().add(i), y) };
    }
    whole
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs() -> (Vec<f32>, Vec<f32>) {
        let mut seed = 0x9E37_79B9u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % 2_000_001) as f32 / 1_000_000.0 - 1.0
        };
        let mut gate: Vec<f32> = (0..1000).map(|_| next() * 20.0).collect();
        gate.extend([0.0, -0.0, 1e-30, -1e-30, 87.5, -87.5, 200.0, -200.0, f32::MAX, f32::MIN]);
        let up = gate.iter().map(|_| next() * 3.0).collect();
        (gate, up)
    }

    #[test]
    fn matches_the_f64_formula() {
        let (gate, up) = inputs();
        let mut out = vec![f32::NAN; gate.len()];
        silu_mul(&gate, &up, &mut out);
        for ((&g, &u), &y) in gate.iter().zip(&up).zip(&out) {
            let want = g as f64 / (1.0 + (-g as f64).exp()) * u as f64;
            assert!(
                (y as f64 - want).abs() <= 4.0 * f32::EPSILON as f64 * want.abs() + 1e-35 * (u as f64).abs(),
                "silu({g})·{u} = {y}, want {want}"
            );
        }
    }

    #[test]
    fn every_element_gets_the_bits_of_the_portable_formula_wherever_it_lies() {
        let (gate, up) = inputs();
        // Lengths and offsets that put elements in whole vectors and in the tail.
        for start in [0, 1, 7, 16] {
            let (g, u) = (&gate[start..], &up[start..]);
            let mut out = vec![0f32; g.len()];
            silu_mul(g, u, &mut out);
            for (i, y) in out.iter().enumerate() {
                assert_eq!(
                    y.to_bits(),
                    silu_mul_lane(g[i], u[i]).to_bits(),
                    "element {i} from {start}"
                );
            }
        }
        // The AVX2 body on its own (an AVX-512 CPU runs the other one above).
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            for start in [0, 3] {
                let (g, u) = (&gate[start..], &up[start..]);
                let mut out = vec![0f32; g.len()];
                // SAFETY: the CPU has the instructions; the lengths match.
                unsafe { silu_mul_avx2(g, u, &mut out) };
                for (i, y) in out.iter().enumerate() {
                    assert_eq!(
                        y.to_bits(),
                        silu_mul_lane(g[i], u[i]).to_bits(),
                        "AVX2: element {i} from {start}"
                    );
                }
            }
        }
        let mut nan = [0f32; 17];
        silu_mul(&[f32::NAN; 17], &[1.0; 17], &mut nan);
        assert!(nan.iter().all(|y| y.is_nan()));
    }
}
