//! The exact f32 body on AVX2 + FMA (x86-64 without AVX-512): `avx512`'s arithmetic on 256-bit registers. A group is
//! 2 blocks (32 bytes of nibbles, one register); nibble t of every 32-bit lane becomes `16^s·q·d` (`scaled`'s masks
//! and shift), and meets the activations arranged as the transpose of the group's 8 × 8 values (`arrange`). Tiles of
//! up to 4 rows share each group's weights, one row running 2 columns at once (120 layers of 576 × 960, one thread,
//! weights in cache: 5.1 against 6.0–6.2 ms one column at a time); from `PANEL_ROWS` rows each column is dequantized
//! once into a panel of 4 columns that passes of 3 rows read. Each (row, column) sums in the same 2 chains in the same
//! order on every path, so a row's bits do not depend on the rows or columns beside it.

use super::{block_sums, Prepared, Q4_1Matrix, BLOCK, NIBBLE_SCALE};
use std::arch::x86_64::*;
use std::ops::Range;

/// Prefetch distances: bytes of nibbles, halves of scales (the weights stream from memory once per call).
const PREFETCH_Q: usize = 2048;
const PREFETCH_DM: usize = 256;

/// Floats of one row per group (2 blocks).
pub(super) const GROUP: usize = 64;
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

/// Floats a prepared row takes: its arranged activations (`arrange`'s `xs`) and its padded block sums (`sums`).
pub(super) fn row_floats(nb: usize) -> (usize, usize) {
    (groups(nb) * GROUP, min_vectors(nb) * MINS)
}

/// Where vector t of group g lies in a row of `ng` groups (in floats; the panels' vectors lie alike): the vectors of
/// even t (chain 0) of every group first, then those of odd t (chain 1), so that a pass over one chain reads whole
/// cache lines, and half a row of K = 1536 stays in the first-level cache beside its panel (30 rows of a 1536 × 576
/// layer, one thread: 127 → 95 ms).
#[inline(always)]
pub(super) fn at(ng: usize, g: usize, t: usize) -> usize {
    (t % 2) * ng * 32 + g * 32 + (t / 2) * 8
}

/// One row of x in the kernel's order (`xs`: `groups(nb)` × 64 floats, vector t of group g at `at(ng, g, t)`) and its
/// block sums (`sums`: `min_vectors(nb)` × 8, zeros past the last block): lane l of vector t of group g is value
/// `8l + t` of the group (element `8(l % 4) + t` of block `2g + l/4`, nibble t of 32-bit lane l) times
/// `NIBBLE_SCALE[t]`; zeros past the last block.
///
/// # Safety
/// The CPU must have AVX2.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn arrange(xr: &[f32], nb: usize, xs: &mut [f32], sums: &mut [f32]) {
    debug_assert!(xr.len() == nb * BLOCK && (xs.len(), sums.len()) == row_floats(nb));
    sums[nb..].fill(0.0);
    block_sums(xr, sums);
    let ng = groups(nb);
    for g in 0..ng {
        if 2 * g + 1 == nb {
            let mut group = [0f32; GROUP];
            arrange_group(xr, nb, g, &mut group);
            for (t, v) in group.chunks_exact(8).enumerate() {
                xs[at(ng, g, t)..][..8].copy_from_slice(v);
            }
            continue;
        }
        // SAFETY: blocks 2g and 2g + 1 are inside the row.
        let xg = unsafe { xr.as_ptr().add(g * GROUP) };
        let r: [__m256; 8] = std::array::from_fn(|l| unsafe { _mm256_loadu_ps(xg.add(8 * l)) });
        // The 8 × 8 transpose: pairs of rows interleaved, then quadruples, then the 128-bit halves.
        let t: [__m256; 8] = std::array::from_fn(|i| {
            let (a, b) = (r[2 * (i / 2)], r[2 * (i / 2) + 1]);
            if i % 2 == 0 {
                _mm256_unpacklo_ps(a, b)
            } else {
                _mm256_unpackhi_ps(a, b)
            }
        });
        // s[4h + j]: rows 4h..4h + 4, columns j and j + 4.
        let s: [__m256; 8] = std::array::from_fn(|i| {
            let (h, j) = (i / 4, i % 4);
            let (a, b) = (t[4 * h + j / 2], t[4 * h + 2 + j / 2]);
            if j % 2 == 0 {
                _mm256_shuffle_ps::<0x44>(a, b)
            } else {
                _mm256_shuffle_ps::<0xEE>(a, b)
            }
        });
        for (c, &scale) in NIBBLE_SCALE.iter().enumerate() {
            let column = if c < 4 {
                _mm256_permute2f128_ps::<0x20>(s[c], s[4 + c])
            } else {
                _mm256_permute2f128_ps::<0x31>(s[c - 4], s[c])
            };
            let dst = &mut xs[at(ng, g, c)..][..8];
            unsafe { _mm256_storeu_ps(dst.as_mut_ptr(), _mm256_mul_ps(column, _mm256_set1_ps(scale))) };
        }
    }
}

/// Group `g` of `arrange`, one value at a time: its 8 vectors in order of t (for a group of 1 block, each vector's
/// second half zeros).
pub(super) fn arrange_group(xr: &[f32], nb: usize, g: usize, group: &mut [f32]) {
    for t in 0..8 {
        for l in 0..8 {
            let b = 2 * g + l / 4;
            group[8 * t + l] = if b < nb {
                xr[b * BLOCK + 8 * (l % 4) + t] * NIBBLE_SCALE[t]
            } else {
                0.0
            };
        }
    }
}

/// Rows from which a call dequantizes each column once into a panel that passes read (`panels`): 120 layers of the
/// model's shapes on one thread, 5 rows 21.7 against 24.9 ms in tiles, 6 rows 24.3 against 27.4, 8 rows 29.8 against
/// 32.6 (4 rows: 20.9 against 16.3).
const PANEL_ROWS: usize = 5;
/// Rows and columns per pass over a panel, and columns per panel: 12 accumulators, 3 activations and a weight vector
/// in the 16 registers (120 layers of the model's shapes on one thread: 162 rows 464–471 against 519–527 ms in passes
/// of 3 × 3, 30 rows 88–89 against 89–91).
const PASS_ROWS: usize = 3;
const PASS_COLS: usize = 4;

/// Every column in `cols` for every prepared row.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C; `p` was prepared for `Isa::Avx2` on `w`'s shape; `y` holds `rows × N` floats.
pub(super) unsafe fn columns(w: &Q4_1Matrix, p: &Prepared, y: *mut f32, cols: Range<usize>) {
    if p.rows >= PANEL_ROWS {
        return unsafe { panels(w, p, y, cols) };
    }
    for (r, rows) in super::row_tiles(p.rows, 4) {
        unsafe {
            match rows {
                1 => by::<1, 2>(w, p, r, y, cols.clone()),
                2 => by::<2, 1>(w, p, r, y, cols.clone()),
                3 => by::<3, 1>(w, p, r, y, cols.clone()),
                _ => by::<4, 1>(w, p, r, y, cols.clone()),
            }
        }
    }
}

/// Rows `r0..r0 + R` over `cols`, `C` columns at a time (the last ones one by one).
unsafe fn by<const R: usize, const C: usize>(w: &Q4_1Matrix, p: &Prepared, r0: usize, y: *mut f32, cols: Range<usize>) {
    for (c, width) in super::column_steps(cols, C) {
        match width {
            1 => unsafe { tile::<R, 1>(w, p, r0, y, c) },
            _ => unsafe { tile::<R, C>(w, p, r0, y, c) },
        }
    }
}

/// Rows `r0..r0 + R` against columns `c0..c0 + C`: per (row, column), the weight vectors of even t in one chain and of
/// odd t in another, group by group, then the minimums' term `Σ_b m_b·Σx_b` 8 blocks per FMA, and the lanes summed in
/// a fixed tree.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile<const R: usize, const C: usize>(w: &Q4_1Matrix, p: &Prepared, r0: usize, y: *mut f32, c0: usize) {
    let nb = w.blocks();
    let (ng, nh) = (groups(nb), min_vectors(nb));
    let stride = ng * GROUP;
    let xs = unsafe { p.xs.as_ptr().add(r0 * stride) };
    let sums = unsafe { p.sums.as_ptr().add(r0 * nh * MINS) };
    let column: [(*const u8, *const u16); C] = std::array::from_fn(|c| w.column(c0 + c));
    let mut acc = [[[_mm256_setzero_ps(); 2]; C]; R];
    for g in 0..ng {
        let loaded: [(__m256i, __m256); C] =
            std::array::from_fn(|c| unsafe { group(column[c].0, column[c].1, g, nb - 2 * g) });
        let high: [__m256i; C] = std::array::from_fn(|c| _mm256_srli_epi32::<12>(loaded[c].0));
        for t in 0..8 {
            let x: [__m256; R] = std::array::from_fn(|r| unsafe { _mm256_loadu_ps(xs.add(r * stride + at(ng, g, t))) });
            for c in 0..C {
                let wt = scaled(loaded[c].0, high[c], loaded[c].1, t);
                for r in 0..R {
                    acc[r][c][t % 2] = _mm256_fmadd_ps(wt, x[r], acc[r][c][t % 2]);
                }
            }
        }
    }
    let minus = unsafe { minus_terms::<R, C>(&column, nb, sums) };
    for r in 0..R {
        for c in 0..C {
            let total = _mm256_add_ps(_mm256_add_ps(acc[r][c][0], acc[r][c][1]), minus[r][c]);
            unsafe { *y.add((r0 + r) * w.n + c0 + c) = reduce(total) };
        }
    }
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

thread_local! {
    /// The weight and minimum vectors of a panel's columns (`dequantize`'s).
    static PANEL: std::cell::RefCell<Vec<__m256>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Many rows: each block of `PASS_COLS` columns is dequantized once into a panel (the very vectors `tile` forms), then
/// passes of up to `PASS_ROWS` rows run `tile`'s operations on all of it in `tile`'s order, so a row's bits match
/// `tile`'s.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn panels(w: &Q4_1Matrix, p: &Prepared, y: *mut f32, cols: Range<usize>) {
    let nb = w.blocks();
    let per_col = groups(nb) * 8 + min_vectors(nb);
    PANEL.with_borrow_mut(|panel| {
        panel.resize(PASS_COLS * per_col, _mm256_setzero_ps());
        for c in (cols.start..cols.end).step_by(PASS_COLS) {
            let width = (cols.end - c).min(PASS_COLS);
            for (i, dst) in panel.chunks_exact_mut(per_col).take(width).enumerate() {
                unsafe { dequantize(w, c + i, dst) };
            }
            for (r, rows) in super::row_tiles(p.rows, PASS_ROWS) {
                unsafe {
                    match (rows, width) {
                        (3, 4) => pass::<3, 4>(w, p, panel, per_col, r, y, c),
                        (2, 4) => pass::<2, 4>(w, p, panel, per_col, r, y, c),
                        (1, 4) => pass::<1, 4>(w, p, panel, per_col, r, y, c),
                        (3, 3) => pass::<3, 3>(w, p, panel, per_col, r, y, c),
                        (2, 3) => pass::<2, 3>(w, p, panel, per_col, r, y, c),
                        (1, 3) => pass::<1, 3>(w, p, panel, per_col, r, y, c),
                        (3, 2) => pass::<3, 2>(w, p, panel, per_col, r, y, c),
                        (2, 2) => pass::<2, 2>(w, p, panel, per_col, r, y, c),
                        (1, 2) => pass::<1, 2>(w, p, panel, per_col, r, y, c),
                        (3, _) => pass::<3, 1>(w, p, panel, per_col, r, y, c),
                        (2, _) => pass::<2, 1>(w, p, panel, per_col, r, y, c),
                        _ => pass::<1, 1>(w, p, panel, per_col, r, y, c),
                    }
                }
            }
        }
    });
}

/// Column `c`'s weight vectors (`groups × 8`, as `tile` forms them, vector t of group g at `at(ng, g, t) / 8`) then
/// its minimum vectors, into `dst`. Written through a pointer, without the slice's index checks (120 layers of the
/// model's shapes, one thread: 5 rows 22.0–22.3 → 19.7–19.9 ms, 8 rows 30.0 → 27.5–27.8, 30 rows 87.9–88.3 → 85.9–86.2).
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dequantize(w: &Q4_1Matrix, c: usize, dst: &mut [__m256]) {
    let nb = w.blocks();
    let (qrow, dmrow) = w.column(c);
    let (ng, nh) = (groups(nb), min_vectors(nb));
    assert_eq!(dst.len(), ng * 8 + nh);
    let out = dst.as_mut_ptr();
    for g in 0..ng {
        let (v, d) = unsafe { group(qrow, dmrow, g, nb - 2 * g) };
        let high = _mm256_srli_epi32::<12>(v);
        for t in 0..8 {
            // SAFETY: at(ng, g, t) / 8 < ng · 8, inside `dst`.
            unsafe { out.add(at(ng, g, t) / 8).write(scaled(v, high, d, t)) };
        }
    }
    for h in 0..nh {
        // SAFETY: ng · 8 + h < dst.len().
        unsafe { out.add(ng * 8 + h).write(minimums(dmrow, nb, h)) };
    }
}

/// Rows `r0..r0 + R` against the `C` columns from `c0` of `panel` (`per_col` vectors each): per (row, column), `tile`'s
/// two chains, each run over the whole column in turn (vector v of chain h is vector `ng·4·h + v`), so that the R × C
/// accumulators, R activations and a weight fit in the 16 registers.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::needless_range_loop)] // columns outside rows: each weight vector is loaded once per pass
unsafe fn pass<const R: usize, const C: usize>(
    w: &Q4_1Matrix,
    p: &Prepared,
    panel: &[__m256],
    per_col: usize,
    r0: usize,
    y: *mut f32,
    c0: usize,
) {
    let nb = w.blocks();
    let (ng, nh) = (groups(nb), min_vectors(nb));
    let stride = ng * GROUP;
    let xs = unsafe { p.xs.as_ptr().add(r0 * stride) };
    let sums = unsafe { p.sums.as_ptr().add(r0 * nh * MINS) };
    let col = |c: usize| unsafe { panel.as_ptr().add(c * per_col) };
    let mut chains = [[[_mm256_setzero_ps(); C]; R]; 2];
    for (h, acc) in chains.iter_mut().enumerate() {
        for v in 0..ng * 4 {
            let i = ng * 4 * h + v;
            let x: [__m256; R] = std::array::from_fn(|r| unsafe { _mm256_loadu_ps(xs.add(r * stride + 8 * i)) });
            for c in 0..C {
                let wt = unsafe { *col(c).add(i) };
                for r in 0..R {
                    acc[r][c] = _mm256_fmadd_ps(wt, x[r], acc[r][c]);
                }
            }
        }
    }
    let mut minus = [[_mm256_setzero_ps(); C]; R];
    for h in 0..nh {
        let s: [__m256; R] = std::array::from_fn(|r| unsafe { _mm256_loadu_ps(sums.add(r * nh * MINS + h * MINS)) });
        for c in 0..C {
            let mv = unsafe { *col(c).add(ng * 8 + h) };
            for r in 0..R {
                minus[r][c] = _mm256_fmadd_ps(mv, s[r], minus[r][c]);
            }
        }
    }
    for r in 0..R {
        for c in 0..C {
            let total = _mm256_add_ps(_mm256_add_ps(chains[0][r][c], chains[1][r][c]), minus[r][c]);
            unsafe { *y.add((r0 + r) * w.n + c0 + c) = reduce(total) };
        }
    }
}

/// Group `g` of a column (`left` blocks from it to the column's end): `load_group`'s nibbles and `spread`'s scales,
/// fetching a few columns ahead.
#[inline]
#[target_feature(enable = "avx2,f16c")]
pub(super) unsafe fn group(qrow: *const u8, dmrow: *const u16, g: usize, left: usize) -> (__m256i, __m256) {
    fetch_ahead(qrow, dmrow, g);
    let (v, dm) = unsafe { load_group(qrow, dmrow, g, left) };
    (v, spread(dm))
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

/// Each lane's scale from a group's `d0 m0 d1 m1` halves (lane l: block l / 4), as floats: one byte shuffle, then the
/// conversion. In assembly because the compiler turns a constant `_mm_shuffle_epi8` into two word shuffles, and that
/// one more operation per group and column made one row 5 % slower (120 layers of the model's shapes, one thread,
/// 7 alternations: 8.20–8.52 against 7.81–7.98 ms; the weights in cache, 5.13–5.31 against 4.90–4.97).
#[inline]
#[target_feature(enable = "avx2,f16c")]
fn spread(dm: __m128i) -> __m256 {
    static SPREAD: [u8; 16] = [0, 1, 0, 1, 0, 1, 0, 1, 4, 5, 4, 5, 4, 5, 4, 5];
    let mut d = dm;
    // SAFETY: reads the 16 bytes of `SPREAD`; no other memory, stack or flags.
    unsafe {
        std::arch::asm!(
            "vpshufb {d}, {d}, xmmword ptr [{spread}]",
            d = inout(xmm_reg) d,
            spread = in(reg) SPREAD.as_ptr(),
            options(pure, readonly, nostack, preserves_flags),
        )
    };
    _mm256_cvtph_ps(d)
}

/// `spread` as the compiler writes it (two word shuffles, then the conversion), for the int8 tiles: their 8 rows keep
/// the registers busy, and with the assembly form they ran slower (8 rows 16.6 → 20.1 ms, 30 rows 62.8 → 74–77).
#[inline]
#[target_feature(enable = "avx2,f16c")]
pub(super) fn spread_shuffled(dm: __m128i) -> __m256 {
    let dm = _mm256_castps128_ps256(_mm_cvtph_ps(dm));
    _mm256_permutevar8x32_ps(dm, _mm256_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2))
}

/// Vector t of a group's `16^s·q·d`: nibble t of every 32-bit lane, masked where it lies (t ≤ 4) or in `high`, 12 bits
/// lower (t ≥ 5), converted and multiplied by d, exactly (`avx512::masked_times`). The form with one FMA from 2^23's
/// bits (`avx512`'s for one row) is slower here: 120 layers of one row, one thread, weights in cache, 5.6 against
/// 5.3 ms; 4 rows 11.0 against 9.9.
#[inline]
#[target_feature(enable = "avx2")]
fn scaled(v: __m256i, high: __m256i, d: __m256, t: usize) -> __m256 {
    let (x, s) = if t <= 4 { (v, t) } else { (high, t - 3) };
    _mm256_mul_ps(
        _mm256_cvtepi32_ps(_mm256_and_si256(x, _mm256_set1_epi32(0x0F << (4 * s)))),
        d,
    )
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
