"""tokenizer.json (HuggingFace `tokenizers` format) built from a GGUF's byte-level BPE vocabulary and merges."""

from __future__ import annotations

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

from . import ConversionError
from .gguf_source import TokenizerData

# GGUF token types (llama.cpp llama_token_type)
TT_NORMAL, TT_UNKNOWN, TT_CONTROL, TT_USER_DEFINED, TT_UNUSED, TT_BYTE = 1, 2, 3, 4, 5, 6

# llama.cpp pre-tokenizer name -> HF pre-tokenizer (same regex split as llama.cpp's for that name)
def _pre_tokenizer(pre: str):
    bytelevel = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":
        # llama.cpp: "\p{N}" then the GPT-2 regex
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), bytelevel])
    if pre in ("gpt-2", "gpt2"):
        return bytelevel
    raise ConversionError(f"unsupported tokenizer pre-tokenizer '{pre}' (supported: smollm, gpt-2)")


def build_tokenizer(tok: TokenizerData) -> Tokenizer:
    if tok.model != "gpt2":
        raise ConversionError(f"unsupported tokenizer model '{tok.model}' (only byte-level BPE 'gpt2' is supported)")
    pre = _pre_tokenizer(tok.pre)

    vocab: dict[str, int] = {}
    for i, t in enumerate(tok.tokens):
        if t in vocab:
            raise ConversionError(f"duplicate token {t!r} in the vocabulary (ids {vocab[t]} and {i})")
        vocab[t] = i
    merges: list[tuple[str, str]] = []
    for m in tok.merges:
        parts = m.split(" ")
        if len(parts) != 2 or not parts[0] or not parts[1]:
            raise ConversionError(f"malformed BPE merge {m!r}")
        merges.append((parts[0], parts[1]))

    t = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None, fuse_unk=False,
                             byte_fallback=False))
    t.normalizer = None
    t.pre_tokenizer = pre
    t.decoder = decoders.ByteLevel()

    added = []
    for i, (text, tt) in enumerate(zip(tok.tokens, tok.token_types)):
        if tt == TT_CONTROL:
            added.append(AddedToken(text, special=True, normalized=False, lstrip=False, rstrip=False,
                                    single_word=False))
        elif tt == TT_USER_DEFINED:
            added.append(AddedToken(text, special=False, normalized=False, lstrip=False, rstrip=False,
                                    single_word=False))
    if added:
        t.add_special_tokens([a for a in added if a.special])
        t.add_tokens([a for a in added if not a.special])
    for a in added:  # adding must not have created new ids
        if t.token_to_id(a.content) != vocab[a.content]:
            raise ConversionError(f"added token {a.content!r} got a different id")

    single, pair, special = [], [], []
    if tok.add_bos:
        bos = tok.tokens[tok.bos_id]
        single.append(bos)
        special.append((bos, tok.bos_id))
    single.append("$A")
    pair = list(single) + ["$B:1"]
    if tok.add_eos:
        eos = tok.tokens[tok.eos_id]
        single.append(eos)
        pair.append(eos + ":1")
        if (eos, tok.eos_id) not in special:
            special.append((eos, tok.eos_id))
    if special:
        t.post_processor = processors.TemplateProcessing(single=" ".join(single), pair=" ".join(pair),
                                                         special_tokens=special)
    return t


def tokenizer_json(tok: TokenizerData) -> bytes:
    return (build_tokenizer(tok).to_str(pretty=False) + "\n").encode("utf-8")
