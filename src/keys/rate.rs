//! Per-key rate limits inside one instance: requests per minute and tokens per minute, by GCRA.
//!
//! GCRA (the generic cell rate algorithm) keeps one "theoretical arrival time" per key and limit instead of a log of
//! requests: O(1) memory per key, exact `Retry-After`, and a full minute's budget usable as a burst. Tokens are
//! only known when a request finishes, so they are charged afterwards; a key whose charged tokens exceed a
//! minute's budget is refused until enough time has passed.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// The window both limits are expressed in.
pub const PERIOD: Duration = Duration::from_secs(60);

/// Forgotten state can never be needed again for more than this long into the future (caps a huge token charge).
const MAX_DEBT: Duration = Duration::from_secs(24 * 3600);

/// Sweep idle keys when the table grows past this many entries (and at least once per [`PERIOD`]).
const SWEEP_AT_LEAST: usize = 1024;

/// One key's limits (from its record); `None` means unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    /// Requests per minute.
    pub rpm: Option<u32>,
    /// Tokens per minute.
    pub tpm: Option<u64>,
}

/// Which limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitKind {
    /// Requests per minute.
    Requests,
    /// Tokens per minute.
    Tokens,
}

/// A refused request: which limit, and how long until it would be allowed (for `429` + `Retry-After`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("Rate limit reached for {} per minute; retry after {} s.", self.kind_name(), self.retry_after_secs())]
pub struct RateLimited {
    /// The limit that was hit.
    pub kind: LimitKind,
    /// Time until the request would be allowed.
    pub retry_after: Duration,
}

impl RateLimited {
    /// `Retry-After` in whole seconds, rounded up and at least 1 (retrying earlier would be refused again).
    pub fn retry_after_secs(&self) -> u64 {
        let d = self.retry_after;
        (d.as_secs() + u64::from(d.subsec_nanos() > 0)).max(1)
    }

    fn kind_name(&self) -> &'static str {
        match self.kind {
            LimitKind::Requests => "requests",
            LimitKind::Tokens => "tokens",
        }
    }
}

/// Theoretical arrival times of one key; `None` or a past instant means "nothing owed".
#[derive(Debug, Clone, Copy, Default)]
struct Cell {
    requests: Option<Instant>,
    tokens: Option<Instant>,
}

impl Cell {
    /// Whether this cell is indistinguishable from a fresh one at `now` (and can be forgotten).
    fn is_idle(&self, now: Instant) -> bool {
        self.requests.is_none_or(|t| t <= now) && self.tokens.is_none_or(|t| t <= now)
    }
}

#[derive(Debug)]
struct Table {
    cells: HashMap<String, Cell>,
    sweep_len: usize,
    last_sweep: Option<Instant>,
}

/// Rate limits for all keys of this instance; thread-safe, and memory bounded by the keys that still owe time
/// (used within the last minute, or charged more tokens than a minute's budget; at most a day).
#[derive(Debug)]
pub struct RateLimiter {
    table: Mutex<Table>,
}

impl Default for RateLimiter {
    fn default() -> Self {
        Self::new()
    }
}

/// Time per unit when `per_period` units fit in [`PERIOD`].
fn interval(per_period: u64) -> Duration {
    Duration::from_nanos((PERIOD.as_nanos() / u128::from(per_period.max(1))) as u64)
}

/// How far `tat` is ahead of `now` (zero if behind).
fn ahead(tat: Option<Instant>, now: Instant) -> Duration {
    tat.map_or(Duration::ZERO, |t| t.saturating_duration_since(now))
}

impl RateLimiter {
    /// An empty limiter.
    pub fn new() -> Self {
        Self {
            table: Mutex::new(Table {
                cells: HashMap::new(),
                sweep_len: SWEEP_AT_LEAST,
                last_sweep: None,
            }),
        }
    }

    /// Admits one request of key `key` at `now`, or says how long to wait. A refused request costs nothing.
    pub fn check_request(&self, key: &str, limits: Limits, now: Instant) -> Result<(), RateLimited> {
        if limits.rpm.is_none() && limits.tpm.is_none() {
            return Ok(());
        }
        let mut table = self.lock();
        table.maybe_sweep(now);
        let cell = table.cells.get(key).copied().unwrap_or_default();
        let mut refusals = Vec::new();
        if limits.tpm.is_some() {
            // Over budget while more than a minute's worth of tokens is still owed.
            let owed = ahead(cell.tokens, now);
            if owed > PERIOD {
                refusals.push(RateLimited {
                    kind: LimitKind::Tokens,
                    retry_after: owed - PERIOD,
                });
            }
        }
        let mut next = cell;
        if let Some(rpm) = limits.rpm {
            let t = interval(u64::from(rpm));
            // Admitting moves the arrival time one interval on; allowed while that stays within one period.
            let after = ahead(cell.requests, now) + t;
            if after > PERIOD {
                refusals.push(RateLimited {
                    kind: LimitKind::Requests,
                    retry_after: after - PERIOD,
                });
            } else {
                next.requests = Some(now + after);
            }
        }
        // If both limits refuse, the later one decides when a retry can succeed.
        if let Some(worst) = refusals.into_iter().max_by_key(|r| r.retry_after) {
            return Err(worst);
        }
        if limits.rpm.is_some() {
            table.cells.insert(key.to_owned(), next);
        }
        Ok(())
    }

    /// Charges `tokens` used by a finished request of key `key` (no-op without a `tpm` limit).
    pub fn record_tokens(&self, key: &str, limits: Limits, tokens: u64, now: Instant) {
        let Some(tpm) = limits.tpm else { return };
        if tokens == 0 {
            return;
        }
        let mut table = self.lock();
        table.maybe_sweep(now);
        let cell = table.cells.entry(key.to_owned()).or_default();
        let cost = interval(tpm).as_nanos().saturating_mul(u128::from(tokens));
        let cost = Duration::from_nanos(u64::try_from(cost).unwrap_or(u64::MAX));
        let owed = (ahead(cell.tokens, now).saturating_add(cost)).min(MAX_DEBT);
        cell.tokens = Some(now + owed);
    }

    /// Keys currently remembered (for tests and metrics).
    pub fn tracked_keys(&self) -> usize {
        self.lock().cells.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        // Every update is a single assignment, so a panic elsewhere cannot leave the table half-written.
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Table {
    /// Forgets keys that owe nothing: exact (an idle cell behaves like a missing one) and keeps memory bounded.
    fn maybe_sweep(&mut self, now: Instant) {
        let due = self
            .last_sweep
            .is_none_or(|t| now.saturating_duration_since(t) >= PERIOD);
        if !due && self.cells.len() < self.sweep_len {
            return;
        }
        self.cells.retain(|_, c| !c.is_idle(now));
        self.sweep_len = (self.cells.len() * 2).max(SWEEP_AT_LEAST);
        self.last_sweep = Some(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;
    const MS: fn(u64) -> Duration = Duration::from_millis;

    fn rpm(n: u32) -> Limits {
        Limits {
            rpm: Some(n),
            tpm: None,
        }
    }

    fn tpm(n: u64) -> Limits {
        Limits {
            rpm: None,
            tpm: Some(n),
        }
    }

    #[test]
    fn unlimited_keys_are_never_refused_nor_remembered() {
        let rl = RateLimiter::new();
        let t = Instant::now();
        for _ in 0..10_000 {
            rl.check_request("k", Limits::default(), t).unwrap();
        }
        rl.record_tokens("k", Limits::default(), 1_000_000, t);
        assert_eq!(rl.tracked_keys(), 0);
    }

    #[test]
    fn rpm_allows_a_full_burst_then_refuses_with_an_exact_retry_after() {
        let rl = RateLimiter::new();
        let t0 = Instant::now();
        for i in 0..60 {
            rl.check_request("k", rpm(60), t0)
                .unwrap_or_else(|e| panic!("request {i}: {e}"));
        }
        let err = rl.check_request("k", rpm(60), t0).unwrap_err();
        assert_eq!(err.kind, LimitKind::Requests);
        assert_eq!(err.retry_after, S(1), "one request's interval at 60 rpm");
        assert_eq!(err.retry_after_secs(), 1);
        assert!(err.to_string().contains("requests per minute"), "{err}");
        // Refusals cost nothing: still exactly one second.
        assert_eq!(
            rl.check_request("k", rpm(60), t0 + MS(400)).unwrap_err().retry_after,
            MS(600)
        );
        assert!(rl.check_request("k", rpm(60), t0 + MS(999)).is_err());
        rl.check_request("k", rpm(60), t0 + S(1)).unwrap();
        assert!(rl.check_request("k", rpm(60), t0 + S(1)).is_err());
    }

    #[test]
    fn rpm_recovers_over_time_and_keys_are_independent() {
        let rl = RateLimiter::new();
        let t0 = Instant::now();
        for _ in 0..3 {
            rl.check_request("a", rpm(3), t0).unwrap();
        }
        assert_eq!(rl.check_request("a", rpm(3), t0).unwrap_err().retry_after, S(20));
        rl.check_request("b", rpm(3), t0).unwrap();
        // After a whole minute the full burst is back.
        for _ in 0..3 {
            rl.check_request("a", rpm(3), t0 + S(60)).unwrap();
        }
        assert!(rl.check_request("a", rpm(3), t0 + S(60)).is_err());
        // Steady pace at the limit is always admitted.
        let rl = RateLimiter::new();
        for i in 0..200 {
            rl.check_request("c", rpm(6), t0 + S(10 * i)).unwrap();
        }
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        let r = |d| RateLimited {
            kind: LimitKind::Requests,
            retry_after: d,
        };
        assert_eq!(r(MS(1)).retry_after_secs(), 1);
        assert_eq!(r(Duration::ZERO).retry_after_secs(), 1);
        assert_eq!(r(MS(1001)).retry_after_secs(), 2);
        assert_eq!(r(S(3)).retry_after_secs(), 3);
        // 7 rpm: interval 8.571… s; the retry is never advertised too early.
        let rl = RateLimiter::new();
        let t0 = Instant::now();
        for _ in 0..7 {
            rl.check_request("k", rpm(7), t0).unwrap();
        }
        let e = rl.check_request("k", rpm(7), t0).unwrap_err();
        assert_eq!(e.retry_after_secs(), 9);
        rl.check_request("k", rpm(7), t0 + e.retry_after).unwrap();
    }

    #[test]
    fn tokens_are_charged_after_the_fact_and_block_until_the_window_allows() {
        let rl = RateLimiter::new();
        let t0 = Instant::now();
        rl.check_request("k", tpm(1000), t0).unwrap();
        rl.record_tokens("k", tpm(1000), 600, t0);
        rl.check_request("k", tpm(1000), t0).unwrap();
        rl.record_tokens("k", tpm(1000), 400, t0);
        // Exactly the budget used: still allowed; one token more and the key is over.
        rl.check_request("k", tpm(1000), t0).unwrap();
        rl.record_tokens("k", tpm(1000), 500, t0);
        let e = rl.check_request("k", tpm(1000), t0).unwrap_err();
        assert_eq!(e.kind, LimitKind::Tokens);
        assert_eq!(e.retry_after, S(30), "500 tokens over at 1000/min");
        assert!(e.to_string().contains("tokens per minute"));
        assert!(rl.check_request("k", tpm(1000), t0 + S(29)).is_err());
        rl.check_request("k", tpm(1000), t0 + S(30)).unwrap();
    }

    #[test]
    fn one_huge_request_blocks_proportionally_and_zero_tokens_are_free() {
        let rl = RateLimiter::new();
        let t0 = Instant::now();
        rl.record_tokens("k", tpm(100), 0, t0);
        assert_eq!(rl.tracked_keys(), 0);
        rl.record_tokens("k", tpm(100), 1000, t0);
        assert_eq!(rl.check_request("k", tpm(100), t0).unwrap_err().retry_after, S(9 * 60));
        rl.record_tokens("k", tpm(1), u64::MAX, t0);
        assert_eq!(
            rl.check_request("k", tpm(1), t0).unwrap_err().retry_after,
            MAX_DEBT - PERIOD
        );
    }

    #[test]
    fn both_limits_together_report_the_later_retry() {
        let rl = RateLimiter::new();
        let t0 = Instant::now();
        let both = Limits {
            rpm: Some(1),
            tpm: Some(60),
        };
        rl.check_request("k", both, t0).unwrap();
        rl.record_tokens("k", both, 150, t0);
        // rpm says 60 s, tpm says 90 s: the later one.
        let e = rl.check_request("k", both, t0).unwrap_err();
        assert_eq!((e.kind, e.retry_after), (LimitKind::Tokens, S(90)));
        // A tpm refusal does not consume an rpm slot.
        rl.check_request("k", both, t0 + S(90)).unwrap();
    }

    #[test]
    fn idle_keys_are_forgotten() {
        let rl = RateLimiter::new();
        let t0 = Instant::now();
        for i in 0..5000 {
            rl.check_request(&format!("k{i}"), rpm(10), t0).unwrap();
        }
        assert!(rl.tracked_keys() <= 5000);
        // A minute later every one of them owes nothing; the next call sweeps them.
        rl.check_request("fresh", rpm(10), t0 + S(61)).unwrap();
        assert_eq!(rl.tracked_keys(), 1);
        // Forgetting is exact: a forgotten key gets a full burst, as it would have anyway.
        for _ in 0..10 {
            rl.check_request("k0", rpm(10), t0 + S(61)).unwrap();
        }
    }

    #[test]
    fn the_limiter_is_shared_across_threads() {
        let rl = std::sync::Arc::new(RateLimiter::new());
        let t0 = Instant::now();
        let admitted: usize = (0..4)
            .map(|_| {
                let rl = rl.clone();
                std::thread::spawn(move || (0..100).filter(|_| rl.check_request("k", rpm(50), t0).is_ok()).count())
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().unwrap())
            .sum();
        assert_eq!(admitted, 50);
    }
}
