//! Authentication: the key a request presents (from plain header values), its record, and what it may do.

use super::document::KeyRecord;
use super::key::{hash_key, is_well_formed_key};
use super::rate::Limits;
use super::{KeyStore, KeyStoreError};
use std::time::SystemTime;
use time::OffsetDateTime;

/// The raw header values a request carried (the HTTP layer copies them out; no HTTP types here).
#[derive(Clone, Copy, Default)]
pub struct Credentials<'a> {
    /// `Authorization`, e.g. `Bearer sk-llm-…`.
    pub authorization: Option<&'a str>,
    /// `x-api-key`.
    pub x_api_key: Option<&'a str>,
}

// Hand-written so that a stray `{:?}` can never print a key.
impl std::fmt::Debug for Credentials<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("authorization", &self.authorization.map(|_| "<redacted>"))
            .field("x_api_key", &self.x_api_key.map(|_| "<redacted>"))
            .finish()
    }
}

/// Why a request is not authorised. The messages are safe to send to clients.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No key was sent (HTTP 401 `invalid_api_key`).
    #[error("You didn't provide an API key. Send it as `Authorization: Bearer <key>` or `x-api-key: <key>`.")]
    Missing,
    /// The key is malformed, unknown, expired or disabled (HTTP 401 `invalid_api_key`); deliberately one variant
    /// and one message, so a client learns nothing about which.
    #[error("Incorrect API key provided.")]
    Invalid,
    /// The key is valid but not for this model (HTTP 403).
    #[error("This API key is not allowed to use the model `{model}`.")]
    ModelNotAllowed {
        /// The requested model id.
        model: String,
    },
    /// Keys cannot be checked: the store never loaded a document (HTTP 503; fail closed).
    #[error("API keys cannot be checked right now; please retry later.")]
    Unavailable,
}

/// An authenticated key: what the rest of the request needs to know about it (no hash, no key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthorizedKey {
    /// The key's public id (log this, never the key).
    pub id: String,
    /// Its name.
    pub name: String,
    /// Model ids it may use (`"*"` = all).
    pub models: Vec<String>,
    /// Its rate limits.
    pub limits: Limits,
    /// When it expires, if ever.
    pub expires_at: Option<OffsetDateTime>,
}

impl AuthorizedKey {
    /// Whether this key may use `model` (an exact, alias-resolved id), e.g. to filter `GET /v1/models`.
    pub fn allows_model(&self, model: &str) -> bool {
        self.models.iter().any(|m| m == super::ALL_MODELS || m == model)
    }
}

/// The key presented by `credentials`: a `Bearer` token in `Authorization` (scheme case-insensitive, as HTTP
/// specifies), else `x-api-key`. An empty or absent value counts as not sent; another scheme (e.g. `Basic`) or a
/// token with spaces is invalid. The key's own format is checked later, by [`authenticate`].
pub fn presented_key<'a>(credentials: &Credentials<'a>) -> Result<&'a str, AuthError> {
    let bearer = credentials
        .authorization
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(|v| {
            let (scheme, token) = v.split_once(char::is_whitespace).unwrap_or((v, ""));
            let token = token.trim();
            if !scheme.eq_ignore_ascii_case("bearer") || token.contains(char::is_whitespace) {
                Err(AuthError::Invalid)
            } else if token.is_empty() {
                Err(AuthError::Missing)
            } else {
                Ok(token)
            }
        });
    let api_key = credentials.x_api_key.map(str::trim).filter(|v| !v.is_empty());
    match (bearer, api_key) {
        (Some(Ok(token)), _) => Ok(token),
        // Some proxies add their own `Authorization` (e.g. Basic); an explicit `x-api-key` still counts.
        (_, Some(key)) if !key.contains(char::is_whitespace) => Ok(key),
        (_, Some(_)) => Err(AuthError::Invalid),
        (Some(Err(e)), None) => Err(e),
        (None, None) => Err(AuthError::Missing),
    }
}

/// Decides whether `record` (looked up by the presented key's hash) may serve a request for `model` at `now`.
/// Pure: the part of [`authenticate`] after the lookup.
pub fn authorize(record: Option<KeyRecord>, model: Option<&str>, now: SystemTime) -> Result<AuthorizedKey, AuthError> {
    let Some(record) = record else {
        return Err(AuthError::Invalid);
    };
    if !record.is_active(now) {
        // Same answer as an unknown key; the id (public) is enough to explain it in debug logs.
        tracing::debug!(key_id = %record.id, disabled = record.disabled, "inactive API key refused");
        return Err(AuthError::Invalid);
    }
    if let Some(model) = model.filter(|m| !record.allows_model(m)) {
        return Err(AuthError::ModelNotAllowed {
            model: model.to_owned(),
        });
    }
    Ok(AuthorizedKey {
        id: record.id,
        name: record.name,
        models: record.models,
        limits: Limits {
            rpm: record.rpm,
            tpm: record.tpm,
        },
        expires_at: record.expires_at,
    })
}

/// Authenticates a request: extracts the key, checks its format, looks its hash up in `store`, and checks it is
/// active and allowed `model` (if the route names one; aliases must be resolved first) at `now`.
///
/// The store is looked up by hash (a map lookup, not a comparison of secrets): timing reveals nothing useful,
/// because an attacker cannot choose a key whose SHA-256 lands near a stored one.
pub async fn authenticate(
    store: &dyn KeyStore,
    credentials: Credentials<'_>,
    model: Option<&str>,
    now: SystemTime,
) -> Result<AuthorizedKey, AuthError> {
    let key = presented_key(&credentials)?;
    // Malformed keys are refused before the store: they cannot exist, so they must not trigger refreshes.
    if !is_well_formed_key(key) {
        return Err(AuthError::Invalid);
    }
    let record = store
        .lookup(&hash_key(key))
        .await
        .map_err(|KeyStoreError::Unavailable(reason)| {
            tracing::warn!(%reason, "API key refused: key store unavailable");
            AuthError::Unavailable
        })?;
    authorize(record, model, now)
}

#[cfg(test)]
mod tests {
    use super::super::test_util::block_on;
    use super::super::{KeysDocument, MemoryKeyStore};
    use super::*;
    use std::time::Duration;

    fn creds<'a>(authorization: Option<&'a str>, x_api_key: Option<&'a str>) -> Credentials<'a> {
        Credentials {
            authorization,
            x_api_key,
        }
    }

    #[test]
    fn bearer_and_x_api_key_are_both_accepted() {
        let k = "sk-llm-abc";
        assert_eq!(presented_key(&creds(Some("Bearer sk-llm-abc"), None)), Ok(k));
        assert_eq!(presented_key(&creds(None, Some("sk-llm-abc"))), Ok(k));
        // The scheme is case-insensitive (RFC 9110); surrounding and separating spaces are tolerated.
        for h in [
            "bearer sk-llm-abc",
            "BEARER sk-llm-abc",
            "Bearer   sk-llm-abc",
            "  Bearer sk-llm-abc  ",
            "Bearer\tsk-llm-abc",
        ] {
            assert_eq!(presented_key(&creds(Some(h), None)), Ok(k), "{h:?}");
        }
        assert_eq!(presented_key(&creds(None, Some("  sk-llm-abc "))), Ok(k));
        // Authorization wins when both are well formed.
        assert_eq!(presented_key(&creds(Some("Bearer a"), Some("b"))), Ok("a"));
        assert_eq!(presented_key(&creds(Some("Basic dXNlcjpwYXNz"), Some("b"))), Ok("b"));
    }

    #[test]
    fn wrong_forms_are_missing_or_invalid() {
        let missing = [
            creds(None, None),
            creds(Some(""), None),
            creds(Some("   "), Some("")),
            creds(Some("Bearer"), None),
        ];
        for c in missing {
            assert_eq!(presented_key(&c), Err(AuthError::Missing), "{c:?}");
        }
        assert_eq!(presented_key(&creds(Some("Bearer   "), None)), Err(AuthError::Missing));
        for h in [
            "Basic dXNlcjpwYXNz",
            "Token sk-llm-abc",
            "sk-llm-abc",
            "Bearer sk-llm-abc extra",
            "Bearersk-llm-abc",
        ] {
            assert_eq!(presented_key(&creds(Some(h), None)), Err(AuthError::Invalid), "{h:?}");
        }
        assert_eq!(presented_key(&creds(None, Some("sk-llm a"))), Err(AuthError::Invalid));
    }

    #[test]
    fn credentials_never_debug_print_a_key() {
        let s = format!("{:?}", creds(Some("Bearer sk-llm-secret"), Some("sk-llm-secret")));
        assert!(!s.contains("secret"), "{s}");
    }

    const KEY: &str = "sk-llm-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
    const MODEL: &str = "smollm2-135m-instruct";

    fn store(edit: impl FnOnce(&mut KeyRecord)) -> MemoryKeyStore {
        let mut r = KeyRecord::new("key_1", "alice", hash_key(KEY));
        r.rpm = Some(10);
        edit(&mut r);
        MemoryKeyStore::new(KeysDocument {
            keys: vec![r],
            ..Default::default()
        })
    }

    fn auth(store: &dyn KeyStore, key: &str, model: Option<&str>) -> Result<AuthorizedKey, AuthError> {
        let header = format!("Bearer {key}");
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(2_000_000_000);
        block_on(authenticate(store, creds(Some(&header), None), model, now))
    }

    #[test]
    fn a_known_active_key_is_authorised_with_its_limits() {
        let s = store(|_| {});
        let k = auth(&s, KEY, Some(MODEL)).unwrap();
        assert_eq!((k.id.as_str(), k.name.as_str()), ("key_1", "alice"));
        assert_eq!(
            k.limits,
            Limits {
                rpm: Some(10),
                tpm: None
            }
        );
        assert!(k.allows_model("any"));
        assert!(auth(&s, KEY, None).is_ok());
    }

    #[test]
    fn unknown_malformed_expired_and_disabled_keys_look_the_same() {
        let unknown = format!("sk-llm-{}", "B".repeat(40));
        let errors = [
            auth(&store(|_| {}), &unknown, Some(MODEL)).unwrap_err(),
            auth(&store(|_| {}), "sk-llm-short", Some(MODEL)).unwrap_err(),
            auth(&store(|_| {}), &format!("{}é", &KEY[..46]), Some(MODEL)).unwrap_err(),
            auth(&store(|r| r.disabled = true), KEY, Some(MODEL)).unwrap_err(),
            auth(
                &store(|r| r.expires_at = Some(OffsetDateTime::UNIX_EPOCH)),
                KEY,
                Some(MODEL),
            )
            .unwrap_err(),
        ];
        for e in errors {
            assert_eq!(e, AuthError::Invalid);
            assert_eq!(e.to_string(), "Incorrect API key provided.");
        }
        let future = OffsetDateTime::from_unix_timestamp(2_000_000_001).unwrap();
        assert!(auth(&store(|r| r.expires_at = Some(future)), KEY, Some(MODEL)).is_ok());
    }

    #[test]
    fn the_model_allow_list_gives_403_not_401() {
        let s = store(|r| r.models = vec![MODEL.into()]);
        assert!(auth(&s, KEY, Some(MODEL)).is_ok());
        let e = auth(&s, KEY, Some("other-model")).unwrap_err();
        assert_eq!(
            e,
            AuthError::ModelNotAllowed {
                model: "other-model".into()
            }
        );
        assert!(e.to_string().contains("`other-model`"));
        // A route without a model (e.g. listing models) needs only a valid key.
        assert!(auth(&s, KEY, None).is_ok());
        // But an invalid key is still 401 whatever the model.
        let disabled = store(|r| {
            r.models = vec![MODEL.into()];
            r.disabled = true;
        });
        assert_eq!(auth(&disabled, KEY, Some("other-model")), Err(AuthError::Invalid));
    }

    #[test]
    fn a_store_that_cannot_answer_fails_closed() {
        struct Down;
        impl KeyStore for Down {
            fn lookup<'a>(
                &'a self,
                _: &'a str,
            ) -> super::super::BoxFuture<'a, Result<Option<KeyRecord>, KeyStoreError>> {
                Box::pin(std::future::ready(Err(KeyStoreError::Unavailable(
                    "never loaded".into(),
                ))))
            }
            fn refresh(&self) -> super::super::BoxFuture<'_, Result<(), KeyStoreError>> {
                Box::pin(std::future::ready(Err(KeyStoreError::Unavailable(
                    "never loaded".into(),
                ))))
            }
        }
        assert_eq!(auth(&Down, KEY, Some(MODEL)), Err(AuthError::Unavailable));
        // Missing and malformed keys are answered without the store.
        assert_eq!(auth(&Down, "nope", Some(MODEL)), Err(AuthError::Invalid));
        let none = block_on(authenticate(&Down, Credentials::default(), None, SystemTime::now()));
        assert_eq!(none, Err(AuthError::Missing));
    }
}
