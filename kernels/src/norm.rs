//! RMS normalization of one row with a residual added first: ONNX Runtime 1.31's `SkipSimplifiedLayerNormalization`
//! in f32, operation for operation, so the `MatMulQ4_1` it folds into gives the very bits of the node it replaces
//! (`tests/norm.rs`). Its plain `SimplifiedLayerNormalization` sums in another order: without a residual, this is not
//! that node's arithmetic.

/// `s = x + skip` (or `x`), written to `sum` when asked; `out = s / sqrt(Σ s² / K + eps) · gamma`, every step in f32
/// in ONNX Runtime's order (the squares summed one by one from the first, a division then a product per element).
pub fn rms_norm(x: &[f32], skip: Option<&[f32]>, gamma: &[f32], eps: f32, sum: Option<&mut [f32]>, out: &mut [f32]) {
    let k = x.len();
    assert!(gamma.len() == k && out.len() == k && skip.is_none_or(|s| s.len() == k));
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
    let mut squares = 0f32;
    for &v in out.iter() {
        squares += v * v;
    }
    let rms = (squares / k as f32 + eps).sqrt();
    for (o, &g) in out.iter_mut().zip(gamma) {
        *o = *o / rms * g;
    }
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
