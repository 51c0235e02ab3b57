"""What the server logs (stderr, `LOG_FORMAT=json`, `RUST_LOG=info`) while real clients use it.

Issue 3: one structured line per request with id, status, tokens and latency — and never the key or the prompt at
info level. The test drives completions, chat and streamed requests (plus rejected ones) through the openai 1.x SDK
with a distinctive prompt, then reads the server's captured stderr:

- no line, at any level, contains the prompt marker, the full key (either key), a rejected key, or a key's SHA-256;
- every request produced exactly one `request` line, found by the `x-request-id` the client received, naming the
  method, path, status, a latency, the key's id (not the key), and for non-streamed generations the token counts.
"""

from __future__ import annotations

import openai
import pytest
from conftest import MODEL_ID, sha256_hex
from openai import OpenAI

MARKER = "zebra-quokka-7731"
PROMPT = f"My secret word is {MARKER}. Repeat the secret word: {MARKER}"
BAD_KEY = "sk-llm-" + "Zq7" * 13 + "x"


def _drive(server) -> list[dict]:
    """Sends a mix of requests; returns what each should have logged (request id from `x-request-id`)."""
    client = OpenAI(base_url=server.v1, api_key=server.key, max_retries=0, timeout=120)
    messages = [{"role": "system", "content": f"Remember {MARKER}."}, {"role": "user", "content": PROMPT}]
    sent: list[dict] = []

    def record(raw, path: str, status: int, key_id: str, usage=None, method: str = "POST"):
        rid = raw.headers.get("x-request-id")
        assert rid, f"{path}: the response has no x-request-id header"
        sent.append({"request_id": rid, "method": method, "path": path, "status": status, "key": key_id,
                     "usage": usage})

    raw = client.completions.with_raw_response.create(model=MODEL_ID, prompt=PROMPT, max_tokens=8, temperature=0)
    record(raw, "/v1/completions", 200, server.key_id, raw.parse().usage)

    raw = client.chat.completions.with_raw_response.create(model=MODEL_ID, messages=messages, max_tokens=8,
                                                           temperature=0)
    record(raw, "/v1/chat/completions", 200, server.key_id, raw.parse().usage)

    with client.completions.with_streaming_response.create(
            model=MODEL_ID, prompt=PROMPT, max_tokens=8, temperature=0, stream=True,
            stream_options={"include_usage": True}) as resp:
        text = "".join(c.choices[0].text for c in resp.parse() if c.choices)
        record(resp, "/v1/completions", 200, server.key_id)
    assert text is not None

    with client.chat.completions.with_streaming_response.create(
            model=MODEL_ID, messages=messages, max_tokens=8, temperature=0.7, seed=5, stream=True) as resp:
        list(resp.parse())
        record(resp, "/v1/chat/completions", 200, server.key_id)

    raw = client.models.with_raw_response.list()
    record(raw, "/v1/models", 200, server.key_id, method="GET")

    # Rejected: a 400 that carries the prompt, a 404, a 403 (restricted key) and a 401 (unknown key).
    with pytest.raises(openai.BadRequestError) as ei:
        client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=4, temperature=9)
    record(ei.value.response, "/v1/completions", 400, server.key_id)

    with pytest.raises(openai.NotFoundError) as ei:
        client.chat.completions.create(model="no-such-model", messages=messages)
    record(ei.value.response, "/v1/chat/completions", 404, server.key_id)

    restricted = OpenAI(base_url=server.v1, api_key=server.restricted_key, max_retries=0)
    with pytest.raises(openai.PermissionDeniedError) as ei:
        restricted.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=4)
    record(ei.value.response, "/v1/completions", 403, server.restricted_key_id)

    bad = OpenAI(base_url=server.v1, api_key=BAD_KEY, max_retries=0)
    with pytest.raises(openai.AuthenticationError) as ei:
        bad.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=4)
    record(ei.value.response, "/v1/completions", 401, "-")
    return sent


@pytest.fixture(scope="module")
def driven(server):
    start = server.log_size()
    sent = _drive(server)
    records = server.request_records(since=start, expect=len(sent))
    return sent, records


def test_no_prompt_or_key_in_logs(server, driven):
    text = server.log_text()  # the whole session's log, every level that RUST_LOG=info lets through
    forbidden = {
        "prompt marker": MARKER,
        "full key": server.key,
        "restricted key": server.restricted_key,
        "rejected key": BAD_KEY,
        "full key sha256": sha256_hex(server.key),
        "restricted key sha256": sha256_hex(server.restricted_key),
        "rejected key sha256": sha256_hex(BAD_KEY),
        "key body without prefix": server.key.removeprefix("sk-llm-"),
    }
    leaks = {what: [line for line in text.splitlines() if needle in line][:3]
             for what, needle in forbidden.items() if needle in text}
    assert not leaks, f"secrets or prompt text in the server log: {leaks}"


def test_one_request_line_per_request(server, driven):
    sent, records = driven
    by_id: dict[str, list[dict]] = {}
    for rec in records:
        rid = rec["fields"].get("request_id")
        assert rid, f"a request line without request_id: {rec}"
        by_id.setdefault(rid, []).append(rec)
    assert len(records) == len(sent), (
        f"{len(sent)} requests sent, {len(records)} request lines logged:\n" + "\n".join(map(str, records)))
    for s in sent:
        lines = by_id.get(s["request_id"], [])
        assert len(lines) == 1, f"expected one request line for {s}, got {lines}"
        rec = lines[0]
        f = rec["fields"]
        assert rec["level"] == "INFO"
        assert f["method"] == s["method"]
        assert f["path"] == s["path"]
        assert f["status"] == s["status"], (s, f)
        assert isinstance(f["latency_ms"], (int, float)) and f["latency_ms"] >= 0
        assert f["key"] == s["key"], (s, f)
        if s["usage"] is not None:
            assert f["prompt_tokens"] == s["usage"].prompt_tokens, (s, f)
            assert f["completion_tokens"] == s["usage"].completion_tokens, (s, f)


def test_request_ids_are_unique(driven):
    sent, _ = driven
    ids = [s["request_id"] for s in sent]
    assert len(set(ids)) == len(ids)


def test_every_stderr_line_is_json_with_a_level(server, driven):
    records = server.log_records()
    assert records, "the server logged nothing"
    levels = {r.get("level") for r in records}
    assert levels <= {"INFO", "WARN", "ERROR"}, f"RUST_LOG=info, yet levels {levels} were logged"
