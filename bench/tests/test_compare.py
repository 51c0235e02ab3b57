"""bench/compare.py's report: each engine's median, and each ratio taken per pair (the runs of one round)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import compare  # noqa: E402


def run(engine: str, rnd: int, prefill: float | None, threads: int = 2) -> dict:
    rec = {"engine": engine, "threads": threads, "round": rnd}
    if prefill is None:
        rec["error"] = "exit 1: killed"
    else:
        rec["result"] = {"prompts": [{"name": "chat-short", "prefill_tok_s": prefill}], "load_ms": 10.0}
    return rec


def test_a_ratio_is_the_median_of_the_rounds_pairs_not_the_ratio_of_the_medians():
    # Round 2 ran llama.cpp slowly: its pair says 4×, the others 1×. The medians alone would say 2×.
    runs = [run("ours", 1, 100), run("llama", 1, 100), run("ours", 2, 200), run("llama", 2, 50),
            run("ours", 3, 400), run("llama", 3, 400)]
    assert compare.pair_ratios(runs, "ours", "llama", 2, "prefill_tok_s", "chat-short") == [1.0, 4.0, 1.0]
    assert compare.median_of(runs, "ours", 2, "prefill_tok_s", "chat-short")[0] == 200
    assert compare.median_of(runs, "llama", 2, "prefill_tok_s", "chat-short")[0] == 100
    _, ratios = compare.build_tables(runs, [2], ["ours", "llama"])
    mine = next(r for r in ratios if r["metric"] == "prefill tok/s" and r["prompt"] == "chat-short")
    assert mine["ratio"] == 1.0 and mine["pairs"] == [1.0, 4.0, 1.0]


def test_a_failed_run_drops_only_its_own_pair():
    runs = [run("ours", 1, 300), run("llama", 1, 100), run("ours", 2, None), run("llama", 2, 100),
            run("ours", 3, 500), run("llama", 3, 100), run("ours", 1, 999, threads=1), run("llama", 1, 1, threads=1)]
    assert compare.pair_ratios(runs, "ours", "llama", 2, "prefill_tok_s", "chat-short") == [3.0, 5.0]
    assert compare.pair_ratios(runs, "ours", "llama", 1, "prefill_tok_s", "chat-short") == [999.0]


def test_the_table_shows_the_median_pair_and_the_range():
    runs = [run("ours", 1, 300), run("llama", 1, 100), run("ours", 2, 250), run("llama", 2, 100),
            run("ours", 3, 200), run("llama", 3, 100)]
    lines, _ = compare.build_tables(runs, [2], ["ours", "llama"])
    row = next(ln for ln in lines if ln.startswith("| prefill tok/s | chat-short"))
    assert row == "| prefill tok/s | chat-short | 250 | 100 | 2.50× (2.00–3.00) |"
    assert compare.ratio_cell([1.5]) == "1.50×"
    assert compare.ratio_cell([]) == "—"
    # No engine reports this metric for the prompt: no pair, no ratio.
    row = next(ln for ln in lines if ln.startswith("| prefill tok/s | long"))
    assert row.endswith("| — |")
