//! The Secrets Manager key store (Lambda): the keys document is the value of one secret, read through the cache.
//!
//! The SDK stays in this file: callers see a [`KeyStore`], never an AWS type (apart from building the client).
//! Every read happens on a request's path (a lookup that finds the cache stale or the key unknown), so the client
//! gets short timeouts and few retries: an unreachable Secrets Manager costs one request a few seconds, and the
//! cache's refresh interval spares the requests after it.
//!
//! Nothing here logs or returns the secret's value: a malformed value is described by its position and kind of
//! error only, because serde's own messages quote the offending text (which may be a key).

use super::cache::{CachePolicy, CachedDocument};
use super::{BoxFuture, DocumentError, KeyRecord, KeyStore, KeyStoreError, KeysDocument};
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, SdkConfig};
use aws_sdk_secretsmanager::error::DisplayErrorContext;
use aws_sdk_secretsmanager::Client;
use std::time::{Duration, Instant};

/// Longest wait for a TCP (and TLS) connection to Secrets Manager.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Longest wait for one attempt of `GetSecretValue` (a healthy call takes tens of milliseconds).
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_millis(1500);
/// Longest wait for the whole call, retries and back-off included: what a request can lose to a broken source.
pub const OPERATION_TIMEOUT: Duration = Duration::from_secs(3);
/// Attempts per call (the first one and one retry): enough for a dropped connection, not for an outage.
pub const MAX_ATTEMPTS: u32 = 2;

/// A keys document that could not be read from Secrets Manager. Messages name the secret, never its value.
#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    /// The call failed: unreachable endpoint, timeout, no credentials, access denied, no such secret…
    #[error("Secrets Manager GetSecretValue for secret {secret_id:?} failed: {message}")]
    Request {
        /// The secret asked for.
        secret_id: String,
        /// The SDK's error with its causes.
        message: String,
    },
    /// The secret's current version holds binary data instead of text.
    #[error("secret {secret_id:?} has no string value (the keys document must be stored as SecretString)")]
    NotString {
        /// The secret read.
        secret_id: String,
    },
    /// The value is not a valid keys document.
    #[error("secret {secret_id:?} does not hold a valid keys document: {reason}")]
    Malformed {
        /// The secret read.
        secret_id: String,
        /// What is wrong, without quoting the value (see [`describe_document_error`]).
        reason: String,
    },
}

/// A [`DocumentError`] described without any of the document's text.
///
/// serde_json's messages quote values (`invalid type: string "sk-llm-…"`), so a JSON error is reduced to its kind
/// and position; an entry error names the entry by position and public id only, which is already safe.
pub fn describe_document_error(e: &DocumentError) -> String {
    match e {
        DocumentError::Json(j) => {
            let kind = match j.classify() {
                serde_json::error::Category::Syntax => "not valid JSON",
                serde_json::error::Category::Eof => "truncated JSON",
                serde_json::error::Category::Data => "JSON that is not a keys document ({\"keys\": [...]})",
                serde_json::error::Category::Io => "unreadable",
            };
            format!("{kind} (at line {} column {})", j.line(), j.column())
        }
        invalid @ DocumentError::Invalid { .. } => invalid.to_string(),
    }
}

/// Parses a secret's value as a keys document.
pub fn parse_secret_value(secret_id: &str, value: &str) -> Result<KeysDocument, SecretsError> {
    KeysDocument::parse(value).map_err(|e| SecretsError::Malformed {
        secret_id: secret_id.to_owned(),
        reason: describe_document_error(&e),
    })
}

/// A key store reading the keys document from a Secrets Manager secret, with the cache rules of every store: the
/// document is trusted for the TTL, an unknown key refreshes it (at most once per refresh interval), a failed read
/// keeps the last good document serving, and a store that never read one fails closed.
#[derive(Debug)]
pub struct SecretsManagerKeyStore {
    client: Client,
    secret_id: String,
    cache: CachedDocument,
}

impl SecretsManagerKeyStore {
    /// A store reading secret `secret_id` (name or ARN) with `client`, trusting what it read for `ttl`
    /// (`KEYS_CACHE_TTL_SECONDS`). Nothing is read yet. Build `client` with [`Self::client`] for request-path
    /// timeouts.
    pub fn new(client: Client, secret_id: impl Into<String>, ttl: Duration) -> Self {
        Self {
            client,
            secret_id: secret_id.into(),
            cache: CachedDocument::new(CachePolicy::new(ttl)),
        }
    }

    /// A store whose client comes from the standard AWS configuration (`AWS_REGION`, `AWS_ENDPOINT_URL`, the
    /// Lambda role's credentials, …). Call once, at cold start: the client and its connections are reused.
    pub async fn from_env(secret_id: impl Into<String>, ttl: Duration) -> Self {
        let sdk = aws_config::defaults(BehaviorVersion::latest()).load().await;
        if sdk.region().is_none() {
            // Every read would fail; say why once here rather than only in each fetch error.
            tracing::warn!("no AWS region configured (set AWS_REGION): the keys secret cannot be read");
        }
        Self::new(Self::client(&sdk), secret_id, ttl)
    }

    /// A Secrets Manager client over `sdk` with this store's timeouts and retries (they replace the SDK defaults,
    /// which allow three attempts with no overall time limit: too long for a request waiting on its key).
    pub fn client(sdk: &SdkConfig) -> Client {
        let conf = aws_sdk_secretsmanager::config::Builder::from(sdk)
            .timeout_config(request_path_timeouts())
            .retry_config(request_path_retries())
            .build();
        Client::from_conf(conf)
    }

    /// The secret served.
    pub fn secret_id(&self) -> &str {
        &self.secret_id
    }

    /// Reads and parses the secret's current value.
    async fn fetch(&self) -> Result<KeysDocument, SecretsError> {
        let out = self
            .client
            .get_secret_value()
            .secret_id(&self.secret_id)
            .send()
            .await
            .map_err(|e| SecretsError::Request {
                secret_id: self.secret_id.clone(),
                message: DisplayErrorContext(&e).to_string(),
            })?;
        let value = out.secret_string().ok_or_else(|| SecretsError::NotString {
            secret_id: self.secret_id.clone(),
        })?;
        parse_secret_value(&self.secret_id, value)
    }
}

/// Timeouts for calls made while a request waits (see the module docs).
fn request_path_timeouts() -> TimeoutConfig {
    TimeoutConfig::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .operation_attempt_timeout(ATTEMPT_TIMEOUT)
        .operation_timeout(OPERATION_TIMEOUT)
        .build()
}

/// Retries for calls made while a request waits: one retry after a short back-off.
fn request_path_retries() -> RetryConfig {
    RetryConfig::standard()
        .with_max_attempts(MAX_ATTEMPTS)
        .with_initial_backoff(Duration::from_millis(100))
        .with_max_backoff(Duration::from_millis(500))
}

impl KeyStore for SecretsManagerKeyStore {
    fn lookup<'a>(&'a self, hash: &'a str) -> BoxFuture<'a, Result<Option<KeyRecord>, KeyStoreError>> {
        Box::pin(self.cache.lookup(hash, Instant::now(), || self.fetch()))
    }

    fn refresh(&self) -> BoxFuture<'_, Result<(), KeyStoreError>> {
        Box::pin(self.cache.refresh(Instant::now(), || self.fetch()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "sk-llm-ABCDEFGHIJabcdefghij0123456789ABCDEFGHIJ";

    #[test]
    fn a_malformed_value_is_described_without_quoting_it() {
        let cases = [
            (SECRET.to_owned(), "not valid JSON"),
            (format!("\"{SECRET}\""), "not a keys document"),
            (format!("{{\"keys\": \"{SECRET}\"}}"), "not a keys document"),
            (
                format!("{{\"keys\": [{{\"id\": \"k\", \"name\": \"{SECRET}\", \"hash\": 1}}]}}"),
                "not a keys document",
            ),
            (
                format!("{{\"keys\": [{{\"id\": \"k\", \"name\": \"{SECRET}\""),
                "truncated JSON",
            ),
        ];
        for (value, expected) in cases {
            let e = parse_secret_value("lambda-llm/keys", &value).unwrap_err();
            let text = e.to_string();
            assert!(matches!(e, SecretsError::Malformed { .. }), "{text}");
            assert!(text.contains(expected) && text.contains("lambda-llm/keys"), "{text}");
            assert!(!text.contains("sk-llm") && !text.contains("ABCDEFGHIJ"), "{text}");
        }
    }

    #[test]
    fn an_invalid_entry_is_named_by_position_and_id_only() {
        let value = format!(r#"{{"keys": [{{"id": "key_1", "name": "a", "hash": "{SECRET}"}}]}}"#);
        let text = parse_secret_value("s", &value).unwrap_err().to_string();
        assert!(
            text.contains("entry #0") && text.contains("key_1") && text.contains("`hash`"),
            "{text}"
        );
        assert!(!text.contains("sk-llm"), "{text}");
    }

    #[test]
    fn a_valid_value_parses() {
        let hash = super::super::hash_key(SECRET);
        let value = format!(r#"{{"keys": [{{"id": "key_1", "name": "a", "hash": "{hash}"}}]}}"#);
        let doc = parse_secret_value("s", &value).unwrap();
        assert_eq!((doc.keys.len(), doc.keys[0].hash.as_str()), (1, hash.as_str()));
    }

    #[test]
    fn request_path_limits_bound_a_call() {
        let t = request_path_timeouts();
        assert_eq!(t.connect_timeout(), Some(CONNECT_TIMEOUT));
        assert_eq!(t.operation_attempt_timeout(), Some(ATTEMPT_TIMEOUT));
        assert_eq!(t.operation_timeout(), Some(OPERATION_TIMEOUT));
        // Every attempt fits in the overall limit, so a retry is possible before a request gives up.
        assert!(ATTEMPT_TIMEOUT < OPERATION_TIMEOUT);
        assert_eq!(request_path_retries().max_attempts(), MAX_ATTEMPTS);
    }
}
