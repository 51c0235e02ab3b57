"""Greedy chat generation through run_ort.py with the model's chat template."""

import run_ort


def test_capital_of_france(runner):
    prompt = run_ort.chat_prompt(runner.manifest, "What is the capital of France?")
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    ids = runner.tokenizer.encode(prompt).ids
    res = runner.generate(ids, 48)
    text = runner.tokenizer.decode(res["ids"], skip_special_tokens=True)
    print(f"\ngenerated: {text!r} ({res['prefill_tok_s']:.0f} prefill tok/s, {res['decode_tok_s']:.0f} decode tok/s)")
    assert "Paris" in text
    assert res["stopped"] and res["stop_id"] == 2  # <|im_end|>
