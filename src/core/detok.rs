//! Incremental, UTF-8-safe detokenization: text comes out token by token, never half a character.

use super::model::{ModelError, TokenDecoder};

/// How many tokens a partial character may be held back before the replacement character is released anyway.
/// A UTF-8 character is at most 4 bytes, and byte-level BPE spends at least one token per byte.
const MAX_HOLD_TOKENS: usize = 4;

/// Tokens decoded before the newest ones, so that decoders which look at context (leading spaces) see some.
const CONTEXT_TOKENS: usize = 6;

/// Turns a growing list of token ids into text deltas.
///
/// The classic prefix/read-offset scheme: decode a short window before and after the newest token and emit the
/// difference. A delta is held back while the text ends in U+FFFD (a character still incomplete in bytes), and only
/// then — so punctuation and spaces stream at once.
#[derive(Debug, Default, Clone)]
pub struct DetokStream {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl DetokStream {
    /// A stream with no tokens yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// All token ids pushed so far.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// Adds one token and returns the text it completes (possibly empty while a character is incomplete).
    pub fn push<D: TokenDecoder + ?Sized>(&mut self, decoder: &D, id: u32) -> Result<String, ModelError> {
        self.ids.push(id);
        let before = decoder.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let after = decoder.decode(&self.ids[self.prefix_offset..])?;
        let held = self.ids.len() - self.read_offset;
        if after.ends_with('\u{FFFD}') && held < MAX_HOLD_TOKENS {
            return Ok(String::new());
        }
        // `before` is normally a prefix of `after`; if a decoder rewrites context, fall back to the common prefix.
        let delta = match after.strip_prefix(before.as_str()) {
            Some(rest) => rest.to_owned(),
            None => {
                let common = common_prefix_len(&before, &after);
                after[common..].to_owned()
            }
        };
        self.read_offset = self.ids.len();
        self.prefix_offset = self.read_offset.saturating_sub(CONTEXT_TOKENS).max(self.prefix_offset);
        Ok(delta)
    }

    /// Releases whatever is still held back (at the end of generation).
    pub fn flush<D: TokenDecoder + ?Sized>(&mut self, decoder: &D) -> Result<String, ModelError> {
        if self.read_offset == self.ids.len() {
            return Ok(String::new());
        }
        let before = decoder.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let after = decoder.decode(&self.ids[self.prefix_offset..])?;
        self.read_offset = self.ids.len();
        let common = common_prefix_len(&before, &after);
        Ok(after[common..].to_owned())
    }
}

fn common_prefix_len(a: &str, b: &str) -> usize {
    a.char_indices()
        .zip(b.chars())
        .find(|((_, ca), cb)| ca != cb)
        .map(|((i, _), _)| i)
        .unwrap_or_else(|| a.len().min(b.len()))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A byte-level decoder over a fixed table: each id is a byte string; invalid UTF-8 becomes U+FFFD, as in
    /// byte-level BPE tokenizers.
    pub(crate) struct ByteDecoder(pub Vec<Vec<u8>>);

    impl TokenDecoder for ByteDecoder {
        fn decode(&self, ids: &[u32]) -> Result<String, ModelError> {
            let bytes: Vec<u8> = ids.iter().flat_map(|&i| self.0[i as usize].clone()).collect();
            Ok(String::from_utf8_lossy(&bytes).into_owned())
        }
    }

    fn stream_all(dec: &ByteDecoder, ids: &[u32]) -> Vec<String> {
        let mut s = DetokStream::new();
        let mut out: Vec<String> = ids.iter().map(|&i| s.push(dec, i).unwrap()).collect();
        out.push(s.flush(dec).unwrap());
        out
    }

    #[test]
    fn multibyte_characters_are_never_split() {
        // "你" = e4 bd a0, "😀" = f0 9f 98 80, split one byte per token.
        let table = vec![
            vec![0xe4],
            vec![0xbd],
            vec![0xa0],
            vec![0xf0],
            vec![0x9f],
            vec![0x98],
            vec![0x80],
            b" ok.".to_vec(),
        ];
        let dec = ByteDecoder(table);
        let deltas = stream_all(&dec, &[0, 1, 2, 3, 4, 5, 6, 7]);
        assert_eq!(deltas, vec!["", "", "你", "", "", "", "😀", " ok.", ""]);
        assert!(deltas.iter().all(|d| !d.contains('\u{FFFD}')));
    }

    #[test]
    fn ascii_and_punctuation_stream_immediately() {
        let dec = ByteDecoder(vec![
            b"Hello".to_vec(),
            b",".to_vec(),
            b" world".to_vec(),
            b"!".to_vec(),
        ]);
        assert_eq!(stream_all(&dec, &[0, 1, 2, 3]), vec!["Hello", ",", " world", "!", ""]);
    }

    #[test]
    fn truly_invalid_bytes_are_released_after_the_hold_limit() {
        // A lone continuation byte never becomes valid: it must not block the stream forever.
        let dec = ByteDecoder(vec![vec![0x80], b"a".to_vec()]);
        let deltas = stream_all(&dec, &[0, 0, 0, 0, 1]);
        let joined: String = deltas.concat();
        assert_eq!(joined, "\u{FFFD}\u{FFFD}\u{FFFD}\u{FFFD}a");
    }

    #[test]
    fn flush_releases_an_incomplete_tail() {
        let dec = ByteDecoder(vec![b"x".to_vec(), vec![0xe4]]);
        assert_eq!(stream_all(&dec, &[0, 1]), vec!["x", "", "\u{FFFD}"]);
    }

    #[test]
    fn concatenated_deltas_equal_full_decode() {
        let table: Vec<Vec<u8>> = "Grüße, 世界! 🎉 done".bytes().map(|b| vec![b]).collect();
        let dec = ByteDecoder(table);
        let ids: Vec<u32> = (0..dec.0.len() as u32).collect();
        assert_eq!(stream_all(&dec, &ids).concat(), "Grüße, 世界! 🎉 done");
    }
}
