//! Logging set-up: `tracing` to stderr, text or JSON, filtered by `RUST_LOG` (default `info`).

use crate::config::LogFormat;
use tracing_subscriber::EnvFilter;

/// Installs the global subscriber once; later calls are no-ops.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().with_current_span(false).try_init(),
        LogFormat::Text => builder.with_target(false).try_init(),
    };
}

/// Writes one CloudWatch Embedded Metric Format line to stdout: CloudWatch turns it into metrics
/// (namespace `lambda-llm`, dimension `function`) without any API call from the function.
///
/// `metrics` are `(name, value, unit)`, with units as CloudWatch spells them (`Milliseconds`, `Count`, …).
pub fn emf(function: &str, metrics: &[(&str, f64, &str)]) {
    println!("{}", emf_line(function, metrics, std::time::SystemTime::now()));
}

fn emf_line(function: &str, metrics: &[(&str, f64, &str)], now: std::time::SystemTime) -> String {
    let ts = now
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let defs: Vec<serde_json::Value> = metrics
        .iter()
        .map(|(name, _, unit)| serde_json::json!({"Name": name, "Unit": unit}))
        .collect();
    let mut line = serde_json::json!({
        "_aws": {"Timestamp": ts, "CloudWatchMetrics": [
            {"Namespace": "lambda-llm", "Dimensions": [["function"]], "Metrics": defs}
        ]},
        "function": function,
    });
    for (name, value, _) in metrics {
        line[*name] = serde_json::json!(value);
    }
    line.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emf_line_declares_and_carries_each_metric() {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(1234);
        let v: serde_json::Value =
            serde_json::from_str(&emf_line("f", &[("TimeToFirstToken", 12.5, "Milliseconds")], t)).unwrap();
        assert_eq!(v["_aws"]["Timestamp"], 1234);
        assert_eq!(
            v["_aws"]["CloudWatchMetrics"][0]["Metrics"][0]["Name"],
            "TimeToFirstToken"
        );
        assert_eq!(
            v["_aws"]["CloudWatchMetrics"][0]["Dimensions"],
            serde_json::json!([["function"]])
        );
        assert_eq!(v["function"], "f");
        assert_eq!(v["TimeToFirstToken"], 12.5);
    }
}
