//! Parse, don't validate: raw request values become [`SamplingParams`] and limits, or a precise error.

use super::sampling::SamplingParams;
use std::collections::BTreeMap;

/// A request value that is out of range or malformed; names the field and the limit.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct ValidationError {
    /// The request field at fault, e.g. `top_p`.
    pub param: String,
    /// A sentence naming the field and the allowed range.
    pub message: String,
    /// A machine-readable code when OpenAI has one (e.g. `context_length_exceeded`).
    pub code: Option<&'static str>,
}

impl ValidationError {
    /// An error about `param`.
    pub fn new(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            param: param.into(),
            message: message.into(),
            code: None,
        }
    }

    /// The same error with an OpenAI error code.
    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }
}

/// Sampling fields as they arrive (all optional, wide types), before validation.
#[derive(Debug, Clone, Default)]
pub struct RawSampling {
    /// `temperature`, 0–2.
    pub temperature: Option<f64>,
    /// `top_p`, (0, 1].
    pub top_p: Option<f64>,
    /// `top_k`, ≥ 0 (−1 and 0 disable it).
    pub top_k: Option<i64>,
    /// `min_p`, 0–1.
    pub min_p: Option<f64>,
    /// `seed`, any integer.
    pub seed: Option<i64>,
    /// `presence_penalty`, −2–2.
    pub presence_penalty: Option<f64>,
    /// `frequency_penalty`, −2–2.
    pub frequency_penalty: Option<f64>,
    /// `repetition_penalty`, (0, 10].
    pub repetition_penalty: Option<f64>,
    /// `logit_bias`: token id (as a string) → bias in −100–100.
    pub logit_bias: Option<BTreeMap<String, f64>>,
}

fn in_range(
    param: &str,
    v: Option<f64>,
    lo: f64,
    hi: f64,
    lo_open: bool,
    default: f64,
) -> Result<f32, ValidationError> {
    let Some(v) = v else {
        return Ok(default as f32);
    };
    // Checked again after the narrowing to f32: a tiny positive `top_p` (1e-300) would otherwise become 0.
    let narrow = v as f32;
    let within = |v: f64| v.is_finite() && (if lo_open { v > lo } else { v >= lo }) && v <= hi;
    if within(v) && within(f64::from(narrow)) {
        Ok(narrow)
    } else {
        let op = if lo_open { ">" } else { ">=" };
        Err(ValidationError::new(
            param,
            format!("`{param}` must be {op} {lo} and <= {hi}, got {v}"),
        ))
    }
}

impl RawSampling {
    /// Checks every field against its range and the vocabulary, giving validated [`SamplingParams`].
    pub fn validate(&self, vocab_size: usize) -> Result<SamplingParams, ValidationError> {
        let temperature = in_range("temperature", self.temperature, 0.0, 2.0, false, 1.0)?;
        let top_p = in_range("top_p", self.top_p, 0.0, 1.0, true, 1.0)?;
        let min_p = in_range("min_p", self.min_p, 0.0, 1.0, false, 0.0)?;
        let presence_penalty = in_range("presence_penalty", self.presence_penalty, -2.0, 2.0, false, 0.0)?;
        let frequency_penalty = in_range("frequency_penalty", self.frequency_penalty, -2.0, 2.0, false, 0.0)?;
        let repetition_penalty = in_range("repetition_penalty", self.repetition_penalty, 0.0, 10.0, true, 1.0)?;
        let top_k = match self.top_k {
            None | Some(-1) | Some(0) => 0,
            Some(k) if k > 0 => usize::try_from(k).unwrap_or(usize::MAX).min(vocab_size),
            Some(k) => {
                return Err(ValidationError::new(
                    "top_k",
                    format!("`top_k` must be >= 0 (or -1 to disable), got {k}"),
                ))
            }
        };
        let mut logit_bias = Vec::new();
        for (key, &bias) in self.logit_bias.iter().flatten() {
            let id: u32 = key
                .trim()
                .parse()
                .ok()
                .filter(|&id: &u32| (id as usize) < vocab_size)
                .ok_or_else(|| {
                    ValidationError::new(
                        "logit_bias",
                        format!(
                            "`logit_bias` keys must be token ids between 0 and {}, got {key:?}",
                            vocab_size - 1
                        ),
                    )
                })?;
            if !(bias.is_finite() && (-100.0..=100.0).contains(&bias)) {
                return Err(ValidationError::new(
                    "logit_bias",
                    format!("`logit_bias` values must be between -100 and 100, got {bias} for token {id}"),
                ));
            }
            logit_bias.push((id, bias as f32));
        }
        Ok(SamplingParams {
            temperature,
            top_p,
            top_k,
            min_p,
            seed: self.seed.map(|s| s as u64),
            presence_penalty,
            frequency_penalty,
            repetition_penalty,
            logit_bias,
        })
    }
}

/// Checks that a prompt of `prompt_tokens` plus `max_tokens` new ones fits the context.
pub fn check_context(prompt_tokens: usize, max_tokens: usize, context_length: usize) -> Result<(), ValidationError> {
    if prompt_tokens == 0 {
        return Err(ValidationError::new(
            "prompt",
            "the prompt must contain at least one token",
        ));
    }
    // Saturating: `max_tokens` comes from the client, and a wrapped sum would let any request through.
    let requested = prompt_tokens.saturating_add(max_tokens);
    if requested > context_length {
        return Err(ValidationError::new(
            "max_tokens",
            format!(
                "This model's maximum context length is {context_length} tokens. However, you requested {requested} \
                 tokens ({prompt_tokens} in the prompt, {max_tokens} for the completion). Please reduce the prompt \
                 or `max_tokens`."
            ),
        )
        .with_code("context_length_exceeded"));
    }
    Ok(())
}

/// Checks a prompt of `prompt_tokens` against the server's prompt cap `max_prompt_tokens` (`MAX_PROMPT_TOKENS`).
///
/// The code is OpenAI's `context_length_exceeded`, so clients that shorten their prompt on it do so here too.
pub fn check_prompt_limit(prompt_tokens: usize, max_prompt_tokens: usize) -> Result<(), ValidationError> {
    if prompt_tokens > max_prompt_tokens {
        return Err(ValidationError::new(
            "prompt",
            format!(
                "This server accepts at most {max_prompt_tokens} prompt tokens. However, your prompt has \
                 {prompt_tokens} tokens. Please reduce the prompt."
            ),
        )
        .with_code("context_length_exceeded"));
    }
    Ok(())
}

/// Checks a requested `max_tokens` (named `param`) against the server's cap (`MAX_COMPLETION_TOKENS`).
pub fn check_completion_limit(param: &str, max_tokens: usize, cap: usize) -> Result<(), ValidationError> {
    if max_tokens > cap {
        return Err(ValidationError::new(
            param,
            format!("`{param}` must be <= {cap} on this server, got {max_tokens}"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_openai_defaults() {
        let p = RawSampling::default().validate(10).unwrap();
        assert_eq!(p, SamplingParams::default());
    }

    #[test]
    fn out_of_range_values_name_the_field_and_limit() {
        let e = RawSampling {
            temperature: Some(2.5),
            ..Default::default()
        }
        .validate(10)
        .unwrap_err();
        assert_eq!(e.param, "temperature");
        assert_eq!(e.message, "`temperature` must be >= 0 and <= 2, got 2.5");
        let e = RawSampling {
            top_p: Some(0.0),
            ..Default::default()
        }
        .validate(10)
        .unwrap_err();
        assert_eq!(e.message, "`top_p` must be > 0 and <= 1, got 0");
        let e = RawSampling {
            top_k: Some(-5),
            ..Default::default()
        }
        .validate(10)
        .unwrap_err();
        assert_eq!(e.param, "top_k");
        let e = RawSampling {
            presence_penalty: Some(f64::NAN),
            ..Default::default()
        }
        .validate(10)
        .unwrap_err();
        assert_eq!(e.param, "presence_penalty");
        // Found by tests/wire_properties.rs: in range as f64, but 0 once narrowed to f32.
        for (top_p, repetition_penalty) in [(Some(1e-300), None), (None, Some(2.8e-191))] {
            let raw = RawSampling {
                top_p,
                repetition_penalty,
                ..Default::default()
            };
            assert!(raw.validate(10).is_err(), "{raw:?}");
        }
    }

    #[test]
    fn logit_bias_keys_and_values_are_checked() {
        let bias = |k: &str, v: f64| RawSampling {
            logit_bias: Some(BTreeMap::from([(k.to_string(), v)])),
            ..Default::default()
        };
        assert_eq!(bias("3", -100.0).validate(10).unwrap().logit_bias, vec![(3, -100.0)]);
        assert_eq!(bias("10", 1.0).validate(10).unwrap_err().param, "logit_bias");
        assert_eq!(bias("abc", 1.0).validate(10).unwrap_err().param, "logit_bias");
        assert_eq!(bias("-1", 1.0).validate(10).unwrap_err().param, "logit_bias");
        assert_eq!(bias("2", 101.0).validate(10).unwrap_err().param, "logit_bias");
    }

    #[test]
    fn context_overflow_has_the_openai_code() {
        assert!(check_context(10, 6, 16).is_ok());
        let e = check_context(10, 7, 16).unwrap_err();
        assert_eq!(e.code, Some("context_length_exceeded"));
        assert_eq!(check_context(0, 1, 16).unwrap_err().param, "prompt");
        // Found by tests/wire_properties.rs: the sum overflowed (a panic in debug builds, a pass in release).
        let e = check_context(2, usize::MAX, 16).unwrap_err();
        assert_eq!(e.code, Some("context_length_exceeded"));
    }

    #[test]
    fn prompt_and_completion_caps_name_the_limit() {
        assert!(check_prompt_limit(8, 8).is_ok());
        let e = check_prompt_limit(9, 8).unwrap_err();
        assert_eq!((e.param.as_str(), e.code), ("prompt", Some("context_length_exceeded")));
        assert!(
            e.message.contains("at most 8 prompt tokens") && e.message.contains("has 9"),
            "{e}"
        );
        assert!(check_completion_limit("max_tokens", 32, 32).is_ok());
        let e = check_completion_limit("max_completion_tokens", 33, 32).unwrap_err();
        assert_eq!(e.param, "max_completion_tokens");
        assert_eq!(
            e.message,
            "`max_completion_tokens` must be <= 32 on this server, got 33"
        );
    }
}
