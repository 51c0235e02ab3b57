"""Serving many at once through the real server and the openai SDK: concurrent streams decode in one batch and give
exactly the answers they give alone; a growing chat reuses its prefix and says so in `usage`."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from conftest import MODEL_ID
from openai import OpenAI

QUESTIONS = ["What is the capital of France?", "Name three colours.", "What is 2 + 2?", "Say hello in Spanish.",
             "What is the largest planet?", "Give me a synonym of fast.", "What do bees make?", "Who wrote Hamlet?"]


def client(server) -> OpenAI:
    return OpenAI(base_url=server.v1, api_key=server.key, max_retries=0, timeout=300)


def ask(c: OpenAI, question: str, stream: bool) -> str:
    kw = dict(model=MODEL_ID, messages=[{"role": "user", "content": question}], max_tokens=32, temperature=0)
    if not stream:
        return c.chat.completions.create(**kw).choices[0].message.content
    parts = []
    for chunk in c.chat.completions.create(stream=True, **kw):
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
    return "".join(parts)


def test_eight_concurrent_streams_answer_exactly_as_alone(server):
    c = client(server)
    alone = [ask(c, q, stream=False) for q in QUESTIONS]
    with ThreadPoolExecutor(len(QUESTIONS)) as pool:
        together = list(pool.map(lambda q: ask(c, q, stream=True), QUESTIONS))
    assert together == alone
    assert all(alone)


def test_a_growing_chat_reports_cached_prompt_tokens(server):
    c = client(server)
    system = {"role": "system", "content": "You are a geography tutor. Answer in one short sentence, plainly."}
    turn1 = [system, {"role": "user", "content": "Which river flows through Cairo?"}]
    first = c.chat.completions.create(model=MODEL_ID, messages=turn1, max_tokens=24, temperature=0)
    assert first.usage.prompt_tokens_details is not None
    turn2 = turn1 + [{"role": "assistant", "content": first.choices[0].message.content},
                     {"role": "user", "content": "And through Paris?"}]
    second = c.chat.completions.create(model=MODEL_ID, messages=turn2, max_tokens=24, temperature=0)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert first.usage.prompt_tokens <= cached < second.usage.prompt_tokens
    # Streamed, with usage: everything but the last two prompt tokens is now cached.
    chunks = list(c.chat.completions.create(model=MODEL_ID, messages=turn2, max_tokens=24, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    usage = chunks[-1].usage
    assert usage.prompt_tokens_details.cached_tokens == usage.prompt_tokens - 2
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == second.choices[0].message.content


def test_a_completion_reports_cached_tokens_too(server):
    c = client(server)
    prompt = "Once upon a time, in a kingdom by the sea, there lived a"
    # Sampled with a seed: the second request, served from the cache, draws the same tokens with the very same
    # log-probabilities (the cache leaves two prompt tokens to compute, as a prompt of two rows).
    kw = dict(model=MODEL_ID, prompt=prompt, max_tokens=8, temperature=1, seed=11, logprobs=2)
    a = c.completions.create(**kw)
    b = c.completions.create(**kw)
    assert b.usage.prompt_tokens_details.cached_tokens == b.usage.prompt_tokens - 2
    assert b.choices[0].text == a.choices[0].text
    assert b.choices[0].logprobs.token_logprobs == a.choices[0].logprobs.token_logprobs
    assert b.choices[0].logprobs.top_logprobs == a.choices[0].logprobs.top_logprobs
