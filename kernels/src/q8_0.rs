//! Exact Q8_0 matrix product `y = x · Wᵀ` with `W = d·(u − 128)` per 32-block, in f32 (the LM head).
//!
//! Layouts are the artifact's: `u` is `[N][K/32][32]` bytes, each weight plus 128 (the embedding's
//! `GatherBlockQuantized` form); `d` is `[N][K/32]` f32, GGUF's half-precision scales widened, so every weight
//! `d·(u − 128)` (11 by 8 significant bits) is exact in f32. The result is `Σ w·x` over the dequantized weights, every
//! product in f32, unlike `MatMulNBits` at accuracy level 4, which rounds the activations to int8.

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

impl<'w> Q8_0Matrix<'w> {
    /// Checks every length against `k` and `n`.
    pub fn new(k: usize, n: usize, u: &'w [u8], d: &'w [f32]) -> Result<Self, String> {
        check_shape(k, n, &[("weights", u.len(), BLOCK), ("scales", d.len(), 1)])?;
        Ok(Self { k, n, u, d })
    }

    /// Writes `y[r][c]` for every row of `x` (`[rows][K]`) and every column in `cols` (`y` is `[rows][N]`).
    ///
    /// # Safety
    /// `y` must point to `rows × N` floats, and no other thread may touch these columns meanwhile.
    pub unsafe fn columns(&self, isa: Isa, x: &[f32], y: *mut f32, cols: Range<usize>) {
        debug_assert_eq!(x.len() % self.k, 0);
        match isa {
            #[cfg(target_arch = "x86_64")]
            // The LM head stays in f32 under the BF16 body too.
            Isa::Avx512 | Isa::Avx512Bf16 => unsafe { avx512::columns(self, x, y, cols) },
            #[cfg(target_arch = "x86_64")]
            // The LM head stays in f32 under the int8 body too.
            Isa::Avx2 | Isa::Avx2Int8 => unsafe { avx2::columns(self, x, y, cols) },
            _ => unsafe { self.columns_portable(x, y, cols) },
        }
    }

    unsafe fn columns_portable(&self, xs: &[f32], y: *mut f32, cols: Range<usize>) {
        let (k, nb) = (self.k, self.k / BLOCK);
        for (r, x) in xs.chunks_exact(k).enumerate() {
            for c in cols.clone() {
                let mut acc = 0f32;
                for (j, (&u, &x)) in self.u[c * k..(c + 1) * k].iter().zip(x).enumerate() {
                    acc += self.d[c * nb + j / BLOCK] * (u as f32 - 128.0) * x;
                }
                unsafe { *y.add(r * self.n + c) = acc };
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    //! 16 weights at a time widened to floats (`vpmovsxbd` + `vcvtdq2ps`) and scaled, shared by up to 8 rows, each
    //! summing them in two chains (a block's two halves).
    use super::{Q8_0Matrix, BLOCK};
    use crate::q4_1::row_tiles;
    use std::arch::x86_64::*;
    use std::ops::Range;

    pub(super) unsafe fn columns(w: &Q8_0Matrix, x: &[f32], y: *mut f32, cols: Range<usize>) {
        for (r, rows) in row_tiles(x.len() / w.k, 8) {
            unsafe {
                match rows {
                    1 => tile::<1>(w, x, r, y, cols.clone()),
                    2 => tile::<2>(w, x, r, y, cols.clone()),
                    3 => tile::<3>(w, x, r, y, cols.clone()),
                    4 => tile::<4>(w, x, r, y, cols.clone()),
                    5 => tile::<5>(w, x, r, y, cols.clone()),
                    6 => tile::<6>(w, x, r, y, cols.clone()),
                    7 => tile::<7>(w, x, r, y, cols.clone()),
                    _ => tile::<8>(w, x, r, y, cols.clone()),
                }
            }
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn tile<const R: usize>(w: &Q8_0Matrix, xs: &[f32], r0: usize, y: *mut f32, cols: Range<usize>) {
        let (k, nb) = (w.k, w.k / BLOCK);
        let x = unsafe { xs.as_ptr().add(r0 * k) };
        for c in cols {
            let row = unsafe { w.u.as_ptr().add(c * k) };
            _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(4 * k).cast());
            let mut acc = [[_mm512_setzero_ps(); 2]; R];
            for b in 0..nb {
                // u − 128 as a signed byte is u with its top bit flipped.
                let bytes = unsafe { _mm256_loadu_si256(row.add(b * BLOCK).cast()) };
                let q = _mm256_xor_si256(bytes, _mm256_set1_epi8(-128));
                let d = _mm512_set1_ps(w.d[c * nb + b]);
                let half = |h: __m128i| _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(h)), d);
                let wv = [half(_mm256_castsi256_si128(q)), half(_mm256_extracti128_si256::<1>(q))];
                for (r, chains) in acc.iter_mut().enumerate() {
                    let xb = unsafe { x.add(r * k + b * BLOCK) };
                    for (i, chain) in chains.iter_mut().enumerate() {
                        *chain = _mm512_fmadd_ps(wv[i], unsafe { _mm512_loadu_ps(xb.add(16 * i)) }, *chain);
                    }
                }
            }
            for (r, chains) in acc.iter().enumerate() {
                let sum = _mm512_add_ps(chains[0], chains[1]);
                unsafe { *y.add((r0 + r) * w.n + c) = crate::q4_1::reduce(sum) };
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    //! 8 weights at a time widened to floats (`vpmovzxbd`, minus 128, `vcvtdq2ps`) and scaled, shared by up to 4 rows;
    //! one row runs 2 columns at once. Each (row, column) sums a block's 4 vectors in 2 chains (even and odd), so a
    //! row's bits do not depend on the rows or columns beside it.
    use super::{Q8_0Matrix, BLOCK};
    use crate::q4_1::{column_steps, reduce8, row_tiles};
    use std::arch::x86_64::*;
    use std::ops::Range;

    /// How far ahead (bytes) each block fetches the weights.
    const PREFETCH: usize = 2048;

    pub(super) unsafe fn columns(w: &Q8_0Matrix, x: &[f32], y: *mut f32, cols: Range<usize>) {
        for (r, rows) in row_tiles(x.len() / w.k, 4) {
            unsafe {
                match rows {
                    1 => by::<1, 2>(w, x, r, y, cols.clone()),
                    2 => by::<2, 1>(w, x, r, y, cols.clone()),
                    3 => by::<3, 1>(w, x, r, y, cols.clone()),
                    _ => by::<4, 1>(w, x, r, y, cols.clone()),
                }
            }
        }
    }

    /// Rows `r0..r0 + R` over `cols`, `C` columns at a time (the last ones one by one).
    unsafe fn by<const R: usize, const C: usize>(
        w: &Q8_0Matrix,
        x: &[f32],
        r0: usize,
        y: *mut f32,
        cols: Range<usize>,
    ) {
        for (c, width) in column_steps(cols, C) {
            match width {
                1 => unsafe { tile::<R, 1>(w, x, r0, y, c) },
                _ => unsafe { tile::<R, C>(w, x, r0, y, c) },
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn tile<const R: usize, const C: usize>(w: &Q8_0Matrix, xs: &[f32], r0: usize, y: *mut f32, c0: usize) {
        let (k, nb) = (w.k, w.k / BLOCK);
        let x = unsafe { xs.as_ptr().add(r0 * k) };
        let row: [*const u8; C] = std::array::from_fn(|c| unsafe { w.u.as_ptr().add((c0 + c) * k) });
        for &row in &row {
            _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(4 * k).cast());
        }
        let mut acc = [[[_mm256_setzero_ps(); 2]; C]; R];
        for b in 0..nb {
            for (c, &row) in row.iter().enumerate() {
                _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(b * BLOCK + PREFETCH).cast());
                let d = _mm256_set1_ps(w.d[(c0 + c) * nb + b]);
                for i in 0..4 {
                    let bytes = unsafe { _mm_loadl_epi64(row.add(b * BLOCK + 8 * i).cast()) };
                    let q = _mm256_sub_epi32(_mm256_cvtepu8_epi32(bytes), _mm256_set1_epi32(128));
                    let wv = _mm256_mul_ps(_mm256_cvtepi32_ps(q), d);
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let xv = unsafe { _mm256_loadu_ps(x.add(r * k + b * BLOCK + 8 * i)) };
                        acc[c][i % 2] = _mm256_fmadd_ps(wv, xv, acc[c][i % 2]);
                    }
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            for (c, chains) in acc.iter().enumerate() {
                unsafe { *y.add((r0 + r) * w.n + c0 + c) = reduce8(_mm256_add_ps(chains[0], chains[1])) };
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
        for isa in Isa::available() {
            for (k, n, rows) in [
                (576, 37, 1),
                (576, 20, 3),
                (64, 5, 6),
                (1536, 9, 4),
                (576, 11, 8),
                (96, 7, 11),
            ] {
                let nb = k / BLOCK;
                let u: Vec<u8> = (0..n * k).map(|_| next() as u8).collect();
                let d: Vec<f32> = (0..n * nb).map(|_| (next() % 1000) as f32 * 1e-5).collect();
                let x: Vec<f32> = (0..rows * k).map(|_| (next() % 2001) as f32 / 1000.0 - 1.0).collect();
                let m = Q8_0Matrix::new(k, n, &u, &d).unwrap();
                let mut y = vec![f32::NAN; rows * n];
                for cols in [0..n / 2, n / 2..n] {
                    unsafe { m.columns(isa, &x, y.as_mut_ptr(), cols) };
                }
                for r in 0..rows {
                    // The same bits alone as beside other rows.
                    let mut alone = vec![0f32; n];
                    unsafe { m.columns(isa, &x[r * k..(r + 1) * k], alone.as_mut_ptr(), 0..n) };
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
