"""check-template accepts the real template and rejects broken copies, each at the stage meant to catch it."""

from __future__ import annotations

import re
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import INFRA, ROOT, tool_env

TEMPLATE = (ROOT / "template.yaml").read_text()
STAGES = ("sam validate --lint", "translate (samtranslator)", "cfn-lint (translated)", "lambda-llm rules")

# id -> (text to replace (must occur), replacement, stages that must fail, text the output must contain).
# Stages not listed must pass: each case pins which layer catches the mistake.
MUTATIONS = {
    # Valid CloudFormation, wrong for us: only our rules know tokens must stream.
    "invoke-mode-buffered": (
        "InvokeMode: RESPONSE_STREAM",
        "InvokeMode: BUFFERED",
        {"lambda-llm rules"},
        "InvokeMode 'BUFFERED', expected 'RESPONSE_STREAM'",
    ),
    # The case `sam validate --lint` lets through: only the translated template's lint sees the bad enum value.
    "invoke-mode-typo": (
        "InvokeMode: RESPONSE_STREAM",
        "InvokeMode: STREAMING",
        {"cfn-lint (translated)", "lambda-llm rules"},
        "'STREAMING' is not one of ['BUFFERED', 'RESPONSE_STREAM']",
    ),
    # Past its deprecation date, so both lints warn (cfn-lint W2531) as well as our rule.
    "runtime-al2": (
        "Runtime: provided.al2023",
        "Runtime: provided.al2",
        {"sam validate --lint", "cfn-lint (translated)", "lambda-llm rules"},
        "Runtime 'provided.al2', expected 'provided.al2023'",
    ),
    "secret-wildcard-resource": (
        "Resource: !Ref KeysSecret",
        'Resource: "*"',
        {"lambda-llm rules"},
        "wildcard resource in ['*']",
    ),
    "secret-wildcard-arn": (
        "Resource: !Ref KeysSecret",
        "Resource: !Sub arn:${AWS::Partition}:secretsmanager:${AWS::Region}:${AWS::AccountId}:secret:*",
        {"lambda-llm rules"},
        "wildcard resource",
    ),
    "secret-extra-action": (
        "Action: secretsmanager:GetSecretValue",
        "Action: [secretsmanager:GetSecretValue, secretsmanager:PutSecretValue]",
        {"lambda-llm rules"},
        "expected only GetSecretValue",
    ),
    # SAM's default role brings AWSLambdaBasicExecutionRole (logs on every group).
    "default-role": (
        "      Role: !GetAtt FunctionRole.Arn\n",
        "",
        {"lambda-llm rules"},
        "ManagedPolicyArns",
    ),
    "no-retention": (
        "      RetentionInDays: !Ref LogRetentionDays\n",
        "",
        {"lambda-llm rules"},
        "RetentionInDays not set",
    ),
    "cargo-lambda-default-path": (
        "CodeUri: build/lambda/http-function.zip",
        "CodeUri: target/lambda/http-function/",
        {"lambda-llm rules"},
        "expected CodeUri 'build/lambda/http-function.zip'",
    ),
    "model-in-opt": (
        "MODEL_DIR: /var/task/model",
        "MODEL_DIR: /opt/model",
        {"lambda-llm rules"},
        "MODEL_DIR '/opt/model', expected '/var/task/model'",
    ),
    # Behind an HTTP API (30 s) a 120 s function would lose its response to the gateway's timeout.
    "buffered-long-timeout": (
        "Timeout: !Ref BufferedTimeout",
        "Timeout: !Ref Timeout",
        {"cfn-lint (translated)", "lambda-llm rules"},  # cfn-lint: parameter BufferedTimeout unused
        "it must stay <= 29 s",
    ),
    "modes-swapped": (
        "LAMBDA_INVOKE_MODE: streaming",
        "LAMBDA_INVOKE_MODE: buffered",
        {"lambda-llm rules"},
        "expected 'streaming'",
    ),
    # Caught by both lints (OPTIONS is not a Function URL CORS method; preflight is answered by Lambda itself).
    "url-cors-options": (
        "          AllowMethods: [GET, POST]\n",
        "          AllowMethods: [GET, POST, OPTIONS]\n",
        {"sam validate --lint", "cfn-lint (translated)"},
        "'OPTIONS' is not one of",
    ),
    # A dangling Ref inside Globals: another mistake `sam validate --lint` misses and the translated lint catches.
    "dangling-ref-in-globals": (
        "API_KEYS_SECRET_ID: !Ref KeysSecret",
        "API_KEYS_SECRET_ID: !Ref KeySecret",
        {"cfn-lint (translated)", "lambda-llm rules"},
        "'KeySecret' is not one of",
    ),
}


def run_check(template: Path) -> tuple[int, str]:
    p = subprocess.run(
        ["bash", str(INFRA / "check-template.sh"), str(template)],
        capture_output=True,
        text=True,
        env=tool_env(),
        timeout=300,
    )
    return p.returncode, p.stdout + p.stderr


def _parse(output: str) -> dict[str, str]:
    found = {}
    for line in output.splitlines():
        m = re.match(r"^check-template: (ok|FAIL) +(.+)$", line)
        if m:
            found[m[2].strip()] = m[1]
    return found


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Runs check-template on the real template and on every mutation, in parallel (each run takes seconds)."""
    d = tmp_path_factory.mktemp("templates")
    paths = {"real": ROOT / "template.yaml"}
    for name, (old, new, _, _) in MUTATIONS.items():
        assert old in TEMPLATE, f"mutation {name}: {old!r} no longer occurs in template.yaml"
        paths[name] = d / f"{name}.yaml"
        paths[name].write_text(TEMPLATE.replace(old, new, 1))
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {name: pool.submit(run_check, path) for name, path in paths.items()}
        return {name: f.result() for name, f in futures.items()}


def test_real_template_passes_every_stage(results):
    code, out = results["real"]
    assert code == 0, out
    assert _parse(out) == {s: "ok" for s in STAGES}, out


@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_mutation_is_caught(results, name):
    _, _, must_fail, message = MUTATIONS[name]
    code, out = results[name]
    assert code == 1, f"{name}: check-template passed a broken template\n{out}"
    got = _parse(out)
    failed = {s for s, r in got.items() if r == "FAIL"}
    assert failed == must_fail, f"{name}: failed stages {sorted(failed)}, expected {sorted(must_fail)}\n{out}"
    assert message in out, out
    if "translate (samtranslator)" not in failed:
        assert set(got) == set(STAGES), out  # every stage ran


def test_missing_template_is_an_error(tmp_path):
    code, out = run_check(tmp_path / "nope.yaml")
    assert code == 2 and "no template" in out
