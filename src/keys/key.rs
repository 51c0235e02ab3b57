//! Key material: generating keys and ids from the OS random source, the key format, and the stored hash.

use sha2::{Digest, Sha256};
use std::fmt::Write;

/// Every key starts with this.
pub const KEY_PREFIX: &str = "sk-llm-";
/// Random base62 characters after the prefix: 40 × log2(62) ≈ 238 bits.
pub const KEY_RANDOM_CHARS: usize = 40;
/// Key ids start with this.
pub const ID_PREFIX: &str = "key_";
/// Random base62 characters of an id: ids are labels, not secrets; 8 characters make collisions negligible.
pub const ID_RANDOM_CHARS: usize = 8;
/// Prefix of a stored hash.
pub const HASH_PREFIX: &str = "sha256:";

const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// The operating system's random source failed (no key is ever made from a weaker one).
#[derive(Debug, thiserror::Error)]
#[error("the operating system's random number generator failed: {0}")]
pub struct RandomError(#[from] getrandom::Error);

/// A new API key: `sk-llm-` + 40 base62 characters from the OS CSPRNG.
pub fn generate_key() -> Result<String, RandomError> {
    Ok(format!("{KEY_PREFIX}{}", random_base62(KEY_RANDOM_CHARS)?))
}

/// A new key id: `key_` + 8 base62 characters (callers check uniqueness against their document).
pub fn generate_id() -> Result<String, RandomError> {
    Ok(format!("{ID_PREFIX}{}", random_base62(ID_RANDOM_CHARS)?))
}

/// `n` uniformly random base62 characters from the OS CSPRNG (also used for request ids).
pub fn random_base62(n: usize) -> Result<String, RandomError> {
    let mut out = String::with_capacity(n);
    let mut buf = [0u8; 64];
    while out.len() < n {
        getrandom::fill(&mut buf)?;
        // Rejection sampling: 248 = 4 × 62, so bytes below it map to each character equally often (a plain `% 62`
        // over all 256 values would favour the first 8 characters).
        for b in buf.iter().filter(|&&b| b < 248) {
            if out.len() == n {
                break;
            }
            out.push(BASE62[usize::from(b % 62)] as char);
        }
    }
    Ok(out)
}

/// `sha256:<64 lowercase hex>` of the whole key: the only form in which keys are stored or looked up.
pub fn hash_key(key: &str) -> String {
    let digest = Sha256::digest(key.as_bytes());
    let mut out = String::with_capacity(HASH_PREFIX.len() + 64);
    out.push_str(HASH_PREFIX);
    for b in digest {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// Whether `key` has the shape of one of our keys (checked before hashing, so garbage never reaches the store).
pub fn is_well_formed_key(key: &str) -> bool {
    key.strip_prefix(KEY_PREFIX)
        .is_some_and(|rest| rest.len() == KEY_RANDOM_CHARS && rest.bytes().all(|b| b.is_ascii_alphanumeric()))
}

/// `hash` normalised to lowercase if it is `sha256:` + 64 hex digits, else `None`.
pub fn normalize_hash(hash: &str) -> Option<String> {
    let hex = hash.strip_prefix(HASH_PREFIX)?;
    (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| format!("{HASH_PREFIX}{}", hex.to_ascii_lowercase()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn keys_have_the_documented_shape() {
        for _ in 0..200 {
            let k = generate_key().unwrap();
            assert_eq!(k.len(), KEY_PREFIX.len() + 40, "{k}");
            assert!(k.starts_with("sk-llm-"));
            assert!(is_well_formed_key(&k), "{k}");
        }
    }

    #[test]
    fn keys_and_ids_do_not_repeat_and_use_the_whole_alphabet() {
        let keys: HashSet<String> = (0..1000).map(|_| generate_key().unwrap()).collect();
        assert_eq!(keys.len(), 1000);
        let seen: HashSet<char> = keys.iter().flat_map(|k| k[KEY_PREFIX.len()..].chars()).collect();
        // 40 000 draws over 62 symbols: every symbol shows up (a biased or truncated alphabet would not).
        assert_eq!(seen.len(), 62);
        let id = generate_id().unwrap();
        assert!(id.starts_with("key_") && id.len() == 12 && id[4..].bytes().all(|b| b.is_ascii_alphanumeric()));
    }

    #[test]
    fn the_hash_is_sha256_hex_of_the_whole_key() {
        // Known answer: sha256("abc").
        assert_eq!(
            hash_key("abc"),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let h = hash_key("sk-llm-x");
        assert_eq!(h.len(), 7 + 64);
        assert_ne!(h, hash_key("sk-llm-y"));
        assert_eq!(normalize_hash(&h.to_uppercase().replace("SHA256:", "sha256:")), Some(h));
    }

    #[test]
    fn malformed_keys_and_hashes_are_recognised() {
        let good = format!("sk-llm-{}", "a".repeat(40));
        assert!(is_well_formed_key(&good));
        for bad in [
            "",
            "sk-llm-",
            &format!("sk-llm-{}", "a".repeat(39)),
            &format!("sk-llm-{}", "a".repeat(41)),
            &format!("sk-llm-{}-", "a".repeat(39)),
            &format!("sk-xxx-{}", "a".repeat(40)),
            &format!("SK-LLM-{}", "a".repeat(40)),
            &format!("sk-llm-{}é", "a".repeat(39)),
        ] {
            assert!(!is_well_formed_key(bad), "{bad}");
        }
        assert_eq!(normalize_hash("sha256:abc"), None);
        assert_eq!(normalize_hash(&format!("md5:{}", "a".repeat(64))), None);
        assert_eq!(normalize_hash(&format!("sha256:{}", "g".repeat(64))), None);
    }
}
