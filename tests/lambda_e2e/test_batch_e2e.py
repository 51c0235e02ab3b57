"""The real `batch-function` under `cargo lambda watch`, S3 and SQS on moto, driven by the recorded events exactly as
`cargo lambda invoke batch-function --data-file events/…` sends them.
"""

from __future__ import annotations

import json
import subprocess

import boto3
import pytest

from conftest import REGION, REPO, Moto, Watch

EVENTS = REPO / "events"


def invoke(watch: Watch, event: str) -> dict:
    out = subprocess.run(
        ["cargo", "lambda", "invoke", "batch-function", "--invoke-port", str(watch.port), "--data-file",
         str(EVENTS / event)],
        cwd=REPO, env=watch.env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads(out.stdout)


@pytest.fixture
def services(tmp_path):
    moto = Moto(tmp_path)
    kw = dict(endpoint_url=moto.endpoint, region_name=REGION, aws_access_key_id="test",
              aws_secret_access_key="test")
    s3 = boto3.client("s3", config=boto3.session.Config(s3={"addressing_style": "path"}), **kw)
    sqs = boto3.client("sqs", **kw)
    yield moto, s3, sqs
    moto.stop()


def test_recorded_s3_and_sqs_events_run_a_batch_end_to_end(services, tmp_path):
    moto, s3, sqs = services
    put = json.loads((EVENTS / "s3-put.json").read_text())["Records"][0]["s3"]
    bucket, key = put["bucket"]["name"], put["object"]["key"]
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key=key, Body=(EVENTS / "batch-example.jsonl").read_bytes())
    queue = sqs.create_queue(QueueName="chunks")["QueueUrl"]
    w = Watch(tmp_path, "batch", moto.endpoint, "buffered", binary="batch-function",
              extra_env={"BATCH_QUEUE_URL": queue, "BATCH_CHUNK_LINES": "20"})
    try:
        assert invoke(w, "s3-put.json") == {}
        sent = sqs.receive_message(QueueUrl=queue, MaxNumberOfMessages=10)["Messages"]
        recorded = json.loads(json.loads((EVENTS / "sqs-chunk.json").read_text())["Records"][0]["body"])
        assert [json.loads(m["Body"]) for m in sent] == [recorded], "the recorded chunk is what the split sends"
        assert invoke(w, "sqs-chunk.json") == {"batchItemFailures": []}
        name = key.removeprefix("batches/input/").removesuffix(".jsonl")
        read = lambda k: s3.get_object(Bucket=bucket, Key=k)["Body"].read().decode()  # noqa: E731
        out = [json.loads(line) for line in read(f"batches/output/{name}.jsonl").splitlines()]
        err = [json.loads(line) for line in read(f"batches/output/{name}.errors.jsonl").splitlines()]
        total = len([line for line in (EVENTS / "batch-example.jsonl").read_text().splitlines() if line.strip()])
        assert len(out) + len(err) == total
        assert all(line["response"]["status_code"] == 200 for line in out)
        status = json.loads(read(f"batches/output/{name}.status.json"))
        assert status["state"] == "completed" and status["succeeded"] == len(out) and status["failed"] == len(err)
    finally:
        w.stop()
