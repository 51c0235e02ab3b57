//! The exact AVX2 body (x86-64 without AVX-512). The weights are laid out again once per matrix (`Lanes`) with one
//! column per 32-bit lane, so that a register of 8 weights holds 8 columns at one position of K, and each row's
//! activation meets it broadcast. A (row, column) then sums in one lane: per block, its 32 products `16^t·q·x·16^−t`
//! in the order of K from zero (every product exact), then the running sum plus that times the block's scale `d`,
//! plus its minimum times the block's sum; its 8 columns come out together, with no sum across lanes. The scale
//! comes in once per block rather than once per weight, so a weight vector is a mask and a conversion, and one row
//! leaves the FMA pipes one operation per vector instead of two. Tiles of up to 4 rows form each weight vector once
//! in registers (`tile`; rows in tiles of 3 and 4 wherever they add up); from `PANEL_ROWS` rows each chunk of 48
//! columns is formed once into panels that passes of 6 rows × 16 columns read (`pass`: 12 partial sums). Both form
//! the same weight vectors with the same instructions and add them in the same order, so a row's bits do not depend
//! on the rows or columns beside it.
//!
//! 120 layers of the model's shapes, random weights, one thread, best of 3 alternations against the same layout with
//! the scale multiplied into each weight (two FMA-pipe operations per vector, tiles of 4 rows, panels from 9): one
//! row 4.8–5.0 against 6.4–6.6 ms, 2 rows 7.5 against 9.0, 3 rows 9.4 against 12.9, 4 rows 12.4 against 14.7, 5 rows
//! 16.3 against 21.3, 8 rows 24.0 against 28.2, 13 rows 38.3 against 40.7; but 30 rows 87–90 against 80 and 162 rows
//! 440–470 against 400–418, about 10 % slower: a pass pays two FMAs per block and partial sum where it paid one. The
//! layout is formed when the session loads (`Q4_1Matrix::settle`).

use super::{Prepared, Q4_1Matrix, BLOCK};
use std::arch::x86_64::*;
use std::ops::Range;

/// Groups of 8 columns per chunk of the layout: one row's tile takes a chunk at a time, its 6 partial sums in
/// registers (with the scale in each weight, 120 layers, one thread: one row 6.5 ms against 7.5–7.8 with chunks of 8
/// groups; 2–4 rows 9–20 % faster too). 48 columns divide every N of the model and its halves.
const CHUNK: usize = 6;
/// Floats of a prepared row per block: its 32 activations, each times `SCALE` (the inverse of the power of two its
/// weight carries), then the block's sum.
pub(super) const PER_BLOCK: usize = BLOCK + 1;
/// Nibble t of a lane is masked where it lies (t ≤ 6: `16^t·q`) or, the last, shifted to the bottom (`q`, so the
/// lane's sign bit plays no part); its activation is divided by the same power of two, which is exact, so every
/// product `q·x` is the very float it was (unless |x| < 2⁻¹⁰², where `x·2⁻²⁴` would be subnormal). A block's sum
/// of unscaled products stays finite while |x| < 7·10³⁵ (32 · 15 · |x|).
const SCALE: [f32; 8] = [
    1.0,
    1.0 / 16.0,
    1.0 / 256.0,
    1.0 / 4096.0,
    1.0 / 65536.0,
    1.0 / 1_048_576.0,
    1.0 / 16_777_216.0,
    1.0,
];
/// Rows from which a call forms panels (`panels`) instead of running tiles of 3 and 4 rows (120 layers, one thread,
/// tiles against panels: 12 rows 35.0 against 40.0 ms, 16 rows 45.9 against 49.8, 24 rows 68.7 against 70.6; from 30
/// to 48 rows within 1 % either way; 162 rows 477 against 441).
const PANEL_ROWS: usize = 32;
/// Positions of a panel per block: its 32 weight vectors, its scales, its minimums.
const PANEL_BLOCK: usize = BLOCK + 2;
/// Rows per micro-kernel over a panel: 12 partial sums, 2 weight vectors and a broadcast activation in the 16
/// registers, the running sums in memory (5 rows were no faster).
const PASS_ROWS: usize = 6;
// Rows split evenly into passes of at most PASS_ROWS give only 5 and 6 from 30 rows (6r / (r + 6) ≥ 5).
const _: () = assert!(PANEL_ROWS >= 30 && PASS_ROWS == 6);
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
/// their sum (`block_sums`').
pub(super) fn arrange(xr: &[f32], nb: usize, out: &mut [f32]) {
    debug_assert!(xr.len() == nb * BLOCK && out.len() == nb * PER_BLOCK);
    for (xb, o) in xr.chunks_exact(BLOCK).zip(out.chunks_exact_mut(PER_BLOCK)) {
        for (e, (dst, &x)) in o.iter_mut().zip(xb).enumerate() {
            *dst = x * SCALE[e % 8];
        }
        super::block_sums(xb, std::slice::from_mut(&mut o[BLOCK]));
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
    for (r0, rows) in row_split(p.rows) {
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
                    (3, 3..) => tile::<3, 3>(l, p, r0, &out, h, j),
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

/// `(first row, count)` for the tiles of `rows`: tiles of 4 and 3 rows, fours first, wherever they add up (every count
/// from 6, and 3 and 4), else the rows as they come (1, 2, 5 = 3 + 2). One and two rows cost the most per row (120
/// layers, one thread: 1 row 4.8–5.0 ms, 2 rows 7.3–7.5, 3 rows 9.2–9.4, 4 rows 12.4; 6 rows as 3 + 3 17.7 against
/// 19.7 as 4 + 2).
fn row_split(rows: usize) -> impl Iterator<Item = (usize, usize)> {
    // Threes that leave a multiple of 4: rows − 3·threes ≡ 0 (mod 4) and ≥ 0; else threes then the rest.
    let (fours, threes) = match (0..4).find(|&t| 3 * t <= rows && (rows - 3 * t).is_multiple_of(4)) {
        Some(t) => ((rows - 3 * t) / 4, t),
        None => (0, rows / 3),
    };
    let tiled = 4 * fours + 3 * threes;
    let sizes = std::iter::repeat_n(4, fours)
        .chain(std::iter::repeat_n(3, threes))
        .chain((tiled < rows).then_some(rows - tiled));
    sizes.scan(0, |r0, n| {
        let at = *r0;
        *r0 += n;
        Some((at, n))
    })
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

/// Weight t of an octet's 8 columns without its scale (`q` its 8 lanes): the nibble masked where it lies, converted
/// (`16^t·q`), or, the last, shifted down to the lane's bottom (`q`). In assembly so that the compiler neither keeps
/// the octet's lanes in registers across t nor merges their loads: each vector is one mask (or shift) and one
/// conversion, the lanes read as a memory operand.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn nibbles<const T: usize>(q: *const [u32; 8]) -> __m256 {
    let w: __m256;
    // SAFETY: reads 32 bytes at `q`; no other memory, stack or flags (the conversions are of integers below 2²⁸,
    // exact, so no MXCSR flag either).
    unsafe {
        if T < 7 {
            let mask = _mm256_set1_epi32((0xF_u32 << (4 * T)) as i32);
            std::arch::asm!(
                "vpand {w}, {mask}, ymmword ptr [{q}]",
                "vcvtdq2ps {w}, {w}",
                w = out(ymm_reg) w,
                mask = in(ymm_reg) mask,
                q = in(reg) q,
                options(readonly, nostack, preserves_flags),
            );
        } else {
            std::arch::asm!(
                "vmovdqu {w}, ymmword ptr [{q}]",
                "vpsrld {w}, {w}, 28",
                "vcvtdq2ps {w}, {w}",
                w = out(ymm_reg) w,
                q = in(reg) q,
                options(readonly, nostack, preserves_flags),
            );
        }
    }
    w
}

/// Closes a block for one (row, group): `*acc = (part·d + *acc) + m·s`, two FMAs, and leaves `part` zero for the
/// next block. In assembly so that the running sums stay in memory (they are touched once per block) and the
/// block's partial sums keep the registers.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn fold(part: &mut __m256, d: __m256, m: *const __m256, s: __m256, acc: *mut __m256) {
    // SAFETY: reads 32 bytes at `m` and at `acc`, writes 32 at `acc`; no stack or flags.
    unsafe {
        std::arch::asm!(
            "vfmadd213ps {p}, {d}, ymmword ptr [{acc}]",
            "vfmadd231ps {p}, {s}, ymmword ptr [{m}]",
            "vmovups ymmword ptr [{acc}], {p}",
            "vxorps {p}, {p}, {p}",
            p = inout(ymm_reg) *part,
            d = in(ymm_reg) d,
            s = in(ymm_reg) s,
            m = in(reg) m,
            acc = in(reg) acc,
            // Not `preserves_flags`: the FMAs set MXCSR's exception flags (inexact).
            options(nostack),
        );
    }
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

/// Rows `0..R` against groups `j..j + W` of chunk `h`; returns W. Per block, each (row, group) sums its 32 products
/// from zero in registers (`part`), then `fold` adds it times the scales, and the minimums times the block's sum, to
/// the running sum in memory.
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
    let mut part = [[_mm256_setzero_ps(); W]; R];
    let (mut d, mut m) = ([_mm256_setzero_ps(); W], [_mm256_setzero_ps(); W]);
    for b in 0..nb {
        let qb = unsafe { l.q.as_ptr().add((h * nb + b) * 4 * CHUNK + j) };
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
                        let wv = unsafe { nibbles::<$t>(qo.add(jj)) };
                        for r in 0..R {
                            part[r][jj] = _mm256_fmadd_ps(wv, x[r], part[r][jj]);
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
        unsafe { halves::<W>(l.dm.as_ptr().add((h * nb + b) * CHUNK + j), &mut d, &mut m) };
        for r in 0..R {
            let s = unsafe { _mm256_broadcast_ss(&*xs[r].add(b * PER_BLOCK + BLOCK)) };
            for jj in 0..W {
                unsafe { fold(&mut part[r][jj], d[jj], &m[jj], s, &mut acc[r][jj]) };
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
    /// A chunk's panels (`dequantize`'s weight vectors, scales and minimums).
    static PANEL: std::cell::RefCell<Vec<__m256>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Many rows: the groups of each chunk (up to 48 columns) are formed once into panels of 2 groups, `[position][group]`
/// over `PANEL_BLOCK` positions per block (its 32 weight vectors, then its scales and minimums), that passes of up to
/// 6 rows read.
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
        // A chunk's groups in pairs (an odd last group takes a pair's first half).
        panel.resize(nb * PANEL_BLOCK * CHUNK.next_multiple_of(2), _mm256_setzero_ps());
        let mut g = g0;
        while g < g1 {
            let (h, j) = (g / CHUNK, g % CHUNK);
            let width = (g1 - g).min(CHUNK - j);
            unsafe { dequantize(l, h, j, width, panel.as_mut_ptr()) };
            let positions = nb * PANEL_BLOCK;
            let mut i = 0;
            while i < width {
                let pair = width - i >= 2;
                let sub = &panel[i * positions..];
                for (r, rows) in balanced(p.rows, PASS_ROWS) {
                    unsafe {
                        // From PANEL_ROWS rows the even split gives passes of 5 and 6 rows only.
                        match (rows, pair) {
                            (6, true) => pass::<6, 2>(l, p, sub, r, &out, g + i),
                            (_, true) => pass::<5, 2>(l, p, sub, r, &out, g + i),
                            (6, false) => pass::<6, 1>(l, p, sub, r, &out, g + i),
                            (_, false) => pass::<5, 1>(l, p, sub, r, &out, g + i),
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

/// Groups `j..j + width` of chunk `h` as `tile` forms them, into `dst`, one panel per pair of groups: per block its
/// 32 weight vectors without their scales (`nibbles`), then the scales, then the minimums; position k of the
/// `PANEL_BLOCK`·K/32 for group j + i at `dst[(i / 2)·2·positions + 2k + i % 2]`.
#[target_feature(enable = "avx2,f16c")]
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
            // Group i's pair of the panel, block b's first position on.
            let at = unsafe { dst.add((i / 2) * 2 * nb * PANEL_BLOCK + 2 * b * PANEL_BLOCK + i % 2) };
            for o in 0..4 {
                let qo = unsafe { qb.add(o * CHUNK + i) };
                // SAFETY: positions below nb · PANEL_BLOCK, groups below CHUNK: inside the panel.
                unsafe {
                    let row = at.add(2 * 8 * o);
                    row.write(nibbles::<0>(qo));
                    row.add(2).write(nibbles::<1>(qo));
                    row.add(4).write(nibbles::<2>(qo));
                    row.add(6).write(nibbles::<3>(qo));
                    row.add(8).write(nibbles::<4>(qo));
                    row.add(10).write(nibbles::<5>(qo));
                    row.add(12).write(nibbles::<6>(qo));
                    row.add(14).write(nibbles::<7>(qo));
                }
            }
            unsafe {
                at.add(2 * BLOCK).write(d[j + i]);
                at.add(2 * (BLOCK + 1)).write(m[j + i]);
            }
        }
    }
}

/// Rows `r0..r0 + R` against the `C` groups of `panel` from group `g`, summing as `tile` does: per (row, group) and
/// block one partial sum over the block's 32 positions in order, each position's activation broadcast, then the
/// running sum plus it times the scales, plus the minimums times the block's sum.
#[target_feature(enable = "avx2,fma")]
unsafe fn pass<const R: usize, const C: usize>(
    l: &Lanes,
    p: &Prepared,
    panel: &[__m256],
    r0: usize,
    out: &Out,
    g: usize,
) {
    let nb = l.nb;
    let xs: [*const f32; R] = std::array::from_fn(|r| unsafe { p.xs.as_ptr().add((r0 + r) * nb * PER_BLOCK) });
    let mut acc = [[_mm256_setzero_ps(); C]; R];
    let mut part = [[_mm256_setzero_ps(); C]; R];
    for b in 0..nb {
        let wp = unsafe { panel.as_ptr().add(2 * b * PANEL_BLOCK) };
        // The block's 32 positions unrolled (a loop over its octets cost a branch miss per block).
        macro_rules! step {
            ($k:expr) => {
                let wv: [__m256; C] = std::array::from_fn(|i| unsafe { *wp.add(2 * $k + i) });
                for r in 0..R {
                    let x = unsafe { _mm256_broadcast_ss(&*xs[r].add(b * PER_BLOCK + $k)) };
                    for i in 0..C {
                        part[r][i] = _mm256_fmadd_ps(wv[i], x, part[r][i]);
                    }
                }
            };
        }
        macro_rules! octet {
            ($o:literal) => {
                step!(8 * $o);
                step!(8 * $o + 1);
                step!(8 * $o + 2);
                step!(8 * $o + 3);
                step!(8 * $o + 4);
                step!(8 * $o + 5);
                step!(8 * $o + 6);
                step!(8 * $o + 7);
            };
        }
        octet!(0);
        octet!(1);
        octet!(2);
        octet!(3);
        let d: [__m256; C] = std::array::from_fn(|i| unsafe { *wp.add(2 * BLOCK + i) });
        for r in 0..R {
            let s = unsafe { _mm256_broadcast_ss(&*xs[r].add(b * PER_BLOCK + BLOCK)) };
            for i in 0..C {
                unsafe { fold(&mut part[r][i], d[i], wp.add(2 * (BLOCK + 1) + i), s, &mut acc[r][i]) };
            }
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        for (i, &v) in acc.iter().enumerate() {
            unsafe { out.put(r0 + r, g + i, v) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::row_split;

    #[test]
    fn rows_split_into_threes_and_fours_wherever_they_add_up() {
        for rows in 1..=40 {
            let tiles: Vec<_> = row_split(rows).collect();
            let mut next = 0;
            for &(r0, n) in &tiles {
                assert!(r0 == next && (1..=4).contains(&n), "{rows} rows: {tiles:?}");
                next += n;
            }
            assert_eq!(next, rows, "{rows} rows: {tiles:?}");
            let want: &[usize] = match rows {
                1 => &[1],
                2 => &[2],
                5 => &[3, 2],
                _ => &[],
            };
            if want.is_empty() {
                assert!(tiles.iter().all(|&(_, n)| n == 3 || n == 4), "{rows} rows: {tiles:?}");
            } else {
                assert_eq!(tiles.iter().map(|&(_, n)| n).collect::<Vec<_>>(), want);
            }
        }
        assert_eq!(row_split(8).collect::<Vec<_>>(), [(0, 4), (4, 4)]);
        assert_eq!(row_split(6).collect::<Vec<_>>(), [(0, 3), (3, 3)]);
    }
}
