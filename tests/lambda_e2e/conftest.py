"""Fixtures of the Lambda end-to-end tests: a moto server (Secrets Manager) and `cargo lambda watch` running the real
`http-function` binary under the real Lambda Runtime API emulator.

Executables: `MOTO_SERVER` (moto_server from the infra venv) and `CARGO_LAMBDA_BIN` (the directory holding
`cargo-lambda`); the Makefile sets both. Nothing is skipped: a missing tool fails with a message saying what to do.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import boto3
import pytest

REPO = Path(__file__).resolve().parents[2]
SECRET_ID = "lambda-llm/keys"
REGION = "us-east-1"
TTL_SECONDS = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(0.2)
    tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
    pytest.fail(f"{what} did not come up within {timeout:.0f}s\n{tail}")


def key_entry(key_id: str, key: str) -> dict:
    return {"id": key_id, "name": key_id, "hash": "sha256:" + hashlib.sha256(key.encode()).hexdigest()}


def make_key(letter: str) -> str:
    return "sk-llm-" + letter * 40


class Moto:
    """A moto_server child process holding the keys secret."""

    def __init__(self, tmp: Path):
        exe = os.environ.get("MOTO_SERVER") or shutil.which("moto_server")
        if not exe or not Path(exe).exists():
            pytest.fail("moto_server not found: run `make setup` (MOTO_SERVER points at the infra venv's moto_server)")
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log = tmp / "moto.log"
        self.proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(self.port)], stdout=self.log.open("wb"),
                                     stderr=subprocess.STDOUT)
        wait_for(lambda: urllib.request.urlopen(self.endpoint + "/moto-api/", timeout=1), 30, "moto_server", self.log)
        self.client = boto3.client("secretsmanager", endpoint_url=self.endpoint, region_name=REGION,
                                   aws_access_key_id="test", aws_secret_access_key="test")

    def put_keys(self, entries: list[dict]) -> None:
        value = json.dumps({"keys": entries})
        try:
            self.client.put_secret_value(SecretId=SECRET_ID, SecretString=value)
        except self.client.exceptions.ResourceNotFoundException:
            self.client.create_secret(Name=SECRET_ID, SecretString=value)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


class Watch:
    """`cargo lambda watch` serving `http-function` on its own port, with the function's environment."""

    def __init__(self, tmp: Path, name: str, endpoint: str, mode: str, binary: str = "http-function",
                 extra_env: dict | None = None):
        bindir = os.environ.get("CARGO_LAMBDA_BIN")
        path = os.environ.get("PATH", "")
        if bindir:
            path = bindir + os.pathsep + path
        if not shutil.which("cargo-lambda", path=path):
            pytest.fail("cargo-lambda not found: run `make setup` (CARGO_LAMBDA_BIN points at the infra venv's bin)")
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}/lambda-url/{binary}"
        self.log = tmp / f"watch-{name}.log"
        env_vars = {
            "MODEL_DIR": str(REPO / "model-artifacts" / "smollm2-135m-instruct"),
            "API_KEYS_SECRET_ID": SECRET_ID,
            "KEYS_CACHE_TTL_SECONDS": str(TTL_SECONDS),
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_REGION": REGION,
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "LAMBDA_INVOKE_MODE": mode,
            "LOG_FORMAT": "json",
            "RUST_LOG": "info",
            **(extra_env or {}),
        }
        cmd = ["cargo", "lambda", "watch", "--ignore-changes", "--invoke-port", str(self.port), "--bin", binary]
        for k, v in env_vars.items():
            cmd += ["--env-var", f"{k}={v}"]
        env = dict(os.environ, PATH=path)
        self.env = env
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=self.log.open("wb"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        if binary == "http-function":
            # The emulator answers at once; the function itself starts (and may compile) on the first invocation.
            wait_for(lambda: urllib.request.urlopen(self.base + "/health", timeout=120).status == 200, 600,
                     f"cargo lambda watch ({name})", self.log)
        else:
            wait_for(lambda: socket.create_connection(("127.0.0.1", self.port), timeout=1).close() is None, 120,
                     f"cargo lambda watch ({name})", self.log)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)


def status_of(url: str, key: str) -> int:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            r.read()
            return r.status
    except urllib.error.HTTPError as e:
        with e:
            e.read()
            return e.code


@pytest.fixture(scope="session")
def moto(tmp_path_factory):
    m = Moto(tmp_path_factory.mktemp("moto"))
    events_keys = json.loads((REPO / "events" / "keys.json").read_text())["keys"]
    m.put_keys([key_entry("key_a", make_key("A"))] + events_keys)
    yield m
    m.stop()


@pytest.fixture(scope="session")
def streaming(moto, tmp_path_factory):
    w = Watch(tmp_path_factory.mktemp("watch"), "streaming", moto.endpoint, "streaming")
    yield w
    w.stop()
