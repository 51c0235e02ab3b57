"""put_keys.py against a real Secrets Manager API (moto server on 127.0.0.1, via AWS_ENDPOINT_URL)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import boto3
import pytest

from conftest import INFRA, ROOT

SAMPLE = json.loads((ROOT / "events" / "keys.json").read_text())


def _client_args(env: dict) -> dict:
    return {
        "endpoint_url": env["AWS_ENDPOINT_URL"],
        "region_name": env["AWS_DEFAULT_REGION"],
        "aws_access_key_id": env["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": env["AWS_SECRET_ACCESS_KEY"],
    }


def entry(kid: str, key: str, **extra) -> dict:
    return {"id": kid, "name": kid, "hash": "sha256:" + hashlib.sha256(key.encode()).hexdigest(), **extra}


def put_keys(env: dict, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(INFRA / "put_keys.py"), *args], input=stdin, capture_output=True, text=True, env=env
    )


@pytest.fixture
def secret(aws):
    sm = boto3.client("secretsmanager", **_client_args(aws))
    arn = sm.create_secret(Name="lambda-llm-test-keys", SecretString='{"keys":[]}')["ARN"]

    def value() -> dict:
        return json.loads(sm.get_secret_value(SecretId=arn)["SecretString"])

    return arn, value


def test_puts_a_document_file(aws, secret):
    arn, value = secret
    p = put_keys(aws, "--secret-id", arn, str(ROOT / "events" / "keys.json"))
    assert p.returncode == 0, p.stderr
    assert value() == SAMPLE
    assert "key_events" in p.stdout


def test_add_and_remove_rotate_keys(aws, secret, tmp_path):
    arn, value = secret
    assert put_keys(aws, "--secret-id", arn, str(ROOT / "events" / "keys.json")).returncode == 0
    new = entry("key_new", "sk-llm-" + "N" * 40, rpm=60)
    # What `lambda-llm keys new --print-entry` prints: one entry on a line.
    p = put_keys(aws, "--secret-id", arn, "--add", "--remove", "key_events", "-", stdin=json.dumps(new) + "\n")
    assert p.returncode == 0, p.stderr
    assert value() == {"keys": [new]}
    p = put_keys(aws, "--secret-id", arn, "--remove", "key_new")
    assert p.returncode == 0, p.stderr
    assert value() == {"keys": []}


@pytest.mark.parametrize(
    "doc, message",
    [
        ({"keys": [entry("a", "k1"), entry("a", "k2")]}, "duplicate `id`"),
        ({"keys": [entry("a", "k1"), entry("b", "k1")]}, "duplicate `hash`"),
        ({"keys": [{"id": "a", "name": "a", "hash": "sha256:abc"}]}, "64 hex digits"),
        ({"keys": [entry("a", "k1", rpm=0)]}, "`rpm` must be an integer >= 1"),
        ({"keys": [entry("a", "k1", expires_at="next year")]}, "RFC 3339"),
        ({"keys": [entry("a", "k1", note="sk-llm-" + "x" * 40)]}, "plaintext API key"),
        ({"key": []}, '{"keys": [...]}'),
    ],
)
def test_refuses_a_bad_document_and_leaves_the_secret_alone(aws, secret, tmp_path, doc, message):
    arn, value = secret
    f = tmp_path / "keys.json"
    f.write_text(json.dumps(doc))
    p = put_keys(aws, "--secret-id", arn, str(f))
    assert p.returncode == 1
    assert message in p.stderr
    assert value() == {"keys": []}


def test_dry_run_puts_nothing(aws, secret):
    arn, value = secret
    p = put_keys(aws, "--secret-id", arn, "--dry-run", str(ROOT / "events" / "keys.json"))
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == SAMPLE
    assert value() == {"keys": []}


def test_finds_the_secret_from_the_stack_output(aws, secret):
    """--stack-name reads the KeysSecretArn output, as after `sam deploy`.

    moto's CloudFormation cannot create secrets, so the stack outputs the ARN of one made directly.
    """
    arn, value = secret
    stack = {
        "Resources": {"Placeholder": {"Type": "AWS::SQS::Queue"}},
        "Outputs": {"KeysSecretArn": {"Value": arn}},
    }
    cfn = boto3.client("cloudformation", **_client_args(aws))
    cfn.create_stack(StackName="lambda-llm", TemplateBody=json.dumps(stack))
    p = put_keys(aws, "--stack-name", "lambda-llm", str(ROOT / "events" / "keys.json"))
    assert p.returncode == 0, p.stderr
    assert arn in p.stdout
    assert value() == SAMPLE


def test_a_stack_without_the_output_is_a_clear_error(aws):
    stack = {"Resources": {"Q": {"Type": "AWS::SQS::Queue"}}}
    boto3.client("cloudformation", **_client_args(aws)).create_stack(StackName="other", TemplateBody=json.dumps(stack))
    p = put_keys(aws, "--stack-name", "other", str(ROOT / "events" / "keys.json"))
    assert p.returncode != 0
    assert "has no KeysSecretArn output" in p.stderr
