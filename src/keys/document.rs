//! The keys document (the Secrets Manager secret's value, and the local keys file): types, defaults and checks.

use super::key::normalize_hash;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::SystemTime;
use time::OffsetDateTime;

/// The model pattern that allows every model.
pub const ALL_MODELS: &str = "*";

/// One API key as stored: its id and limits, never the key itself, only its SHA-256.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyRecord {
    /// Public id (`key_…`): safe to log and to show.
    pub id: String,
    /// Who or what the key is for.
    pub name: String,
    /// `sha256:<64 hex>` of the whole key.
    pub hash: String,
    /// Model ids the key may use (exact ids, aliases resolved by the caller); `"*"` allows all. Default: `["*"]`.
    #[serde(default = "all_models")]
    pub models: Vec<String>,
    /// Requests per minute; absent means unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpm: Option<u32>,
    /// Tokens (prompt + completion) per minute; absent means unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm: Option<u64>,
    /// The first instant at which the key no longer works (RFC 3339); absent means never.
    #[serde(
        default,
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub expires_at: Option<OffsetDateTime>,
    /// A disabled (revoked) key is refused exactly like an unknown one.
    #[serde(default)]
    pub disabled: bool,
    /// Fields this version does not know: ignored, but kept so that rewriting the file does not drop them.
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

fn all_models() -> Vec<String> {
    vec![ALL_MODELS.to_owned()]
}

impl KeyRecord {
    /// A record with the defaults: all models, no limits, never expires, enabled.
    pub fn new(id: impl Into<String>, name: impl Into<String>, hash: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            name: name.into(),
            hash: hash.into(),
            models: all_models(),
            rpm: None,
            tpm: None,
            expires_at: None,
            disabled: false,
            extra: BTreeMap::new(),
        }
    }

    /// Whether the key may use model `model` (an exact, alias-resolved id).
    pub fn allows_model(&self, model: &str) -> bool {
        self.models.iter().any(|m| m == ALL_MODELS || m == model)
    }

    /// Whether the key has expired at `now` (`expires_at` itself is already expired).
    pub fn is_expired(&self, now: SystemTime) -> bool {
        self.expires_at.is_some_and(|at| OffsetDateTime::from(now) >= at)
    }

    /// Whether the key works at `now`: neither disabled nor expired.
    pub fn is_active(&self, now: SystemTime) -> bool {
        !self.disabled && !self.is_expired(now)
    }
}

/// The whole document: `{"keys": [...]}`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct KeysDocument {
    /// The keys, in the order they were added.
    pub keys: Vec<KeyRecord>,
    /// Top-level fields this version does not know (kept on rewrite).
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

/// A keys document that cannot be used. Messages name the entry by position and id, never by hash.
#[derive(Debug, thiserror::Error)]
pub enum DocumentError {
    /// Not JSON, or not the document's shape.
    #[error("keys document is not valid JSON of the expected shape: {0}")]
    Json(#[from] serde_json::Error),
    /// An entry breaks a rule.
    #[error("keys document entry #{index} (id {id:?}): {reason}")]
    Invalid {
        /// 0-based position in `keys`.
        index: usize,
        /// The entry's id as written.
        id: String,
        /// What is wrong.
        reason: &'static str,
    },
}

impl KeysDocument {
    /// Parses and checks a document; hashes come out normalised to lowercase.
    pub fn parse(text: &str) -> Result<Self, DocumentError> {
        let mut doc: Self = serde_json::from_str(text)?;
        doc.check()?;
        Ok(doc)
    }

    /// Checks every entry (ids and hashes present and unique, limits ≥ 1) and normalises hashes.
    ///
    /// One bad entry rejects the whole document: a store then keeps its last good document rather than silently
    /// serving a partial one.
    pub fn check(&mut self) -> Result<(), DocumentError> {
        let mut ids = HashSet::new();
        let mut hashes = HashSet::new();
        for (index, k) in self.keys.iter_mut().enumerate() {
            let fail = |reason| {
                Err(DocumentError::Invalid {
                    index,
                    id: k.id.clone(),
                    reason,
                })
            };
            if k.id.trim().is_empty() {
                return fail("`id` must not be empty");
            }
            let Some(hash) = normalize_hash(&k.hash) else {
                return fail("`hash` must be \"sha256:\" followed by 64 hex digits");
            };
            if k.rpm == Some(0) || k.tpm == Some(0) {
                return fail("`rpm` and `tpm` must be at least 1 (leave them out for no limit)");
            }
            if !ids.insert(k.id.clone()) {
                return fail("duplicate `id`");
            }
            if !hashes.insert(hash.clone()) {
                return fail("duplicate `hash` (the same key listed twice)");
            }
            k.hash = hash;
        }
        Ok(())
    }

    /// The document as pretty JSON with a final newline (the file format).
    ///
    /// Fallible only in theory (a timestamp outside RFC 3339's years); an error, never a substitute document, so
    /// a file is never overwritten with less than it held.
    pub fn to_pretty_json(&self) -> Result<String, serde_json::Error> {
        let mut s = serde_json::to_string_pretty(self)?;
        s.push('\n');
        Ok(s)
    }

    /// The entry with id `id`.
    pub fn find(&self, id: &str) -> Option<&KeyRecord> {
        self.keys.iter().find(|k| k.id == id)
    }

    /// The entry with id `id`, mutable.
    pub fn find_mut(&mut self, id: &str) -> Option<&mut KeyRecord> {
        self.keys.iter_mut().find(|k| k.id == id)
    }

    /// The records by hash, for lookups (expects a checked document: unique, normalised hashes).
    pub fn into_index(self) -> HashMap<String, KeyRecord> {
        self.keys.into_iter().map(|k| (k.hash.clone(), k)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const H: &str = "sha256:0000000000000000000000000000000000000000000000000000000000000001";

    #[test]
    fn the_design_example_parses() {
        let text = format!(
            r#"{{"keys": [{{"id": "key_7Hq2", "name": "alice", "hash": "{H}", "models": ["*"],
                "rpm": 600, "tpm": 200000, "expires_at": "2027-01-01T00:00:00Z", "disabled": false}}]}}"#
        );
        let doc = KeysDocument::parse(&text).unwrap();
        let k = &doc.keys[0];
        assert_eq!(
            (k.id.as_str(), k.name.as_str(), k.hash.as_str()),
            ("key_7Hq2", "alice", H)
        );
        assert_eq!((k.rpm, k.tpm, k.disabled), (Some(600), Some(200_000), false));
        assert_eq!(k.expires_at.unwrap().unix_timestamp(), 1_798_761_600);
        assert!(k.allows_model("anything"));
    }

    #[test]
    fn optional_fields_default_and_unknown_fields_are_ignored_but_kept() {
        let text = format!(r#"{{"version": 2, "keys": [{{"id": "k", "name": "n", "hash": "{H}", "team": "x"}}]}}"#);
        let doc = KeysDocument::parse(&text).unwrap();
        let k = &doc.keys[0];
        assert_eq!(k.models, vec!["*"]);
        assert_eq!((k.rpm, k.tpm, k.expires_at, k.disabled), (None, None, None, false));
        assert_eq!(k.extra["team"], "x");
        let again: serde_json::Value = serde_json::from_str(&doc.to_pretty_json().unwrap()).unwrap();
        assert_eq!(again["version"], 2);
        assert_eq!(again["keys"][0]["team"], "x");
        assert!(again["keys"][0].get("rpm").is_none(), "absent limits stay absent");
        assert_eq!(KeysDocument::parse(&doc.to_pretty_json().unwrap()).unwrap(), doc);
    }

    #[test]
    fn timestamps_with_offsets_and_fractions_parse() {
        let text = format!(
            r#"{{"keys": [{{"id": "k", "name": "n", "hash": "{H}",
            "expires_at": "2027-01-01T02:00:00.5+02:00"}}]}}"#
        );
        let at = KeysDocument::parse(&text).unwrap().keys[0].expires_at.unwrap();
        assert_eq!(at.unix_timestamp(), 1_798_761_600);
        let bad = format!(r#"{{"keys": [{{"id": "k", "name": "n", "hash": "{H}", "expires_at": "2027-01-01"}}]}}"#);
        assert!(matches!(KeysDocument::parse(&bad), Err(DocumentError::Json(_))));
    }

    #[test]
    fn expiry_and_disabled_decide_activity() {
        let mut k = KeyRecord::new("k", "n", H);
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        assert!(k.is_active(t));
        k.expires_at = Some(OffsetDateTime::from(t));
        assert!(k.is_active(t - Duration::from_secs(1)));
        assert!(k.is_expired(t), "expires_at is the first refused instant");
        assert!(!k.is_active(t + Duration::from_secs(1)));
        k.expires_at = None;
        k.disabled = true;
        assert!(!k.is_active(t));
    }

    #[test]
    fn model_lists_are_exact_unless_star() {
        let mut k = KeyRecord::new("k", "n", H);
        k.models = vec!["smollm2-135m-instruct".into()];
        assert!(k.allows_model("smollm2-135m-instruct"));
        assert!(!k.allows_model("smollm2-135m"));
        assert!(!k.allows_model("SMOLLM2-135M-INSTRUCT"));
        k.models = vec![];
        assert!(
            !k.allows_model("smollm2-135m-instruct"),
            "an explicit empty list allows nothing"
        );
        k.models = vec!["a".into(), "*".into()];
        assert!(k.allows_model("b"));
    }

    #[test]
    fn bad_entries_reject_the_document_without_showing_hashes() {
        let entry = |id: &str, hash: &str, extra: &str| format!(r#"{{"id":"{id}","name":"n","hash":"{hash}"{extra}}}"#);
        let doc = |entries: Vec<String>| format!(r#"{{"keys":[{}]}}"#, entries.join(","));
        let h2 = H.replace("01", "02");
        let cases = [
            (doc(vec![entry("", H, "")]), "`id`"),
            (doc(vec![entry("a", "sk-llm-abc", "")]), "`hash`"),
            (doc(vec![entry("a", H, r#","rpm":0"#)]), "at least 1"),
            (doc(vec![entry("a", H, ""), entry("a", &h2, "")]), "duplicate `id`"),
            (
                doc(vec![
                    entry("a", H, ""),
                    entry("b", &H.to_uppercase().replace("SHA256", "sha256"), ""),
                ]),
                "duplicate `hash`",
            ),
        ];
        for (text, want) in cases {
            let err = KeysDocument::parse(&text).unwrap_err().to_string();
            assert!(err.contains(want), "{err}");
            assert!(!err.contains("sk-llm-abc") && !err.contains("000000"), "{err}");
        }
        assert!(matches!(KeysDocument::parse("{}"), Err(DocumentError::Json(_))));
        assert!(matches!(
            KeysDocument::parse(r#"{"keys":[{"id":"a","name":"n"}]}"#),
            Err(DocumentError::Json(_))
        ));
        assert!(matches!(
            KeysDocument::parse(r#"{"keys":[{"id":"a","name":"n","hash":"x","rpm":-1}]}"#),
            Err(DocumentError::Json(_))
        ));
    }

    #[test]
    fn hashes_are_normalised_and_indexed() {
        let upper = H.to_uppercase().replace("SHA256", "sha256");
        let doc = KeysDocument::parse(&format!(r#"{{"keys":[{{"id":"a","name":"n","hash":"{upper}"}}]}}"#)).unwrap();
        assert_eq!(doc.keys[0].hash, H);
        assert_eq!(doc.find("a").unwrap().name, "n");
        assert!(doc.find("b").is_none());
        assert_eq!(doc.into_index()[H].id, "a");
    }
}
