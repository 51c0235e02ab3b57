//! Stop strings: found even when they span tokens, never emitted, and held back no longer than necessary.

/// Scans generated text for stop strings.
///
/// Text goes in as deltas; what comes out is safe to show: it holds back only the longest tail that could still
/// grow into a stop string, and ends (excluding the stop string) at the first match.
#[derive(Debug, Clone, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
}

/// What [`StopMatcher::push`] decided for one delta.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopScan {
    /// No stop string yet: this text may be emitted.
    Continue(String),
    /// A stop string matched: emit this text (everything before the match), then stop.
    Stopped(String),
}

impl StopMatcher {
    /// A matcher for these stop strings (empty strings are ignored).
    pub fn new(stops: &[String]) -> Self {
        Self {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            held: String::new(),
        }
    }

    /// Feeds a text delta.
    pub fn push(&mut self, delta: &str) -> StopScan {
        if self.stops.is_empty() {
            return StopScan::Continue(delta.to_owned());
        }
        self.held.push_str(delta);
        // Earliest match wins; among matches at the same place, the longest.
        let found = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()).map(|pos| (pos, std::cmp::Reverse(s.len()))))
            .min();
        if let Some((pos, _)) = found {
            let out = self.held[..pos].to_owned();
            self.held.clear();
            return StopScan::Stopped(out);
        }
        let keep = self.partial_tail_len();
        let cut = self.held.len() - keep;
        let out = self.held[..cut].to_owned();
        self.held.drain(..cut);
        StopScan::Continue(out)
    }

    /// Releases the held-back tail (generation ended for another reason, so it can no longer become a stop).
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// Length in bytes of the longest suffix of the held text that is a proper prefix of some stop string.
    fn partial_tail_len(&self) -> usize {
        let text = self.held.as_str();
        let longest_stop = self.stops.iter().map(String::len).max().unwrap_or(0);
        let min_start = text.len().saturating_sub(longest_stop.saturating_sub(1));
        text.char_indices()
            .map(|(i, _)| i)
            .filter(|&i| i >= min_start)
            .find(|&i| self.stops.iter().any(|s| s.starts_with(&text[i..])))
            .map_or(0, |i| text.len() - i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], deltas: &[&str]) -> (String, bool) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut m = StopMatcher::new(&stops);
        let mut out = String::new();
        for d in deltas {
            match m.push(d) {
                StopScan::Continue(t) => out.push_str(&t),
                StopScan::Stopped(t) => {
                    out.push_str(&t);
                    return (out, true);
                }
            }
        }
        out.push_str(&m.flush());
        (out, false)
    }

    #[test]
    fn stop_string_spanning_tokens_is_found_and_not_emitted() {
        assert_eq!(
            run(&["\n\nUser:"], &["Hi", " there", "\n", "\nUs", "er:", " more"]),
            ("Hi there".into(), true)
        );
    }

    #[test]
    fn only_a_possible_prefix_is_held_back() {
        let stops = vec!["STOP".to_string()];
        let mut m = StopMatcher::new(&stops);
        assert_eq!(m.push("abc S"), StopScan::Continue("abc ".into()));
        assert_eq!(m.push("T"), StopScan::Continue("".into()));
        // "STx" can no longer become "STOP": released at once.
        assert_eq!(m.push("x"), StopScan::Continue("STx".into()));
        assert_eq!(m.push(" yes"), StopScan::Continue(" yes".into()));
    }

    #[test]
    fn held_prefix_is_released_when_generation_ends() {
        assert_eq!(run(&["END"], &["the E", "N"]), ("the EN".into(), false));
    }

    #[test]
    fn earliest_match_wins_among_several_stops() {
        assert_eq!(run(&["world", "o w"], &["hello world"]), ("hell".into(), true));
    }

    #[test]
    fn multibyte_stop_strings_and_text() {
        assert_eq!(run(&["。"], &["你好", "世界", "。再见"]), ("你好世界".into(), true));
        assert_eq!(run(&["🎉!"], &["ok 🎉", "?", "🎉", "!"]), ("ok 🎉?".into(), true));
    }

    #[test]
    fn no_stops_passes_everything_through() {
        assert_eq!(run(&[], &["a", "b"]), ("ab".into(), false));
        assert_eq!(run(&[""], &["a", "b"]), ("ab".into(), false));
    }

    #[test]
    fn stop_at_the_very_start_emits_nothing() {
        assert_eq!(run(&["###"], &["##", "#tail"]), ("".into(), true));
    }
}
