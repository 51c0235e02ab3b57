"""Shared fixtures for the infra tests: paths, the infra venv's tools, and a moto server on 127.0.0.1."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

INFRA = Path(__file__).resolve().parent.parent
ROOT = INFRA.parent
# The venv running pytest is the infra venv (make test-infra): its bin/ holds sam, cfn-lint, moto_server.
VENV = Path(sys.prefix)


def _sam_app_dir() -> str:
    """A private SAM CLI state directory saying the weekly PyPI version check just ran: SAM stays offline."""
    d = tempfile.mkdtemp(prefix="sam-app-")
    atexit.register(shutil.rmtree, d, ignore_errors=True)
    state = {"lastVersionCheck": float(time.time()), "telemetryEnabled": False}  # must be a float
    Path(d, "metadata.json").write_text(json.dumps(state))
    return d


SAM_APP_DIR = _sam_app_dir()


def tool_env(**extra: str) -> dict[str, str]:
    """Environment for the scripts under test: offline, a region, the infra venv first on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        INFRA_VENV=str(VENV),
        PATH=f"{VENV / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_REGION="us-east-1",
        AWS_EC2_METADATA_DISABLED="true",
        SAM_CLI_TELEMETRY="0",
        __SAM_CLI_APP_DIR=SAM_APP_DIR,
    )
    env.update(extra)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def moto_endpoint(tmp_path_factory):
    """A moto server (Secrets Manager, CloudFormation) for the whole session; reset before each use."""
    port = _free_port()
    log = (tmp_path_factory.mktemp("moto") / "moto.log").open("w")
    proc = subprocess.Popen(
        [str(VENV / "bin" / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{url}/moto-api/data.json", timeout=1).read()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not start (see {log.name})") from None
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


@pytest.fixture
def aws(moto_endpoint):
    """A clean moto state and the environment pointing boto3 (and our scripts) at it."""
    urllib.request.urlopen(urllib.request.Request(f"{moto_endpoint}/moto-api/reset", method="POST"), timeout=5).read()
    return tool_env(AWS_ENDPOINT_URL=moto_endpoint, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing")
