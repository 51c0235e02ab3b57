"""tokenizer.json (HF tokenizers) vs llama.cpp's tokenizer of the same GGUF."""

import json
import os

import pytest
from tokenizers import Tokenizer

from corpus import TOKENIZER_CORPUS


@pytest.fixture(scope="module")
def hf(artifact_dir):
    return Tokenizer.from_file(os.path.join(artifact_dir, "tokenizer.json"))


@pytest.fixture(scope="module")
def llama_vocab(gguf_path):
    from llama_cpp import Llama
    return Llama(model_path=gguf_path, vocab_only=True, verbose=False)


def test_corpus_size():
    assert len(TOKENIZER_CORPUS) >= 30


@pytest.mark.parametrize("text", TOKENIZER_CORPUS)
def test_ids_match_llama_cpp(hf, llama_vocab, text):
    ours = hf.encode(text).ids
    theirs = llama_vocab.tokenize(text.encode("utf-8"), add_bos=False, special=True)
    assert ours == theirs
    assert hf.decode(ours, skip_special_tokens=False) == text


def test_special_tokens(hf, artifact):
    ids = hf.encode("<|im_start|>user\nHi<|im_end|>").ids
    assert ids[0] == 1 and ids[-1] == 2
    assert hf.decode(ids, skip_special_tokens=True) == "user\nHi"
    assert hf.encode("Hi").ids[0] != 1  # no BOS added (add_bos false)
    with open(os.path.join(artifact.path, "tokenizer.json"), encoding="utf-8") as f:
        tj = json.load(f)
    added = {t["content"]: t for t in tj["added_tokens"]}
    assert len(added) == 17 and all(t["special"] for t in added.values())
    assert added["<|im_end|>"]["id"] == 2
    assert tj["post_processor"] is None
    assert tj["decoder"]["type"] == "ByteLevel"
