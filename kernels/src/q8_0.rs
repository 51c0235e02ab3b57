//! Exact Q8_0 matrix product `y = x · Wᵀ` with `W = d·(u − 128)` per 32-block, in f32 (the LM head).
//!
//! Layouts are the artifact's: `u` is `[N][K/32][32]` bytes, each weight plus 128 (the embedding's
//! `GatherBlockQuantized` form); `d` is `[N][K/32]` f32. The result is `Σ_b d·(Σ_j u·x − 128·Σ_j x)`: every product
//! in f32, unlike `MatMulNBits` at accuracy level 4, which rounds the activations to int8.

use crate::q4_1::{check_shape, Isa, BLOCK};
use std::ops::Range;

/// One Q8_0 weight matrix, borrowed from the session's initializers.
#[derive(Clone, Copy, Debug)]
pub struct Q8_0Matrix<'w> {
    pub k: usize,
    pub n: usize,
    u: &'w [u8],
    d: &'w [f32],
}

/// Per-call block sums of the activations, reused between calls.
#[derive(Default)]
pub struct Prepared8 {
    rows: usize,
    sums: Vec<f32>,
}

impl<'w> Q8_0Matrix<'w> {
    /// Checks every length against `k` and `n`.
    pub fn new(k: usize, n: usize, u: &'w [u8], d: &'w [f32]) -> Result<Self, String> {
        check_shape(k, n, &[("weights", u.len(), BLOCK), ("scales", d.len(), 1)])?;
        Ok(Self { k, n, u, d })
    }

    /// The block sums of `rows` rows of `x` (`[rows][K]`) for `columns`.
    pub fn prepare(&self, x: &[f32], rows: usize, p: &mut Prepared8) {
        debug_assert_eq!(x.len(), rows * self.k);
        p.rows = rows;
        p.sums.clear();
        p.sums.extend(x.chunks_exact(BLOCK).map(|b| b.iter().sum::<f32>()));
    }

    /// Writes `y[r][c]` for every row of `x` (the one `p` was prepared from) and every column in `cols` (`y` is
    /// `[rows][N]`).
    ///
    /// # Safety
    /// `y` must point to `rows × N` floats, and no other thread may touch these columns meanwhile.
    pub unsafe fn columns(&self, isa: Isa, x: &[f32], p: &Prepared8, y: *mut f32, cols: Range<usize>) {
        debug_assert_eq!(x.len(), p.rows * self.k);
        match isa {
            #[cfg(target_arch = "x86_64")]
            // The LM head stays in f32 under the BF16 body too.
            Isa::Avx512 | Isa::Avx512Bf16 => unsafe { avx512::columns(self, x, p, y, cols) },
            _ => unsafe { self.columns_portable(x, p, y, cols) },
        }
    }

    unsafe fn columns_portable(&self, xs: &[f32], p: &Prepared8, y: *mut f32, cols: Range<usize>) {
        let (k, nb) = (self.k, self.k / BLOCK);
        for r in 0..p.rows {
            for c in cols.clone() {
                let mut acc = 0f32;
                for b in 0..nb {
                    let u = &self.u[c * k + b * BLOCK..c * k + (b + 1) * BLOCK];
                    let x = &xs[r * k + b * BLOCK..r * k + (b + 1) * BLOCK];
                    let dot: f32 = u.iter().zip(x).map(|(&u, &x)| u as f32 * x).sum();
                    acc += self.d[c * nb + b] * (dot - 128.0 * p.sums[r * nb + b]);
                }
                unsafe { *y.add(r * self.n + c) = acc };
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    //! 16 bytes at a time widened to 16 floats (`vpmovzxbd` + `vcvtdq2ps`), shared by up to 4 rows.
    use super::{Prepared8, Q8_0Matrix, BLOCK};
    use crate::q4_1::row_tiles;
    use std::arch::x86_64::*;
    use std::ops::Range;

    pub(super) unsafe fn columns(w: &Q8_0Matrix, x: &[f32], p: &Prepared8, y: *mut f32, cols: Range<usize>) {
        for (r, rows) in row_tiles(p.rows, 4) {
            unsafe {
                match rows {
                    1 => tile::<1>(w, x, p, r, y, cols.clone()),
                    2 => tile::<2>(w, x, p, r, y, cols.clone()),
                    3 => tile::<3>(w, x, p, r, y, cols.clone()),
                    _ => tile::<4>(w, x, p, r, y, cols.clone()),
                }
            }
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn tile<const R: usize>(
        w: &Q8_0Matrix,
        xs: &[f32],
        p: &Prepared8,
        r0: usize,
        y: *mut f32,
        cols: Range<usize>,
    ) {
        let (k, nb) = (w.k, w.k / BLOCK);
        for c in cols {
            let row = unsafe { w.u.as_ptr().add(c * k) };
            _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(4 * k).cast());
            let mut tot = [_mm512_setzero_ps(); R];
            let mut corr = [0f32; R];
            for b in 0..nb {
                let (lo, hi) = unsafe {
                    (
                        _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(row.add(b * BLOCK).cast()))),
                        _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(row.add(b * BLOCK + 16).cast()))),
                    )
                };
                let d = w.d[c * nb + b];
                for (i, (t, corr)) in tot.iter_mut().zip(&mut corr).enumerate() {
                    let x = unsafe { xs.as_ptr().add((r0 + i) * k + b * BLOCK) };
                    let block = unsafe {
                        _mm512_fmadd_ps(hi, _mm512_loadu_ps(x.add(16)), _mm512_mul_ps(lo, _mm512_loadu_ps(x)))
                    };
                    *t = _mm512_fmadd_ps(block, _mm512_set1_ps(d), *t);
                    *corr += d * p.sums[(r0 + i) * nb + b];
                }
            }
            for (i, (t, corr)) in tot.iter().zip(corr).enumerate() {
                unsafe { *y.add((r0 + i) * w.n + c) = _mm512_reduce_add_ps(*t) - 128.0 * corr };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_dequantized_reference() {
        let mut s = 0x2545_F491_4F6C_DD1Du64;
        let mut next = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        let mut isas = vec![Isa::Portable];
        if Isa::detect() == Isa::Avx512 {
            isas.push(Isa::Avx512);
        }
        for isa in isas {
            for (k, n, rows) in [(576, 37, 1), (576, 20, 3), (64, 5, 6), (1536, 9, 4)] {
                let nb = k / BLOCK;
                let u: Vec<u8> = (0..n * k).map(|_| next() as u8).collect();
                let d: Vec<f32> = (0..n * nb).map(|_| (next() % 1000) as f32 * 1e-5).collect();
                let x: Vec<f32> = (0..rows * k).map(|_| (next() % 2001) as f32 / 1000.0 - 1.0).collect();
                let m = Q8_0Matrix::new(k, n, &u, &d).unwrap();
                let mut p = Prepared8::default();
                m.prepare(&x, rows, &mut p);
                let mut y = vec![f32::NAN; rows * n];
                for cols in [0..n / 2, n / 2..n] {
                    unsafe { m.columns(isa, &x, &p, y.as_mut_ptr(), cols) };
                }
                for r in 0..rows {
                    // The same bits alone as beside other rows.
                    m.prepare(&x[r * k..(r + 1) * k], 1, &mut p);
                    let mut alone = vec![0f32; n];
                    unsafe { m.columns(isa, &x[r * k..(r + 1) * k], &p, alone.as_mut_ptr(), 0..n) };
                    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&alone), bits(&y[r * n..(r + 1) * n]), "{isa:?} row {r}");
                    for c in 0..n {
                        let want: f64 = (0..k)
                            .map(|j| d[c * nb + j / BLOCK] as f64 * (u[c * k + j] as f64 - 128.0) * x[r * k + j] as f64)
                            .sum();
                        let got = y[r * n + c] as f64;
                        assert!(
                            (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                            "{isa:?} K={k} r={r} c={c}: {got} vs {want}"
                        );
                    }
                }
            }
        }
        assert!(Q8_0Matrix::new(32, 2, &[0; 64], &[0.0; 2]).is_ok());
        assert!(Q8_0Matrix::new(32, 2, &[0; 63], &[0.0; 2])
            .unwrap_err()
            .contains("weights"));
        assert!(Q8_0Matrix::new(32, 2, &[0; 64], &[0.0; 3])
            .unwrap_err()
            .contains("scales"));
    }
}
