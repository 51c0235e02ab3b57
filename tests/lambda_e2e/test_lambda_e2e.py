"""The real `http-function` under `cargo lambda watch` (the Lambda Runtime API emulator), keys in Secrets Manager on
moto, called through the Function URL path with the openai SDK. Tests run in file order: buffered mode, streaming
mode, key rotation, Secrets Manager going away, and a fresh instance that never saw the keys.
"""

from __future__ import annotations

import json
import subprocess
import time

import openai
import pytest
from openai import OpenAI

from conftest import REPO, TTL_SECONDS, Watch, key_entry, make_key, status_of

MODEL = "smollm2-135m-instruct"
KEY_A, KEY_B = make_key("A"), make_key("B")
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def client(base: str, key: str) -> OpenAI:
    return OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=120)


def test_buffered_mode_answers_and_delivers_whole_streams(moto, tmp_path):
    w = Watch(tmp_path, "buffered", moto.endpoint, "buffered")
    try:
        c = client(w.base, KEY_A)
        done = c.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0)
        assert "Paris" in done.choices[0].text
        chat = c.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=20)
        assert "Paris" in chat.choices[0].message.content
        chunks = list(c.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=20,
                                                stream=True, stream_options={"include_usage": True}))
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        assert "Paris" in text
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    finally:
        w.stop()


def test_streaming_mode_completions_and_chat(streaming):
    c = client(streaming.base, KEY_A)
    done = c.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert "Paris" in done.choices[0].text
    assert done.usage.completion_tokens == 8
    chat = c.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=20)
    assert "Paris" in chat.choices[0].message.content
    chunks = list(c.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=6, temperature=0,
                                       stream=True))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices)


def test_streamed_chunks_arrive_incrementally(streaming):
    c = client(streaming.base, KEY_A)
    arrivals = []
    stream = c.chat.completions.create(model=MODEL, temperature=0, max_tokens=64, stream=True,
                                       messages=[{"role": "user", "content": "Write a long story about a dragon."}])
    for ch in stream:
        if ch.choices and ch.choices[0].delta.content:
            arrivals.append(time.monotonic())
    assert len(arrivals) >= 20
    # Token by token: the first text arrives well before the last (a buffered body would arrive all at once).
    spread = arrivals[-1] - arrivals[0]
    assert spread > 0.2, f"all {len(arrivals)} chunks arrived within {spread:.3f}s"


@pytest.mark.parametrize("event", ["function-url-completions.json", "http-api-chat.json", "rest-v1-completions.json"])
def test_recorded_events_through_cargo_lambda_invoke(streaming, event):
    out = subprocess.run(
        ["cargo", "lambda", "invoke", "http-function", "--invoke-port", str(streaming.port), "--data-file",
         str(REPO / "events" / event)],
        cwd=REPO, env=streaming.env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout, out.stdout


def test_a_bad_key_is_401(streaming):
    with pytest.raises(openai.AuthenticationError):
        client(streaming.base, make_key("Z")).models.list()


def test_rotation_new_key_works_at_once_old_stops_within_ttl_and_no_valid_call_fails(streaming, moto):
    time.sleep(TTL_SECONDS + 0.5)  # let the unknown-key refresh of the previous test age out
    moto.put_keys([key_entry("key_a", KEY_A), key_entry("key_b", KEY_B)])
    assert status_of(streaming.base + "/v1/models", KEY_B) == 200, "a newly added key must work on the next call"
    # One caller at a time, as one Lambda instance serves one request at a time: the valid key is called between
    # every check of the removed one.
    moto.put_keys([key_entry("key_b", KEY_B)])
    removed_at, calls, failures = time.monotonic(), 0, []
    while True:
        s = status_of(streaming.base + "/v1/models", KEY_B)
        calls += 1
        if s != 200:
            failures.append(s)
        if status_of(streaming.base + "/v1/models", KEY_A) == 401:
            break
        assert time.monotonic() - removed_at < TTL_SECONDS + 8, "a removed key kept working past the TTL"
        time.sleep(0.1)
    for _ in range(10):
        calls += 1
        if (s := status_of(streaming.base + "/v1/models", KEY_B)) != 200:
            failures.append(s)
    assert failures == [], f"{len(failures)} of {calls} calls with a valid key failed: {failures}"


def test_secrets_manager_unreachable_cached_keys_keep_working(streaming, moto):
    moto.stop()
    # Past the TTL the store tries to refresh, fails, and keeps serving the last good document.
    end = time.monotonic() + TTL_SECONDS * 2 + 1
    while time.monotonic() < end:
        assert status_of(streaming.base + "/v1/models", KEY_B) == 200
        time.sleep(0.3)
    assert status_of(streaming.base + "/v1/models", KEY_A) == 401


def test_a_fresh_instance_without_secrets_manager_fails_closed(moto, tmp_path):
    assert moto.proc.poll() is not None, "moto must be down for this test"
    w = Watch(tmp_path, "fresh", moto.endpoint, "streaming")
    try:
        for key in (KEY_A, KEY_B, make_key("Q")):
            assert status_of(w.base + "/v1/models", key) == 503
        init = [json.loads(line) for line in w.log.read_text(errors="replace").splitlines()
                if line.startswith("{") and '"InitDuration"' in line]
        print(f"\ncold start (InitDuration, process start to ready): {init[-1]['InitDuration']:.0f} ms" if init else "")
    finally:
        w.stop()
