"""infra/package.sh and lambda_zip.py with stand-in files: the zip's layout, modes, reproducibility and refusals.

The real build (cargo lambda, the real model) is `make lambda`; here the binary and the library are tiny ELF headers
of the right machine, so the packaging rules are tested in a second, offline, without a Rust build.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import INFRA, ROOT, VENV, tool_env

sys.path.insert(0, str(INFRA))
import check_template  # noqa: E402
import lambda_zip  # noqa: E402

LAYOUT = [
    "bootstrap",
    "libonnxruntime.so",
    "model/",
    "model/manifest.json",
    "model/model.onnx",
    "model/tokenizer.json",
]


def fake_elf(path: Path, machine: int, size: int = 4096) -> Path:
    """An ELF64 little-endian header with e_machine `machine`, padded."""
    header = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9) + struct.pack("<HH", 3, machine)
    path.write_bytes(header + bytes(size - len(header)))
    return path


@pytest.fixture
def inputs(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "manifest.json").write_text(json.dumps({"id": "smollm2-135m-instruct", "ort_version": "1.31.1"}))
    (model / "model.onnx").write_bytes(b"onnx" * 1000)
    (model / "tokenizer.json").write_text("{}")
    return {
        "BOOTSTRAP": str(fake_elf(tmp_path / "bootstrap", 62)),
        "ORT_LIB": str(fake_elf(tmp_path / "libonnxruntime.so", 62)),
        "MODEL_DIR": str(model),
        "OUT": str(tmp_path / "out" / "http-function.zip"),
    }


def package(inputs: dict, **extra: str) -> subprocess.CompletedProcess:
    env = tool_env(**inputs, **extra)
    return subprocess.run(["bash", str(INFRA / "package.sh")], capture_output=True, text=True, env=env, timeout=120)


def test_layout_and_modes(inputs):
    p = package(inputs)
    assert p.returncode == 0, p.stderr
    with zipfile.ZipFile(inputs["OUT"]) as zf:
        infos = zf.infolist()
        assert [i.filename for i in infos] == LAYOUT
        modes = {i.filename: i.external_attr >> 16 for i in infos}
    assert modes["bootstrap"] == 0o100755
    assert modes["libonnxruntime.so"] == 0o100755
    assert modes["model/model.onnx"] == 0o100644
    assert "unzipped (limit 262.1 MB" in p.stdout


def test_zip_is_byte_reproducible(inputs, tmp_path):
    assert package(inputs).returncode == 0
    first = Path(inputs["OUT"]).read_bytes()
    Path(inputs["OUT"]).unlink()
    assert package(inputs).returncode == 0
    assert Path(inputs["OUT"]).read_bytes() == first


def test_refuses_a_library_of_the_wrong_architecture(inputs, tmp_path):
    inputs["BOOTSTRAP"] = str(fake_elf(tmp_path / "bootstrap-arm", 183))
    p = package(inputs, ARCH="arm64")  # the library is still x86_64
    assert p.returncode == 1
    assert "built for x86_64, package is arm64" in p.stderr


def test_refuses_a_model_made_for_another_onnx_runtime(inputs):
    manifest = Path(inputs["MODEL_DIR"]) / "manifest.json"
    manifest.write_text(json.dumps({"ort_version": "1.20.0"}))
    p = package(inputs)
    assert p.returncode == 1
    assert "made for ONNX Runtime '1.20.0'" in p.stderr


def test_refuses_an_incomplete_model(inputs):
    (Path(inputs["MODEL_DIR"]) / "tokenizer.json").unlink()
    p = package(inputs)
    assert p.returncode == 1
    assert "tokenizer.json missing" in p.stderr


def test_refuses_an_unknown_architecture(inputs):
    p = package(inputs, ARCH="riscv64")
    assert p.returncode == 1
    assert "expected x86_64 or arm64" in p.stderr


def test_check_enforces_the_size_limit(inputs):
    assert package(inputs).returncode == 0
    out = Path(inputs["OUT"])
    assert lambda_zip.main(["check", str(out), "--arch", "x86_64", "--limit", "100000"]) == 0
    assert lambda_zip.main(["check", str(out), "--limit", "1000"]) == 1
    with pytest.raises(lambda_zip.PackageError, match="over Lambda's limit"):
        lambda_zip.check(out, "x86_64", limit=1000)


def test_check_refuses_a_zip_without_the_library(tmp_path):
    z = tmp_path / "bad.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("bootstrap", b"x")
    with pytest.raises(lambda_zip.PackageError, match="libonnxruntime.so missing"):
        lambda_zip.check(z, None)


def test_sam_package_uploads_the_zip_once_for_both_functions(aws, inputs, tmp_path):
    """`sam package` (the first half of `sam deploy`) against moto's S3: template.yaml's CodeUri resolves to the
    zip package.sh writes, uploaded as is (not re-zipped) under its MD5, once for both functions, and not again
    when it has not changed."""
    import hashlib

    import boto3

    project = tmp_path / "project"
    (project / "build" / "lambda").mkdir(parents=True)
    (project / "template.yaml").write_text((ROOT / "template.yaml").read_text())
    zip_path = project / "build" / "lambda" / "http-function.zip"
    assert package({**inputs, "OUT": str(zip_path)}).returncode == 0
    s3 = boto3.client(
        "s3",
        endpoint_url=aws["AWS_ENDPOINT_URL"],
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    s3.create_bucket(Bucket="lambda-llm-artifacts")

    def sam_package(out: str) -> subprocess.CompletedProcess:
        cmd = [
            str(VENV / "bin" / "sam"),
            "package",
            "--s3-bucket",
            "lambda-llm-artifacts",
            "--output-template-file",
            out,
        ]
        return subprocess.run(cmd, cwd=project, capture_output=True, text=True, env=aws, timeout=120)

    p = sam_package("packaged.yaml")
    assert p.returncode == 0, p.stdout + p.stderr
    digest = hashlib.md5(zip_path.read_bytes()).hexdigest()
    objects = s3.list_objects_v2(Bucket="lambda-llm-artifacts")["Contents"]
    assert [(o["Key"], o["Size"]) for o in objects] == [(digest, zip_path.stat().st_size)]
    packaged = check_template.load_template(project / "packaged.yaml")
    uris = {
        k: r["Properties"]["CodeUri"]
        for k, r in packaged["Resources"].items()
        if r["Type"] == "AWS::Serverless::Function"
    }
    assert uris == {f: f"s3://lambda-llm-artifacts/{digest}" for f in ("HttpFunction", "HttpBufferedFunction")}
    again = sam_package("packaged-again.yaml")
    assert again.returncode == 0
    assert "skipping upload" in again.stdout + again.stderr
