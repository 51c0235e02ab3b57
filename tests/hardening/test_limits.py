"""Limits (issue 7, part 5) that the server has today, each set small and enforced with its documented error:

- MAX_BODY_BYTES → 413 in the envelope (and a body at the limit is accepted);
- MAX_QUEUE → 503 `server_error` with Retry-After when more requests wait than allowed (the others are served);
- per-key rpm and tpm (`keys new --rpm/--tpm`) → 429 `rate_limit_exceeded` with Retry-After.
The request-shape limits (MAX_STOP, MAX_N, MAX_PROMPT_TOKENS, MAX_COMPLETION_TOKENS) are in test_limits_config.py.
"""

from __future__ import annotations

import json
import threading

import httpx
import pytest
from conftest import MODEL_ID, Serve, add, assert_envelope, new_key

BODY_LIMIT = 4096
QUEUE = 1


@pytest.fixture(scope="module")
def limited(tmp_path_factory):
    s = Serve(tmp_path_factory.mktemp("serve-limits"), env={"MAX_BODY_BYTES": str(BODY_LIMIT), "MAX_QUEUE": str(QUEUE)})
    s.rpm_key, _ = new_key(s.keys_file, "rpm", "--rpm", "3")
    s.tpm_key, _ = new_key(s.keys_file, "tpm", "--tpm", "20")
    yield s
    s.stop()


def _body_of_size(size: int) -> bytes:
    doc = {"model": MODEL_ID, "prompt": "Hi", "max_tokens": 1, "user": ""}
    pad = size - len(json.dumps(doc, separators=(",", ":")))
    doc["user"] = "u" * pad
    b = json.dumps(doc, separators=(",", ":")).encode()
    assert len(b) == size
    return b


def test_max_body_bytes_is_413(limited):
    h = {**limited.auth, "content-type": "application/json"}
    with httpx.Client(base_url=limited.base_url, timeout=60) as c:
        assert c.post("/v1/completions", headers=h, content=_body_of_size(BODY_LIMIT)).status_code == 200
        r = c.post("/v1/completions", headers=h, content=_body_of_size(BODY_LIMIT + 1))
        err = assert_envelope(r, 413, kind="invalid_request_error")
        assert str(BODY_LIMIT) in err["message"]
        r = c.post("/tokenize", headers=h, content=b"[" * (BODY_LIMIT * 4))
        assert_envelope(r, 413)
    add("limits: MAX_BODY_BYTES enforced (413)")


def test_max_queue_is_503_with_retry_after(limited):
    results: list[httpx.Response] = []
    lock = threading.Lock()

    def call():
        r = httpx.post(limited.base_url + "/v1/completions", headers=limited.auth, timeout=300,
                       json={"model": MODEL_ID, "prompt": "Tell me a story", "max_tokens": 24})
        with lock:
            results.append(r)

    threads = [threading.Thread(target=call) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    statuses = sorted(r.status_code for r in results)
    busy = [r for r in results if r.status_code == 503]
    add("limits: MAX_QUEUE=1, requests", len(results))
    add("limits: MAX_QUEUE=1, 503 busy", len(busy))
    assert set(statuses) <= {200, 503}, statuses
    assert busy, f"8 simultaneous requests on a queue of {QUEUE}: expected some 503, got {statuses}"
    assert statuses.count(200) >= 1 + QUEUE
    for r in busy:
        assert_envelope(r, 503, kind="server_error")
        assert int(r.headers["retry-after"]) >= 1
    # Once the queue drains, it serves again.
    assert httpx.post(limited.base_url + "/v1/completions", headers=limited.auth, timeout=60,
                      json={"model": MODEL_ID, "prompt": "Hi", "max_tokens": 1}).status_code == 200


def test_rpm_is_429_with_retry_after(limited):
    h = {"Authorization": f"Bearer {limited.rpm_key}"}
    with httpx.Client(base_url=limited.base_url, timeout=60) as c:
        statuses = [c.get("/v1/models", headers=h).status_code for _ in range(3)]
        assert statuses == [200] * 3
        r = c.get("/v1/models", headers=h)
        err = assert_envelope(r, 429, code="rate_limit_exceeded", kind="rate_limit_error")
        assert 1 <= int(r.headers["retry-after"]) <= 60
        assert "requests" in err["message"]
        # Other keys are not affected.
        assert c.get("/v1/models", headers=limited.auth).status_code == 200
    add("limits: rpm enforced (429)")


def test_tpm_is_429_with_retry_after(limited):
    h = {"Authorization": f"Bearer {limited.tpm_key}"}
    with httpx.Client(base_url=limited.base_url, timeout=60) as c:
        # Greedy with the end tokens suppressed, so all 16 tokens come (sampled at temperature 1, the model could end
        # early, under the limit: it did in a fresh clone).
        r = c.post("/v1/completions", headers=h,
                   json={"model": MODEL_ID, "prompt": "One two three four five six seven eight", "max_tokens": 16,
                         "temperature": 0, "logit_bias": {"0": -100, "2": -100}})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 16
        assert r.json()["usage"]["total_tokens"] > 20
        r = c.post("/v1/completions", headers=h, json={"model": MODEL_ID, "prompt": "Hi", "max_tokens": 1})
        err = assert_envelope(r, 429, code="rate_limit_exceeded", kind="rate_limit_error")
        assert int(r.headers["retry-after"]) >= 1
        assert "tokens" in err["message"]
    add("limits: tpm enforced (429)")
