"""The sample events in events/: current with infra/gen_events.py, and carrying what each event source really sends."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys

import pytest

from conftest import INFRA, ROOT, tool_env

sys.path.insert(0, str(INFRA))
import check_template  # noqa: E402

EVENTS = ROOT / "events"
KEY = "sk-llm-EVENTSAMPLEKEYEVENTSAMPLEKEYEVENTSAMPLEK"
# The chunk message contract (src/batch/jobs.rs `Chunk`), in its field order.
CHUNK_FIELDS = ["bucket", "key", "etag", "name", "part", "parts", "first_line", "last_line", "total_lines"]


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
    assert generated == sorted(f.name for f in EVENTS.iterdir() if f.suffix in (".json", ".jsonl"))
    for name in generated:
        assert (tmp_path / name).read_bytes() == (EVENTS / name).read_bytes(), f"events/{name} is stale"


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
    events = [load(f.name) for f in EVENTS.glob("*.json")]
    ids = [ev["requestContext"]["requestId"] for ev in events if "requestContext" in ev]
    assert len(ids) == 8 and len(ids) == len(set(ids))


def _input_filter() -> tuple[str, str]:
    """(prefix, suffix) of template.yaml's S3 notification to the batch function."""
    template = check_template.load_template(ROOT / "template.yaml")
    events = template["Resources"]["BatchFunction"]["Properties"]["Events"]
    [s3] = [e["Properties"] for e in events.values() if e["Type"] == "S3"]
    rules = {r["Name"]: r["Value"] for r in s3["Filter"]["S3Key"]["Rules"]}
    return rules["prefix"], rules["suffix"]


def test_the_batch_example_has_a_chat_a_completion_and_a_broken_line():
    text = (EVENTS / "batch-example.jsonl").read_text()
    lines = text.splitlines()
    assert len(lines) == 3 and text.endswith("\n")
    chat, completion = json.loads(lines[0]), json.loads(lines[1])
    assert chat["url"] == "/v1/chat/completions" and chat["method"] == "POST" and chat["body"]["messages"]
    assert completion["url"] == "/v1/completions" and completion["body"]["prompt"]
    assert chat["custom_id"] != completion["custom_id"]
    with pytest.raises(json.JSONDecodeError):
        json.loads(lines[2])
    assert '"custom_id":"request-3"' in lines[2]  # recognizable, though not parseable


def test_the_s3_event_is_the_upload_of_the_example_to_the_input_prefix():
    data = (EVENTS / "batch-example.jsonl").read_bytes()
    [rec] = load("s3-put.json")["Records"]
    assert rec["eventSource"] == "aws:s3" and rec["eventName"].startswith("ObjectCreated:")
    bucket, obj = rec["s3"]["bucket"], rec["s3"]["object"]
    assert bucket["name"] == "lambda-llm-batch-example" and bucket["arn"] == "arn:aws:s3:::lambda-llm-batch-example"
    assert obj["key"] == "batches/input/example.jsonl"
    prefix, suffix = _input_filter()
    assert obj["key"].startswith(prefix) and obj["key"].endswith(suffix), "the template's notification must match it"
    assert obj["size"] == len(data)
    assert obj["eTag"] == hashlib.md5(data).hexdigest()  # a single-part upload's ETag, unquoted as S3 sends it
    assert "versionId" not in obj  # the bucket is not versioned


def test_the_sqs_event_carries_the_one_chunk_of_the_example():
    data = (EVENTS / "batch-example.jsonl").read_bytes()
    [rec] = load("sqs-chunk.json")["Records"]
    assert rec["eventSource"] == "aws:sqs"
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", rec["messageId"])
    assert rec["md5OfBody"] == hashlib.md5(rec["body"].encode()).hexdigest()
    chunk = json.loads(rec["body"])
    assert list(chunk) == CHUNK_FIELDS
    [s3] = load("s3-put.json")["Records"]
    non_blank = sum(1 for line in data.decode().splitlines() if line.strip())
    assert chunk == {
        "bucket": s3["s3"]["bucket"]["name"],
        "key": s3["s3"]["object"]["key"],
        "etag": s3["s3"]["object"]["eTag"],
        "name": "example",  # the file name without .jsonl
        "part": 0,
        "parts": 1,
        "first_line": 1,  # 1-based, inclusive
        "last_line": non_blank,
        "total_lines": non_blank,
    }
