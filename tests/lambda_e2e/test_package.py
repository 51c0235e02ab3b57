"""The deployable zip from `make lambda`: its contents and size, and its `bootstrap` started from the unzipped folder
(no variable pointing at ONNX Runtime) under the Lambda Runtime API emulator, answering a real request.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import time
import urllib.request
import zipfile

import pytest

from conftest import REGION, REPO, SECRET_ID, Moto, free_port, key_entry, make_key, wait_for

ZIP = REPO / "build" / "lambda" / "http-function.zip"
LAMBDA_UNZIPPED_LIMIT = 262_144_000  # bytes: 250 MiB, function and layers together
EXPECTED = {"bootstrap", "libonnxruntime.so", "model/manifest.json", "model/model.onnx", "model/model.onnx.data",
            "model/model.fast.onnx", "model/model.fast.onnx.data", "model/tokenizer.json"}


@pytest.mark.parametrize("name", ["http-function", "batch-function"])
def test_the_zip_holds_bootstrap_library_and_model_within_the_limit(name):
    path = REPO / "build" / "lambda" / f"{name}.zip"
    assert path.exists(), f"{path} is missing: `make lambda` builds it (make test does)"
    with zipfile.ZipFile(path) as z:
        infos = [i for i in z.infolist() if not i.is_dir()]
    assert {i.filename for i in infos} == EXPECTED
    unzipped = sum(i.file_size for i in infos)
    print(f"\n{name}: zip {path.stat().st_size / 1e6:.1f} MB, unzipped {unzipped / 1e6:.1f} MB "
          + ", ".join(f"{i.filename} {i.file_size / 1e6:.1f} MB" for i in infos))
    assert unzipped < LAMBDA_UNZIPPED_LIMIT
    modes = {i.filename: (i.external_attr >> 16) for i in infos}
    assert modes["bootstrap"] & stat.S_IXUSR, "bootstrap must be executable"


@pytest.fixture
def own_moto(tmp_path_factory):
    """A Secrets Manager of its own (the end-to-end module stops the shared one on purpose)."""
    m = Moto(tmp_path_factory.mktemp("moto-package"))
    m.put_keys([key_entry("key_a", make_key("A"))])
    yield m
    m.stop()


def test_bootstrap_starts_from_the_unzipped_folder_and_answers(own_moto, tmp_path):
    moto = own_moto
    with zipfile.ZipFile(ZIP) as z:
        z.extractall(tmp_path)
    (tmp_path / "bootstrap").chmod(0o755)
    api_port = free_port()
    cargo_lambda = os.environ.get("CARGO_LAMBDA_BIN", "")
    path = cargo_lambda + os.pathsep + os.environ["PATH"] if cargo_lambda else os.environ["PATH"]
    emulator_log = tmp_path / "emulator.log"
    emulator = subprocess.Popen(["cargo", "lambda", "watch", "--only-lambda-apis", "-P", str(api_port)], cwd=REPO,
                                env=dict(os.environ, PATH=path), stdout=emulator_log.open("wb"),
                                stderr=subprocess.STDOUT, start_new_session=True)
    fn = None
    try:
        wait_for(lambda: socket.create_connection(("127.0.0.1", api_port), timeout=1).close() is None, 60,
                 "the Runtime API emulator", emulator_log)
        # Only what Lambda itself sets, plus the function's configuration: nothing points at the library.
        env = {
            "PATH": "/usr/bin:/bin",
            "AWS_LAMBDA_RUNTIME_API": f"http://127.0.0.1:{api_port}/.rt",
            "AWS_LAMBDA_FUNCTION_NAME": "_",
            "AWS_LAMBDA_FUNCTION_VERSION": "1",
            "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": "2048",
            "MODEL_DIR": str(tmp_path / "model"),
            "API_KEYS_SECRET_ID": SECRET_ID,
            "AWS_ENDPOINT_URL": moto.endpoint,
            "AWS_REGION": REGION,
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "LOG_FORMAT": "json",
        }
        fn_log = tmp_path / "bootstrap.log"
        started = time.monotonic()
        fn = subprocess.Popen([str(tmp_path / "bootstrap")], cwd=tmp_path, env=env, stdout=fn_log.open("wb"),
                              stderr=subprocess.STDOUT)
        body = json.dumps({"model": "smollm2-135m-instruct", "temperature": 0, "max_tokens": 16,
                           "messages": [{"role": "user", "content": "What is the capital of France?"}]}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{api_port}/lambda-url/_/v1/chat/completions", data=body,
                                     headers={"Authorization": f"Bearer {make_key('A')}",
                                              "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            answer = json.loads(r.read())
        cold = time.monotonic() - started
        assert fn.poll() is None, fn_log.read_text(errors="replace")
        assert "Paris" in answer["choices"][0]["message"]["content"], answer
        init = [json.loads(line)["InitDuration"] for line in fn_log.read_text(errors="replace").splitlines()
                if '"InitDuration"' in line]
        print(f"\ncold start of the release bootstrap: process start -> first response {cold * 1e3:.0f} ms "
              f"(init {init[0]:.0f} ms)" if init else "")
    finally:
        if fn is not None:
            fn.kill()
            fn.wait(timeout=10)
        os.killpg(emulator.pid, 9)
        emulator.wait(timeout=10)
