"""Key attacks against the real server (issue 7, part 2), with JSON and with text logs.

More than 1,000 forged credentials per server: random well-formed keys, near-misses (every position of a real key
changed), a real key's prefixes, suffixes and extensions, wrong header forms, and real keys that stopped being valid
(expired, disabled by `keys revoke`, deleted by `keys revoke --delete`, disabled by editing the keys document).
None is accepted; every rejection of a presented key has the same status, headers and body (so the answer does not
tell which condition failed); a valid key for a model it is not allowed gets the documented 403 `model_not_allowed`.
Then the server's log (info level) is searched: no key, no key hash, no piece of either, no prompt text.
"""

from __future__ import annotations

import base64
import json
import random
import re
import string
import time
from datetime import datetime, timedelta, timezone

import httpx
import pytest
from conftest import (MODEL_ID, OTHER_MODEL, Serve, add, assert_envelope, keys_cli, new_key, random_key, sha256_hex)

ALPHABET = string.ascii_letters + string.digits
MARKER = "okapi-marmalade-5521"
PROMPT = f"My secret prompt is {MARKER}."
IGNORED = {"date", "x-request-id"}


@pytest.fixture(scope="module", params=["json", "text"])
def target(request, server, tmp_path_factory):
    """The shared JSON-logging server, and a text-logging one of this module's own."""
    if request.param == "json":
        yield server
        return
    s = Serve(tmp_path_factory.mktemp("serve-text-log"), log_format="text", env={"REQUEST_TIMEOUT_SECONDS": "2"})
    s.restricted_key, s.restricted_key_id = new_key(s.keys_file, "restricted", "--models", OTHER_MODEL)
    yield s
    s.stop()


def _bytes(headers: dict) -> dict:
    """Header values as latin-1 bytes (what goes on the wire; lets a forged key carry non-ASCII bytes)."""
    return {k: v.encode("latin-1") for k, v in headers.items()}


def _completion(client: httpx.Client, headers: dict, model: str = MODEL_ID) -> httpx.Response:
    return client.post("/v1/completions", headers=_bytes(headers),
                       json={"model": model, "prompt": PROMPT, "max_tokens": 1})


def _near_misses(key: str, rng: random.Random) -> list[str]:
    out = []
    for i in range(len(key)):  # every position, the prefix `sk-llm-` included
        for _ in range(2):
            c = rng.choice([ch for ch in ALPHABET + "-_" if ch != key[i]])
            out.append(key[:i] + c + key[i + 1:])
    body = key[len("sk-llm-"):]
    out += [key.swapcase(), key.upper(), key.lower(), "sk-llm-" + body[::-1], "sk-llm-" + body[1:] + body[0],
            "sk-LLM-" + body, "sk_llm_" + body, "sk-" + body, key.replace("sk-llm-", "sk-llm--")]
    return [k for k in out if k != key]


def _prefix_suffix(key: str) -> list[str]:
    out = [key[:n] for n in range(1, len(key))]
    out += [key[n:] for n in range(1, len(key))]
    out += [key + c for c in "aZ09-_."] + [key + key, key[:-1], key + "=" * 4, key + "\u00e9".encode().decode("latin-1")]
    # Leading/trailing whitespace and control characters are not sendable as a header value by an HTTP client
    # (the raw-socket cases of test_hostile.py cover bytes like these).
    return [k for k in out if k.strip() == k and all(32 <= ord(ch) < 256 for ch in k)]


def _header_forms(key: str, other_forged: str) -> list[tuple[str, dict]]:
    """Wrong ways of presenting credentials; (label, headers). Each is refused."""
    basic = base64.b64encode(f"user:{key}".encode()).decode()
    return [
        ("Basic with key", {"Authorization": f"Basic {basic}"}),
        ("Basic raw key", {"Authorization": f"Basic {key}"}),
        ("Token scheme", {"Authorization": f"Token {key}"}),
        ("no scheme", {"Authorization": key}),
        ("Bearer without space", {"Authorization": f"Bearer{key}"}),
        ("Bearer, two tokens", {"Authorization": f"Bearer {key} {key}"}),
        ("Bearer, comma list", {"Authorization": f"Bearer {key}, Bearer {key}"}),
        ("x-api-key with Bearer", {"x-api-key": f"Bearer {key}"}),
        ("x-api-key two tokens", {"x-api-key": f"{key} {key}"}),
        ("lowercase bearer, forged", {"Authorization": f"bearer {other_forged}"}),
        ("X-API-KEY forged", {"X-API-KEY": other_forged}),
        ("api-key header, forged", {"api-key": other_forged, "x-api-key": other_forged}),
        ("quoted key", {"Authorization": f'Bearer "{key}"'}),
        ("url-encoded key", {"Authorization": f"Bearer {key.replace('-', '%2D')}"}),
    ]


def _missing_forms(key: str) -> list[tuple[str, dict]]:
    """Forms that present no key at all (answered with the 'no key' message)."""
    return [
        ("no header", {}),
        ("Bearer alone", {"Authorization": "Bearer"}),
        ("empty Authorization", {"Authorization": ""}),
        ("empty x-api-key", {"x-api-key": ""}),
        ("x_api_key underscore", {"x_api_key": key}),
        ("Authorisation typo", {"Authorisation": f"Bearer {key}"}),
        ("api-key header", {"api-key": key}),
    ]


def _shape(resp: httpx.Response) -> tuple:
    return (resp.status_code, tuple(sorted((k, v) for k, v in resp.headers.items() if k not in IGNORED)), resp.content)


def test_forged_keys_are_never_accepted_and_all_look_the_same(target):
    rng = random.Random(11)
    c = httpx.Client(base_url=target.base_url, timeout=60)
    kf = target.keys_file
    # Real keys that will stop being valid; each works first.
    soon = (datetime.now(timezone.utc) + timedelta(seconds=3)).strftime("%Y-%m-%dT%H:%M:%SZ")
    expiring, _ = new_key(kf, "expiring", "--expires", soon)
    revoked, revoked_id = new_key(kf, "revoked")
    deleted, deleted_id = new_key(kf, "deleted")
    edited, edited_id = new_key(kf, "edited")
    for k in (expiring, revoked, deleted, edited):
        assert _completion(c, {"Authorization": f"Bearer {k}"}).status_code == 200
    keys_cli(kf, "revoke", revoked_id)
    keys_cli(kf, "revoke", deleted_id, "--delete")
    doc = json.loads(kf.read_text())
    for k in doc["keys"]:
        if k["id"] == edited_id:
            k["disabled"] = True
    tmp = kf.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc))
    tmp.replace(kf)
    while datetime.now(timezone.utc) < datetime.strptime(soon, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc):
        time.sleep(0.2)
    time.sleep(2.5)  # KEYS_CACHE_TTL_SECONDS=1 plus margin

    real = target.key
    forged_keys = ([random_key() for _ in range(800)] + _near_misses(real, rng) + _near_misses(expiring, rng)[:40]
                   + _prefix_suffix(real) + [expiring, revoked, deleted, edited])
    cases: list[tuple[str, dict]] = []
    for i, k in enumerate(forged_keys):
        cases.append(("forged", {"Authorization": f"Bearer {k}"} if i % 2 == 0 else {"x-api-key": k}))
    cases += [("forged", h) for _, h in _header_forms(real, random_key())]
    cases += [("forged", {"Authorization": f"Bearer {k}"}) for k in (revoked, expiring, edited, deleted)]
    cases += [("forged", {"x-api-key": k}) for k in (revoked, expiring, edited, deleted)]
    # A forged key for a model (even one the real key may not use) is still 401, never 403.
    cases += [("forged-model", {"Authorization": f"Bearer {random_key()}"}) for _ in range(20)]
    missing = [h for _, h in _missing_forms(real)]

    shapes: dict[str, set] = {"presented": set(), "missing": set()}
    accepted, tried = [], 0
    for i, (label, headers) in enumerate(cases):
        model = OTHER_MODEL if label == "forged-model" else MODEL_ID
        r = _completion(c, headers, model) if i % 3 else c.get("/v1/models", headers=_bytes(headers))
        tried += 1
        if r.status_code < 400:
            accepted.append((headers, r.status_code))
            continue
        assert_envelope(r, 401, code="invalid_api_key", kind="invalid_request_error")
        if not all(v.isascii() for v in headers.values()):
            # A header value with non-ASCII bytes is not readable as text: the server treats it as absent and
            # answers "no key" (nothing about any real key is revealed by that).
            if i % 3:
                shapes["missing"].add(_shape(r))
            continue
        shapes["presented"].add(_shape(r) if i % 3 else ("GET",) + _shape(r))
    for headers in missing:
        r = _completion(c, headers)
        tried += 1
        if r.status_code < 400:
            accepted.append((headers, r.status_code))
            continue
        assert_envelope(r, 401, code="invalid_api_key")
        shapes["missing"].add(_shape(r))
    add("keys: forged keys tried", tried)
    add("keys: forged keys accepted", len(accepted))
    assert tried >= 1000
    assert not accepted, accepted[:10]
    # One answer for every presented-but-invalid credential (per route), one for every missing one.
    post = {s for s in shapes["presented"] if s[0] != "GET"}
    get = {s for s in shapes["presented"] if s[0] == "GET"}
    assert len(post) == 1, "\n".join(map(repr, post))
    assert len(get) == 1, "\n".join(map(repr, get))
    assert {s[1:] for s in get} == post, "GET and POST rejections differ"
    assert len(shapes["missing"]) == 1, "\n".join(map(repr, shapes["missing"]))
    presented_body = json.loads(next(iter(post))[2])
    assert presented_body["error"]["message"] == "Incorrect API key provided."

    # The real key still works, with both accepted headers and a lowercase scheme (RFC 9110: case-insensitive).
    for h in ({"Authorization": f"Bearer {real}"}, {"x-api-key": real}, {"Authorization": f"bearer {real}"}):
        assert _completion(c, h).status_code == 200
    # A valid key for a model it may not use: the documented 403, naming the model, not a 401.
    r = _completion(c, {"Authorization": f"Bearer {target.restricted_key}"})
    err = assert_envelope(r, 403, code="model_not_allowed")
    assert err["param"] == "model" and MODEL_ID in err["message"]
    assert c.get("/v1/models", headers={"Authorization": f"Bearer {target.restricted_key}"}).status_code == 200
    target.secrets = {"real": [real, target.restricted_key, expiring, revoked, deleted, edited],
                      "forged": forged_keys}
    c.close()


HEX64 = re.compile(r"(?<![0-9a-fA-F])[0-9a-fA-F]{64}(?![0-9a-fA-F])")
KEYLIKE = re.compile(r"sk-llm-[A-Za-z0-9]{6,}")


def test_no_key_hash_or_prompt_in_the_log(target):
    secrets = getattr(target, "secrets", None)
    assert secrets, "runs after test_forged_keys_are_never_accepted_and_all_look_the_same"
    # A 400 that carries the prompt, and a 200 with it, so the prompt passed through every layer.
    with httpx.Client(base_url=target.base_url, timeout=60, headers={"Authorization": f"Bearer {target.key}"}) as c:
        c.post("/v1/chat/completions", json={"model": MODEL_ID, "max_tokens": 1,
                                             "messages": [{"role": "user", "content": PROMPT}]})
        c.post("/v1/completions", json={"model": MODEL_ID, "prompt": PROMPT, "max_tokens": "many"})
        c.post("/tokenize", json={"model": MODEL_ID, "prompt": PROMPT})
    time.sleep(0.5)
    text = target.log_text()
    lines = text.splitlines()
    assert any(MODEL_ID in ln or "request" in ln for ln in lines), "the server logged nothing at info"
    leaks = []
    leaks += [f"key-like text: {ln[:200]}" for ln in lines if KEYLIKE.search(ln)]
    # A SHA-256 in hex (hostile paths like /v1/models/aaaa… are not: a digest uses many different digits).
    leaks += [f"64-hex (a hash?): {ln[:200]}" for ln in lines
              if any(len(set(m.lower())) >= 10 for m in HEX64.findall(ln))]
    for k in secrets["forged"]:
        if sha256_hex(k) in text:
            leaks.append(f"hash of forged key {k[:10]}…")
    if MARKER in text:
        leaks.append("prompt marker: " + next(ln for ln in lines if MARKER in ln)[:200])
    for k in secrets["real"]:
        body, h = k[len("sk-llm-"):], sha256_hex(k)
        # No 8-character piece of a real key's body, and no 12-hex piece of its hash (the keys CLI shows 8).
        for i in range(0, len(body) - 8 + 1):
            if body[i:i + 8] in text:
                leaks.append(f"piece of a real key {body[i:i + 8]!r}")
                break
        for i in range(0, len(h) - 12 + 1):
            if h[i:i + 12] in text:
                leaks.append(f"piece of a real key's hash {h[i:i + 12]!r}")
                break
    forged_bodies = {k[len("sk-llm-"):] for k in secrets["forged"] if k.startswith("sk-llm-") and len(k) >= 30}
    leaks += [f"forged key {b[:6]}…" for b in forged_bodies if b in text]
    add(f"keys: log lines checked ({'json' if text.lstrip().startswith('{') else 'text'})", len(lines))
    add("keys: secrets or prompt found in the log", len(leaks))
    assert not leaks, leaks[:10]
