//! lambda-llm's CPU kernels: plain slices in, plain slices out; the ONNX Runtime operators around them live in the
//! main crate (`src/engine/custom_op.rs`). A crate of its own so that `cargo test` and debug builds run it optimized.

pub mod attention;
pub mod exp;
pub mod norm;
pub mod q4_1;
pub mod q8_0;
pub mod swiglu;
