"""The sample events in events/: current with infra/gen_events.py, and carrying what each event source really sends."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest

from conftest import INFRA, ROOT, tool_env

EVENTS = ROOT / "events"
KEY = "sk-llm-EVENTSAMPLEKEYEVENTSAMPLEKEYEVENTSAMPLEK"


def load(name: str) -> dict:
    return json.loads((EVENTS / name).read_text())


def test_events_are_what_gen_events_writes(tmp_path):
    """Edit infra/gen_events.py, not the JSON: this fails until `python infra/gen_events.py` is re-run."""
    p = subprocess.run(
        [sys.executable, str(INFRA / "gen_events.py"), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env=tool_env(),
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    generated = sorted(f.name for f in tmp_path.iterdir())
    assert generated == sorted(f.name for f in EVENTS.glob("*.json"))
    for name in generated:
        assert (tmp_path / name).read_text() == (EVENTS / name).read_text(), f"events/{name} is stale"


def test_the_sample_key_is_well_formed_and_installed_by_keys_json():
    rest = KEY.removeprefix("sk-llm-")
    assert len(rest) == 40 and rest.isalnum() and rest.isascii()
    doc = load("keys.json")
    assert [k["hash"] for k in doc["keys"]] == ["sha256:" + hashlib.sha256(KEY.encode()).hexdigest()]


@pytest.mark.parametrize("source", ["http-api", "function-url", "rest-v1"])
@pytest.mark.parametrize("kind, path", [("completions", "/v1/completions"), ("chat", "/v1/chat/completions")])
def test_each_source_has_completions_and_chat(source, kind, path):
    ev = load(f"{source}-{kind}.json")
    body = json.loads(ev["body"])
    assert ev["isBase64Encoded"] is False
    assert body["model"] == "smollm2-135m-instruct"
    if kind == "completions":
        assert body == {"model": body["model"], "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}
    else:
        assert body["messages"] == [{"role": "user", "content": "What is the capital of France?"}]
    headers = {k.lower(): v for k, v in ev["headers"].items()}
    assert headers["authorization"] == f"Bearer {KEY}"
    assert headers["content-type"] == "application/json"
    assert headers["content-length"] == str(len(ev["body"].encode()))
    if source == "rest-v1":
        assert ev["path"] == path and ev["httpMethod"] == "POST"
        assert ev["requestContext"]["stage"] == "prod"
        assert ev["requestContext"]["path"] == "/prod" + path
        assert ev["multiValueHeaders"] == {k: [v] for k, v in ev["headers"].items()}
    else:
        assert ev["version"] == "2.0" and ev["rawPath"] == path
        ctx = ev["requestContext"]
        assert ctx["http"]["method"] == "POST" and ctx["http"]["path"] == path
        assert ctx["stage"] == "$default"
        assert all(k == k.lower() for k in ev["headers"]), "payload 2.0 lowercases header names"
        if source == "function-url":
            assert ctx["domainName"].endswith(".lambda-url.us-east-1.on.aws")
            assert ev["routeKey"] == "$default" and "pathParameters" not in ev
        else:
            assert ctx["domainName"].endswith(".execute-api.us-east-1.amazonaws.com")
            assert ev["routeKey"] == "ANY /{proxy+}" and ev["pathParameters"] == {"proxy": path[1:]}


def test_the_streaming_variant_asks_for_a_stream():
    ev = load("function-url-chat-stream.json")
    body = json.loads(ev["body"])
    assert body["stream"] is True
    assert ev["headers"]["accept"] == "text/event-stream"


def test_request_ids_are_distinct():
    ids = [load(f.name)["requestContext"]["requestId"] for f in EVENTS.glob("*.json") if f.name != "keys.json"]
    assert len(ids) == len(set(ids))
