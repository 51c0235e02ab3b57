"""infra/package.sh and lambda_zip.py with stand-in files: the zips' layout, modes, reproducibility and refusals.

The real build (cargo lambda, the real model) is `make lambda`; here the binaries and the library are tiny ELF headers
of the right machine, and `cargo` is a stand-in that records how it was called and writes what `cargo lambda build`
writes, so the packaging rules are tested in seconds, offline, without a Rust build.
"""

from __future__ import annotations

import json
import shlex
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


BINS = ("http-function", "batch-function")


def fake_elf(path: Path, machine: int, size: int = 4096, tag: bytes = b"") -> Path:
    """An ELF64 little-endian header with e_machine `machine`, then `tag` (to tell binaries apart), padded."""
    header = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9) + struct.pack("<HH", 3, machine) + tag
    path.write_bytes(header + bytes(size - len(header)))
    return path


# A stand-in `cargo`: `cargo lambda build ... --bin A --bin B --target T --lambda-dir D` appends its arguments to
# $FAKE_CARGO_LOG (one line per call) and writes D/A/bootstrap, D/B/bootstrap: ELF files of T's machine tagged with
# the binary's name. Anything else fails.
FAKE_CARGO = r"""#!/usr/bin/env python3
import os, shlex, struct, sys
from pathlib import Path
args = sys.argv[1:]
with open(os.environ["FAKE_CARGO_LOG"], "a") as log:
    log.write(shlex.join(args) + "\n")
if args[:2] != ["lambda", "build"]:
    sys.exit(f"fake cargo: unexpected {args}")
bins = [args[i + 1] for i, a in enumerate(args) if a == "--bin"]
target = args[args.index("--target") + 1]
out = Path(args[args.index("--lambda-dir") + 1])
machine = 183 if target.startswith("aarch64") else 62
for b in bins:
    (out / b).mkdir(parents=True, exist_ok=True)
    header = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9) + struct.pack("<HH", 3, machine) + b.encode()
    (out / b / "bootstrap").write_bytes(header + bytes(4096 - len(header)))
"""


@pytest.fixture
def fake_cargo(tmp_path):
    """PATH entries with the stand-in cargo, and the log of its calls."""
    d = tmp_path / "fake-bin"
    d.mkdir()
    (d / "cargo").write_text(FAKE_CARGO)
    (d / "cargo").chmod(0o755)
    log = tmp_path / "cargo-calls.log"
    env = tool_env()
    return {
        "PATH": f"{d}:{env['PATH']}",
        "FAKE_CARGO_LOG": str(log),
        "CARGO_TARGET_DIR": str(tmp_path / "target"),
        "log": log,
    }


def cargo_calls(fake: dict) -> list[list[str]]:
    log = fake["log"]
    return [shlex.split(line) for line in log.read_text().splitlines()] if log.exists() else []


@pytest.fixture
def inputs(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "manifest.json").write_text(json.dumps({"id": "smollm2-135m-instruct", "ort_version": "1.31.1"}))
    (model / "model.onnx").write_bytes(b"onnx" * 1000)
    (model / "tokenizer.json").write_text("{}")
    return {
        "BIN": "http-function",
        "BOOTSTRAP": str(fake_elf(tmp_path / "bootstrap", 62)),
        "ORT_LIB": str(fake_elf(tmp_path / "libonnxruntime.so", 62)),
        "MODEL_DIR": str(model),
        "OUT": str(tmp_path / "out" / "http-function.zip"),
    }


def package(inputs: dict, **extra: str) -> subprocess.CompletedProcess:
    env = tool_env(**{k: v for k, v in {**inputs, **extra}.items() if isinstance(v, str)})
    return subprocess.run(["bash", str(INFRA / "package.sh")], capture_output=True, text=True, env=env, timeout=120)


def both(inputs: dict, out_dir: Path) -> dict:
    """`inputs` for packaging both binaries into out_dir (no single BOOTSTRAP / OUT / BIN)."""
    rest = {k: v for k, v in inputs.items() if k not in ("BIN", "BOOTSTRAP", "OUT")}
    return {**rest, "OUT_DIR": str(out_dir)}


def bootstrap_of(zip_path: Path) -> bytes:
    with zipfile.ZipFile(zip_path) as zf:
        return zf.read("bootstrap")


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


def test_one_cargo_lambda_build_makes_both_zips(inputs, fake_cargo, tmp_path):
    """`make lambda` = package.sh with no BIN: one `cargo lambda build --bin http-function --bin batch-function`
    (cargo-lambda 1.9.2 passes every --bin to one cargo build and writes <lambda-dir>/<bin>/bootstrap for each),
    then one zip per binary, each with its own bootstrap and the same library and model."""
    out = tmp_path / "zips"
    p = package(both(inputs, out), **fake_cargo)
    assert p.returncode == 0, p.stdout + p.stderr
    calls = cargo_calls(fake_cargo)
    assert len(calls) == 1, calls
    call = calls[0]
    assert call[:2] == ["lambda", "build"] and "--release" in call and "--locked" in call
    assert [call[i + 1] for i, a in enumerate(call) if a == "--bin"] == list(BINS)
    assert call[call.index("--target") + 1] == "x86_64-unknown-linux-gnu"
    assert call[call.index("--lambda-dir") + 1] == f"{fake_cargo['CARGO_TARGET_DIR']}/lambda"
    assert sorted(f.name for f in out.iterdir()) == sorted(f"{b}.zip" for b in BINS)
    for b in BINS:
        with zipfile.ZipFile(out / f"{b}.zip") as zf:
            assert [i.filename for i in zf.infolist()] == LAYOUT
            assert b.encode() in zf.read("bootstrap")[:64], f"{b}.zip holds another binary"
            assert zf.read("libonnxruntime.so") == Path(inputs["ORT_LIB"]).read_bytes()
    assert "batch-function.zip (batch-function, x86_64) ready" in p.stdout


def test_bin_selects_one_binary(inputs, fake_cargo, tmp_path):
    out = tmp_path / "zips"
    p = package(both(inputs, out), BIN="batch-function", **fake_cargo)
    assert p.returncode == 0, p.stdout + p.stderr
    [call] = cargo_calls(fake_cargo)
    assert [call[i + 1] for i, a in enumerate(call) if a == "--bin"] == ["batch-function"]
    assert [f.name for f in out.iterdir()] == ["batch-function.zip"]


def test_arm64_builds_both_for_aarch64(inputs, fake_cargo, tmp_path):
    out = tmp_path / "zips"
    arm_lib = str(fake_elf(tmp_path / "libonnxruntime-arm.so", 183))
    p = package({**both(inputs, out), "ORT_LIB": arm_lib}, ARCH="arm64", **fake_cargo)
    assert p.returncode == 0, p.stdout + p.stderr
    [call] = cargo_calls(fake_cargo)
    assert call[call.index("--target") + 1] == "aarch64-unknown-linux-gnu"
    for b in BINS:
        assert lambda_zip.elf_machine(bootstrap_of(out / f"{b}.zip")) == 183


def test_bootstrap_dir_packages_prebuilt_binaries(inputs, tmp_path):
    """BOOTSTRAP_DIR: binaries built elsewhere, in cargo lambda's layout; nothing is built."""
    prebuilt = tmp_path / "prebuilt"
    for b in BINS:
        (prebuilt / b).mkdir(parents=True)
        fake_elf(prebuilt / b / "bootstrap", 62, tag=b.encode())
    out = tmp_path / "zips"
    p = package(both(inputs, out), BOOTSTRAP_DIR=str(prebuilt), PATH="/usr/bin:/bin")  # no cargo on PATH
    assert p.returncode == 0, p.stdout + p.stderr
    for b in BINS:
        assert bootstrap_of(out / f"{b}.zip") == (prebuilt / b / "bootstrap").read_bytes()
    missing = package(both(inputs, tmp_path / "none"), BOOTSTRAP_DIR=str(tmp_path / "empty"), PATH="/usr/bin:/bin")
    assert missing.returncode == 1 and "http-function/bootstrap missing" in missing.stderr


def test_refuses_unknown_binaries_and_single_paths_for_two(inputs, tmp_path):
    p = package(inputs, BIN="lambda-llm")
    assert p.returncode == 1 and "BIN=lambda-llm: expected one or more of: http-function batch-function" in p.stderr
    p = package({**inputs, "BIN": "http-function batch-function"})
    assert p.returncode == 1 and "BOOTSTRAP packages one binary" in p.stderr
    rest = {k: v for k, v in inputs.items() if k != "BOOTSTRAP"}
    p = package({**rest, "BIN": "http-function batch-function", "BOOTSTRAP_DIR": str(tmp_path)})
    assert p.returncode == 1 and "OUT names one zip" in p.stderr


def test_the_defaults_write_what_the_template_names():
    """package.sh's DEFAULT_OUT_DIR/<bin>.zip for its DEFAULT_BINS are the template's CodeUris (make check-template
    checks the same through check_template.py)."""
    text = (INFRA / "package.sh").read_text()
    template = check_template.load_template(ROOT / "template.yaml")
    uris = {
        r["Properties"].get("CodeUri", template["Globals"]["Function"]["CodeUri"])
        for r in template["Resources"].values()
        if r["Type"] == "AWS::Serverless::Function"
    }
    assert "DEFAULT_OUT_DIR=build/lambda\n" in text and 'DEFAULT_BINS="http-function batch-function"\n' in text
    assert uris == {f"build/lambda/{b}.zip" for b in BINS}


def test_check_refuses_a_zip_without_the_library(tmp_path):
    z = tmp_path / "bad.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("bootstrap", b"x")
    with pytest.raises(lambda_zip.PackageError, match="libonnxruntime.so missing"):
        lambda_zip.check(z, None)


def test_sam_package_uploads_each_zip_once(aws, inputs, fake_cargo, tmp_path):
    """`sam package` (the first half of `sam deploy`) against moto's S3: template.yaml's CodeUris resolve to the
    zips package.sh writes, each uploaded as is (not re-zipped) under its MD5, the HTTP zip once for both HTTP
    functions, and neither again when it has not changed."""
    import hashlib

    import boto3

    project = tmp_path / "project"
    (project / "build" / "lambda").mkdir(parents=True)
    (project / "template.yaml").write_text((ROOT / "template.yaml").read_text())
    made = package(both(inputs, project / "build" / "lambda"), **fake_cargo)
    assert made.returncode == 0, made.stdout + made.stderr
    zips = {b: project / "build" / "lambda" / f"{b}.zip" for b in BINS}
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
    digest = {b: hashlib.md5(z.read_bytes()).hexdigest() for b, z in zips.items()}
    assert digest["http-function"] != digest["batch-function"]
    objects = s3.list_objects_v2(Bucket="lambda-llm-artifacts")["Contents"]
    assert sorted((o["Key"], o["Size"]) for o in objects) == sorted(
        (digest[b], zips[b].stat().st_size) for b in BINS
    )
    packaged = check_template.load_template(project / "packaged.yaml")
    uris = {
        k: r["Properties"]["CodeUri"]
        for k, r in packaged["Resources"].items()
        if r["Type"] == "AWS::Serverless::Function"
    }
    assert uris == {
        "HttpFunction": f"s3://lambda-llm-artifacts/{digest['http-function']}",
        "HttpBufferedFunction": f"s3://lambda-llm-artifacts/{digest['http-function']}",
        "BatchFunction": f"s3://lambda-llm-artifacts/{digest['batch-function']}",
    }
    again = sam_package("packaged-again.yaml")
    assert again.returncode == 0
    out = again.stdout + again.stderr
    assert out.count("skipping upload") >= 2, out
    assert len(s3.list_objects_v2(Bucket="lambda-llm-artifacts")["Contents"]) == 2
