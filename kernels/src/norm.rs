//! RMS normalization of one row with a residual added first: ONNX Runtime 1.31's `SkipSimplifiedLayerNormalization`
//! in f32, operation for operation, so the `MatMulQ4_1` it folds into gives the very bits of the node it replaces
//! (`tests/norm.rs`). Its plain `SimplifiedLayerNormalization` sums in another order: without a residual, this is not
//! that node's arithmetic.

/// For every row of `x` (`[rows][K]`, K = `gamma.len()`): `s = x + skip` (or `x`), written to `sum` when asked;
/// `out = s / sqrt(Σ s² / K + eps) · gamma`, every step in f32 in ONNX Runtime's order (the squares summed one by one
/// from the first, a division then a product per element). Up to 8 rows sum their squares side by side: each row's
/// sum is one chain of K dependent additions, so one row at a time waited on the adder's latency (162 rows of 576: 110
/// → 55 µs on one thread).
pub fn rms_norm(x: &[f32], skip: Option<&[f32]>, gamma: &[f32], eps: f32, sum: Option<&mut [f32]>, out: &mut [f32]) {
    let k = gamma.len();
    assert!(k > 0 && x.len().is_multiple_of(k) && out.len() == x.len() && skip.is_none_or(|s| s.len() == x.len()));
    match skip {
        Some(skip) => {
            for ((o, &a), &b) in out.iter_mut().zip(x).zip(skip) {
                *o = a + b;
            }
        }
        None => out.copy_from_slice(x),
    }
    if let Some(sum) = sum {
        sum.copy_from_slice(out);
    }
    for rows in out.chunks_mut(8 * k) {
        let mut sq = [0f32; 8];
        let n = rows.len() / k;
        match n {
            1 => sq[..1].copy_from_slice(&squares::<1>(rows, k)),
            2 => sq[..2].copy_from_slice(&squares::<2>(rows, k)),
            3 => sq[..3].copy_from_slice(&squares::<3>(rows, k)),
            4 => sq[..4].copy_from_slice(&squares::<4>(rows, k)),
            5 => sq[..5].copy_from_slice(&squares::<5>(rows, k)),
            6 => sq[..6].copy_from_slice(&squares::<6>(rows, k)),
            7 => sq[..7].copy_from_slice(&squares::<7>(rows, k)),
            _ => sq = squares::<8>(rows, k),
        }
        for (row, &squares) in rows.chunks_exact_mut(k).zip(&sq) {
            let rms = (squares / k as f32 + eps).sqrt();
            for (o, &g) in row.iter_mut().zip(gamma) {
                *o = *o / rms * g;
            }
        }
    }
}

/// `Σ v²` of each of the `R` rows of `rows` (`[R][k]`), each in order from its first element, the rows side by side.
fn squares<const R: usize>(rows: &[f32], k: usize) -> [f32; R] {
    let rows: [&[f32]; R] = std::array::from_fn(|r| &rows[r * k..(r + 1) * k]);
    let mut acc = [0f32; R];
    for i in 0..k {
        for (a, row) in acc.iter_mut().zip(rows) {
            let v = row[i];
            *a += v * v;
        }
    }
    acc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_row_is_scaled_to_unit_root_mean_square_times_gamma() {
        let x = [3.0f32, -4.0, 0.0, 0.0];
        let gamma = [1.0f32, 2.0, 1.0, 1.0];
        let mut out = [0f32; 4];
        rms_norm(&x, None, &gamma, 0.0, None, &mut out);
        // Σ s² / K = 25 / 4, rms = 2.5.
        assert_eq!(out, [1.2, -3.2, 0.0, 0.0]);
    }

    #[test]
    fn the_residual_is_added_first_and_handed_back() {
        let (x, skip, gamma) = ([1.0f32, 2.0], [2.0f32, 2.0], [1.0f32, 1.0]);
        let (mut sum, mut out) = ([0f32; 2], [0f32; 2]);
        rms_norm(&x, Some(&skip), &gamma, 1e-5, Some(&mut sum), &mut out);
        assert_eq!(sum, [3.0, 4.0]);
        let rms = (25.0f32 / 2.0 + 1e-5).sqrt();
        assert_eq!(out, [3.0 / rms, 4.0 / rms]);
    }
}
