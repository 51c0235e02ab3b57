//! The exact AVX2 body (x86-64 without AVX-512). The weights are laid out again once per matrix (`Lanes`) with one
//! column per 32-bit lane, so that a register of 8 weights holds 8 columns at one position of K, and each row's
//! activation meets it broadcast. A (row, column) then sums in one lane in the order of K, a block's 32 products and
//! then its minimum times the block's sum, and its 8 columns come out together, with no sum across lanes. Tiles of up
//! to 4 rows form each weight vector once in registers (`tile`); from `PANEL_ROWS` rows each chunk of 48 columns is
//! formed once into panels that passes of 6 rows × 16 columns read (`pass`: 12 accumulators, the shape that keeps both
//! FMA pipes busy). Both form the same weight vectors with the same instructions and add them in the same order, so a
//! row's bits do not depend on the rows or columns beside it.
//!
//! 120 layers of the model's shapes, random weights, one thread, best of 3 alternations against the layout it replaced
//! (a column's nibbles across the lanes, two chains summed across the lanes at the end, panels of 3 rows × 4 columns):
//! one row 6.4 against 8.1 ms, 2 rows 9.0 against 11.1, 4 rows 14.6 against 16.3, 5–9 rows within 3 % either way, 13
//! rows 40.7 against 43.2, 30 rows 81.4 against 97.3, 162 rows 413 against 497. The layout is formed when the session
//! loads (`Q4_1Matrix::settle`).

use super::{Prepared, Q4_1Matrix, BLOCK};
use std::arch::x86_64::*;
use std::ops::Range;

/// Groups of 8 columns per chunk of the layout: one row's tile takes a chunk at a time, its 6 accumulators and 6
/// scales in registers (120 layers, one thread: one row 6.5 ms against 7.5–7.8 with chunks of 8 groups and the scales
/// read from memory; 2–4 rows 9–20 % faster too). 48 columns divide every N of the model and its halves.
const CHUNK: usize = 6;
/// Floats of a prepared row per block: its 32 activations, each times `SCALE` (the inverse of the power of two its
/// weight carries), then the block's sum.
pub(super) const PER_BLOCK: usize = BLOCK + 1;
/// Weight t of a lane's 8 nibbles is masked where it lies (t ≤ 6: `q·16^t·d`) or, the last, 4 bits lower (`q·16^6·d`,
/// so the lane's sign bit stays clear); its activation is divided by the same power of two, which is exact, so every
/// product `q·d·x` is the very float it was (unless |x| < 2⁻¹⁰², where `x·2⁻²⁴` would be subnormal).
const SCALE: [f32; 8] = [
    1.0,
    1.0 / 16.0,
    1.0 / 256.0,
    1.0 / 4096.0,
    1.0 / 65536.0,
    1.0 / 1_048_576.0,
    1.0 / 16_777_216.0,
    1.0 / 16_777_216.0,
];
/// Each weight t's mask (the last one after the 4-bit shift).
static MASKS: [[u32; 8]; 8] = {
    let mut m = [[0u32; 8]; 8];
    let mut t = 0;
    while t < 8 {
        let shift = if t < 7 { 4 * t } else { 24 };
        let mut l = 0;
        while l < 8 {
            m[t][l] = 0xF << shift;
            l += 1;
        }
        t += 1;
    }
    m
};
/// Rows from which a call forms panels (`panels`) instead of running tiles of up to 4 rows (120 layers, one thread:
/// 5–8 rows 1–9 % faster in tiles, 8 rows 27.5 against 29.0 ms; 9 rows 30.4 against 33.7 in panels, 16 rows 47.9
/// against 54.7).
const PANEL_ROWS: usize = 9;
/// Rows per micro-kernel over a panel: 12 accumulators, 2 weight vectors and a broadcast activation in the 16 registers.
const PASS_ROWS: usize = 6;
/// How far ahead (bytes) the weights are fetched (they stream from memory once per call).
const PREFETCH: usize = 2048;

/// A matrix's weights in the lane layout: chunk h (`CHUNK` groups of 8 columns), block b, octet o (positions
/// 8o..8o + 8 of the block), group j: 8 lanes of 32 bits, lane l holding column `48h + 8j + l`'s 8 nibbles of the
/// octet (nibble t at bits 4t..4t + 4, the low nibble of each byte first, as `MatMulNBits` packs them); and per chunk,
/// block and group the 8 scales then the 8 minimums as halves. Columns past N are zeros.
#[derive(Debug)]
pub struct Lanes {
    nb: usize,
    q: Vec<[u32; 8]>,
    dm: Vec<[u16; 16]>,
}

impl Lanes {
    pub(super) fn new(w: &Q4_1Matrix) -> Self {
        let nb = w.blocks();
        let chunks = w.n.div_ceil(8 * CHUNK);
        let mut q = Vec::with_capacity(chunks * nb * 4 * CHUNK);
        let mut dm = Vec::with_capacity(chunks * nb * CHUNK);
        // In the layout's order, a chunk's block at a time (its 48 columns' 16 bytes each).
        for h in 0..chunks {
            for b in 0..nb {
                let mut units = [[0u32; 8]; 4 * CHUNK];
                let mut halves = [[0u16; 16]; CHUNK];
                for c in 8 * CHUNK * h..(8 * CHUNK * (h + 1)).min(w.n) {
                    let (j, l) = (c / 8 % CHUNK, c % 8);
                    let src = &w.q[(c * nb + b) * 16..][..16];
                    for (o, bytes) in src.chunks_exact(4).enumerate() {
                        units[o * CHUNK + j][l] = u32::from_le_bytes(bytes.try_into().unwrap());
                    }
                    halves[j][l] = w.dm[(c * nb + b) * 2];
                    halves[j][8 + l] = w.dm[(c * nb + b) * 2 + 1];
                }
                q.extend_from_slice(&units);
                dm.extend_from_slice(&halves);
            }
        }
        Self { nb, q, dm }
    }

    /// Nibble t of octet o of block b of column c (tests).
    #[cfg(test)]
    pub(super) fn nibble(&self, c: usize, b: usize, o: usize, t: usize) -> u8 {
        let (h, j, l) = (c / (8 * CHUNK), c / 8 % CHUNK, c % 8);
        ((self.q[((h * self.nb + b) * 4 + o) * CHUNK + j][l] >> (4 * t)) & 15) as u8
    }

    /// The scale and minimum halves of block b of column c (tests).
    #[cfg(test)]
    pub(super) fn halves(&self, c: usize, b: usize) -> (u16, u16) {
        let (h, j, l) = (c / (8 * CHUNK), c / 8 % CHUNK, c % 8);
        let halves = &self.dm[(h * self.nb + b) * CHUNK + j];
        (halves[l], halves[8 + l])
    }
}

/// One row in the kernel's order (`out`: `nb` × `PER_BLOCK` floats): per block, its activations times `SCALE`, then
/// their sum (in order, as `block_sums` forms it).
pub(super) fn arrange(xr: &[f32], nb: usize, out: &mut [f32]) {
    debug_assert!(xr.len() == nb * BLOCK && out.len() == nb * PER_BLOCK);
    for (xb, o) in xr.chunks_exact(BLOCK).zip(out.chunks_exact_mut(PER_BLOCK)) {
        for (e, (dst, &x)) in o.iter_mut().zip(xb).enumerate() {
            *dst = x * SCALE[e % 8];
        }
        o[BLOCK] = xb.iter().sum::<f32>();
    }
}

/// Every column in `cols` for every prepared row.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C; `p` was prepared for `Isa::Avx2` on `w`'s shape; `y` holds `rows × N` floats.
pub(super) unsafe fn columns(w: &Q4_1Matrix, l: &Lanes, p: &Prepared, y: *mut f32, cols: Range<usize>) {
    if p.rows >= PANEL_ROWS {
        return unsafe { panels(w, l, p, y, cols) };
    }
    let out = Out {
        y,
        n: w.n,
        cols: cols.clone(),
    };
    let (g0, g1) = (cols.start / 8, cols.end.div_ceil(8));
    for (r0, rows) in super::row_tiles(p.rows, 4) {
        let mut g = g0;
        while g < g1 {
            // Within one chunk, as many groups at a time as the tile takes.
            let (h, j) = (g / CHUNK, g % CHUNK);
            let avail = (g1 - g).min(CHUNK - j);
            let step = unsafe {
                match (rows, avail) {
                    (1, 6..) => tile::<1, 6>(l, p, r0, &out, h, j),
                    (1, 4..) => tile::<1, 4>(l, p, r0, &out, h, j),
                    (1, 2..) => tile::<1, 2>(l, p, r0, &out, h, j),
                    (1, _) => tile::<1, 1>(l, p, r0, &out, h, j),
                    (2, 4..) => tile::<2, 4>(l, p, r0, &out, h, j),
                    (2, 2..) => tile::<2, 2>(l, p, r0, &out, h, j),
                    (2, _) => tile::<2, 1>(l, p, r0, &out, h, j),
                    (3, 2..) => tile::<3, 2>(l, p, r0, &out, h, j),
                    (3, _) => tile::<3, 1>(l, p, r0, &out, h, j),
                    (_, 2..) => tile::<4, 2>(l, p, r0, &out, h, j),
                    (_, _) => tile::<4, 1>(l, p, r0, &out, h, j),
                }
            };
            g += step;
        }
    }
}

/// Where results go: `y` (`[rows][n]`), only the columns of `cols`.
struct Out {
    y: *mut f32,
    n: usize,
    cols: Range<usize>,
}

impl Out {
    /// The 8 columns of group `g` for row `r`, those inside `cols`.
    #[inline]
    #[target_feature(enable = "avx")]
    unsafe fn put(&self, r: usize, g: usize, v: __m256) {
        let c0 = 8 * g;
        if c0 >= self.cols.start && c0 + 8 <= self.cols.end {
            unsafe { _mm256_storeu_ps(self.y.add(r * self.n + c0), v) };
        } else {
            let mut lanes = [0f32; 8];
            unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), v) };
            for (i, &x) in lanes.iter().enumerate() {
                if self.cols.contains(&(c0 + i)) {
                    unsafe { *self.y.add(r * self.n + c0 + i) = x };
                }
            }
        }
    }
}

/// Weight t of an octet's 8 columns (`q` its 8 lanes): the nibble masked where it lies (or 4 bits lower, t = 7),
/// converted, times the columns' scales (`$d`: the assembly operand, then its binding). In assembly so that the
/// compiler neither keeps the octet's lanes in registers across t nor merges their loads: each weight vector is one
/// mask, one conversion and one multiply, the lanes read as a memory operand.
macro_rules! weight {
    ($t:expr, $q:expr, $d:literal, $($scales:tt)*) => {{
        let mask = unsafe { _mm256_load_si256(MASKS[$t].as_ptr().cast()) };
        let w: __m256;
        // SAFETY: reads 32 bytes at `q` (and at the scales, in memory); no other memory, stack or flags.
        unsafe {
            if $t < 7 {
                std::arch::asm!(
                    "vpand {w}, {mask}, ymmword ptr [{q}]",
                    "vcvtdq2ps {w}, {w}",
                    concat!("vmulps {w}, {w}, ", $d),
                    w = out(ymm_reg) w,
                    mask = in(ymm_reg) mask,
                    q = in(reg) $q,
                    $($scales)*,
                    options(readonly, nostack, preserves_flags),
                );
            } else {
                std::arch::asm!(
                    "vmovdqu {w}, ymmword ptr [{q}]",
                    "vpsrld {w}, {w}, 4",
                    "vpand {w}, {w}, {mask}",
                    "vcvtdq2ps {w}, {w}",
                    concat!("vmulps {w}, {w}, ", $d),
                    w = out(ymm_reg) w,
                    mask = in(ymm_reg) mask,
                    q = in(reg) $q,
                    $($scales)*,
                    options(readonly, nostack, preserves_flags),
                );
            }
        }
        w
    }};
}

/// `weight!` with the scales read from memory at `d`.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn weight<const T: usize>(q: *const [u32; 8], d: *const __m256) -> __m256 {
    weight!(T, q, "ymmword ptr [{d}]", d = in(reg) d)
}

/// `weight!` with the scales `d` in a register.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn weight_by<const T: usize>(q: *const [u32; 8], d: __m256) -> __m256 {
    weight!(T, q, "{d}", d = in(ymm_reg) d)
}

/// The scales and minimums of `W` groups (from `dm` on) as floats.
#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn halves<const W: usize>(dm: *const [u16; 16], d: &mut [__m256; W], m: &mut [__m256; W]) {
    for j in 0..W {
        let h = unsafe { _mm256_loadu_si256(dm.add(j).cast()) };
        d[j] = _mm256_cvtph_ps(_mm256_castsi256_si128(h));
        m[j] = _mm256_cvtph_ps(_mm256_extracti128_si256::<1>(h));
    }
}

/// Rows `0..R` against groups `j..j + W` of chunk `h`; returns W.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile<const R: usize, const W: usize>(
    l: &Lanes,
    p: &Prepared,
    r0: usize,
    out: &Out,
    h: usize,
    j: usize,
) -> usize {
    let nb = l.nb;
    let xs: [*const f32; R] = std::array::from_fn(|r| unsafe { p.xs.as_ptr().add((r0 + r) * nb * PER_BLOCK) });
    let mut acc = [[_mm256_setzero_ps(); W]; R];
    let (mut d, mut m) = ([_mm256_setzero_ps(); W], [_mm256_setzero_ps(); W]);
    for b in 0..nb {
        let qb = unsafe { l.q.as_ptr().add((h * nb + b) * 4 * CHUNK + j) };
        unsafe { halves::<W>(l.dm.as_ptr().add((h * nb + b) * CHUNK + j), &mut d, &mut m) };
        for o in 0..4 {
            let qo = qb.wrapping_add(o * CHUNK);
            for line in 0..(W * 32).div_ceil(64) {
                _mm_prefetch::<_MM_HINT_T0>(qo.cast::<i8>().wrapping_add(PREFETCH + 64 * line));
            }
            let at = b * PER_BLOCK + 8 * o;
            macro_rules! step {
                ($t:literal) => {
                    let x: [__m256; R] = std::array::from_fn(|r| unsafe { _mm256_broadcast_ss(&*xs[r].add(at + $t)) });
                    for jj in 0..W {
                        // One row keeps its W scales in registers; more rows read them from memory (their
                        // broadcasts take the registers).
                        let wv = if R == 1 {
                            unsafe { weight_by::<$t>(qo.add(jj), d[jj]) }
                        } else {
                            unsafe { weight::<$t>(qo.add(jj), d.as_ptr().add(jj)) }
                        };
                        for r in 0..R {
                            acc[r][jj] = _mm256_fmadd_ps(wv, x[r], acc[r][jj]);
                        }
                    }
                };
            }
            step!(0);
            step!(1);
            step!(2);
            step!(3);
            step!(4);
            step!(5);
            step!(6);
            step!(7);
        }
        let s: [__m256; R] =
            std::array::from_fn(|r| unsafe { _mm256_broadcast_ss(&*xs[r].add(b * PER_BLOCK + BLOCK)) });
        for jj in 0..W {
            for r in 0..R {
                acc[r][jj] = _mm256_fmadd_ps(m[jj], s[r], acc[r][jj]);
            }
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        for (jj, &v) in acc.iter().enumerate() {
            unsafe { out.put(r0 + r, h * CHUNK + j + jj, v) };
        }
    }
    W
}

thread_local! {
    /// A panel's weight vectors (`dequantize`'s).
    static PANEL: std::cell::RefCell<Vec<__m256>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Many rows: the groups of each chunk (up to 48 columns) are formed once into panels of 2 groups, `[position][group]`
/// over the K + K/32 positions (a block's 32 weights, then its minimums), that passes of up to 6 rows read.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn panels(w: &Q4_1Matrix, l: &Lanes, p: &Prepared, y: *mut f32, cols: Range<usize>) {
    let nb = l.nb;
    let out = Out {
        y,
        n: w.n,
        cols: cols.clone(),
    };
    let (g0, g1) = (cols.start / 8, cols.end.div_ceil(8));
    PANEL.with_borrow_mut(|panel| {
        panel.resize(nb * PER_BLOCK * (CHUNK + 1), _mm256_setzero_ps());
        let mut g = g0;
        while g < g1 {
            let (h, j) = (g / CHUNK, g % CHUNK);
            let width = (g1 - g).min(CHUNK - j);
            unsafe { dequantize(l, h, j, width, panel.as_mut_ptr()) };
            let positions = nb * PER_BLOCK;
            let mut i = 0;
            while i < width {
                let pair = width - i >= 2;
                let sub = &panel[i * positions..];
                for (r, rows) in balanced(p.rows, PASS_ROWS) {
                    unsafe {
                        match (rows, pair) {
                            (6, true) => pass::<6, 2>(l, p, sub, r, &out, g + i),
                            (5, true) => pass::<5, 2>(l, p, sub, r, &out, g + i),
                            (4, true) => pass::<4, 2>(l, p, sub, r, &out, g + i),
                            (3, true) => pass::<3, 2>(l, p, sub, r, &out, g + i),
                            (2, true) => pass::<2, 2>(l, p, sub, r, &out, g + i),
                            (1, true) => pass::<1, 2>(l, p, sub, r, &out, g + i),
                            (6, false) => pass::<6, 1>(l, p, sub, r, &out, g + i),
                            (5, false) => pass::<5, 1>(l, p, sub, r, &out, g + i),
                            (4, false) => pass::<4, 1>(l, p, sub, r, &out, g + i),
                            (3, false) => pass::<3, 1>(l, p, sub, r, &out, g + i),
                            (2, false) => pass::<2, 1>(l, p, sub, r, &out, g + i),
                            _ => pass::<1, 1>(l, p, sub, r, &out, g + i),
                        }
                    }
                }
                i += 2;
            }
            g += width;
        }
    });
}

/// `(first row, count)` for the fewest tiles of at most `max` rows covering `rows`, their sizes as even as can be (8
/// rows: 4 and 4, not 6 and 2).
fn balanced(rows: usize, max: usize) -> impl Iterator<Item = (usize, usize)> {
    let tiles = rows.div_ceil(max);
    (0..tiles).map(move |i| (i * rows / tiles, (i + 1) * rows / tiles - i * rows / tiles))
}

/// Groups `j..j + width` of chunk `h` as `tile` forms them, into `dst`, one panel per pair of groups: position k of
/// the K + K/32 for group j + i at `dst[(i / 2)·2·positions + 2k + i % 2]`.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dequantize(l: &Lanes, h: usize, j: usize, width: usize, dst: *mut __m256) {
    let nb = l.nb;
    let (mut d, mut m) = ([_mm256_setzero_ps(); CHUNK], [_mm256_setzero_ps(); CHUNK]);
    for b in 0..nb {
        let qb = unsafe { l.q.as_ptr().add((h * nb + b) * 4 * CHUNK + j) };
        unsafe { halves::<CHUNK>(l.dm.as_ptr().add((h * nb + b) * CHUNK), &mut d, &mut m) };
        let ahead = qb.wrapping_sub(j).cast::<i8>().wrapping_add(PREFETCH);
        for line in 0..2 * CHUNK {
            _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64 * line));
        }
        for i in 0..width {
            let dp = unsafe { d.as_ptr().add(j + i) };
            // Group i's pair of the panel, position 33b on.
            let at = unsafe { dst.add((i / 2) * 2 * nb * PER_BLOCK + 2 * b * PER_BLOCK + i % 2) };
            for o in 0..4 {
                let qo = unsafe { qb.add(o * CHUNK + i) };
                // SAFETY: positions below nb · PER_BLOCK, groups below CHUNK: inside the panel.
                unsafe {
                    let row = at.add(2 * 8 * o);
                    row.write(weight::<0>(qo, dp));
                    row.add(2).write(weight::<1>(qo, dp));
                    row.add(4).write(weight::<2>(qo, dp));
                    row.add(6).write(weight::<3>(qo, dp));
                    row.add(8).write(weight::<4>(qo, dp));
                    row.add(10).write(weight::<5>(qo, dp));
                    row.add(12).write(weight::<6>(qo, dp));
                    row.add(14).write(weight::<7>(qo, dp));
                }
            }
            unsafe { at.add(2 * BLOCK).write(m[j + i]) };
        }
    }
}

/// Rows `r0..r0 + R` against the `C` groups of `panel` from group `g`: per (row, group) one accumulator over the
/// panel's positions in order, each position's activation broadcast.
#[target_feature(enable = "avx2,fma")]
unsafe fn pass<const R: usize, const C: usize>(
    l: &Lanes,
    p: &Prepared,
    panel: &[__m256],
    r0: usize,
    out: &Out,
    g: usize,
) {
    let positions = l.nb * PER_BLOCK;
    let xs: [*const f32; R] = std::array::from_fn(|r| unsafe { p.xs.as_ptr().add((r0 + r) * positions) });
    let wp = panel.as_ptr();
    let mut acc = [[_mm256_setzero_ps(); C]; R];
    for k in 0..positions {
        let wv: [__m256; C] = std::array::from_fn(|i| unsafe { *wp.add(2 * k + i) });
        for r in 0..R {
            let x = unsafe { _mm256_broadcast_ss(&*xs[r].add(k)) };
            for i in 0..C {
                acc[r][i] = _mm256_fmadd_ps(wv[i], x, acc[r][i]);
            }
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        for (i, &v) in acc.iter().enumerate() {
            unsafe { out.put(r0 + r, g + i, v) };
        }
    }
}
