"""Harness of the hardening suite: real processes (the `lambda-llm` binary and its model, `http-function` under the
cargo-lambda Runtime API emulator, moto speaking the AWS wire protocol), the OpenAI error-envelope check, and the
figures printed at the end of the run.

Every server is started here with its own keys file (keys made by `lambda-llm keys new`, as a user would), its
stderr captured to a file; when a server stops, the fixture fails the test if it died or logged a panic.

Environment:
  LAMBDA_LLM_BIN            the `lambda-llm` binary (else $CARGO_TARGET_DIR/debug/lambda-llm, else
                            /root/.cache/lambda-llm/target/debug/lambda-llm)
  LAMBDA_HTTP_FUNCTION_BIN  the `http-function` binary (else beside LAMBDA_LLM_BIN if there, else
                            $CARGO_TARGET_DIR/debug/http-function)
  LAMBDA_LLM_MODEL_DIR      the model artifact directory (else <repo>/model-artifacts/smollm2-135m-instruct)
  MOTO_SERVER               moto_server (the Makefile points it at the infra venv's)
  CARGO_LAMBDA_BIN          directory holding `cargo-lambda` (else beside MOTO_SERVER, else on PATH)
  HARDENING_SOAK=1          the long variants (`make soak`): more requests, longer runs
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MODEL_ID = "smollm2-135m-instruct"
OTHER_MODEL = "other-model"
SECRET_ID = "lambda-llm/keys"
REGION = "us-east-1"
KEY_RE = re.compile(r"^sk-llm-[A-Za-z0-9]{40}$")
SOAK = os.environ.get("HARDENING_SOAK", "") not in ("", "0")
STARTUP_TIMEOUT_S = 90.0

# --- figures ----------------------------------------------------------------------------------------------------------

FIGURES: Counter = Counter()
RSS: dict[str, str] = {}
_FIG_LOCK = threading.Lock()


def add(name: str, n: int = 1) -> None:
    """Adds `n` to the figure `name` (thread-safe)."""
    with _FIG_LOCK:
        FIGURES[name] += n


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not FIGURES and not RSS:
        return
    tr = terminalreporter
    tr.section("hardening figures" + (" (soak)" if SOAK else ""))
    width = max([len(k) for k in FIGURES] + [len(k) for k in RSS] + [10])
    for k in sorted(FIGURES):
        tr.write_line(f"  {k:<{width}}  {FIGURES[k]:>10}")
    for k in sorted(RSS):
        tr.write_line(f"  {k:<{width}}  {RSS[k]:>10}")


# --- paths ------------------------------------------------------------------------------------------------------------


def binary_path() -> Path:
    if os.environ.get("LAMBDA_LLM_BIN"):
        return Path(os.environ["LAMBDA_LLM_BIN"])
    if os.environ.get("CARGO_TARGET_DIR"):
        return Path(os.environ["CARGO_TARGET_DIR"]) / "debug" / "lambda-llm"
    return Path("/root/.cache/lambda-llm/target/debug/lambda-llm")


def function_path() -> Path:
    if os.environ.get("LAMBDA_HTTP_FUNCTION_BIN"):
        return Path(os.environ["LAMBDA_HTTP_FUNCTION_BIN"])
    beside = binary_path().parent / "http-function"
    if beside.is_file():
        return beside
    return binary_path().parent.parent / "debug" / "http-function"


def model_dir() -> Path:
    if os.environ.get("LAMBDA_LLM_MODEL_DIR"):
        return Path(os.environ["LAMBDA_LLM_MODEL_DIR"])
    return REPO / "model-artifacts" / MODEL_ID


def need_file(path: Path, what: str) -> Path:
    if not path.is_file():
        pytest.fail(f"{what} not found at {path} (see tests/hardening/conftest.py for the variables; `make test` "
                    f"builds and sets them up)", pytrace=False)
    return path


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kb(pid: int) -> int:
    """Resident set size of a process, in KiB (from /proc)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def mib(kb: int) -> str:
    return f"{kb / 1024:.1f}MiB"


# --- the OpenAI error envelope ----------------------------------------------------------------------------------------


def envelope_problem(status: int, headers, body: bytes) -> str | None:
    """Why a non-2xx response is not in the OpenAI envelope (None if it is)."""
    ctype = headers.get("content-type", "") if headers is not None else ""
    if not ctype.startswith("application/json"):
        return f"content-type {ctype!r}"
    try:
        doc = json.loads(body)
    except ValueError:
        return f"body is not JSON: {body[:200]!r}"
    if not isinstance(doc, dict) or set(doc) != {"error"} or not isinstance(doc["error"], dict):
        return f"not {{'error': {{...}}}}: {body[:200]!r}"
    err = doc["error"]
    if set(err) != {"message", "type", "param", "code"}:
        return f"error fields {sorted(err)}"
    if not (isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str) and err["type"]):
        return f"empty message/type: {err}"
    if not all(err[k] is None or isinstance(err[k], str) for k in ("param", "code")):
        return f"param/code not string-or-null: {err}"
    return None


def assert_envelope(resp, status: int, code=..., kind=...) -> dict:
    """`resp` (httpx) has `status` and the exact envelope; returns the inner error."""
    assert resp.status_code == status, (resp.status_code, resp.text[:500])
    problem = envelope_problem(resp.status_code, resp.headers, resp.content)
    assert problem is None, problem
    err = resp.json()["error"]
    if code is not ...:
        assert err["code"] == code, err
    if kind is not ...:
        assert err["type"] == kind, err
    return err


# --- processes --------------------------------------------------------------------------------------------------------


def new_key(keys_file: Path, name: str, *extra: str) -> tuple[str, str]:
    """`lambda-llm keys new`: (plaintext key, its id in the keys file)."""
    cmd = [str(binary_path()), "keys", "new", "--name", name, "--keys-file", str(keys_file), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"{cmd}: {proc.stderr}"
    key = proc.stdout.strip()
    assert KEY_RE.match(key), proc.stdout
    doc = json.loads(keys_file.read_text())
    ids = [k["id"] for k in doc["keys"] if k["hash"] == "sha256:" + sha256_hex(key)]
    assert len(ids) == 1, doc
    return key, ids[0]


def keys_cli(keys_file: Path, *args: str) -> str:
    cmd = [str(binary_path()), "keys", *args, "--keys-file", str(keys_file)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"{cmd}: {proc.stderr}"
    return proc.stdout


def _stop(proc: subprocess.Popen, sig=signal.SIGTERM) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


def panics(text: str) -> list[str]:
    return [line for line in text.splitlines() if "panicked" in line]


class Serve:
    """A real `lambda-llm serve` on a free port with the real model; keys file with a full key."""

    def __init__(self, workdir: Path, env: dict | None = None, log_format: str = "json"):
        binary, mdir = need_file(binary_path(), "lambda-llm binary"), model_dir()
        need_file(mdir / "model.onnx", "model artifact")
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.keys_file = workdir / "keys.json"
        self.key, self.key_id = new_key(self.keys_file, "hardening")
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "server.stderr.log"
        e = dict(os.environ)
        for var in ("API_KEYS_FILE", "API_KEYS_SECRET_ID", "MODEL_DIR"):
            e.pop(var, None)
        e.update(LOG_FORMAT=log_format, RUST_LOG="info", KEYS_CACHE_TTL_SECONDS="1", MAX_QUEUE="1000")
        e.update(env or {})
        cmd = [str(binary), "serve", "--host", "127.0.0.1", "--port", str(self.port), "--keys-file",
               str(self.keys_file), "--model-dir", str(mdir)]
        with open(self.log_path, "wb") as err, open(workdir / "server.stdout.log", "wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL, cwd=workdir, env=e)
        wait_healthy(self.proc, self.base_url + "/health", self.log_path)

    @property
    def auth(self) -> dict:
        return {"Authorization": f"Bearer {self.key}"}

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def rss_kb(self) -> int:
        return rss_kb(self.proc.pid)

    def stop(self) -> None:
        alive = self.proc.poll() is None
        _stop(self.proc)
        found = panics(self.log_text())
        add("panics (grep 'panicked' in server stderr)", len(found))
        assert alive, f"the server died (exit {self.proc.returncode}):\n{self.log_text()[-3000:]}"
        assert not found, "the server panicked:\n" + "\n".join(found[:10])


def wait_healthy(proc: subprocess.Popen, url: str, log_path: Path, timeout: float = STARTUP_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                body = json.loads(resp.read())
                if resp.status == 200 and body.get("model_loaded"):
                    return
                last = f"{resp.status} {body}"
        except (urllib.error.URLError, OSError, ValueError) as e:
            last = repr(e)
        time.sleep(0.2)
    tail = log_path.read_text(errors="replace")[-3000:] if log_path.exists() else ""
    pytest.fail(f"{url} not healthy (exit {proc.poll()}; last: {last})\n{tail}", pytrace=False)


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """The shared server of the hostile-input and key tests: JSON logs at info, a big queue, and generation cut
    after 2 s (REQUEST_TIMEOUT_SECONDS) so that a hostile yet valid `max_tokens` cannot keep the model busy."""
    s = Serve(tmp_path_factory.mktemp("serve-main"), env={"REQUEST_TIMEOUT_SECONDS": "2"})
    s.restricted_key, s.restricted_key_id = new_key(s.keys_file, "restricted", "--models", OTHER_MODEL)
    yield s
    s.stop()


# --- moto and the Lambda function -------------------------------------------------------------------------------------


def infra_bin() -> Path | None:
    exe = os.environ.get("MOTO_SERVER") or shutil.which("moto_server")
    return Path(exe).parent if exe else None


class Moto:
    """moto_server on a free port (restartable on the same port, for the outage tests)."""

    def __init__(self, workdir: Path):
        exe = os.environ.get("MOTO_SERVER") or shutil.which("moto_server")
        if not exe or not Path(exe).exists():
            pytest.fail("moto_server not found: set MOTO_SERVER (the Makefile points it at the infra venv)",
                        pytrace=False)
        self.exe, self.workdir = exe, workdir
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc = None
        self.start()
        import boto3

        self.client = boto3.client("secretsmanager", endpoint_url=self.endpoint, region_name=REGION,
                                   aws_access_key_id="test", aws_secret_access_key="test")

    def start(self) -> None:
        log = (self.workdir / "moto.log").open("ab")
        self.proc = subprocess.Popen([self.exe, "-H", "127.0.0.1", "-p", str(self.port)], stdout=log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(self.endpoint + "/moto-api/", timeout=1).close()
                return
            except OSError:
                time.sleep(0.2)
        pytest.fail("moto_server did not start", pytrace=False)

    def put_keys(self, entries: list[dict]) -> None:
        value = json.dumps({"keys": entries})
        try:
            self.client.put_secret_value(SecretId=SECRET_ID, SecretString=value)
        except self.client.exceptions.ResourceNotFoundException:
            self.client.create_secret(Name=SECRET_ID, SecretString=value)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


def key_entry(key_id: str, key: str, **extra) -> dict:
    return {"id": key_id, "name": key_id, "hash": "sha256:" + sha256_hex(key), **extra}


def random_key() -> str:
    import secrets
    import string

    alphabet = string.ascii_letters + string.digits
    return "sk-llm-" + "".join(secrets.choice(alphabet) for _ in range(40))


class LambdaFunction:
    """The real `http-function` binary polling the cargo-lambda Runtime API emulator (`cargo lambda watch
    --only-lambda-apis`: the emulator alone, nothing compiled); invoked over HTTP at `base_url` like a Function URL.
    """

    def __init__(self, workdir: Path, aws_endpoint: str, env: dict | None = None):
        fn = need_file(function_path(), "http-function binary")
        need_file(model_dir() / "model.onnx", "model artifact")
        bindir = os.environ.get("CARGO_LAMBDA_BIN") or (str(infra_bin()) if infra_bin() else "")
        path = (bindir + os.pathsep if bindir else "") + os.environ.get("PATH", "")
        cargo_lambda = shutil.which("cargo-lambda", path=path)
        if not cargo_lambda:
            pytest.fail("cargo-lambda not found (CARGO_LAMBDA_BIN, or the infra venv beside MOTO_SERVER)",
                        pytrace=False)
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/lambda-url/_"
        self.emulator_log = workdir / "emulator.log"
        self.emulator = subprocess.Popen(
            [cargo_lambda, "lambda", "watch", "--only-lambda-apis", "-A", "127.0.0.1", "-P", str(self.port)],
            cwd=REPO, stdout=self.emulator_log.open("wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=dict(os.environ, PATH=path), start_new_session=True)
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or self.emulator.poll() is not None:
                    pytest.fail(f"cargo lambda emulator did not start:\n{self.emulator_log.read_text()[-2000:]}",
                                pytrace=False)
                time.sleep(0.2)
        e = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "API_KEYS"))}
        e.update(AWS_LAMBDA_FUNCTION_VERSION="1", AWS_LAMBDA_FUNCTION_MEMORY_SIZE="4096",
                 AWS_LAMBDA_RUNTIME_API=f"http://127.0.0.1:{self.port}/.rt", AWS_LAMBDA_FUNCTION_NAME="_",
                 API_KEYS_SECRET_ID=SECRET_ID, AWS_ENDPOINT_URL=aws_endpoint, AWS_REGION=REGION,
                 AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test", MODEL_DIR=str(model_dir()),
                 KEYS_CACHE_TTL_SECONDS="1", LOG_FORMAT="json", RUST_LOG="info", LAMBDA_INVOKE_MODE="streaming")
        e.update(env or {})
        self.log_path = workdir / "function.stderr.log"
        self.proc = subprocess.Popen([str(fn)], cwd=workdir, env=e, stdout=(workdir / "function.stdout.log").open("wb"),
                                     stderr=self.log_path.open("wb"), stdin=subprocess.DEVNULL)
        wait_healthy(self.proc, self.base_url + "/health", self.log_path)

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def stop(self) -> None:
        alive = self.proc.poll() is None
        _stop(self.proc)
        if self.emulator.poll() is None:
            os.killpg(self.emulator.pid, signal.SIGTERM)
            try:
                self.emulator.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.emulator.pid, signal.SIGKILL)
        found = panics(self.log_text())
        add("panics (grep 'panicked' in server stderr)", len(found))
        assert alive, f"http-function died (exit {self.proc.returncode}):\n{self.log_text()[-3000:]}"
        assert not found, "http-function panicked:\n" + "\n".join(found[:10])
