//! The local keys file: atomic load and save for the CLI, and `FileKeyStore`, which serves it through the cache.

use super::cache::{CachePolicy, CachedDocument};
use super::key::{generate_id, generate_key, hash_key, RandomError};
use super::{BoxFuture, DocumentError, KeyRecord, KeyStore, KeyStoreError, KeysDocument};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The keys file used when neither `--keys-file` nor `API_KEYS_FILE` names one: in the working directory, like
/// the model artifacts `make run` uses, so a checkout's dev key stays with the checkout.
pub const DEFAULT_KEYS_FILE: &str = "lambda-llm-keys.json";

/// A keys file that cannot be read or written.
#[derive(Debug, thiserror::Error)]
pub enum KeysFileError {
    /// The file does not exist.
    #[error("no keys file at {path} (create one with `lambda-llm keys new --name NAME`)")]
    Missing {
        /// The path tried.
        path: PathBuf,
    },
    /// Reading or writing failed.
    #[error("keys file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// No randomness for a new key.
    #[error(transparent)]
    Random(#[from] RandomError),
    /// The content is not a valid keys document.
    #[error("keys file {path}: {source}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        source: DocumentError,
    },
}

/// Reads and checks the keys file.
pub fn load_file(path: &Path) -> Result<KeysDocument, KeysFileError> {
    let text = std::fs::read_to_string(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => KeysFileError::Missing { path: path.to_owned() },
        _ => KeysFileError::Io {
            path: path.to_owned(),
            source: e,
        },
    })?;
    KeysDocument::parse(&text).map_err(|source| KeysFileError::Invalid {
        path: path.to_owned(),
        source,
    })
}

/// Reads the keys file, or an empty document if there is none yet (for `keys new`).
pub fn load_or_empty(path: &Path) -> Result<KeysDocument, KeysFileError> {
    match load_file(path) {
        Err(KeysFileError::Missing { .. }) => Ok(KeysDocument::default()),
        other => other,
    }
}

/// Writes the keys file atomically (temporary file in the same directory, then rename), readable only by the
/// owner on unix; creates missing parent directories.
///
/// A reader (a running server) sees the old or the new document, never half of one. Two writers at once are not
/// serialised: the last rename wins.
pub fn save_file(path: &Path, doc: &KeysDocument) -> Result<(), KeysFileError> {
    let io = |source| KeysFileError::Io {
        path: path.to_owned(),
        source,
    };
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io)?;
    let name = path
        .file_name()
        .map_or_else(|| "keys".into(), |n| n.to_string_lossy().into_owned());
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let tmp = dir.join(format!(".{name}.{}.{nanos}.tmp", std::process::id()));
    let text = doc.to_pretty_json().map_err(|e| io(std::io::Error::other(e)))?;
    let written = write_new(&tmp, text.as_bytes()).and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(io(e));
    }
    // Make the rename itself durable; not every platform can open a directory, so this is best effort.
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Creates a keys file with one key named `name` if `path` does not exist yet, and returns that key (shown once;
/// for `serve`'s dev key). An existing file is left alone: `Ok(None)`.
pub fn create_with_first_key(path: &Path, name: &str) -> Result<Option<String>, KeysFileError> {
    if path.exists() {
        return Ok(None);
    }
    let key = generate_key()?;
    let record = KeyRecord::new(generate_id()?, name, hash_key(&key));
    save_file(
        path,
        &KeysDocument {
            keys: vec![record],
            ..Default::default()
        },
    )?;
    Ok(Some(key))
}

/// Replaces the key named `name` (if any) with a fresh one and returns it; creates the file if missing.
///
/// For `serve --dev-key`: only hashes are stored, so a local dev key cannot be shown again — a new one is made.
pub fn replace_named_key(path: &Path, name: &str) -> Result<String, KeysFileError> {
    let mut doc = load_or_empty(path)?;
    doc.keys.retain(|k| k.name != name);
    let key = generate_key()?;
    doc.keys.push(KeyRecord::new(generate_id()?, name, hash_key(&key)));
    save_file(path, &doc)?;
    Ok(key)
}

/// Creates `path` (which must not exist) with owner-only permissions and writes `bytes` durably.
fn write_new(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut f = options.open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// A key store over the local keys file, with the same cache rules as the Secrets Manager store: `keys revoke`
/// takes effect within the TTL, `keys new` at once (refresh on unknown key), and a broken edit of the file keeps
/// the last good document serving.
#[derive(Debug)]
pub struct FileKeyStore {
    path: PathBuf,
    cache: CachedDocument,
}

impl FileKeyStore {
    /// A store reading `path`, trusting what it read for `ttl` (`KEYS_CACHE_TTL_SECONDS`). Nothing is read yet.
    pub fn new(path: impl Into<PathBuf>, ttl: Duration) -> Self {
        Self {
            path: path.into(),
            cache: CachedDocument::new(CachePolicy::new(ttl)),
        }
    }

    /// The file served.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the file. Blocking I/O inside an async lookup is acceptable here: the file is small, local, and read
    /// at most once per refresh interval; the Secrets Manager store does real async I/O instead.
    async fn fetch(&self) -> Result<KeysDocument, KeysFileError> {
        load_file(&self.path)
    }
}

impl KeyStore for FileKeyStore {
    fn lookup<'a>(&'a self, hash: &'a str) -> BoxFuture<'a, Result<Option<KeyRecord>, KeyStoreError>> {
        Box::pin(self.cache.lookup(hash, Instant::now(), || self.fetch()))
    }

    fn refresh(&self) -> BoxFuture<'_, Result<(), KeyStoreError>> {
        Box::pin(self.cache.refresh(Instant::now(), || self.fetch()))
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{block_on, TempDir};
    use super::*;

    fn record(id: &str, key: &str) -> KeyRecord {
        KeyRecord::new(id, "test", hash_key(key))
    }

    #[test]
    fn save_then_load_round_trips_atomically_with_owner_only_mode() {
        let dir = TempDir::new();
        let path = dir.0.join("sub/keys.json");
        assert!(matches!(load_file(&path), Err(KeysFileError::Missing { .. })));
        assert_eq!(load_or_empty(&path).unwrap(), KeysDocument::default());
        let mut doc = KeysDocument::default();
        doc.keys.push(record("key_a", "k1"));
        save_file(&path, &doc).unwrap();
        assert_eq!(load_file(&path).unwrap(), doc);
        doc.keys.push(record("key_b", "k2"));
        save_file(&path, &doc).unwrap();
        assert_eq!(load_file(&path).unwrap().keys.len(), 2);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        }
        let leftovers: Vec<_> = std::fs::read_dir(path.parent().unwrap()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temporary files left behind");
    }

    #[test]
    fn a_first_key_is_created_only_without_a_file() {
        let dir = TempDir::new();
        let path = dir.0.join("keys.json");
        let key = create_with_first_key(&path, "dev").unwrap().unwrap();
        let doc = load_file(&path).unwrap();
        assert_eq!((doc.keys.len(), doc.keys[0].name.as_str()), (1, "dev"));
        assert_eq!(doc.keys[0].hash, hash_key(&key));
        assert_eq!(create_with_first_key(&path, "dev").unwrap(), None);
        assert_eq!(load_file(&path).unwrap(), doc);
    }

    #[test]
    fn a_broken_file_is_a_clear_error() {
        let dir = TempDir::new();
        let path = dir.0.join("keys.json");
        std::fs::write(&path, "{\"keys\": [").unwrap();
        let err = load_file(&path).unwrap_err().to_string();
        assert!(err.contains("keys.json") && err.contains("valid JSON"), "{err}");
    }

    #[test]
    fn the_file_store_sees_new_keys_at_once_and_revocations_within_the_ttl() {
        let dir = TempDir::new();
        let path = dir.0.join("keys.json");
        let (k1, k2) = (generate_key().unwrap(), generate_key().unwrap());
        let store = FileKeyStore::new(&path, Duration::ZERO);
        // Never loaded and no file: fail closed.
        assert!(matches!(
            block_on(store.lookup(&hash_key(&k1))),
            Err(KeyStoreError::Unavailable(_))
        ));
        assert!(block_on(store.refresh()).is_err());

        let mut doc = KeysDocument {
            keys: vec![record("key_1", &k1)],
            ..Default::default()
        };
        save_file(&path, &doc).unwrap();
        block_on(store.refresh()).unwrap();
        assert_eq!(block_on(store.lookup(&hash_key(&k1))).unwrap().unwrap().id, "key_1");
        // A key added while serving works on its first use.
        doc.keys.push(record("key_2", &k2));
        save_file(&path, &doc).unwrap();
        assert_eq!(block_on(store.lookup(&hash_key(&k2))).unwrap().unwrap().id, "key_2");
        // A revoked key: with a zero TTL, the next lookup already sees it.
        doc.find_mut("key_1").unwrap().disabled = true;
        save_file(&path, &doc).unwrap();
        assert!(block_on(store.lookup(&hash_key(&k1))).unwrap().unwrap().disabled);
        // A broken edit keeps the last good document.
        std::fs::write(&path, "not json").unwrap();
        assert_eq!(block_on(store.lookup(&hash_key(&k2))).unwrap().unwrap().id, "key_2");
        assert_eq!(store.path(), path);
    }

    #[test]
    fn the_file_store_trusts_its_copy_for_the_ttl() {
        let dir = TempDir::new();
        let path = dir.0.join("keys.json");
        let k = generate_key().unwrap();
        save_file(
            &path,
            &KeysDocument {
                keys: vec![record("key_1", &k)],
                ..Default::default()
            },
        )
        .unwrap();
        let store = FileKeyStore::new(&path, Duration::from_secs(60));
        assert!(block_on(store.lookup(&hash_key(&k))).unwrap().is_some());
        std::fs::remove_file(&path).unwrap();
        assert!(
            block_on(store.lookup(&hash_key(&k))).unwrap().is_some(),
            "cached within the TTL"
        );
    }
}
