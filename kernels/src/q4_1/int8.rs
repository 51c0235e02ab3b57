//! The AVX2 int8 body (`Isa::Avx2Int8`, an explicit option, not exact): each block of 32 activations rounded once to
//! 8-bit integers with its own scale `s = max|x| / 127` (llama.cpp's Q8_1 rounding of the activations, the scale kept
//! in f32), `vpmaddubsw` multiplying 32 nibbles by 32 of them per instruction into exact integer sums, one FMA per
//! group of 2 blocks for the scales.
//!
//! `Σ_b d·s·Σ_j q·x̂ + Σ_b m·s·Σ_j x̂`, with `x̂ = round(x / s)`: the dequantized weights `d·q + m` times the rounded
//! activations `s·x̂`, the integer sums exact, so the only rounding beyond f32 sums is `x → s·x̂` (at most `s/2`, 1/254
//! of the block's largest value). The minimums' term takes the rounded activations too: with the exact ones, the
//! rounding error meets `d·q` (from 0 to 15·d) instead of the centred weight `d·q + m`, and the real model kept 120 of
//! its 128 teacher-forced choices instead of 126, the winning logit off by up to 2.15 instead of 0.95.
//!
//! Every row count runs tiles of up to `TILE_ROWS` rows sharing each group's weights: the integer sums leave no
//! dequantization for a panel to save. Each (row, column) folds its groups in the same order on every path, so a
//! row's bits do not depend on the rows or columns beside it.

use super::avx2::{fetch_ahead, groups, load_group, minus_terms, reduce, spread_shuffled, sum_floats};
use super::{Prepared, Q4_1Matrix, BLOCK};
use std::arch::x86_64::*;
use std::ops::Range;

/// Bytes of one row per group (2 blocks): the even elements of both blocks, then the odd ones.
const GROUP_BYTES: usize = 64;
/// Floats of one row per group: each lane's scale (lane l: block 2g + l/4).
const GROUP_SCALES: usize = 8;
/// Rows per tile, sharing each group's weights: 120 layers of the model's shapes on one thread, 8 rows 16.8 ms in one
/// tile against 19.5–20.3 as tiles of 6 and 2, 30 rows 62.6–63.0 against 64.7–65.0, 162 rows 344–345 against 352–354
/// (tiles of 4 had been slower still: 30 rows 74.9–78.2 ms).
const TILE_ROWS: usize = 8;
/// Columns per chunk: every tile of rows runs over a chunk's columns before the next chunk, so its weights stay in
/// cache across the tiles, and only the first tile fetches ahead (162 rows, 120 layers, one thread: 368–383 → 349–351
/// ms without the later tiles' prefetches).
const CHUNK: usize = 32;

/// What a prepared row takes: bytes of rounded activations (`u16` halves of `Prepared::xh`), floats of scales
/// (`Prepared::xs`), floats of block sums padded to whole vectors of 8 (`Prepared::sums`).
pub(super) fn row_sizes(nb: usize) -> (usize, usize, usize) {
    (groups(nb) * GROUP_BYTES / 2, groups(nb) * GROUP_SCALES, sum_floats(nb))
}

/// One row: per group of 2 blocks, the rounded activations as 64 bytes (`[even elements of block 2g | of block 2g + 1]`
/// then the odd ones alike, the order in which `vpmaddubsw` meets the low and high nibbles of the group's 32 bytes)
/// and 8 scales (block 2g's over lanes 0..4, block 2g + 1's over 4..8); each block's sum of its rounded activations
/// (`s·Σx̂`); zeros past the last block.
///
/// # Safety
/// The CPU must have AVX2.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn arrange(xr: &[f32], nb: usize, xb: &mut [u8], scales: &mut [f32], sums: &mut [f32]) {
    let ng = groups(nb);
    debug_assert!(xr.len() == nb * BLOCK && xb.len() == ng * GROUP_BYTES && scales.len() == ng * GROUP_SCALES);
    sums[nb..].fill(0.0);
    if nb % 2 == 1 {
        // The missing second block of the last group.
        let g = nb / 2;
        xb[g * GROUP_BYTES + 16..][..16].fill(0);
        xb[g * GROUP_BYTES + 48..][..16].fill(0);
        scales[g * GROUP_SCALES + 4..][..4].fill(0.0);
    }
    for (b, xv) in xr.chunks_exact(BLOCK).enumerate() {
        let (g, half) = (b / 2, b % 2);
        let (s, bytes, total) = unsafe { round_block(xv) };
        sums[b] = s * total as f32;
        let at = g * GROUP_BYTES + 16 * half;
        xb[at..at + 16].copy_from_slice(&bytes[..16]);
        xb[at + 32..at + 48].copy_from_slice(&bytes[16..]);
        scales[g * GROUP_SCALES + 4 * half..][..4].fill(s);
    }
}

/// A block's scale `max|x| / 127`, its activations `round(x / s)` (nearest, ties to even: the even elements in order,
/// then the odd ones), and their sum.
#[target_feature(enable = "avx2")]
unsafe fn round_block(xv: &[f32]) -> (f32, [u8; 32], i32) {
    let v: [__m256; 4] = std::array::from_fn(|i| unsafe { _mm256_loadu_ps(xv.as_ptr().add(8 * i)) });
    let magnitude = _mm256_set1_ps(f32::from_bits(0x7FFF_FFFF));
    let m = v.iter().fold(_mm256_setzero_ps(), |m, &x| {
        _mm256_max_ps(m, _mm256_and_ps(x, magnitude))
    });
    let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
    let s = amax / 127.0;
    let inverse = _mm256_set1_ps(if s > 0.0 { 1.0 / s } else { 0.0 });
    let q: [__m256i; 4] = std::array::from_fn(|i| _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inverse)));
    let total = {
        let t = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
        let t = _mm_add_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256::<1>(t));
        let t = _mm_add_epi32(t, _mm_shuffle_epi32::<0b01_00_11_10>(t));
        _mm_cvtsi128_si32(_mm_add_epi32(t, _mm_shuffle_epi32::<0b10_11_00_01>(t)))
    };
    // To 16 bits and 8 bits (each 128-bit half apart), then the 32-bit words back in element order.
    let p01 = _mm256_packs_epi32(q[0], q[1]);
    let p23 = _mm256_packs_epi32(q[2], q[3]);
    let bytes = _mm256_packs_epi16(p01, p23);
    let bytes = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    // Even elements then odd ones in each half, then the halves' evens together.
    let split = _mm256_setr_epi8(
        0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15, 0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
    );
    let bytes = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_shuffle_epi8(bytes, split));
    let mut out = [0u8; 32];
    unsafe { _mm256_storeu_si256(out.as_mut_ptr().cast(), bytes) };
    (s, out, total)
}

/// Every column in `cols` for every prepared row.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C; `p` was prepared for `Isa::Avx2Int8` on `w`'s shape; `y` holds `rows × N`
/// floats.
pub(super) unsafe fn columns(w: &Q4_1Matrix, p: &Prepared, y: *mut f32, cols: Range<usize>) {
    let mut c = cols.start;
    while c < cols.end {
        let chunk = c..(c + CHUNK).min(cols.end);
        for (r, rows) in super::row_tiles(p.rows, TILE_ROWS) {
            // The first tile streams the chunk's weights from memory; the next ones find them in the cache.
            let fetch = r == 0;
            unsafe {
                match rows {
                    1 => by::<1, 2>(w, p, r, y, chunk.clone(), fetch),
                    2 => by::<2, 1>(w, p, r, y, chunk.clone(), fetch),
                    3 => by::<3, 1>(w, p, r, y, chunk.clone(), fetch),
                    4 => by::<4, 1>(w, p, r, y, chunk.clone(), fetch),
                    5 => by::<5, 1>(w, p, r, y, chunk.clone(), fetch),
                    6 => by::<6, 1>(w, p, r, y, chunk.clone(), fetch),
                    7 => by::<7, 1>(w, p, r, y, chunk.clone(), fetch),
                    _ => by::<8, 1>(w, p, r, y, chunk.clone(), fetch),
                }
            }
        }
        c = chunk.end;
    }
}

/// Rows `r0..r0 + R` over `cols`, `C` columns at a time (the last ones one by one), fetching ahead if `fetch`.
unsafe fn by<const R: usize, const C: usize>(
    w: &Q4_1Matrix,
    p: &Prepared,
    r0: usize,
    y: *mut f32,
    cols: Range<usize>,
    fetch: bool,
) {
    for (c, width) in super::column_steps(cols, C) {
        match width {
            1 => unsafe { tile::<R, 1>(w, p, r0, y, c, fetch) },
            _ => unsafe { tile::<R, C>(w, p, r0, y, c, fetch) },
        }
    }
}

/// Rows `r0..r0 + R` against columns `c0..c0 + C`: per group, the low and high nibbles times the even and odd
/// activations (`vpmaddubsw`, pairs summed in 16 bits: at most 4·15·127), summed to 32 bits per lane, converted, and
/// folded in times `d·s`; then the minimums' term and the lanes summed in a fixed tree. Fetches the columns' next
/// groups ahead if `fetch` (a tile that streams them from memory).
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile<const R: usize, const C: usize>(
    w: &Q4_1Matrix,
    p: &Prepared,
    r0: usize,
    y: *mut f32,
    c0: usize,
    fetch: bool,
) {
    let nb = w.blocks();
    let ng = groups(nb);
    let xb = unsafe { p.xh.as_ptr().cast::<u8>().add(r0 * ng * GROUP_BYTES) };
    let scales = unsafe { p.xs.as_ptr().add(r0 * ng * GROUP_SCALES) };
    let sums = unsafe { p.sums.as_ptr().add(r0 * sum_floats(nb)) };
    let column: [(*const u8, *const u16); C] = std::array::from_fn(|c| w.column(c0 + c));
    let (low, ones) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi16(1));
    let mut acc = [[_mm256_setzero_ps(); C]; R];
    for g in 0..ng {
        let x = |r: usize, half: usize| unsafe {
            _mm256_loadu_si256(xb.add(r * ng * GROUP_BYTES + g * GROUP_BYTES + 32 * half).cast())
        };
        let s: [__m256; R] =
            std::array::from_fn(|r| unsafe { _mm256_loadu_ps(scales.add(r * ng * GROUP_SCALES + g * GROUP_SCALES)) });
        for c in 0..C {
            if fetch {
                fetch_ahead(column[c].0, column[c].1, g);
            }
            let (v, dm) = unsafe { load_group(column[c].0, column[c].1, g, nb - 2 * g) };
            let d = spread_shuffled(dm);
            let lo = _mm256_and_si256(v, low);
            let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(v), low);
            for r in 0..R {
                let pairs = _mm256_add_epi16(_mm256_maddubs_epi16(lo, x(r, 0)), _mm256_maddubs_epi16(hi, x(r, 1)));
                let sum = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, ones));
                acc[r][c] = _mm256_fmadd_ps(sum, _mm256_mul_ps(d, s[r]), acc[r][c]);
            }
        }
    }
    let minus = unsafe { minus_terms::<R, C>(&column, nb, sums) };
    for r in 0..R {
        for c in 0..C {
            unsafe { *y.add((r0 + r) * w.n + c0 + c) = reduce(_mm256_add_ps(acc[r][c], minus[r][c])) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_block_rounds_to_nearest_with_its_own_scale_evens_first() {
        if !std::arch::is_x86_feature_detected!("avx2") {
            return;
        }
        let xv: Vec<f32> = (0..32)
            .map(|i| (i as f32 - 12.3) * if i % 3 == 0 { -0.7 } else { 1.1 })
            .collect();
        let (s, bytes, total) = unsafe { round_block(&xv) };
        let amax = xv.iter().fold(0f32, |m, x| m.max(x.abs()));
        assert_eq!(s, amax / 127.0);
        let want: Vec<u8> = (0..2)
            .flat_map(|odd| (0..16).map(move |i| 2 * i + odd))
            .map(|j| (xv[j] * (1.0 / s)).round_ties_even() as i8 as u8)
            .collect();
        assert_eq!(bytes.to_vec(), want);
        assert_eq!(total, want.iter().map(|&b| b as i8 as i32).sum::<i32>());
        let (s, bytes, total) = unsafe { round_block(&[0.0; 32]) };
        assert_eq!((s, bytes, total), (0.0, [0; 32], 0));
    }
}
