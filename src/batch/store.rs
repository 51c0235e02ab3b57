//! The two services a batch job needs, as small traits: an object store (S3) and a chunk queue (SQS).
//!
//! The job logic in `jobs.rs` sees only these traits; `s3.rs` implements them with the AWS SDK.

use std::future::Future;
use std::pin::Pin;

/// A boxed, sendable future (object-safe async trait methods).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A storage or queue failure, with the service's message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct StoreError(pub String);

/// An object read from the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Object {
    /// The bytes.
    pub bytes: Vec<u8>,
    /// Its ETag (quotes stripped).
    pub etag: String,
}

/// Objects by bucket and key.
pub trait ObjectStore: Send + Sync {
    /// The object, or `None` if there is none.
    fn get<'a>(&'a self, bucket: &'a str, key: &'a str) -> BoxFuture<'a, Result<Option<Object>, StoreError>>;
    /// Writes (or replaces) an object.
    fn put<'a>(&'a self, bucket: &'a str, key: &'a str, bytes: Vec<u8>) -> BoxFuture<'a, Result<(), StoreError>>;
    /// Creates an object only if none exists (`If-None-Match: *`); `false` when another writer was first.
    fn create<'a>(&'a self, bucket: &'a str, key: &'a str, bytes: Vec<u8>) -> BoxFuture<'a, Result<bool, StoreError>>;
    /// Keys under `prefix`.
    fn list<'a>(&'a self, bucket: &'a str, prefix: &'a str) -> BoxFuture<'a, Result<Vec<String>, StoreError>>;
}

/// Where chunk messages go.
pub trait ChunkQueue: Send + Sync {
    /// Sends one message.
    fn send<'a>(&'a self, body: String) -> BoxFuture<'a, Result<(), StoreError>>;
}
