"""The official `openai` Python SDK 1.x against a real `lambda-llm serve` with the real model.

Everything goes through `OpenAI(base_url=.../v1, api_key=...)`, exactly as a user's code would: completions (text,
token-id and list prompts), chat, both streamed with `stream_options.include_usage`, `n`, `logprobs`, `stop`, `seed`,
`max_tokens`, the models endpoints, the model alias, and the SDK's typed errors (401/403/404/400) with the OpenAI error
envelope's `param` and `code`.

Greedy (temperature 0) calls are deterministic, so a streamed call is compared with the same non-streamed call.
The SDK runs with `max_retries=0` so that an error status is seen as the server sent it.
"""

from __future__ import annotations

import openai
import pytest
from conftest import ALIAS, MODEL_ID
from openai import OpenAI

PROMPT = "The capital of France is"
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def client(server) -> OpenAI:
    return OpenAI(base_url=server.v1, api_key=server.key, max_retries=0, timeout=120)


def greedy_completion(client: OpenAI, prompt, max_tokens: int = 12, **kw):
    return client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=max_tokens, temperature=0, **kw)


def greedy_chat(client: OpenAI, content: str = QUESTION, max_tokens: int = 24, **kw):
    return client.chat.completions.create(
        model=MODEL_ID, messages=[{"role": "user", "content": content}], max_tokens=max_tokens, temperature=0, **kw
    )


def assert_usage(usage, prompt_tokens: int | None = None, completion_tokens: int | None = None):
    assert usage is not None
    assert usage.prompt_tokens > 0
    assert usage.completion_tokens >= 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    if prompt_tokens is not None:
        assert usage.prompt_tokens == prompt_tokens
    if completion_tokens is not None:
        assert usage.completion_tokens == completion_tokens


# --- completions -----------------------------------------------------------------------------------------------------


def test_completion_text(client):
    r = greedy_completion(client, PROMPT, max_tokens=8)
    assert r.object == "text_completion"
    assert r.id.startswith("cmpl-")
    assert r.model == MODEL_ID
    assert isinstance(r.created, int) and r.created > 0
    assert len(r.choices) == 1
    c = r.choices[0]
    assert c.index == 0
    assert isinstance(c.text, str) and c.text.strip()
    assert c.finish_reason in ("stop", "length")
    assert c.logprobs is None
    assert_usage(r.usage)
    assert 1 <= r.usage.completion_tokens <= 8


def test_completion_token_id_prompt_equals_text_prompt(client, server):
    import httpx

    tok = httpx.post(server.base_url + "/tokenize", json={"model": MODEL_ID, "prompt": PROMPT},
                     headers={"Authorization": f"Bearer {server.key}"}, timeout=30)
    assert tok.status_code == 200, tok.text
    ids = tok.json()["tokens"]
    assert ids and all(isinstance(i, int) for i in ids)

    by_text = greedy_completion(client, PROMPT)
    by_ids = greedy_completion(client, ids)
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert by_ids.usage.prompt_tokens == len(ids) == by_text.usage.prompt_tokens

    # An array of token-id arrays is a batch of prompts.
    batch = greedy_completion(client, [ids, ids])
    assert [c.index for c in batch.choices] == [0, 1]
    assert all(c.text == by_text.choices[0].text for c in batch.choices)


def test_completion_list_of_prompts(client):
    prompts = [PROMPT, "One, two, three,"]
    singles = [greedy_completion(client, p) for p in prompts]
    r = greedy_completion(client, prompts)
    assert [c.index for c in r.choices] == [0, 1]
    assert [c.text for c in r.choices] == [s.choices[0].text for s in singles]
    assert_usage(r.usage,
                 prompt_tokens=sum(s.usage.prompt_tokens for s in singles),
                 completion_tokens=sum(s.usage.completion_tokens for s in singles))


def test_completion_max_tokens_gives_length(client):
    r = client.completions.create(model=MODEL_ID, prompt="Once upon a time", max_tokens=5, temperature=0)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 5


def test_completion_stream_with_usage(client):
    expected = greedy_completion(client, PROMPT, max_tokens=10)
    stream = client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=10, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    assert len(chunks) >= 3
    *content, last = chunks
    ids = {c.id for c in chunks}
    assert len(ids) == 1 and ids.pop().startswith("cmpl-")
    for c in content:
        assert c.object == "text_completion"
        assert c.model == MODEL_ID
        assert len(c.choices) == 1 and c.choices[0].index == 0
        assert c.usage is None
    assert [c.choices[0].finish_reason for c in content][:-1] == [None] * (len(content) - 1)
    assert content[-1].choices[0].finish_reason == expected.choices[0].finish_reason
    assert "".join(c.choices[0].text for c in content) == expected.choices[0].text
    # The usage chunk: no choices, the same counts as the non-streamed call.
    assert last.choices == []
    assert_usage(last.usage, expected.usage.prompt_tokens, expected.usage.completion_tokens)


def test_completion_stream_without_usage_has_no_usage_chunk(client):
    chunks = list(client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=4, temperature=0, stream=True))
    assert chunks and all(len(c.choices) == 1 for c in chunks)
    assert all(getattr(c, "usage", None) is None for c in chunks)


def test_completion_n2(client):
    r = client.completions.create(model=MODEL_ID, prompt="Once upon a time", max_tokens=8, temperature=1, n=2,
                                  seed=7, logprobs=1)
    assert sorted(c.index for c in r.choices) == [0, 1]
    for c in r.choices:
        assert isinstance(c.text, str)
        assert c.text == "".join(c.logprobs.tokens)
    # usage counts the tokens of every choice (plus the end token of a choice that stopped on it)
    visible = sum(len(c.logprobs.tokens) for c in r.choices)
    stopped = sum(c.finish_reason == "stop" for c in r.choices)
    assert visible <= r.usage.completion_tokens <= visible + stopped


def test_completion_logprobs(client):
    r = greedy_completion(client, PROMPT, max_tokens=6, logprobs=2)
    c = r.choices[0]
    lp = c.logprobs
    assert c.finish_reason == "length"
    n = r.usage.completion_tokens
    assert n == 6
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    assert "".join(lp.tokens) == c.text
    assert lp.text_offset == sorted(lp.text_offset)
    for tok, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert logprob <= 0.0
        assert 1 <= len(top) <= 2
        assert all(v <= 0.0 for v in top.values())
        # greedy: the chosen token is the most likely one, and it is among the top alternatives
        assert tok in top
        assert abs(top[tok] - logprob) < 1e-4
        assert logprob >= max(top.values()) - 1e-4


def test_completion_logprobs_out_of_range_is_400(client):
    with pytest.raises(openai.BadRequestError) as ei:
        greedy_completion(client, PROMPT, max_tokens=2, logprobs=6)
    assert ei.value.status_code == 400
    assert ei.value.param == "logprobs"


def test_completion_stop(client):
    prompt = "1, 2, 3, 4, 5,"
    full = greedy_completion(client, prompt, max_tokens=16).choices[0].text
    stop = " 8"
    assert stop in full, f"test premise: the greedy continuation {full!r} should contain {stop!r}"
    r = greedy_completion(client, prompt, max_tokens=16, stop=[stop, "never-generated-xyz"])
    text = r.choices[0].text
    assert stop not in text
    assert text == full[: full.index(stop)]
    assert r.choices[0].finish_reason == "stop"
    # a single string works too
    assert greedy_completion(client, prompt, max_tokens=16, stop=stop).choices[0].text == text


def test_completion_seed_reproducible(client):
    def sample(seed: int) -> str:
        r = client.completions.create(model=MODEL_ID, prompt="Once upon a time", max_tokens=48, temperature=1,
                                      seed=seed)
        return r.choices[0].text

    a, b, c = sample(1234), sample(1234), sample(98765)
    assert a == b
    assert a != c


def test_completion_seed_stream_equals_non_stream(client):
    kw = dict(model=MODEL_ID, prompt="Once upon a time", max_tokens=24, temperature=1, seed=42)
    text = client.completions.create(**kw).choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw) if c.choices)
    assert streamed == text


def test_alias_text_davinci_003(client):
    expected = greedy_completion(client, PROMPT).choices[0].text
    r = client.completions.create(model=ALIAS, prompt=PROMPT, max_tokens=12, temperature=0)
    assert r.model in (ALIAS, MODEL_ID)
    assert r.choices[0].text == expected
    assert_usage(r.usage)


def test_unknown_fields_are_ignored(client):
    r = greedy_completion(client, PROMPT, max_tokens=2, extra_body={"definitely_not_a_field": {"x": 1}})
    assert r.choices[0].text


# --- chat ------------------------------------------------------------------------------------------------------------


def test_chat(client):
    r = client.chat.completions.create(
        model=MODEL_ID,
        messages=[{"role": "system", "content": "You are a concise assistant."},
                  {"role": "user", "content": "Say hello."}],
        max_tokens=16, temperature=0,
    )
    assert r.object == "chat.completion"
    assert r.id.startswith("chatcmpl-")
    assert r.model == MODEL_ID
    assert len(r.choices) == 1
    m = r.choices[0].message
    assert m.role == "assistant"
    assert isinstance(m.content, str) and m.content.strip()
    assert r.choices[0].finish_reason in ("stop", "length")
    assert_usage(r.usage)


def test_chat_text_part_content(client):
    plain = greedy_chat(client, max_tokens=8)
    parts = client.chat.completions.create(
        model=MODEL_ID, messages=[{"role": "user", "content": [{"type": "text", "text": QUESTION}]}],
        max_tokens=8, temperature=0,
    )
    assert parts.choices[0].message.content == plain.choices[0].message.content


def test_greedy_capital_of_france_is_paris(client):
    r = greedy_chat(client, QUESTION, max_tokens=24)
    assert "Paris" in r.choices[0].message.content


def test_chat_max_completion_tokens(client):
    r = client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "Tell me a story."}],
                                       max_completion_tokens=3, temperature=0)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 3


def test_chat_stream_with_usage(client):
    expected = greedy_chat(client, QUESTION, max_tokens=24)
    stream = client.chat.completions.create(
        model=MODEL_ID, messages=[{"role": "user", "content": QUESTION}], max_tokens=24, temperature=0,
        stream=True, stream_options={"include_usage": True},
    )
    chunks = list(stream)
    *content, last = chunks
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    for c in content:
        assert c.object == "chat.completion.chunk"
        assert c.model == MODEL_ID
        assert len(c.choices) == 1 and c.choices[0].index == 0
        assert c.usage is None
    # role first, then content deltas, then the finish reason
    assert content[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role in (None, "assistant") for c in content)
    assert content[-1].choices[0].finish_reason == expected.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in content[:-1])
    text = "".join(c.choices[0].delta.content or "" for c in content)
    assert text == expected.choices[0].message.content
    # the usage chunk
    assert last.choices == []
    assert_usage(last.usage, expected.usage.prompt_tokens, expected.usage.completion_tokens)


def test_chat_n2(client):
    r = client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "Name a fruit."}],
                                       max_tokens=8, temperature=1, n=2, seed=3)
    assert sorted(c.index for c in r.choices) == [0, 1]
    assert all(c.message.role == "assistant" and isinstance(c.message.content, str) for c in r.choices)
    assert_usage(r.usage)


def test_chat_n2_stream(client):
    chunks = list(client.chat.completions.create(
        model=MODEL_ID, messages=[{"role": "user", "content": "Name a fruit."}], max_tokens=6, temperature=1, n=2,
        seed=3, stream=True, stream_options={"include_usage": True},
    ))
    by_index: dict[int, list] = {}
    for c in chunks:
        for ch in c.choices:
            by_index.setdefault(ch.index, []).append(ch)
    assert sorted(by_index) == [0, 1]
    for deltas in by_index.values():
        assert deltas[0].delta.role == "assistant"
        assert deltas[-1].finish_reason in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


def test_chat_logprobs(client):
    r = greedy_chat(client, QUESTION, max_tokens=8, logprobs=True, top_logprobs=3)
    choice = r.choices[0]
    content = choice.logprobs.content
    # usage may count the end-of-turn token that ended a `stop` generation; it has no text, so no logprobs entry
    eos = 1 if choice.finish_reason == "stop" else 0
    assert len(content) in (r.usage.completion_tokens, r.usage.completion_tokens - eos)
    assert "".join(t.token for t in content) == choice.message.content
    for t in content:
        assert t.logprob <= 0.0
        assert t.bytes is None or bytes(t.bytes).decode("utf-8", errors="replace")
        assert len(t.top_logprobs) == 3
        tops = [x.logprob for x in t.top_logprobs]
        assert tops == sorted(tops, reverse=True)
        # greedy: the chosen token is the most likely one
        assert t.token == t.top_logprobs[0].token
        assert abs(t.logprob - tops[0]) < 1e-4


def test_chat_stop(client):
    full = greedy_chat(client, "Count from 1 to 10, separated by commas.", max_tokens=40).choices[0].message.content
    stop = "5"
    assert stop in full, f"test premise: {full!r} should contain {stop!r}"
    r = greedy_chat(client, "Count from 1 to 10, separated by commas.", max_tokens=40, stop=[stop])
    assert r.choices[0].message.content == full[: full.index(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_chat_seed_reproducible(client):
    def sample(seed: int) -> str:
        r = client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "Write a poem."}],
                                           max_tokens=40, temperature=1, seed=seed)
        return r.choices[0].message.content

    a, b, c = sample(11), sample(11), sample(12)
    assert a == b
    assert a != c


# --- models ----------------------------------------------------------------------------------------------------------


def test_models_list_has_id_and_alias(client):
    ids = [m.id for m in client.models.list()]
    assert MODEL_ID in ids
    assert ALIAS in ids


def test_models_retrieve(client):
    m = client.models.retrieve(MODEL_ID)
    assert m.id == MODEL_ID and m.object == "model"
    assert client.models.retrieve(ALIAS).id == ALIAS


def test_models_retrieve_unknown_is_not_found(client):
    with pytest.raises(openai.NotFoundError) as ei:
        client.models.retrieve("no-such-model")
    assert ei.value.status_code == 404
    assert ei.value.code == "model_not_found"


# --- errors ----------------------------------------------------------------------------------------------------------


def test_bad_key_is_authentication_error(server):
    bad = OpenAI(base_url=server.v1, api_key="sk-llm-" + "A" * 40, max_retries=0)
    with pytest.raises(openai.AuthenticationError) as ei:
        bad.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=1)
    assert ei.value.status_code == 401
    assert ei.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_unknown_model_is_not_found(client):
    with pytest.raises(openai.NotFoundError) as ei:
        client.completions.create(model="gpt-9-turbo", prompt=PROMPT, max_tokens=1)
    assert ei.value.code == "model_not_found"
    assert ei.value.param == "model"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-9-turbo", messages=[{"role": "user", "content": "hi"}])


def test_restricted_key_is_permission_denied(server):
    restricted = OpenAI(base_url=server.v1, api_key=server.restricted_key, max_retries=0)
    with pytest.raises(openai.PermissionDeniedError) as ei:
        restricted.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=1)
    assert ei.value.status_code == 403
    assert ei.value.param == "model"
    with pytest.raises(openai.PermissionDeniedError):
        restricted.chat.completions.create(model=ALIAS, messages=[{"role": "user", "content": "hi"}], max_tokens=1)


@pytest.mark.parametrize(
    "field, kwargs",
    [
        ("temperature", {"temperature": 5}),
        ("temperature", {"temperature": -0.5}),
        ("top_p", {"top_p": 0}),
        ("top_p", {"top_p": 1.5}),
        ("n", {"n": 0}),
        ("n", {"n": 17}),
        ("max_tokens", {"max_tokens": -1}),
    ],
)
def test_bad_values_are_bad_request(client, field, kwargs):
    args = {"model": MODEL_ID, "prompt": PROMPT, "max_tokens": 1, **kwargs}
    with pytest.raises(openai.BadRequestError) as ei:
        client.completions.create(**args)
    e = ei.value
    assert e.status_code == 400
    assert e.param == field, e.body
    assert e.type == "invalid_request_error"
    assert isinstance(e.body, dict) and e.body.get("message")


def test_chat_bad_value_is_bad_request(client):
    with pytest.raises(openai.BadRequestError) as ei:
        client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "hi"}], temperature=5)
    assert ei.value.param == "temperature"


def test_prompt_plus_max_tokens_over_context_is_400(client):
    with pytest.raises(openai.BadRequestError) as ei:
        client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=8192)
    assert ei.value.code == "context_length_exceeded"
    assert "8192" in ei.value.body["message"]


def test_prompt_alone_over_context_is_400(client):
    with pytest.raises(openai.BadRequestError) as ei:
        client.completions.create(model=MODEL_ID, prompt="hello " * 9000, max_tokens=1)
    assert ei.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as ei:
        client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "hello " * 9000}],
                                       max_tokens=1)
    assert ei.value.code == "context_length_exceeded"
