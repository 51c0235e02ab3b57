"""The Rust engine's tokenizer (`lambda-llm tokenize`, `tokenizers` crate) vs llama.cpp on the same corpus."""

import json
import os
import subprocess

from corpus import TOKENIZER_CORPUS


def lambda_llm_binary() -> str:
    """The debug binary `make test` builds before the Python tests (LAMBDA_LLM_BIN overrides)."""
    explicit = os.environ.get("LAMBDA_LLM_BIN")
    if explicit:
        return explicit
    target = os.environ.get("CARGO_TARGET_DIR") or os.path.expanduser("~/.cache/lambda-llm/target")
    return os.path.join(target, "debug", "lambda-llm")


def test_rust_tokenizer_ids_match_llama_cpp(artifact_dir, gguf_path):
    from llama_cpp import Llama

    binary = lambda_llm_binary()
    assert os.path.exists(binary), f"{binary} is missing: build it with `cargo build` (make test does)"
    stdin = "".join(json.dumps(t) + "\n" for t in TOKENIZER_CORPUS)
    out = subprocess.run([binary, "tokenize", "--model-dir", artifact_dir], input=stdin, capture_output=True,
                         text=True, check=True, timeout=120)
    rust_ids = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(rust_ids) == len(TOKENIZER_CORPUS)
    vocab = Llama(model_path=gguf_path, vocab_only=True, verbose=False)
    mismatches = []
    for text, ours in zip(TOKENIZER_CORPUS, rust_ids):
        theirs = vocab.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        if ours != theirs:
            mismatches.append((text, ours, theirs))
    assert not mismatches, mismatches
