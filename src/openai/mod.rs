//! OpenAI wire types (serde only): requests as clients send them, responses and stream chunks as OpenAI shapes them.
//!
//! Every request field is optional and loosely typed here; `core::validate` turns them into checked values.
//! Unknown fields are ignored (serde's default), never rejected.

pub mod chat;
pub mod common;
pub mod completions;
pub mod models;

pub use chat::*;
pub use common::*;
pub use completions::*;
pub use models::*;
