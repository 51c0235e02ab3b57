//! `bench --profile`: ONNX Runtime's per-operator trace of the real graph, summed per operator type for a decode step
//! and for the chat prompt.

use anyhow::{Context, Result};
use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Where the time of one kind of run goes.
#[derive(Debug, Serialize, PartialEq)]
pub struct RunKind {
    /// `decode step` or `prompt`.
    pub name: &'static str,
    /// Sequences and tokens per run.
    pub rows: u64,
    pub tokens: u64,
    /// Runs of this kind in the trace.
    pub runs: usize,
    /// Mean wall time of one run (`model_run`), µs.
    pub run_us: f64,
    /// Per operator type, most time first.
    pub ops: Vec<OpTime>,
    /// The run's time outside every node (the executor and the profiler's own bookkeeping), µs per run.
    pub outside_nodes_us: f64,
}

/// One operator type's time in a kind of run.
#[derive(Debug, Serialize, PartialEq)]
pub struct OpTime {
    pub op: String,
    /// Nodes of this type per run.
    pub nodes: usize,
    /// Mean time per run, µs.
    pub us: f64,
    /// `us` over the run's wall time.
    pub share: f64,
}

/// The profile of a bench: the trace file and its summary.
#[derive(Debug, Serialize)]
pub struct Profile {
    pub file: PathBuf,
    pub kinds: Vec<RunKind>,
    /// The trace reached ONNX Runtime's limit of events, so the last runs are missing from it.
    pub truncated: bool,
}

/// Events ONNX Runtime's profiler records at most; it drops the rest.
const MAX_EVENTS: usize = 1_000_000;

/// The attention operators (lambda-llm's in model.fast.onnx, ONNX Runtime's in model.onnx), whose first input is
/// `[rows, tokens, …]`.
const ATTENTION: [&str; 2] = ["Attention", "GroupQueryAttention"];

/// A run of the trace: its wall time and its nodes (operator type, µs).
struct Run {
    end: f64,
    dur: f64,
    /// `[rows, tokens]` from the first attention node's first input.
    shape: Option<(u64, u64)>,
    nodes: Vec<(String, f64)>,
}

/// Reads the trace at `file` and, leaving out its first `skip` runs (the warm-up), summarises its one-token runs of
/// one sequence (decode steps) and its runs of a `prompt_tokens` prompt.
pub fn summarise(file: &Path, skip: usize, prompt_tokens: usize) -> Result<Profile> {
    let text = std::fs::read_to_string(file).with_context(|| format!("reading the profile {}", file.display()))?;
    let events: Vec<Value> =
        serde_json::from_str(&text).with_context(|| format!("parsing the profile {}", file.display()))?;
    let runs: Vec<Run> = runs(&events).into_iter().skip(skip).collect();
    let kinds: Vec<RunKind> = [("decode step", 1), ("prompt", prompt_tokens as u64)]
        .into_iter()
        .filter_map(|(name, tokens)| kind(name, &runs, 1, tokens))
        .collect();
    anyhow::ensure!(
        !kinds.is_empty(),
        "the profile {} has no one-token run and no {prompt_tokens}-token run of one sequence ({} runs after the \
         warm-up)",
        file.display(),
        runs.len()
    );
    Ok(Profile {
        file: file.to_path_buf(),
        kinds,
        truncated: events.len() >= MAX_EVENTS,
    })
}

/// The trace's `model_run` events, each with the node events inside it.
fn runs(events: &[Value]) -> Vec<Run> {
    let span = |e: &Value| Some((e.get("ts")?.as_f64()?, e.get("dur")?.as_f64()?));
    let mut runs: Vec<(f64, Run)> = events
        .iter()
        .filter(|e| e.get("cat").and_then(Value::as_str) == Some("Session"))
        .filter(|e| e.get("name").and_then(Value::as_str) == Some("model_run"))
        .filter_map(|e| {
            let (ts, dur) = span(e)?;
            Some((
                ts,
                Run {
                    end: ts + dur,
                    dur,
                    shape: None,
                    nodes: Vec::new(),
                },
            ))
        })
        .collect();
    runs.sort_by(|a, b| a.0.total_cmp(&b.0));
    for e in events {
        let is_kernel = e.get("cat").and_then(Value::as_str) == Some("Node")
            && e.get("name")
                .and_then(Value::as_str)
                .is_some_and(|n| n.ends_with("_kernel_time"));
        let (Some((ts, dur)), true) = (span(e), is_kernel) else {
            continue;
        };
        let Some(op) = e.pointer("/args/op_name").and_then(Value::as_str) else {
            continue;
        };
        // The run that started last at or before this node, if the node ends inside it (a run whose own event the
        // profiler dropped at its limit does not take the nodes).
        let i = runs.partition_point(|(start, _)| *start <= ts);
        let Some((_, run)) = i.checked_sub(1).and_then(|i| runs.get_mut(i)) else {
            continue;
        };
        if ts + dur > run.end {
            continue;
        }
        if run.shape.is_none() && ATTENTION.contains(&op) {
            // The first input's shape: `{"<element type>": [rows, tokens, hidden]}`.
            let first = e.pointer("/args/input_type_shape/0").and_then(Value::as_object);
            let dims = first.and_then(|m| m.values().next()).and_then(Value::as_array);
            let dim = |k: usize| dims.and_then(|d| d.get(k)).and_then(Value::as_u64);
            run.shape = dim(0).zip(dim(1));
        }
        run.nodes.push((op.to_string(), dur));
    }
    runs.into_iter().map(|(_, r)| r).collect()
}

/// The mean over the runs of `rows × tokens`, or `None` if there are none.
fn kind(name: &'static str, runs: &[Run], rows: u64, tokens: u64) -> Option<RunKind> {
    let these: Vec<&Run> = runs.iter().filter(|r| r.shape == Some((rows, tokens))).collect();
    if these.is_empty() {
        return None;
    }
    let n = these.len() as f64;
    let run_us = these.iter().map(|r| r.dur).sum::<f64>() / n;
    let mut per_op: BTreeMap<&str, (usize, f64)> = BTreeMap::new();
    for r in &these {
        for (op, dur) in &r.nodes {
            let e = per_op.entry(op).or_default();
            e.0 += 1;
            e.1 += dur;
        }
    }
    let in_nodes: f64 = per_op.values().map(|v| v.1).sum::<f64>() / n;
    let mut ops: Vec<OpTime> = per_op
        .into_iter()
        .map(|(op, (count, total))| OpTime {
            op: op.to_string(),
            nodes: (count as f64 / n).round() as usize,
            us: total / n,
            share: total / n / run_us,
        })
        .collect();
    ops.sort_by(|a, b| b.us.total_cmp(&a.us));
    Some(RunKind {
        name,
        rows,
        tokens,
        runs: these.len(),
        run_us,
        ops,
        outside_nodes_us: run_us - in_nodes,
    })
}

/// The summary as text, the operators that take at least 0.5 % of a run.
pub fn render(p: &Profile) -> String {
    let mut out = format!(
        "ONNX Runtime profile (every node is slowed by the recording): {}\n",
        p.file.display()
    );
    if p.truncated {
        out += &format!("(the trace reached ONNX Runtime's limit of {MAX_EVENTS} events: its last runs are missing)\n");
    }
    for k in &p.kinds {
        out += &format!(
            "{} ({} token{}): {} runs, {:.0} µs each\n",
            k.name,
            k.tokens,
            if k.tokens == 1 { "" } else { "s" },
            k.runs,
            k.run_us
        );
        for o in k.ops.iter().filter(|o| o.share >= 0.005) {
            out += &format!(
                "  {:<34} {:>4} nodes {:>9.0} µs {:>6.1} %\n",
                o.op,
                o.nodes,
                o.us,
                100.0 * o.share
            );
        }
        out += &format!(
            "  {:<34} {:>10} {:>9.0} µs {:>6.1} %\n",
            "outside nodes",
            "",
            k.outside_nodes_us,
            100.0 * k.outside_nodes_us / k.run_us
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node(ts: f64, dur: f64, op: &str, rows: u64, tokens: u64) -> Value {
        json!({"cat": "Node", "name": format!("{op}_{ts}_kernel_time"), "ts": ts, "dur": dur,
               "args": {"op_name": op, "input_type_shape": [{"float": [rows, tokens, 960]}]}})
    }

    fn run(ts: f64, dur: f64) -> Value {
        json!({"cat": "Session", "name": "model_run", "ts": ts, "dur": dur})
    }

    #[test]
    fn nodes_are_summed_per_operator_within_each_kind_of_run() {
        let trace = json!([
            run(-50.0, 10.0), // the warm-up, left out
            node(-49.0, 1.0, "GroupQueryAttention", 1, 1),
            run(0.0, 100.0),
            node(1.0, 50.0, "MatMulQ4_1", 1, 30),
            node(60.0, 20.0, "GroupQueryAttention", 1, 30),
            node(2.0, 1.0, "Cast", 1, 1),
            run(200.0, 10.0),
            node(201.0, 4.0, "MatMulQ4_1", 1, 1),
            node(205.0, 2.0, "MatMulQ4_1", 1, 1),
            node(207.0, 1.0, "GroupQueryAttention", 1, 1),
            run(300.0, 20.0),
            node(301.0, 8.0, "MatMulQ4_1", 1, 1),
            node(309.0, 8.0, "MatMulQ4_1", 1, 1),
            node(317.0, 3.0, "GroupQueryAttention", 1, 1),
            run(400.0, 30.0), // a batched step: neither kind
            node(401.0, 9.0, "GroupQueryAttention", 8, 1),
            node(500.0, 9.0, "GroupQueryAttention", 1, 1), // after every run's end: its run was dropped
            node(509.0, 9.0, "MatMulQ4_1", 1, 1),
            json!({"cat": "Session", "name": "session_initialization", "ts": 0.0, "dur": 5.0}),
        ]);
        let file = std::env::temp_dir().join(format!("lambda-llm-profile-test-{}.json", std::process::id()));
        std::fs::write(&file, trace.to_string()).unwrap();
        let p = summarise(&file, 1, 30).unwrap();
        std::fs::remove_file(&file).unwrap();
        assert!(!p.truncated);
        assert_eq!(p.kinds.len(), 2);
        let decode = &p.kinds[0];
        assert_eq!(
            (decode.name, decode.rows, decode.tokens, decode.runs),
            ("decode step", 1, 1, 2)
        );
        assert_eq!(decode.run_us, 15.0);
        assert_eq!(
            decode.ops,
            vec![
                OpTime {
                    op: "MatMulQ4_1".into(),
                    nodes: 2,
                    us: 11.0,
                    share: 11.0 / 15.0
                },
                OpTime {
                    op: "GroupQueryAttention".into(),
                    nodes: 1,
                    us: 2.0,
                    share: 2.0 / 15.0
                },
            ]
        );
        assert_eq!(decode.outside_nodes_us, 2.0);
        let prompt = &p.kinds[1];
        assert_eq!(
            (prompt.name, prompt.tokens, prompt.runs, prompt.run_us),
            ("prompt", 30, 1, 100.0)
        );
        assert_eq!(
            prompt.ops.iter().map(|o| o.op.as_str()).collect::<Vec<_>>()[..2],
            ["MatMulQ4_1", "GroupQueryAttention"]
        );
        assert_eq!(prompt.outside_nodes_us, 29.0);
        let text = render(&p);
        assert!(text.contains("decode step (1 token): 2 runs, 15 µs each"), "{text}");
        assert!(text.contains("MatMulQ4_1"), "{text}");
    }

    #[test]
    fn a_file_that_is_not_a_trace_is_an_error() {
        let file = std::env::temp_dir().join(format!("lambda-llm-profile-bad-{}.json", std::process::id()));
        std::fs::write(&file, "{\"not\": \"a list\"}").unwrap();
        let err = summarise(&file, 0, 30).unwrap_err();
        assert!(format!("{err:#}").contains("parsing the profile"), "{err:#}");
        // A trace without a decode step or the prompt (here: only the warm-up) says so.
        let only_warm_up = json!([run(0.0, 10.0), node(1.0, 1.0, "GroupQueryAttention", 1, 2)]);
        std::fs::write(&file, only_warm_up.to_string()).unwrap();
        let err = summarise(&file, 1, 30).unwrap_err();
        std::fs::remove_file(&file).unwrap();
        assert!(
            format!("{err:#}").contains("no one-token run and no 30-token run"),
            "{err:#}"
        );
        assert!(summarise(Path::new("/nonexistent/profile.json"), 0, 30).is_err());
    }
}
