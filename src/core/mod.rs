//! The pure generation core: validation, sampling, stop matching, detokenization and the generation loop.
//!
//! Nothing here knows about ONNX Runtime, AWS, HTTP or async runtimes; the engine implements [`Model`] and
//! [`TokenDecoder`], and the adapters turn wire requests into [`GenerationRequest`]s.

pub mod batch;
pub mod detok;
pub mod generate;
pub mod model;
pub mod sampling;
pub mod sequence;
pub mod stop;
pub mod validate;

pub use batch::{BatchModel, Batcher, Listener, OneAtATime, SeqId, Started, PREFILL_CHUNK};
pub use detok::DetokStream;
pub use generate::{
    generate, Delta, FinishReason, Generation, GenerationRequest, Timings, TokenLogprob, TopLogprob, Usage,
};
pub use model::{Model, ModelError, ModelInfo, TokenDecoder};
pub use sampling::{LogitsProcessor, SamplingParams};
pub use sequence::Sequence;
pub use stop::StopMatcher;
pub use validate::{RawSampling, ValidationError};
