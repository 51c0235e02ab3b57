"""The request-shape limits: MAX_STOP, MAX_N, MAX_PROMPT_TOKENS, MAX_COMPLETION_TOKENS.

Each limit is set small and must be enforced with a 400 `invalid_request_error` in the OpenAI envelope whose `param`
names the field and whose message names the limit (MAX_PROMPT_TOKENS with code `context_length_exceeded` and param
`prompt`/`messages`), while a request at the limit is accepted — as `http::Limits` and SECURITY.md document them.
"""

from __future__ import annotations

import httpx
import pytest
from conftest import MODEL_ID, Serve, add, assert_envelope

MAX_STOP, MAX_N, MAX_PROMPT_TOKENS, MAX_COMPLETION_TOKENS = 2, 2, 16, 8


@pytest.fixture(scope="module")
def limited(tmp_path_factory):
    s = Serve(tmp_path_factory.mktemp("serve-new-limits"),
              env={"MAX_STOP": str(MAX_STOP), "MAX_N": str(MAX_N), "MAX_PROMPT_TOKENS": str(MAX_PROMPT_TOKENS),
                   "MAX_COMPLETION_TOKENS": str(MAX_COMPLETION_TOKENS)})
    yield s
    s.stop()


@pytest.fixture
def client(limited):
    with httpx.Client(base_url=limited.base_url, timeout=120, headers=limited.auth) as c:
        yield c


def expect_400(r: httpx.Response, params: tuple[str, ...], limit: int, code=...) -> None:
    err = assert_envelope(r, 400, kind="invalid_request_error", code=code)
    assert err["param"] in params, err
    assert str(limit) in err["message"], err


def _tokens(client, text: str) -> int:
    r = client.post("/tokenize", json={"model": MODEL_ID, "prompt": text})
    assert r.status_code == 200, r.text
    body = r.json()
    return body.get("count", len(body.get("tokens", [])))


def test_max_stop(client):
    ok = client.post("/v1/completions", json={"model": MODEL_ID, "prompt": "Hi", "max_tokens": 1,
                                              "stop": ["a"] * MAX_STOP})
    assert ok.status_code == 200, ok.text
    for path, body in [("/v1/completions", {"prompt": "Hi"}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]})]:
        r = client.post(path, json={"model": MODEL_ID, "max_tokens": 1, "stop": ["a"] * (MAX_STOP + 1), **body})
        expect_400(r, ("stop",), MAX_STOP)
    add("limits: MAX_STOP enforced")


def test_max_n(client):
    ok = client.post("/v1/completions", json={"model": MODEL_ID, "prompt": "Hi", "max_tokens": 1, "n": MAX_N})
    assert ok.status_code == 200, ok.text
    assert len(ok.json()["choices"]) == MAX_N
    r = client.post("/v1/completions", json={"model": MODEL_ID, "prompt": "Hi", "max_tokens": 1, "n": MAX_N + 1})
    expect_400(r, ("n",), MAX_N)
    r = client.post("/v1/chat/completions", json={"model": MODEL_ID, "max_tokens": 1, "n": MAX_N + 1,
                                                  "messages": [{"role": "user", "content": "Hi"}]})
    expect_400(r, ("n",), MAX_N)
    r = client.post("/v1/completions", json={"model": MODEL_ID, "prompt": "Hi", "max_tokens": 1, "n": 1,
                                             "best_of": MAX_N + 1})
    expect_400(r, ("best_of", "n"), MAX_N)
    add("limits: MAX_N enforced")


def test_max_prompt_tokens(client):
    short = "One two three"
    assert _tokens(client, short) <= MAX_PROMPT_TOKENS
    ok = client.post("/v1/completions", json={"model": MODEL_ID, "prompt": short, "max_tokens": 1})
    assert ok.status_code == 200, ok.text
    long = " ".join(["word"] * (MAX_PROMPT_TOKENS * 2))
    r = client.post("/v1/completions", json={"model": MODEL_ID, "prompt": long, "max_tokens": 1})
    expect_400(r, ("prompt",), MAX_PROMPT_TOKENS, code="context_length_exceeded")
    r = client.post("/v1/chat/completions", json={"model": MODEL_ID, "max_tokens": 1,
                                                  "messages": [{"role": "user", "content": long}]})
    expect_400(r, ("messages",), MAX_PROMPT_TOKENS, code="context_length_exceeded")
    add("limits: MAX_PROMPT_TOKENS enforced")


def test_max_completion_tokens(client):
    ok = client.post("/v1/completions", json={"model": MODEL_ID, "prompt": "Hi", "max_tokens": MAX_COMPLETION_TOKENS})
    assert ok.status_code == 200, ok.text
    assert ok.json()["usage"]["completion_tokens"] <= MAX_COMPLETION_TOKENS
    r = client.post("/v1/completions", json={"model": MODEL_ID, "prompt": "Hi",
                                             "max_tokens": MAX_COMPLETION_TOKENS + 1})
    expect_400(r, ("max_tokens",), MAX_COMPLETION_TOKENS)
    r = client.post("/v1/chat/completions", json={"model": MODEL_ID, "messages": [{"role": "user", "content": "Hi"}],
                                                  "max_completion_tokens": MAX_COMPLETION_TOKENS + 1})
    expect_400(r, ("max_completion_tokens", "max_tokens"), MAX_COMPLETION_TOKENS)
    add("limits: MAX_COMPLETION_TOKENS enforced")
