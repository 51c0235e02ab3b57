"""pytest fixtures: the real SmolLM2 artifact (converted once per session, or LAMBDA_LLM_ARTIFACT_DIR), reference."""

from __future__ import annotations

import json
import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for p in (ROOT, HERE):
    if p not in sys.path:
        sys.path.insert(0, p)

from lambda_llm_convert.cli import convert, default_gguf  # noqa: E402
from lambda_llm_convert.gguf_source import file_digest  # noqa: E402


class Artifact:
    def __init__(self, path: str, built_here: bool):
        self.path = path
        self.built_here = built_here
        with open(os.path.join(path, "manifest.json"), encoding="utf-8") as f:
            self.manifest = json.load(f)


@pytest.fixture(scope="session")
def gguf_path() -> str:
    return default_gguf()


@pytest.fixture(scope="session")
def artifact(tmp_path_factory, gguf_path) -> Artifact:
    """The default artifact of the real model: LAMBDA_LLM_ARTIFACT_DIR if set (must be built from the same GGUF),
    else converted once into a session temp dir."""
    env = os.environ.get("LAMBDA_LLM_ARTIFACT_DIR")
    if env:
        art = Artifact(env, built_here=False)
        sha, _ = file_digest(gguf_path)
        assert art.manifest["source"]["sha256"] == sha, f"{env} was not built from {gguf_path}"
        return art
    out = str(tmp_path_factory.mktemp("artifact"))
    convert(gguf_path, out, show_progress=False)
    return Artifact(out, built_here=True)


@pytest.fixture(scope="session")
def artifact_dir(artifact) -> str:
    return artifact.path


@pytest.fixture(scope="session")
def runner(artifact_dir):
    import run_ort
    return run_ort.load(artifact_dir)


@pytest.fixture(scope="session")
def reference(gguf_path):
    from reference import Reference
    return Reference(gguf_path)


@pytest.fixture(scope="session")
def results_dir(tmp_path_factory):
    return tmp_path_factory.getbasetemp()
