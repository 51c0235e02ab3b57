//! The normalization `MatMulQ4_1` applies before its product (model.fast.onnx fuses each
//! `SkipSimplifiedLayerNormalization` into the projection after it) against ONNX Runtime's own node: the very bits.

use lambda_llm_kernels::norm::rms_norm;
use ort::session::Session;
use ort::value::Tensor;
use std::path::PathBuf;

#[test]
fn the_fused_norm_gives_onnx_runtimes_skip_simplified_layer_normalization_bit_for_bit() {
    let (_, env) = lambda_llm::engine::runtime::environment(None).expect("ONNX Runtime (run `make setup`)");
    // tests/fixtures/skip_norm.py writes this one-node graph, with SmolLM2's epsilon.
    let fixture = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/skip_norm.onnx");
    let mut session = Session::builder(env).unwrap().commit_from_file(&fixture).unwrap();
    let mut seed = 0x2545F4914F6CDD1Du64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed % 2_000_001) as f32 / 1e6 - 1.0
    };
    for (rows, k, scale) in [
        (1usize, 576usize, 1.0f32),
        (7, 576, 40.0),
        (19, 576, 0.5), // two groups of 8 rows side by side and 3 more
        (3, 1536, 0.01),
        (2, 64, 1e4),
    ] {
        let x: Vec<f32> = (0..rows * k).map(|_| next() * scale).collect();
        let skip: Vec<f32> = (0..rows * k).map(|_| next() * 3.0).collect();
        let gamma: Vec<f32> = (0..k).map(|_| 1.0 + next() / 2.0).collect();
        let outputs = session
            .run(ort::inputs![
                "x" => Tensor::from_array(([rows, k], x.clone())).unwrap(),
                "skip" => Tensor::from_array(([rows, k], skip.clone())).unwrap(),
                "gamma" => Tensor::from_array(([k], gamma.clone())).unwrap(),
            ])
            .unwrap();
        let (_, want) = outputs["y"].try_extract_tensor::<f32>().unwrap();
        let (_, want_sum) = outputs["sum"].try_extract_tensor::<f32>().unwrap();
        let (mut got, mut got_sum) = (vec![0f32; rows * k], vec![0f32; rows * k]);
        rms_norm(
            &x,
            Some(&skip),
            &gamma,
            1e-5, // SmolLM2's, the float32 the fixture holds
            Some(&mut got_sum),
            &mut got,
        );
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&got_sum), bits(want_sum), "sum, {rows}×{k}");
        assert_eq!(bits(&got), bits(want), "normalized, {rows}×{k}, scale {scale}");
    }
}
