//! AVX2 pieces of the int8 option's body (`int8`) and the lanes' sum of the LM head (`reduce`), on the packed layout
//! of `MatMulNBits` (a column's nibbles across the lanes, 2 blocks to a group); the exact Q4_1 body is `lanes`.

use std::arch::x86_64::*;

/// Prefetch distances: bytes of nibbles, halves of scales (the weights stream from memory once per call).
const PREFETCH_Q: usize = 2048;
const PREFETCH_DM: usize = 256;

/// Blocks per vector of minimums.
const MINS: usize = 8;

/// Groups of a row of `nb` blocks (the last may hold 1 block).
pub(super) fn groups(nb: usize) -> usize {
    nb.div_ceil(2)
}

/// Vectors of 8 block sums (or minimums) per row (or column), padded with zeros.
fn min_vectors(nb: usize) -> usize {
    nb.div_ceil(MINS)
}

/// Floats of a prepared row's block sums, padded to whole vectors of 8 with zeros.
pub(super) fn sum_floats(nb: usize) -> usize {
    min_vectors(nb) * MINS
}

/// The minimums' term `Σ_b m_b·Σx_b` of R rows (their padded block sums from `sums` on) against C columns, 8 blocks
/// per FMA.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C; `sums` holds R rows of `min_vectors(nb)` × 8 floats.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn minus_terms<const R: usize, const C: usize>(
    column: &[(*const u8, *const u16); C],
    nb: usize,
    sums: *const f32,
) -> [[__m256; C]; R] {
    let nh = min_vectors(nb);
    let mut minus = [[_mm256_setzero_ps(); C]; R];
    for h in 0..nh {
        for (c, &(_, dmrow)) in column.iter().enumerate() {
            let mv = unsafe { minimums(dmrow, nb, h) };
            for (r, minus) in minus.iter_mut().enumerate() {
                let s = unsafe { _mm256_loadu_ps(sums.add(r * nh * MINS + h * MINS)) };
                minus[c] = _mm256_fmadd_ps(mv, s, minus[c]);
            }
        }
    }
    minus
}

/// Asks for the nibbles and scales a few columns past group `g` of a column (the weights stream from memory once per
/// call): one request per cache line, the nibbles' every 2 groups and the scales' every 8, 64 bytes apart (120 layers
/// of one row on one thread: 8.84–8.97 → 8.35–8.61 ms against a request per group for each; every 4 groups: 9.0–9.2).
#[inline]
#[target_feature(enable = "sse")]
pub(super) fn fetch_ahead(qrow: *const u8, dmrow: *const u16, g: usize) {
    if g.is_multiple_of(2) {
        _mm_prefetch::<_MM_HINT_T0>(qrow.wrapping_add(g * 32 + PREFETCH_Q).cast());
    }
    if g.is_multiple_of(8) {
        _mm_prefetch::<_MM_HINT_T0>(dmrow.wrapping_add(g * 4 + PREFETCH_DM).cast());
    }
}

/// Group `g` of a column (`left` blocks from it to the column's end): its 2 blocks of nibbles (32 bytes; a last group
/// of 1 block has zeros above) and their (scale, minimum) halves `d0 m0 d1 m1` (`d1 = m1 = 0` past the end).
#[inline]
#[target_feature(enable = "avx2")]
pub(super) unsafe fn load_group(qrow: *const u8, dmrow: *const u16, g: usize, left: usize) -> (__m256i, __m128i) {
    unsafe {
        if left >= 2 {
            (
                _mm256_loadu_si256(qrow.add(g * 32).cast()),
                _mm_loadl_epi64(dmrow.add(g * 4).cast()),
            )
        } else {
            (
                _mm256_zextsi128_si256(_mm_loadu_si128(qrow.add(g * 32).cast())),
                _mm_cvtsi32_si128(std::ptr::read_unaligned(dmrow.add(g * 4).cast::<i32>())),
            )
        }
    }
}

/// Each lane's scale from a group's `d0 m0 d1 m1` halves (lane l: block l / 4), as floats (two word shuffles, then the
/// conversion: with one byte shuffle in assembly the int8 tiles' 8 rows ran slower, 16.6 → 20.1 ms, 30 rows 62.8 →
/// 74–77).
#[inline]
#[target_feature(enable = "avx2,f16c")]
pub(super) fn spread_shuffled(dm: __m128i) -> __m256 {
    let dm = _mm256_castps128_ps256(_mm_cvtph_ps(dm));
    _mm256_permutevar8x32_ps(dm, _mm256_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2))
}

/// The minimums of blocks `8h..8h + 8` of a column (`nb` blocks), zeros past the last.
#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn minimums(dmrow: *const u16, nb: usize, h: usize) -> __m256 {
    let left = nb - MINS * h;
    // One (d, m) pair per 32-bit lane.
    let pairs = unsafe {
        if left >= MINS {
            _mm256_loadu_si256(dmrow.add(16 * h).cast())
        } else {
            let lanes = _mm256_cmpgt_epi32(
                _mm256_set1_epi32(left as i32),
                _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
            );
            _mm256_maskload_epi32(dmrow.add(16 * h).cast(), lanes)
        }
    };
    // m in each lane's low half, packed to 16 bits (m0..m3 in the low quarter, m4..m7 in the third), then together.
    let m = _mm256_srli_epi32::<16>(pairs);
    let packed = _mm256_permute4x64_epi64::<0b1000>(_mm256_packus_epi32(m, m));
    _mm256_cvtph_ps(_mm256_castsi256_si128(packed))
}

/// The sum of the 8 lanes in a fixed tree: lanes i and i + 4, then i and i + 2 of those, 0 and 1.
#[inline]
#[target_feature(enable = "avx")]
pub(crate) fn reduce(v: __m256) -> f32 {
    let a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let b = _mm_add_ps(a, _mm_movehl_ps(a, a));
    _mm_cvtss_f32(_mm_add_ss(b, _mm_movehdup_ps(b)))
}
