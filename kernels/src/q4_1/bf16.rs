//! The AVX-512 BF16 body: the activations rounded once to bfloat16, each nibble `q` read as the bfloat16 `128 + q`
//! (its bits `0x4300 | q`), `vdpbf16ps` summing 32 products per instruction in f32, one FMA per 4 blocks for the scales.
//!
//! `Σ_b d·Σ_j (128 + q)·x̃ − Σ_b 128·d·Σ_j x̃ + Σ_b m·Σ_j x`, with `x̃` the bfloat16 activations and the minimums'
//! term on the exact ones; the products are exact in f32, so the only rounding beyond f32 sums is `x → x̃` (at most
//! 2⁻⁸ relative).

use super::avx512::{block_scales, group, put, Body};
use super::{Prepared, Q4_1Matrix};
use std::arch::x86_64::*;
use std::ops::Range;

/// This module's body for the shared drivers (`avx512::columns`).
pub(super) struct Bf16;

impl Body for Bf16 {
    /// 8 rows ran faster as two tiles of 4 (15.6 ms for the 120 layers on one thread) than in a panel (19.2 ms).
    const PANEL_ROWS: usize = 9;
    const PANEL_PASS: usize = 3;

    fn per_col(w: &Q4_1Matrix) -> usize {
        w.groups() * 5 + w.min_vectors() * 2
    }

    /// Up to 4 rows sharing each group's weight vectors.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,f16c")]
    unsafe fn tile<const R: usize>(w: &Q4_1Matrix, p: &Prepared, r0: usize, y: *mut f32, cols: Range<usize>) {
        let nb = w.blocks();
        let (ng, nh) = (w.groups(), w.min_vectors());
        let stride = ng * 128;
        let xs = unsafe { p.xh.as_ptr().add(r0 * stride) };
        let sums = unsafe { p.sums.as_ptr().add(r0 * nh * 32) };
        for c in cols {
            let (qrow, dmrow) = w.column(c);
            let mut acc = [_mm512_setzero_ps(); R];
            for g in 0..ng {
                let (v, d) = unsafe { group(qrow, dmrow, g, nb - 4 * g) };
                let wt = weights(v);
                for (r, a) in acc.iter_mut().enumerate() {
                    let xg = unsafe { xs.add(r * stride + g * 128) };
                    let x = std::array::from_fn(|t| unsafe { _mm512_loadu_si512(xg.add(32 * t).cast()) });
                    *a = _mm512_fmadd_ps(dot(&wt, x), d, *a);
                }
            }
            let mut minus = [_mm512_setzero_ps(); R];
            for h in 0..nh {
                let (mv, dv) = unsafe { min_vectors(dmrow, nb, h) };
                for (r, m) in minus.iter_mut().enumerate() {
                    let s = unsafe { sums.add(r * nh * 32 + h * 32) };
                    *m = _mm512_fmadd_ps(mv, unsafe { _mm512_loadu_ps(s) }, *m);
                    *m = _mm512_fmadd_ps(dv, unsafe { _mm512_loadu_ps(s.add(16)) }, *m);
                }
            }
            for r in 0..R {
                unsafe { put(w, y, r0 + r, c, acc[r], minus[r]) };
            }
        }
    }

    /// Column `c`'s vectors, exactly as `tile` forms them, into `dst`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
    unsafe fn dequantize(w: &Q4_1Matrix, c: usize, dst: &mut [__m512]) {
        let nb = w.blocks();
        let (qrow, dmrow) = w.column(c);
        let (groups, mins) = dst.split_at_mut(w.groups() * 5);
        for (g, out) in groups.chunks_exact_mut(5).enumerate() {
            let (v, d) = unsafe { group(qrow, dmrow, g, nb - 4 * g) };
            for (o, wt) in out.iter_mut().zip(weights(v)) {
                *o = _mm512_castsi512_ps(wt);
            }
            out[4] = d;
        }
        for (h, out) in mins.chunks_exact_mut(2).enumerate() {
            let (mv, dv) = unsafe { min_vectors(dmrow, nb, h) };
            out[0] = mv;
            out[1] = dv;
        }
    }

    /// Rows `r0..r0 + R` against the `C` columns from `c0` in `panel`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,f16c")]
    #[allow(clippy::needless_range_loop)] // columns outside rows: each weight vector is loaded once per row pass
    unsafe fn pass<const R: usize, const C: usize>(
        w: &Q4_1Matrix,
        p: &Prepared,
        panel: &[__m512],
        r0: usize,
        y: *mut f32,
        c0: usize,
    ) {
        let (ng, nh) = (w.groups(), w.min_vectors());
        let stride = ng * 128;
        let per_col = ng * 5 + nh * 2;
        let xs = unsafe { p.xh.as_ptr().add(r0 * stride) };
        let sums = unsafe { p.sums.as_ptr().add(r0 * nh * 32) };
        let col = |c: usize| unsafe { panel.as_ptr().add(c * per_col) };
        let bh = |v: __m512i| -> __m512bh { unsafe { std::mem::transmute(v) } };
        let mut acc = [[_mm512_setzero_ps(); C]; R];
        for g in 0..ng {
            // `dot`'s chains, one step of every (row, column) at a time, so the chains overlap.
            let mut sum = [[_mm512_setzero_ps(); C]; R];
            for t in 0..4 {
                let x: [__m512i; R] = std::array::from_fn(|r| unsafe {
                    _mm512_loadu_si512(xs.add(r * stride + g * 128 + 32 * t).cast())
                });
                for c in 0..C {
                    let wt = _mm512_castps_si512(unsafe { *col(c).add(g * 5 + t) });
                    for r in 0..R {
                        sum[r][c] = _mm512_dpbf16_ps(sum[r][c], bh(wt), bh(x[r]));
                    }
                }
            }
            for c in 0..C {
                let d = unsafe { *col(c).add(g * 5 + 4) };
                for r in 0..R {
                    acc[r][c] = _mm512_fmadd_ps(sum[r][c], d, acc[r][c]);
                }
            }
        }
        let mut minus = [[_mm512_setzero_ps(); C]; R];
        for h in 0..nh {
            for c in 0..C {
                let v = unsafe { col(c).add(ng * 5 + 2 * h) };
                let (mv, dv) = unsafe { (*v, *v.add(1)) };
                for r in 0..R {
                    let s = unsafe { sums.add(r * nh * 32 + h * 32) };
                    minus[r][c] = _mm512_fmadd_ps(mv, unsafe { _mm512_loadu_ps(s) }, minus[r][c]);
                    minus[r][c] = _mm512_fmadd_ps(dv, unsafe { _mm512_loadu_ps(s.add(16)) }, minus[r][c]);
                }
            }
        }
        for r in 0..R {
            for c in 0..C {
                unsafe { put(w, y, r0 + r, c0 + c, acc[r][c], minus[r][c]) };
            }
        }
    }
}

/// One row of x (`nb` blocks) in the kernel's order, into `xh` (per group of 4 blocks, 4 vectors of 32 bfloat16
/// lanes: lane l holds bytes 2l, 2l + 1 of the group's nibbles, that is elements 4l .. 4l + 4 of its 128, and vector t
/// element 4l + t), and its block sums into `sums` (per 16 blocks, the sums of x, then of its bfloat16 values).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
pub(super) unsafe fn arrange(xr: &[f32], nb: usize, xh: &mut [u16], sums: &mut [f32]) {
    debug_assert_eq!(xr.len(), nb * 32);
    sums.fill(0.0);
    for (g, out) in xh.chunks_exact_mut(128).enumerate() {
        let left = nb - 4 * g;
        let x: [__m512; 8] = std::array::from_fn(|i| {
            if i / 2 < left {
                unsafe { _mm512_loadu_ps(xr.as_ptr().add(128 * g + 16 * i)) }
            } else {
                _mm512_setzero_ps()
            }
        });
        // Block j's 32 values, rounded to nearest even, in order.
        let h: [__m512i; 4] = std::array::from_fn(|j| unsafe {
            std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(x[2 * j + 1], x[2 * j]))
        });
        for t in 0..4i16 {
            // Lane l: element 4(l % 8) + t of block l / 8 (the first or second operand by (l / 8) % 2).
            let lanes: [i16; 32] = std::array::from_fn(|l| (l / 8 % 2 * 32 + 4 * (l % 8)) as i16 + t);
            let idx = unsafe { _mm512_loadu_si512(lanes.as_ptr().cast()) };
            let v = _mm512_mask_blend_epi16(
                0xFFFF_0000,
                _mm512_permutex2var_epi16(h[0], idx, h[1]),
                _mm512_permutex2var_epi16(h[2], idx, h[3]),
            );
            unsafe { _mm512_storeu_si512(out.as_mut_ptr().add(32 * t as usize).cast(), v) };
        }
        for j in 0..left.min(4) {
            let b = 4 * g + j;
            let at = (b / 16) * 32 + b % 16;
            sums[at] = _mm512_reduce_add_ps(_mm512_add_ps(x[2 * j], x[2 * j + 1]));
            let bh = |v: __m256i| unsafe { std::mem::transmute::<__m256i, __m256bh>(v) };
            let lo = _mm512_cvtpbh_ps(bh(_mm512_castsi512_si256(h[j])));
            let hi = _mm512_cvtpbh_ps(bh(_mm512_extracti64x4_epi64::<1>(h[j])));
            sums[at + 16] = _mm512_reduce_add_ps(_mm512_add_ps(lo, hi));
        }
    }
}

/// The 4 weight vectors of a group: nibble t of every 16-bit lane as the bfloat16 `128 + q`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
fn weights(v: __m512i) -> [__m512i; 4] {
    let mask = _mm512_set1_epi16(0x0F);
    let magic = _mm512_set1_epi16(0x4300);
    [
        _mm512_ternarylogic_epi32::<0xEA>(v, mask, magic),
        _mm512_ternarylogic_epi32::<0xEA>(_mm512_srli_epi16::<4>(v), mask, magic),
        _mm512_ternarylogic_epi32::<0xEA>(_mm512_srli_epi16::<8>(v), mask, magic),
        _mm512_or_si512(_mm512_srli_epi16::<12>(v), magic),
    ]
}

/// `Σ_t w_t·x_t` over a group, per lane pair, in one chain.
#[inline]
#[target_feature(enable = "avx512f,avx512bf16")]
fn dot(w: &[__m512i; 4], x: [__m512i; 4]) -> __m512 {
    let bh = |v: __m512i| -> __m512bh { unsafe { std::mem::transmute(v) } };
    let mut a = _mm512_dpbf16_ps(_mm512_setzero_ps(), bh(w[0]), bh(x[0]));
    a = _mm512_dpbf16_ps(a, bh(w[1]), bh(x[1]));
    a = _mm512_dpbf16_ps(a, bh(w[2]), bh(x[2]));
    _mm512_dpbf16_ps(a, bh(w[3]), bh(x[3]))
}

/// The minimums and −128·d of blocks `16h..16h + 16` of a column (`nb` blocks), zeros past the last.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
unsafe fn min_vectors(dmrow: *const u16, nb: usize, h: usize) -> (__m512, __m512) {
    let (d, m) = unsafe { block_scales(dmrow, nb, h) };
    (m, _mm512_mul_ps(d, _mm512_set1_ps(-128.0)))
}
