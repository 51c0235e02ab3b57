//! `e^x` for `x ≤ 0` in f32, portable and in AVX-512 and AVX2 registers with the same operations per lane (the same
//! bits): the softmax of attention and SwiGLU's sigmoid use it.

/// Lanes per vector step (one AVX-512 register of f32).
pub const LANES: usize = 16;

/// `e^x` per lane for `x ≤ 0` (clamped at −87, where it is 1.6e-38), relative error below 2.5·2⁻²³: `x = k·ln 2 + r`,
/// `|r| ≤ ln 2 / 2`, a degree-7 Taylor polynomial in `r`, then `2^k` through the exponent bits. A NaN counts as −87
/// rather than spreading.
#[inline(always)]
pub fn exp(x: [f32; LANES]) -> [f32; LANES] {
    x.map(exp_lane)
}

/// One lane of [`exp`].
#[inline(always)]
pub fn exp_lane(x: f32) -> f32 {
    let y = x.max(-87.0);
    let k = (y * EXP_LOG2E + EXP_ROUND) - EXP_ROUND;
    let r = (-k).mul_add(EXP_LN2_LO, (-k).mul_add(EXP_LN2_HI, y));
    let mut p = EXP_POLY[0];
    for &c in &EXP_POLY[1..] {
        p = p.mul_add(r, c);
    }
    p * f32::from_bits(((k as i32 + 127) as u32) << 23)
}

/// [`exp`] in a register: the same operations per lane.
///
/// # Safety
/// The CPU must have AVX-512 F and FMA.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,fma")]
pub fn exp_avx512(x: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    // `max(x, −87)` returns −87 for a NaN, as `f32::max` does.
    let y = _mm512_max_ps(x, _mm512_set1_ps(-87.0));
    let round = _mm512_set1_ps(EXP_ROUND);
    let k = _mm512_sub_ps(_mm512_add_ps(_mm512_mul_ps(y, _mm512_set1_ps(EXP_LOG2E)), round), round);
    let minus_k = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(k), _mm512_set1_epi32(i32::MIN)));
    let r = _mm512_fmadd_ps(
        minus_k,
        _mm512_set1_ps(EXP_LN2_LO),
        _mm512_fmadd_ps(minus_k, _mm512_set1_ps(EXP_LN2_HI), y),
    );
    let mut p = _mm512_set1_ps(EXP_POLY[0]);
    for &c in &EXP_POLY[1..] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
    }
    let two_k = _mm512_slli_epi32::<23>(_mm512_add_epi32(_mm512_cvttps_epi32(k), _mm512_set1_epi32(127)));
    _mm512_mul_ps(p, _mm512_castsi512_ps(two_k))
}

/// [`exp`] in an AVX2 register (8 lanes): the same operations per lane.
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
pub fn exp_avx2(x: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    // `max(x, −87)` returns −87 for a NaN, as `f32::max` does.
    let y = _mm256_max_ps(x, _mm256_set1_ps(-87.0));
    let round = _mm256_set1_ps(EXP_ROUND);
    let k = _mm256_sub_ps(_mm256_add_ps(_mm256_mul_ps(y, _mm256_set1_ps(EXP_LOG2E)), round), round);
    let minus_k = _mm256_xor_ps(k, _mm256_set1_ps(-0.0));
    let r = _mm256_fmadd_ps(
        minus_k,
        _mm256_set1_ps(EXP_LN2_LO),
        _mm256_fmadd_ps(minus_k, _mm256_set1_ps(EXP_LN2_HI), y),
    );
    let mut p = _mm256_set1_ps(EXP_POLY[0]);
    for &c in &EXP_POLY[1..] {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
    }
    let two_k = _mm256_slli_epi32::<23>(_mm256_add_epi32(_mm256_cvttps_epi32(k), _mm256_set1_epi32(127)));
    _mm256_mul_ps(p, _mm256_castsi256_ps(two_k))
}

const EXP_LOG2E: f32 = std::f32::consts::LOG2_E;
/// ln 2 in two parts (Cody and Waite): 0.693359375 has 9 significant bits.
const EXP_LN2_HI: f32 = 0.693_359_4;
const EXP_LN2_LO: f32 = -2.121_944_4e-4;
/// 1.5·2^23: adding it rounds to an integer.
const EXP_ROUND: f32 = 12_582_912.0;
const EXP_POLY: [f32; 8] = [
    1.0 / 5040.0,
    1.0 / 720.0,
    1.0 / 120.0,
    1.0 / 24.0,
    1.0 / 6.0,
    0.5,
    1.0,
    1.0,
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_two_and_a_half_epsilons_of_the_library() {
        let mut worst = 0f64;
        for i in 0..=100_000 {
            let x = -87.0 * i as f32 / 100_000.0;
            let got = exp([x; LANES])[0] as f64;
            let want = (x as f64).exp();
            worst = worst.max((got - want).abs() / want);
        }
        assert!(worst < 2.5 * f32::EPSILON as f64, "relative error {worst:e}");
        assert_eq!(exp([0.0; LANES])[0], 1.0);
    }

    #[test]
    fn the_register_body_gives_the_portable_bits() {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("fma") {
            use std::arch::x86_64::*;
            for i in 0..=10_000 {
                let x: [f32; LANES] = std::array::from_fn(|l| -90.0 * (i * LANES + l) as f32 / (10_001 * LANES) as f32);
                let mut got = [0f32; LANES];
                unsafe { _mm512_storeu_ps(got.as_mut_ptr(), exp_avx512(_mm512_loadu_ps(x.as_ptr()))) };
                assert_eq!(got.map(f32::to_bits), exp(x).map(f32::to_bits), "{x:?}");
            }
            return;
        }
        println!("no AVX-512 here: one body only");
    }

    #[test]
    fn the_avx2_body_gives_the_portable_bits() {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            use std::arch::x86_64::*;
            for i in 0..=10_000 {
                let mut x: [f32; 8] = std::array::from_fn(|l| -90.0 * (i * 8 + l) as f32 / (10_001 * 8) as f32);
                if i == 0 {
                    x[1] = f32::NAN;
                    x[2] = -0.0;
                }
                let mut got = [0f32; 8];
                unsafe { _mm256_storeu_ps(got.as_mut_ptr(), exp_avx2(_mm256_loadu_ps(x.as_ptr()))) };
                assert_eq!(got.map(f32::to_bits), x.map(exp_lane).map(f32::to_bits), "{x:?}");
            }
            return;
        }
        println!("no AVX2 here: one body only");
    }
}
