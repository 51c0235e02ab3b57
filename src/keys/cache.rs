//! A cached keys document over any fetch source: the rules every key store follows, as pure logic with a clock.
//!
//! The rules (DESIGN.md, "Keys document"):
//! - a loaded document is trusted for the TTL, then re-fetched (so a removed or disabled key stops within it);
//! - a key unknown to the cache triggers a refresh, at most once per refresh interval (so new keys work at once,
//!   and a flood of made-up keys cannot turn into a flood of fetches);
//! - a failed fetch (unreachable source, broken document) keeps the last good document serving;
//! - a store that never loaded a document fails closed, retrying the source at most once per refresh interval.

use super::{KeyRecord, KeyStoreError, KeysDocument};
use std::collections::HashMap;
use std::fmt::Display;
use std::future::Future;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// `KEYS_CACHE_TTL_SECONDS` default.
pub const DEFAULT_CACHE_TTL: Duration = Duration::from_secs(60);
/// The longest wait between two refreshes caused by unknown keys or failures ("a few seconds").
pub const MAX_REFRESH_INTERVAL: Duration = Duration::from_secs(5);

/// How long a document is trusted, and how often the source may be asked again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CachePolicy {
    /// A document older than this is re-fetched before it is used again (when a fetch is allowed).
    pub ttl: Duration,
    /// Minimum time between refreshes triggered by unknown keys, by a stale document, or after a failure.
    pub refresh_interval: Duration,
}

impl CachePolicy {
    /// A policy with this TTL and a refresh interval of [`MAX_REFRESH_INTERVAL`], or the TTL if shorter (a longer
    /// interval would let a stale document outlive its TTL).
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            refresh_interval: ttl.min(MAX_REFRESH_INTERVAL),
        }
    }
}

impl Default for CachePolicy {
    fn default() -> Self {
        Self::new(DEFAULT_CACHE_TTL)
    }
}

/// What a lookup should do next, decided under the lock.
#[derive(Debug, Clone, PartialEq)]
pub enum CacheStep {
    /// Answer now.
    Answer(Result<Option<KeyRecord>, KeyStoreError>),
    /// Fetch the document, give it to [`CachedDocument::store`], then ask [`CachedDocument::answer`].
    Fetch,
}

#[derive(Debug)]
struct Loaded {
    by_hash: HashMap<String, KeyRecord>,
    fetched_at: Instant,
}

#[derive(Debug, Default)]
struct State {
    loaded: Option<Loaded>,
    /// Start of the latest fetch of any kind (spaces out stale re-fetches; also covers fetches in flight).
    last_attempt: Option<Instant>,
    /// Start of the latest fetch caused by an unknown key.
    last_unknown_fetch: Option<Instant>,
    /// The latest failed fetch.
    last_failure: Option<Instant>,
    /// The latest failure's message, for the fail-closed error.
    failure: Option<String>,
}

/// The cached document and the refresh rules; holds no I/O, so a file store and a Secrets Manager store share it.
#[derive(Debug)]
pub struct CachedDocument {
    policy: CachePolicy,
    state: Mutex<State>,
}

/// Whether `interval` has passed since `since` (or nothing happened yet).
fn elapsed(since: Option<Instant>, now: Instant, interval: Duration) -> bool {
    since.is_none_or(|t| now.saturating_duration_since(t) >= interval)
}

impl CachedDocument {
    /// An empty cache (never loaded: lookups fetch, and fail closed until a fetch succeeds).
    pub fn new(policy: CachePolicy) -> Self {
        Self {
            policy,
            state: Mutex::new(State::default()),
        }
    }

    /// The policy in force.
    pub fn policy(&self) -> CachePolicy {
        self.policy
    }

    /// Whether a document was ever loaded.
    pub fn is_loaded(&self) -> bool {
        self.lock().loaded.is_some()
    }

    /// Looks `hash` up at `now`, calling `fetch` when the rules say so.
    ///
    /// The lock is never held across `fetch`, so lookups go on (from the last good document) while one is slow.
    pub async fn lookup<F, Fut, E>(
        &self,
        hash: &str,
        now: Instant,
        fetch: F,
    ) -> Result<Option<KeyRecord>, KeyStoreError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<KeysDocument, E>>,
        E: Display,
    {
        match self.plan(hash, now) {
            CacheStep::Answer(a) => a,
            CacheStep::Fetch => {
                let fetched = fetch().await.map_err(|e| e.to_string());
                self.store(fetched, now);
                self.answer(hash)
            }
        }
    }

    /// Decides, at `now`, whether to answer `hash` from the cache or to fetch first (and records the attempt).
    pub fn plan(&self, hash: &str, now: Instant) -> CacheStep {
        let policy = self.policy;
        let mut s = self.lock();
        let may_retry = elapsed(s.last_attempt, now, policy.refresh_interval);
        let (fresh, hit) = match &s.loaded {
            None => {
                // Nothing to serve: fetch unless the source failed just now (then fail closed, sparing the source).
                if elapsed(s.last_failure, now, policy.refresh_interval) {
                    s.last_attempt = Some(now);
                    return CacheStep::Fetch;
                }
                return CacheStep::Answer(Err(unavailable(&s)));
            }
            Some(l) => (
                now.saturating_duration_since(l.fetched_at) < policy.ttl,
                l.by_hash.get(hash).cloned(),
            ),
        };
        if !fresh && may_retry {
            s.last_attempt = Some(now);
            return CacheStep::Fetch;
        }
        // An unknown key may be new at the source; but not right after a failure (the source is down).
        let may_refresh_unknown = elapsed(s.last_unknown_fetch, now, policy.refresh_interval)
            && elapsed(s.last_failure, now, policy.refresh_interval);
        if hit.is_none() && may_refresh_unknown {
            s.last_attempt = Some(now);
            s.last_unknown_fetch = Some(now);
            return CacheStep::Fetch;
        }
        // Fresh, or stale with a fetch already tried within the interval (in flight, or failed): serve what we have.
        CacheStep::Answer(Ok(hit))
    }

    /// Takes the outcome of a fetch started at `started`: a document replaces the cache, an error keeps it.
    pub fn store(&self, fetched: Result<KeysDocument, String>, started: Instant) {
        let mut s = self.lock();
        match fetched {
            Ok(doc) => {
                // Two fetches may finish out of order: never replace a document with an older one.
                if s.loaded.as_ref().is_none_or(|l| l.fetched_at <= started) {
                    tracing::debug!(keys = doc.keys.len(), "keys document loaded");
                    s.loaded = Some(Loaded {
                        by_hash: doc.into_index(),
                        fetched_at: started,
                    });
                }
            }
            Err(e) => {
                if s.loaded.is_some() {
                    tracing::warn!(error = %e, "keys document refresh failed; serving the last good document");
                } else {
                    tracing::warn!(error = %e, "keys document could not be loaded; refusing requests (fail closed)");
                }
                s.last_failure = Some(started);
                s.failure = Some(e);
            }
        }
    }

    /// The answer for `hash` from what is cached now (after a fetch).
    pub fn answer(&self, hash: &str) -> Result<Option<KeyRecord>, KeyStoreError> {
        let s = self.lock();
        match &s.loaded {
            Some(l) => Ok(l.by_hash.get(hash).cloned()),
            None => Err(unavailable(&s)),
        }
    }

    /// Fetches now, whatever the rules say; `Err` if this fetch failed (even if an older document still serves).
    pub async fn refresh<F, Fut, E>(&self, now: Instant, fetch: F) -> Result<(), KeyStoreError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<KeysDocument, E>>,
        E: Display,
    {
        self.lock().last_attempt = Some(now);
        let fetched = fetch().await.map_err(|e| e.to_string());
        let outcome = fetched
            .as_ref()
            .map(|_| ())
            .map_err(|e| KeyStoreError::Unavailable(e.clone()));
        self.store(fetched, now);
        outcome
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Updates are plain assignments: a panic elsewhere cannot leave the state half-written.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn unavailable(s: &State) -> KeyStoreError {
    KeyStoreError::Unavailable(
        s.failure
            .clone()
            .unwrap_or_else(|| "keys document not loaded yet".to_owned()),
    )
}

#[cfg(test)]
mod tests {
    use super::super::test_util::block_on;
    use super::*;
    use std::cell::Cell;

    const S: fn(u64) -> Duration = Duration::from_secs;

    fn doc(hashes: &[&str]) -> KeysDocument {
        KeysDocument {
            keys: hashes
                .iter()
                .map(|h| KeyRecord::new(format!("id-{h}"), "n", *h))
                .collect(),
            ..Default::default()
        }
    }

    /// A scripted source: the document it serves (or an error), and how often it was asked.
    struct Source {
        doc: std::cell::RefCell<Result<KeysDocument, String>>,
        fetches: Cell<usize>,
    }

    impl Source {
        fn new(d: Result<KeysDocument, String>) -> Self {
            Self {
                doc: std::cell::RefCell::new(d),
                fetches: Cell::new(0),
            }
        }

        fn set(&self, d: Result<KeysDocument, String>) {
            *self.doc.borrow_mut() = d;
        }

        fn lookup(&self, cache: &CachedDocument, hash: &str, now: Instant) -> Result<Option<String>, KeyStoreError> {
            let fut = cache.lookup(hash, now, || {
                self.fetches.set(self.fetches.get() + 1);
                std::future::ready(self.doc.borrow().clone())
            });
            block_on(fut).map(|r| r.map(|k| k.id))
        }
    }

    fn cache(ttl: u64) -> CachedDocument {
        CachedDocument::new(CachePolicy::new(S(ttl)))
    }

    #[test]
    fn the_policy_interval_never_exceeds_the_ttl() {
        assert_eq!(
            CachePolicy::default(),
            CachePolicy {
                ttl: S(60),
                refresh_interval: S(5)
            }
        );
        assert_eq!(CachePolicy::new(S(2)).refresh_interval, S(2));
        assert_eq!(CachePolicy::new(S(0)).refresh_interval, S(0));
    }

    #[test]
    fn a_loaded_document_is_served_until_the_ttl_then_refetched() {
        let (c, src, t0) = (cache(60), Source::new(Ok(doc(&["a"]))), Instant::now());
        assert!(!c.is_loaded());
        assert_eq!(src.lookup(&c, "a", t0).unwrap().as_deref(), Some("id-a"));
        assert!(c.is_loaded());
        for s in [1, 30, 59] {
            src.lookup(&c, "a", t0 + S(s)).unwrap();
        }
        assert_eq!(src.fetches.get(), 1);
        // The key is removed at the source: still served from cache until the TTL, gone after it.
        src.set(Ok(doc(&["b"])));
        assert!(src.lookup(&c, "a", t0 + S(59)).unwrap().is_some());
        assert_eq!(src.lookup(&c, "a", t0 + S(60)).unwrap(), None);
        assert_eq!(src.fetches.get(), 2);
    }

    #[test]
    fn unknown_keys_refresh_at_most_once_per_interval() {
        let (c, src, t0) = (cache(60), Source::new(Ok(doc(&["a"]))), Instant::now());
        src.lookup(&c, "a", t0).unwrap();
        // A key added at the source works at once, even right after the initial load.
        src.set(Ok(doc(&["a", "new"])));
        assert_eq!(src.lookup(&c, "new", t0).unwrap().as_deref(), Some("id-new"));
        assert_eq!(src.fetches.get(), 2);
        // A flood of unknown keys: no further fetch within the interval.
        for i in 0..100 {
            assert_eq!(src.lookup(&c, &format!("junk{i}"), t0 + S(4)).unwrap(), None);
        }
        assert_eq!(src.fetches.get(), 2);
        // Known keys never refresh while fresh.
        src.lookup(&c, "a", t0 + S(4)).unwrap();
        assert_eq!(src.fetches.get(), 2);
        // Once the interval has passed, the next unknown key may refresh again (once).
        src.lookup(&c, "junk", t0 + S(5)).unwrap();
        src.lookup(&c, "junk", t0 + S(6)).unwrap();
        assert_eq!(src.fetches.get(), 3);
    }

    #[test]
    fn the_last_good_document_serves_while_the_source_fails() {
        let (c, src, t0) = (cache(60), Source::new(Ok(doc(&["a"]))), Instant::now());
        src.lookup(&c, "a", t0).unwrap();
        src.set(Err("connection refused".into()));
        // Stale: a fetch is tried, fails, and the old document answers.
        assert!(src.lookup(&c, "a", t0 + S(61)).unwrap().is_some());
        assert_eq!(src.fetches.get(), 2);
        // The source is not hammered: no retry within the interval, stale answers meanwhile.
        for s in [62, 63, 65] {
            assert!(src.lookup(&c, "a", t0 + S(s)).unwrap().is_some());
        }
        assert_eq!(src.lookup(&c, "zzz", t0 + S(62)).unwrap(), None);
        assert_eq!(src.fetches.get(), 2);
        assert!(src.lookup(&c, "a", t0 + S(66)).unwrap().is_some());
        assert_eq!(src.fetches.get(), 3);
        // The source recovers: the next allowed fetch replaces the document.
        src.set(Ok(doc(&["b"])));
        assert_eq!(src.lookup(&c, "a", t0 + S(71)).unwrap(), None);
        assert!(src.lookup(&c, "b", t0 + S(71)).unwrap().is_some());
    }

    #[test]
    fn a_cache_that_never_loaded_fails_closed() {
        let (c, src, t0) = (cache(60), Source::new(Err("AccessDenied".into())), Instant::now());
        let err = src.lookup(&c, "a", t0).unwrap_err();
        assert_eq!(err, KeyStoreError::Unavailable("AccessDenied".into()));
        // Within the interval: refused without asking the source again.
        assert!(src.lookup(&c, "a", t0 + S(3)).is_err());
        assert_eq!(src.fetches.get(), 1);
        src.set(Ok(doc(&["a"])));
        assert!(src.lookup(&c, "a", t0 + S(4)).is_err());
        assert!(src.lookup(&c, "a", t0 + S(5)).unwrap().is_some());
        assert_eq!(src.fetches.get(), 2);
    }

    #[test]
    fn a_slow_fetch_does_not_block_lookups_from_the_last_good_document() {
        let (c, t0) = (cache(10), Instant::now());
        c.store(Ok(doc(&["a"])), t0);
        // A stale lookup starts a fetch (in flight) ...
        assert_eq!(c.plan("a", t0 + S(10)), CacheStep::Fetch);
        // ... and concurrent lookups meanwhile answer from the stale document instead of fetching too.
        assert!(matches!(c.plan("a", t0 + S(11)), CacheStep::Answer(Ok(Some(_)))));
        // Out-of-order completion: an older fetch never replaces a newer document.
        c.store(Ok(doc(&["new"])), t0 + S(12));
        c.store(Ok(doc(&["old"])), t0 + S(10));
        assert!(c.answer("new").unwrap().is_some());
        assert!(c.answer("old").unwrap().is_none());
    }

    #[test]
    fn zero_ttl_refetches_every_time() {
        let (c, src, t0) = (cache(0), Source::new(Ok(doc(&["a"]))), Instant::now());
        src.lookup(&c, "a", t0).unwrap();
        src.lookup(&c, "a", t0).unwrap();
        assert_eq!(src.fetches.get(), 2);
    }

    #[test]
    fn a_forced_refresh_reports_its_own_failure() {
        let (c, t0) = (cache(60), Instant::now());
        let ok = block_on(c.refresh(t0, || std::future::ready(Ok::<_, String>(doc(&["a"])))));
        assert_eq!(ok, Ok(()));
        let bad = block_on(c.refresh(t0 + S(1), || std::future::ready(Err::<KeysDocument, _>("boom"))));
        assert_eq!(bad, Err(KeyStoreError::Unavailable("boom".into())));
        assert!(c.answer("a").unwrap().is_some(), "the last good document still serves");
    }
}
