"""Shared fixtures of the real-client tests: one real `lambda-llm serve` per pytest session.

The session fixture `server` starts the real binary on a free port of 127.0.0.1 with the real model, a fresh keys file
(keys created by `lambda-llm keys new`, exactly as a user would), `MODEL_ALIASES=text-davinci-003=...`, JSON logs at
`info`, and stderr captured to a file that `test_logs.py` inspects. It waits for `GET /health`, yields a `Server`
(base URL, keys, log path) and stops the server at the end of the session.

This file is imported by both client venvs (openai 1.x and the legacy openai==0.28.1), so it uses only the standard
library and pytest. Nothing is skipped: a missing binary or model fails every test with a message saying what to do.

Environment:
  LAMBDA_LLM_BIN        the binary (else $CARGO_TARGET_DIR/debug/lambda-llm, else
                        /root/.cache/lambda-llm/target/debug/lambda-llm)
  LAMBDA_LLM_MODEL_DIR  the model artifact directory (else <repo>/model-artifacts/smollm2-135m-instruct)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MODEL_ID = "smollm2-135m-instruct"
ALIAS = "text-davinci-003"
OTHER_MODEL = "other-model"
STARTUP_TIMEOUT_S = 60.0
KEY_RE = re.compile(r"^sk-llm-[A-Za-z0-9]{40}$")


def binary_path() -> Path:
    """The `lambda-llm` binary under test (see the module docstring for the lookup order)."""
    if os.environ.get("LAMBDA_LLM_BIN"):
        return Path(os.environ["LAMBDA_LLM_BIN"])
    if os.environ.get("CARGO_TARGET_DIR"):
        return Path(os.environ["CARGO_TARGET_DIR"]) / "debug" / "lambda-llm"
    return Path("/root/.cache/lambda-llm/target/debug/lambda-llm")


def model_dir() -> Path:
    """The model artifact directory the server loads."""
    if os.environ.get("LAMBDA_LLM_MODEL_DIR"):
        return Path(os.environ["LAMBDA_LLM_MODEL_DIR"])
    return REPO / "model-artifacts" / MODEL_ID


def sha256_hex(text: str) -> str:
    """Hex SHA-256 of a string (how the keys file stores a key)."""
    return hashlib.sha256(text.encode()).hexdigest()


@dataclasses.dataclass
class Server:
    """A running `lambda-llm serve` and what the tests need to talk to it."""

    base_url: str  # http://127.0.0.1:PORT (no trailing slash, no /v1)
    key: str  # full key: every model
    key_id: str  # its id in the keys file (what the request log names)
    restricted_key: str  # allowed only `other-model` -> 403 on the served model
    restricted_key_id: str
    log_path: Path  # the server's captured stderr (JSON lines)
    keys_file: Path
    workdir: Path
    process: subprocess.Popen

    @property
    def v1(self) -> str:
        """Base URL for OpenAI SDKs (`.../v1`)."""
        return self.base_url + "/v1"

    def log_text(self) -> str:
        """Everything the server wrote to stderr so far."""
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def log_size(self) -> int:
        """Current size of the log, to read only what later requests add (`log_records(since=...)`)."""
        return self.log_path.stat().st_size

    def log_records(self, since: int = 0) -> list[dict]:
        """The JSON log records written after byte offset `since` (every stderr line must be JSON)."""
        with open(self.log_path, "rb") as f:
            f.seek(since)
            data = f.read().decode("utf-8", errors="replace")
        records = []
        for line in data.splitlines():
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:  # pragma: no cover - a failure message, not a branch
                    raise AssertionError(f"server stderr line is not JSON (LOG_FORMAT=json): {line!r}") from e
        return records

    def request_records(self, since: int = 0, expect: int | None = None, timeout: float = 5.0) -> list[dict]:
        """The `request` log records after `since`; with `expect`, waits (briefly) until that many were written."""
        deadline = time.monotonic() + timeout
        while True:
            recs = [r for r in self.log_records(since) if r.get("fields", {}).get("message") == "request"]
            if expect is None or len(recs) >= expect or time.monotonic() > deadline:
                return recs
            time.sleep(0.05)

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of the log, for failure messages."""
        try:
            return "\n".join(self.log_text().splitlines()[-lines:])
        except OSError:
            return "(no log)"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _new_key(binary: Path, keys_file: Path, name: str, *extra: str) -> tuple[str, str]:
    """Runs `lambda-llm keys new` and returns (plaintext key from stdout, its id from the keys file)."""
    cmd = [str(binary), "keys", "new", "--name", name, "--keys-file", str(keys_file), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        pytest.fail(f"`{' '.join(cmd)}` failed ({proc.returncode}):\n{proc.stderr}", pytrace=False)
    key = proc.stdout.strip()
    if not KEY_RE.match(key):
        pytest.fail(f"`keys new` must print the key alone on stdout (sk-llm- + 40 base62); got {proc.stdout!r}",
                    pytrace=False)
    doc = json.loads(keys_file.read_text())
    ids = [k["id"] for k in doc["keys"] if k.get("hash") == "sha256:" + sha256_hex(key)]
    if len(ids) != 1:
        pytest.fail(f"the keys file has no single entry with the new key's sha256: {doc}", pytrace=False)
    return key, ids[0]


def _wait_healthy(proc: subprocess.Popen, base_url: str, log_path: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    last = "no answer"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            with urllib.request.urlopen(base_url + "/health", timeout=2) as resp:
                body = json.loads(resp.read())
                if resp.status == 200 and body.get("model_loaded"):
                    return
                last = f"{resp.status} {body}"
        except (urllib.error.URLError, OSError, ValueError) as e:
            last = repr(e)
        time.sleep(0.2)
    tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-40:]) if log_path.exists() else "(no log)"
    state = f"exited with code {proc.returncode}" if proc.poll() is not None else "still running, never healthy"
    pytest.fail(
        f"lambda-llm serve did not become healthy within {STARTUP_TIMEOUT_S:.0f}s ({state}; last /health: {last}).\n"
        f"--- server stderr ({log_path}) ---\n{tail}",
        pytrace=False,
    )


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory):
    """A real `lambda-llm serve` with the real model, for the whole session."""
    binary, mdir = binary_path(), model_dir()
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        pytest.fail(
            f"lambda-llm binary not found at {binary} (set LAMBDA_LLM_BIN or CARGO_TARGET_DIR, or run `make test`, "
            f"which builds it first)",
            pytrace=False,
        )
    if not (mdir / "manifest.json").is_file() or not (mdir / "model.onnx").is_file():
        pytest.fail(
            f"model artifact not found in {mdir} (manifest.json + model.onnx; set LAMBDA_LLM_MODEL_DIR or run "
            f"`make setup`)",
            pytrace=False,
        )

    workdir = tmp_path_factory.mktemp("lambda-llm-server")
    keys_file = workdir / "keys.json"
    key, key_id = _new_key(binary, keys_file, "client-tests")
    restricted, restricted_id = _new_key(binary, keys_file, "client-tests-restricted", "--models", OTHER_MODEL)

    env = dict(os.environ)
    for var in ("API_KEYS_FILE", "API_KEYS_SECRET_ID", "MODEL_DIR"):  # the command line decides these
        env.pop(var, None)
    env.update(MODEL_ALIASES=f"{ALIAS}={MODEL_ID}", LOG_FORMAT="json", RUST_LOG="info")

    log_path = workdir / "server.stderr.log"
    port = _free_port()
    base_url = f"http://127.0.0.1:{port}"
    cmd = [str(binary), "serve", "--host", "127.0.0.1", "--port", str(port), "--keys-file", str(keys_file),
           "--model-dir", str(mdir)]
    with open(log_path, "wb") as err, open(workdir / "server.stdout.log", "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL, cwd=workdir, env=env)
    try:
        _wait_healthy(proc, base_url, log_path)
        srv = Server(base_url=base_url, key=key, key_id=key_id, restricted_key=restricted,
                     restricted_key_id=restricted_id, log_path=log_path, keys_file=keys_file, workdir=workdir,
                     process=proc)
        yield srv
        # After the session: the server must have survived every request, without a panic.
        if proc.poll() is not None:
            pytest.fail(f"lambda-llm serve died during the tests (exit {proc.returncode}):\n{srv.log_tail()}",
                        pytrace=False)
        panics = [line for line in srv.log_text().splitlines() if "panicked" in line]
        if panics:
            pytest.fail("the server logged a panic:\n" + "\n".join(panics[:10]), pytrace=False)
    finally:
        _stop(proc)


@pytest.fixture(scope="session")
def latency_report(tmp_path_factory: pytest.TempPathFactory):
    """A dict the latency tests fill; printed and written as JSON (under the pytest tmp dir) at session end."""
    report: dict = {}
    yield report
    if report:
        path = tmp_path_factory.getbasetemp() / "latency.json"
        path.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nlatency report ({path}):\n{json.dumps(report, indent=2)}")
