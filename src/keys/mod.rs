//! API keys: the keys document, key format and hashing, the `KeyStore` trait and its stores, authentication and
//! per-key rate limits.
//!
//! Keys are never stored, only `sha256:<hex>` of the whole key; a request's key is hashed and looked up by that hash.
//! Nothing here logs a key or a hash (key ids are public and safe to log).

pub mod auth;
pub mod cache;
pub mod document;
pub mod file;
pub mod key;
pub mod rate;
pub mod secrets;

pub use auth::{authenticate, authorize, presented_key, AuthError, AuthorizedKey, Credentials};
pub use cache::{CachePolicy, CachedDocument, DEFAULT_CACHE_TTL, MAX_REFRESH_INTERVAL};
pub use document::{DocumentError, KeyRecord, KeysDocument, ALL_MODELS};
pub use file::{
    create_with_first_key, load_file, load_or_empty, save_file, FileKeyStore, KeysFileError, DEFAULT_KEYS_FILE,
};
pub use key::{generate_id, generate_key, hash_key, is_well_formed_key, RandomError, KEY_PREFIX};
pub use rate::{LimitKind, Limits, RateLimited, RateLimiter};
pub use secrets::{SecretsError, SecretsManagerKeyStore};

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{PoisonError, RwLock};

/// A boxed, `Send` future: what [`KeyStore`] methods return, so the trait stays object-safe.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Where key records come from (a JSON file locally, Secrets Manager on Lambda).
///
/// Hand-written boxed futures instead of `async fn` in the trait: native async trait methods are not object-safe,
/// and the router keeps an `Arc<dyn KeyStore>`; this also avoids the `async-trait` macro for two methods.
pub trait KeyStore: Send + Sync {
    /// The record whose `hash` is `hash` (`sha256:<hex>`), `Ok(None)` if no such key; an error only when the store
    /// cannot answer at all (it never loaded a document).
    fn lookup<'a>(&'a self, hash: &'a str) -> BoxFuture<'a, Result<Option<KeyRecord>, KeyStoreError>>;

    /// Loads the document now, whatever the cache says (at start-up, to fail fast on a broken keys source).
    fn refresh(&self) -> BoxFuture<'_, Result<(), KeyStoreError>>;
}

/// A key store that cannot answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyStoreError {
    /// No keys document was ever loaded (or the forced refresh failed): requests must be refused (fail closed).
    #[error("API keys unavailable: {0}")]
    Unavailable(String),
}

/// A fixed, in-memory key store (tests, and embedding without a keys source).
#[derive(Debug, Default)]
pub struct MemoryKeyStore {
    by_hash: RwLock<HashMap<String, KeyRecord>>,
}

impl MemoryKeyStore {
    /// A store serving `document`.
    pub fn new(document: KeysDocument) -> Self {
        let store = Self::default();
        store.replace(document);
        store
    }

    /// Serves `document` from now on.
    pub fn replace(&self, document: KeysDocument) {
        let index = document.into_index();
        *self.by_hash.write().unwrap_or_else(PoisonError::into_inner) = index;
    }
}

impl KeyStore for MemoryKeyStore {
    fn lookup<'a>(&'a self, hash: &'a str) -> BoxFuture<'a, Result<Option<KeyRecord>, KeyStoreError>> {
        let found = self
            .by_hash
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(hash)
            .cloned();
        Box::pin(std::future::ready(Ok(found)))
    }

    fn refresh(&self) -> BoxFuture<'_, Result<(), KeyStoreError>> {
        Box::pin(std::future::ready(Ok(())))
    }
}

/// Helpers shared by this module's tests.
#[cfg(test)]
pub(crate) mod test_util {
    use std::future::Future;
    use std::sync::Arc;
    use std::task::{Context, Poll, Wake, Waker};

    struct Unpark(std::thread::Thread);

    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }

    /// Runs a future to completion on this thread (the stores' futures need no runtime).
    pub fn block_on<F: Future>(fut: F) -> F::Output {
        let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
        let mut cx = Context::from_waker(&waker);
        let mut fut = std::pin::pin!(fut);
        loop {
            match fut.as_mut().poll(&mut cx) {
                Poll::Ready(v) => return v,
                Poll::Pending => std::thread::park(),
            }
        }
    }

    /// A fresh, empty directory under the system temp dir, removed on drop.
    pub struct TempDir(pub std::path::PathBuf);

    impl TempDir {
        /// Creates it.
        pub fn new() -> Self {
            use std::sync::atomic::{AtomicUsize, Ordering};
            static N: AtomicUsize = AtomicUsize::new(0);
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos());
            let dir = std::env::temp_dir().join(format!(
                "lambda-llm-keys-{}-{}-{nanos}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_util::block_on;
    use super::*;

    #[test]
    fn the_trait_is_object_safe_and_its_futures_are_send() {
        fn assert_send<T: Send>(_: &T) {}
        let key = "sk-llm-0123456789012345678901234567890123456789";
        let doc = KeysDocument {
            keys: vec![KeyRecord::new("key_a", "a", hash_key(key))],
            ..Default::default()
        };
        let store: std::sync::Arc<dyn KeyStore> = std::sync::Arc::new(MemoryKeyStore::new(doc));
        let hash = hash_key(key);
        let fut = store.lookup(&hash);
        assert_send(&fut);
        assert_eq!(block_on(fut).unwrap().unwrap().id, "key_a");
        assert_eq!(block_on(store.lookup("sha256:00")).unwrap(), None);
        assert_eq!(block_on(store.refresh()), Ok(()));
    }
}
