//! lambda-llm: an OpenAI-compatible LLM API over a quantized ONNX Transformer, for AWS Lambda and the laptop.

pub mod batch;
pub mod cli;
pub mod config;
pub mod core;
pub mod engine;
pub mod http;
pub mod keys;
pub mod lambda;
pub mod openai;
pub mod telemetry;
