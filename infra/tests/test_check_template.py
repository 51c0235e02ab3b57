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
    # --- batch jobs ---
    # The notification must not see the function's own writes under batches/output/.
    "batch-prefix-too-wide": (
        "Value: batches/input/",
        "Value: batches/",
        {"lambda-llm rules"},
        "also matches 'batches/output/', where the function writes: every result would trigger it again (recursion)",
    ),
    "batch-no-prefix": (
        "                  - Name: prefix\n                    Value: batches/input/\n",
        "",
        {"lambda-llm rules"},
        "notification prefix '' also matches 'batches/output/'",
    ),
    # The floor (visibility >= timeout) and AWS's advice (>= 6 x timeout), each on its own.
    "batch-visibility-below-timeout": (
        '    "900":\n      Seconds: 5400\n',
        '    "900":\n      Seconds: 600\n',
        {"lambda-llm rules"},
        "VisibilityTimeout 600 s < the function's Timeout 900 s",
    ),
    "batch-visibility-below-6x": (
        '    "900":\n      Seconds: 5400\n',
        '    "900":\n      Seconds: 1800\n',
        {"lambda-llm rules"},
        "VisibilityTimeout 1800 s < 6 x Timeout 900 s",
    ),
    # SQS's default of 30 s; both lints only see the mapping left unused (W7001).
    "batch-visibility-default": (
        "      VisibilityTimeout: !FindInMap [BatchVisibility, !Ref BatchTimeout, Seconds]\n",
        "",
        {"sam validate --lint", "cfn-lint (translated)", "lambda-llm rules"},
        "VisibilityTimeout 30 s < the function's Timeout 60 s",
    ),
    "batch-no-redrive": (
        "      RedrivePolicy:\n        deadLetterTargetArn: !GetAtt BatchDeadLetterQueue.Arn\n"
        "        maxReceiveCount: !Ref MaxReceiveCount\n",
        "",
        {"cfn-lint (translated)", "lambda-llm rules"},  # cfn-lint: parameter MaxReceiveCount unused
        "no RedrivePolicy: a poison chunk would be retried",
    ),
    "batch-no-report-failures": (
        "            FunctionResponseTypes: [ReportBatchItemFailures]",
        "            # FunctionResponseTypes: [ReportBatchItemFailures]",
        {"lambda-llm rules"},
        "FunctionResponseTypes lacks ReportBatchItemFailures",
    ),
    "batch-no-max-concurrency": (
        "            ScalingConfig:\n              MaximumConcurrency: !Ref BatchMaxConcurrency\n",
        "",
        {"cfn-lint (translated)", "lambda-llm rules"},  # cfn-lint: parameter BatchMaxConcurrency unused
        "ScalingConfig.MaximumConcurrency None",
    ),
    # Least privilege: S3 on the two prefixes, SQS on the chunk queue, logs on the own group.
    "batch-s3-whole-bucket": (
        "lambda-llm-batch-${StackUuid}/batches/output/*",
        "lambda-llm-batch-${StackUuid}/*",
        {"lambda-llm rules"},
        "s3:GetObject on '*' (the whole bucket)",
    ),
    "batch-put-on-input": (
        "                Action: s3:GetObject\n",
        "                Action: [s3:GetObject, s3:PutObject]\n",
        {"lambda-llm rules"},
        "s3:PutObject on 'batches/input/*' reaches 'batches/input/': a write there triggers the function (recursion)",
    ),
    "batch-sqs-wildcard": (
        "                Action: sqs:SendMessage\n                Resource: !GetAtt BatchQueue.Arn\n",
        '                Action: sqs:SendMessage\n                Resource: "*"\n',
        {"lambda-llm rules"},
        "wildcard resource in ['*']",
    ),
    # An explicit role gets nothing from SAM's SQS event: without these the event source mapping is refused.
    "batch-poller-incomplete": (
        "Action: [sqs:ReceiveMessage, sqs:DeleteMessage, sqs:GetQueueAttributes]",
        "Action: [sqs:ReceiveMessage, sqs:DeleteMessage]",
        {"lambda-llm rules"},
        "no sqs:GetQueueAttributes on BatchQueue: the SQS event source needs it",
    ),
    "batch-poller-on-dlq": (
        "                Action: [sqs:ReceiveMessage, sqs:DeleteMessage, sqs:GetQueueAttributes]\n"
        "                Resource: !GetAtt BatchQueue.Arn\n",
        "                Action: [sqs:ReceiveMessage, sqs:DeleteMessage, sqs:GetQueueAttributes]\n"
        "                Resource: !GetAtt BatchDeadLetterQueue.Arn\n",
        {"lambda-llm rules"},
        "expected only !GetAtt BatchQueue.Arn",
    ),
    "batch-logs-other-group": (
        "Resource: !GetAtt BatchFunctionLogGroup.Arn",
        "Resource: !GetAtt HttpFunctionLogGroup.Arn",
        {"lambda-llm rules"},
        "expected only !GetAtt of ['BatchFunctionLogGroup'].Arn",
    ),
    "batch-shares-http-role": (
        "Role: !GetAtt BatchFunctionRole.Arn",
        "Role: !GetAtt FunctionRole.Arn",
        {"lambda-llm rules"},
        "HTTP and batch functions need different grants",
    ),
    # The S3 notification makes the bucket depend on the function: a !Ref to the bucket from the function is a
    # cycle. SAM adds the notification while translating, so `sam validate --lint` cannot see it; cfn-lint can.
    "batch-bucket-ref-cycle": (
        "          BATCH_BUCKET: !Sub\n            - lambda-llm-batch-${StackUuid}\n"
        '            - StackUuid: !Select [2, !Split ["/", !Ref AWS::StackId]]\n',
        "          BATCH_BUCKET: !Ref BatchBucket\n",
        {"cfn-lint (translated)", "lambda-llm rules"},
        "E3004:Circular Dependencies for resource BatchBucket",
    ),
    "batch-no-retention": (
        "      LogGroupName: !Sub /aws/lambda/${AWS::StackName}-BatchFunction\n"
        "      RetentionInDays: !Ref LogRetentionDays\n",
        "      LogGroupName: !Sub /aws/lambda/${AWS::StackName}-BatchFunction\n",
        {"lambda-llm rules"},
        "BatchFunctionLogGroup: RetentionInDays not set",
    ),
    "batch-http-package": (
        "CodeUri: build/lambda/batch-function.zip",
        "CodeUri: build/lambda/http-function.zip",
        {"lambda-llm rules"},
        "expected CodeUri 'build/lambda/batch-function.zip'",
    ),
    "batch-keeps-keys-env": (
        "          API_KEYS_SECRET_ID: !Ref AWS::NoValue\n",
        "",
        {"lambda-llm rules"},
        "API_KEYS_SECRET_ID is an HTTP function's",
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
