"""The legacy `openai==0.28.1` SDK (module-level API, `requests` underneath) against a real `lambda-llm serve`.

This is the call issue 3 names: `openai.Completion.create(model="text-davinci-003", prompt, temperature, max_tokens)`
through the `MODEL_ALIASES` alias, with `openai.api_base = <server>/v1` and `openai.api_key = <key>` set globally as
old code does. Also: `openai.ChatCompletion.create`, streaming (the 0.28 SSE parser), `openai.Model.list`, and the
0.28 exception classes for 401/404/400/403.

Runs only in the legacy venv (requirements-legacy.txt); the 1.x suites run in the other one.
"""

from __future__ import annotations

import openai
import openai.error
import pytest
from conftest import ALIAS, MODEL_ID

PROMPT = "The capital of France is"

assert openai.version.VERSION == "0.28.1", f"this suite needs openai==0.28.1, found {openai.version.VERSION}"


@pytest.fixture(autouse=True)
def legacy_globals(server):
    """The module-level configuration of the 0.28 SDK, restored after each test."""
    saved = (openai.api_base, openai.api_key)
    openai.api_base = server.v1
    openai.api_key = server.key
    yield
    openai.api_base, openai.api_key = saved


def test_completion_create_with_alias():
    r = openai.Completion.create(model=ALIAS, prompt=PROMPT, temperature=0, max_tokens=8)
    assert r.object == "text_completion"
    text = r.choices[0].text
    assert isinstance(text, str) and text.strip()
    assert r["choices"][0]["text"] == text  # dict-style access, as old code uses too
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 0
    assert 1 <= r.usage.completion_tokens <= 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # the alias is the served model: same greedy text under its real id
    same = openai.Completion.create(model=MODEL_ID, prompt=PROMPT, temperature=0, max_tokens=8)
    assert same.choices[0].text == text


def test_completion_greedy_says_paris():
    r = openai.Completion.create(model=ALIAS, prompt=PROMPT, temperature=0, max_tokens=8)
    assert "Paris" in r.choices[0].text


def test_chat_completion_create():
    r = openai.ChatCompletion.create(
        model=MODEL_ID, messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0, max_tokens=24,
    )
    assert r.object == "chat.completion"
    msg = r.choices[0].message
    assert msg.role == "assistant"
    assert "Paris" in msg.content
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_completion_stream():
    full = openai.Completion.create(model=ALIAS, prompt=PROMPT, temperature=0, max_tokens=10)
    chunks = list(openai.Completion.create(model=ALIAS, prompt=PROMPT, temperature=0, max_tokens=10, stream=True))
    assert len(chunks) >= 2
    assert all(c.object == "text_completion" and len(c.choices) == 1 for c in chunks)
    assert "".join(c.choices[0].text for c in chunks) == full.choices[0].text
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason


def test_chat_completion_stream():
    kw = dict(model=MODEL_ID, messages=[{"role": "user", "content": "Say hello."}], temperature=0, max_tokens=12)
    full = openai.ChatCompletion.create(**kw)
    chunks = list(openai.ChatCompletion.create(stream=True, **kw))
    assert chunks[0].choices[0].delta.get("role") == "assistant"
    text = "".join(c.choices[0].delta.get("content") or "" for c in chunks)
    assert text == full.choices[0].message.content


def test_model_list():
    ids = [m.id for m in openai.Model.list().data]
    assert MODEL_ID in ids and ALIAS in ids


def test_unknown_model_is_invalid_request():
    with pytest.raises(openai.error.InvalidRequestError) as ei:
        openai.Completion.create(model="no-such-model", prompt=PROMPT, max_tokens=1)
    assert ei.value.http_status == 404
    assert ei.value.code == "model_not_found"


def test_bad_value_is_invalid_request():
    with pytest.raises(openai.error.InvalidRequestError) as ei:
        openai.Completion.create(model=ALIAS, prompt=PROMPT, max_tokens=1, temperature=5)
    assert ei.value.http_status == 400
    assert ei.value.param == "temperature"


def test_restricted_key_is_permission_error(server):
    with pytest.raises(openai.error.PermissionError) as ei:
        openai.Completion.create(model=ALIAS, prompt=PROMPT, max_tokens=1, api_key=server.restricted_key)
    assert ei.value.http_status == 403


def test_bad_key_is_authentication_error():
    openai.api_key = "sk-llm-" + "F" * 40
    with pytest.raises(openai.error.AuthenticationError) as ei:
        openai.Completion.create(model=ALIAS, prompt=PROMPT, temperature=0, max_tokens=8)
    assert ei.value.http_status == 401
    # 0.28 does not copy `code` onto AuthenticationError; the parsed envelope is there
    assert ei.value.json_body["error"]["code"] == "invalid_api_key"
