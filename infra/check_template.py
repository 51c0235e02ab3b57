#!/usr/bin/env python3
"""Translates template.yaml (SAM) to plain CloudFormation offline, and asserts what lambda-llm relies on.

`sam validate --lint` checks SAM resources weakly (a wrong `InvokeMode` passes), so check-template.sh lints the
CloudFormation that samtranslator produces, and this script checks our own rules on it: the streaming Function URL,
the buffered HTTP API function, the runtime, the package paths, least-privilege IAM, log retention, the keys secret,
and the batch jobs (bucket notification on the input prefix only, queue visibility vs. function timeout, redrive to a
dead-letter queue, ReportBatchItemFailures, S3/SQS grants on the batch bucket's prefixes and the chunk queue only).

  python infra/check_template.py translate template.yaml -o translated.json
  python infra/check_template.py assert template.yaml translated.json

Offline: needs a region (AWS_DEFAULT_REGION, for pseudo parameters), no credentials, no network.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent

# The contract with `make lambda` (infra/package.sh) and the http-function binary.
PACKAGE = "build/lambda/http-function.zip"  # CodeUri, relative to the repository root (package.sh DEFAULT_OUT_DIR)
BATCH_PACKAGE = "build/lambda/batch-function.zip"  # the batch function's CodeUri (package.sh, BIN=batch-function)
MODEL_DIR = "/var/task/model"  # the zip's model/ folder, where Lambda unpacks it
RUNTIME = "provided.al2023"
HANDLER = "bootstrap"
INVOKE_MODES = {"streaming", "buffered"}
CORS_HEADERS = {"authorization", "x-api-key", "content-type"}
CORS_METHODS = {"GET", "POST"}
HTTP_API_MAX_SECONDS = 29  # API Gateway HTTP APIs end requests at 30 s; the function must finish first
EXPECTED_DEFAULTS = {
    "MemorySize": 2048,
    "Timeout": 120,
    "Architecture": "x86_64",
    "KeysCacheTtlSeconds": 60,
    "ModelAliases": "",
    "LogRetentionDays": 14,
    "BatchTimeout": 900,
    "BatchChunkLines": 20,
    "BatchSize": 1,
    "BatchMaxConcurrency": 10,
    "MaxReceiveCount": 3,
}
REQUIRED_OUTPUTS = (
    "FunctionUrl",
    "HttpApiUrl",
    "KeysSecretArn",
    "BatchBucketName",
    "BatchQueueUrl",
    "BatchDeadLetterQueueUrl",
)
# The batch contract (src/batch/jobs.rs, ../shared/DESIGN.md "Batch").
INPUT_PREFIX = "batches/input/"  # uploads that start a job: the notification's prefix filter
INPUT_SUFFIX = ".jsonl"
OUTPUT_PREFIX = "batches/output/"  # parts, status, results: must never trigger the function
BATCH_ENV = ("BATCH_BUCKET", "BATCH_QUEUE_URL", "BATCH_CHUNK_LINES")
# Lambda's SQS poller needs these on the queue (the event source mapping is refused without them); the S3 handler
# sends the chunks.
SQS_EVENT_SOURCE_ACTIONS = {"sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:GetQueueAttributes"}
SQS_ALLOWED_ACTIONS = SQS_EVENT_SOURCE_ACTIONS | {"sqs:SendMessage", "sqs:ChangeMessageVisibility"}
# What the batch function does on S3: action -> key prefixes it may be granted on (None: the bucket itself).
S3_GRANTS = {
    "s3:GetObject": (INPUT_PREFIX, OUTPUT_PREFIX),
    "s3:PutObject": (OUTPUT_PREFIX,),
    "s3:ListBucket": (None,),
}
SQS_VISIBILITY_FACTOR = 6  # AWS: a source queue's visibility timeout >= 6 x the function's timeout
SQS_MAX_VISIBILITY = 43200  # 12 h, SQS's limit
SQS_DEFAULT_RETENTION = 345600  # 4 days
SQS_MAX_BATCH_WITHOUT_WINDOW = 10  # a BatchSize above 10 needs MaximumBatchingWindowInSeconds
# Services each kind of function may be granted actions of (least privilege per role).
ROLE_SERVICES = {"http": {"logs", "secretsmanager"}, "batch": {"logs", "s3", "sqs"}}
NO_VALUE = {"Ref": "AWS::NoValue"}
# Placeholder bucket for local CodeUri paths, as `sam validate` does: Code.S3Key then names the local path.
LOCAL_BUCKET = "local-package"


# --- loading -------------------------------------------------------------------------------------------------------


class _CfnLoader(yaml.SafeLoader):
    """YAML with CloudFormation's short-form intrinsics (`!Ref`, `!GetAtt`, `!Sub`, ...)."""


def _intrinsic(loader: yaml.Loader, suffix: str, node: yaml.Node) -> dict:
    if isinstance(node, yaml.ScalarNode):
        value: Any = loader.construct_scalar(node)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)
    if suffix == "Ref":
        return {"Ref": value}
    if suffix == "GetAtt" and isinstance(value, str):
        value = value.split(".", 1)
    return {f"Fn::{suffix}": value}


_CfnLoader.add_multi_constructor("!", _intrinsic)


def load_template(path: Path) -> dict:
    """A SAM or CloudFormation template from YAML or JSON."""
    doc = yaml.load(path.read_text(), Loader=_CfnLoader)  # noqa: S506 - SafeLoader subclass
    if not isinstance(doc, dict):
        raise SystemExit(f"{path}: not a template (top level is not a mapping)")
    return doc


# --- translate -----------------------------------------------------------------------------------------------------


def _local_to_s3(props: dict, key: str) -> None:
    uri = props.get(key)
    if isinstance(uri, str) and not uri.startswith("s3://"):
        props[key] = f"s3://{LOCAL_BUCKET}/{uri}"


def translate(sam: dict, region: str) -> dict:
    """SAM -> CloudFormation with samtranslator, local code paths replaced by placeholder S3 URIs."""
    import boto3
    from samtranslator.parser.parser import Parser
    from samtranslator.public.exceptions import InvalidDocumentException
    from samtranslator.translator.translator import Translator

    sam = copy.deepcopy(sam)
    _local_to_s3(sam.get("Globals", {}).get("Function", {}), "CodeUri")
    for res in sam.get("Resources", {}).values():
        props = res.get("Properties", {}) if isinstance(res, dict) else {}
        if res.get("Type") == "AWS::Serverless::Function":
            _local_to_s3(props, "CodeUri")
        elif res.get("Type") == "AWS::Serverless::LayerVersion":
            _local_to_s3(props, "ContentUri")

    def no_managed_policies() -> dict:
        # Resolving managed policy names needs IAM (the network); our template names none, and should not.
        return {}

    translator = Translator(
        managed_policy_map=None, sam_parser=Parser(), plugins=[], boto_session=boto3.session.Session(region_name=region)
    )
    try:
        return translator.translate(sam_template=sam, parameter_values={}, get_managed_policy_map=no_managed_policies)
    except InvalidDocumentException as e:
        raise SystemExit("samtranslator: " + " ".join(str(c) for c in e.causes)) from e


# --- assertions ----------------------------------------------------------------------------------------------------


class Checker:
    """Collects every failed rule, so one run reports all of them."""

    def __init__(self, sam: dict, cfn: dict):
        self.sam, self.cfn = sam, cfn
        self.res: dict[str, dict] = cfn.get("Resources", {})
        self.params: dict[str, dict] = cfn.get("Parameters", sam.get("Parameters", {}))
        self.failures: list[str] = []

    def expect(self, ok: bool, where: str, message: str) -> bool:
        if not ok:
            self.failures.append(f"{where}: {message}")
        return ok

    def of_type(self, type_: str) -> dict[str, dict]:
        return {k: v for k, v in self.res.items() if v.get("Type") == type_}

    def props(self, logical_id: str) -> dict:
        return self.res.get(logical_id, {}).get("Properties", {})

    def resolve(self, value: Any) -> Any:
        """A parameter's default for `Ref`s to parameters; the value itself otherwise."""
        if isinstance(value, dict) and set(value) == {"Ref"} and value["Ref"] in self.params:
            return self.params[value["Ref"]].get("Default")
        return value

    def param_max(self, value: Any) -> float | None:
        """The largest value a literal or a `Ref`'d parameter can take (MaxValue, AllowedValues or the literal)."""
        if isinstance(value, dict) and set(value) == {"Ref"} and value["Ref"] in self.params:
            p = self.params[value["Ref"]]
            if "MaxValue" in p:
                return float(p["MaxValue"])
            if "AllowedValues" in p:
                return max(float(v) for v in p["AllowedValues"])
            return None
        try:
            return float(value)
        except (TypeError, ValueError):
            return None

    def referenced_id(self, value: Any) -> str | None:
        """The logical id behind `Ref` / `Fn::GetAtt`, else None."""
        if isinstance(value, dict):
            if "Ref" in value:
                return value["Ref"]
            if "Fn::GetAtt" in value:
                att = value["Fn::GetAtt"]
                return att[0] if isinstance(att, list) else str(att).split(".", 1)[0]
        return None

    def values(self, value: Any) -> list[float] | None:
        """Every value a literal or a `Ref`'d parameter can take that matters for a bound: its AllowedValues, else its
        MinValue, Default and MaxValue; None if unknown (a parameter without bounds, another intrinsic)."""
        if isinstance(value, dict) and set(value) == {"Ref"} and value["Ref"] in self.params:
            p = self.params[value["Ref"]]
            try:
                if "AllowedValues" in p:
                    return sorted(float(v) for v in p["AllowedValues"])
                got = [float(p[k]) for k in ("MinValue", "Default", "MaxValue") if k in p]
            except (TypeError, ValueError):
                return None
            return sorted(set(got)) or None
        try:
            return [float(value)]
        except (TypeError, ValueError):
            return None

    def evaluate(self, value: Any, bound: dict[str, float]) -> list[float] | None:
        """The values `value` can take when the parameters in `bound` have those values: literals, `Ref`s to
        parameters (all their values, see `values`) and `Fn::FindInMap` over this template's Mappings."""
        if isinstance(value, dict) and set(value) == {"Ref"} and value["Ref"] in bound:
            return [bound[value["Ref"]]]
        if isinstance(value, dict) and "Fn::FindInMap" in value:
            args = value["Fn::FindInMap"]
            if not isinstance(args, list) or len(args) < 3:
                return None
            table = self.cfn.get("Mappings", self.sam.get("Mappings", {})).get(args[0], {})
            keys: list[str] = []
            for k in (args[1],):
                if isinstance(k, str):
                    keys = [k]
                else:
                    vals = self.evaluate(k, bound)
                    if vals is None:
                        return None
                    keys = [str(int(v)) if v == int(v) else str(v) for v in vals]
            out = []
            for k in keys:
                row = table.get(k)
                if not isinstance(row, dict) or not isinstance(args[2], str) or args[2] not in row:
                    return None
                out.extend(self.evaluate(row[args[2]], bound) or [])
            return out or None
        return self.values(value)

    def env_of(self, logical_id: str) -> dict:
        """A function's environment variables, without those set to AWS::NoValue (CloudFormation drops them)."""
        env = self.props(logical_id).get("Environment", {}).get("Variables", {})
        return {k: v for k, v in env.items() if v != NO_VALUE}

    def sub_text(self, value: Any) -> str | None:
        """A string, `Ref`, `Fn::GetAtt` or `Fn::Sub` as one comparable text: `${Name}` for references, a Sub's
        variables replaced by a digest of their value. Two values naming the same thing the same way give the same
        text."""
        if isinstance(value, str):
            return value
        if isinstance(value, dict) and set(value) == {"Ref"}:
            return "${%s}" % value["Ref"]
        if isinstance(value, dict) and set(value) == {"Fn::GetAtt"}:
            att = value["Fn::GetAtt"]
            return "${%s}" % (".".join(att) if isinstance(att, list) else att)
        if isinstance(value, dict) and set(value) == {"Fn::Sub"}:
            sub = value["Fn::Sub"]
            if isinstance(sub, str):
                return sub
            if isinstance(sub, list) and len(sub) == 2 and isinstance(sub[0], str) and isinstance(sub[1], dict):
                text = sub[0]
                for name, v in sub[1].items():
                    # A digest, not the JSON itself: the JSON may hold "/" and ":" that ARN parsing would split on.
                    digest = hashlib.sha256(json.dumps(v, sort_keys=True).encode()).hexdigest()[:16]
                    text = text.replace("${%s}" % name, "${=%s}" % digest)
                return text
        return None

    def s3_resource(self, value: Any) -> tuple[str, str | None] | None:
        """(bucket text, key pattern or None for the bucket itself) of an S3 ARN, else None."""
        text = self.sub_text(value)
        m = re.fullmatch(r"arn:(?:aws|\$\{AWS::Partition\}):s3:::([^/]+)(?:/(.*))?", text or "", re.S)
        return (m[1], m[2]) if m else None

    def function_roles(self) -> dict[str, str]:
        """Function logical id -> the logical id of its role (None if not one of this template's roles)."""
        return {
            fid: self.referenced_id(fn.get("Properties", {}).get("Role"))
            for fid, fn in self.of_type("AWS::Lambda::Function").items()
        }

    # --- the rules ---

    def parameters(self) -> None:
        for name, default in EXPECTED_DEFAULTS.items():
            p = self.params.get(name)
            if self.expect(p is not None, f"Parameters.{name}", "missing"):
                got = p.get("Default")
                same = str(got) == str(default)
                self.expect(same, f"Parameters.{name}", f"default {got!r}, expected {default!r}")
        arch = self.params.get("Architecture", {})
        allowed = set(arch.get("AllowedValues", []))
        self.expect(allowed == {"x86_64", "arm64"}, "Parameters.Architecture", f"AllowedValues {sorted(allowed)}")
        conc = self.values({"Ref": "BatchMaxConcurrency"}) if "BatchMaxConcurrency" in self.params else None
        self.expect(
            conc is not None and min(conc) >= 2 and max(conc) <= 1000,
            "Parameters.BatchMaxConcurrency",
            f"can be {conc}: SQS MaximumConcurrency takes 2 to 1000",
        )

    def functions(self) -> tuple[dict[str, str], list[str]]:
        """Checks every function; returns (HTTP function logical id -> LAMBDA_INVOKE_MODE, batch function ids).
        A batch function is one with a BATCH_* variable or the batch package."""
        modes: dict[str, str] = {}
        batch: list[str] = []
        fns = self.of_type("AWS::Lambda::Function")
        self.expect(bool(fns), "Resources", "no AWS::Lambda::Function")
        for fid, fn in fns.items():
            p, w = fn.get("Properties", {}), f"{fid}"
            self.expect(p.get("Runtime") == RUNTIME, w, f"Runtime {p.get('Runtime')!r}, expected {RUNTIME!r}")
            self.expect(p.get("Handler") == HANDLER, w, f"Handler {p.get('Handler')!r}, expected {HANDLER!r}")
            self.expect(p.get("PackageType", "Zip") == "Zip", w, "PackageType must be Zip")
            code = p.get("Code", {})
            key = code.get("S3Key") if code.get("S3Bucket") == LOCAL_BUCKET else None
            env = self.env_of(fid)
            is_batch = key == BATCH_PACKAGE or any(v in env for v in BATCH_ENV)
            package = BATCH_PACKAGE if is_batch else PACKAGE
            self.expect(key == package, w, f"code {code!r}, expected CodeUri {package!r} (what `make lambda` writes)")
            self.expect(not p.get("Layers"), w, "Layers: the model and library ship in the zip (template comment)")
            archs = [self.resolve(a) for a in p.get("Architectures", [{"Ref": "Architecture"}])]
            self.expect(
                p.get("Architectures") == [{"Ref": "Architecture"}],
                w,
                f"Architectures {p.get('Architectures')!r}, expected [!Ref Architecture] (default {archs})",
            )
            self.expect(
                env.get("MODEL_DIR") == MODEL_DIR, w, f"MODEL_DIR {env.get('MODEL_DIR')!r}, expected {MODEL_DIR!r}"
            )
            self.expect(env.get("LOG_FORMAT") == "json", w, f"LOG_FORMAT {env.get('LOG_FORMAT')!r}, expected 'json'")
            self.expect("RUST_LOG" in env, w, "RUST_LOG not set")
            # The library sits beside bootstrap; keys come from the secret; the SDK talks to AWS itself; the binary
            # strips stage prefixes on its own (with lambda_http's switch too, a segment named like the stage goes).
            forbidden = ("ORT_DYLIB_PATH", "API_KEYS_FILE", "AWS_ENDPOINT_URL", "AWS_LAMBDA_HTTP_IGNORE_STAGE_IN_PATH")
            for var in forbidden:
                self.expect(var not in env, w, f"{var} must not be set in Lambda")
            group = self.referenced_id(p.get("LoggingConfig", {}).get("LogGroup"))
            if self.expect(
                group in self.of_type("AWS::Logs::LogGroup"), w, "LoggingConfig.LogGroup must Ref a LogGroup here"
            ):
                retention = self.resolve(self.props(group).get("RetentionInDays"))
                self.expect(retention is not None, group, "RetentionInDays not set (logs would be kept forever)")
            if is_batch:
                batch.append(fid)
                for var in BATCH_ENV:
                    self.expect(var in env, w, f"{var} not set (the batch function reads it)")
                # Batch jobs are authorized by the bucket, not by API keys; no HTTP front.
                for var in ("API_KEYS_SECRET_ID", "KEYS_CACHE_TTL_SECONDS", "LAMBDA_INVOKE_MODE"):
                    self.expect(var not in env, w, f"{var} is an HTTP function's; set it to !Ref AWS::NoValue here")
                continue
            secret = self.referenced_id(env.get("API_KEYS_SECRET_ID"))
            self.expect(
                secret in self.of_type("AWS::SecretsManager::Secret"),
                w,
                "API_KEYS_SECRET_ID must Ref the template's AWS::SecretsManager::Secret",
            )
            self.expect("KEYS_CACHE_TTL_SECONDS" in env, w, "KEYS_CACHE_TTL_SECONDS not set")
            mode = env.get("LAMBDA_INVOKE_MODE")
            if self.expect(
                mode in INVOKE_MODES, w, f"LAMBDA_INVOKE_MODE {mode!r}, expected one of {sorted(INVOKE_MODES)}"
            ):
                modes[fid] = mode
        return modes, batch

    def function_url(self, modes: dict[str, str]) -> None:
        urls = self.of_type("AWS::Lambda::Url")
        self.expect(len(urls) == 1, "Resources", f"{len(urls)} AWS::Lambda::Url, expected 1")
        for uid, url in urls.items():
            p = url.get("Properties", {})
            self.expect(
                p.get("InvokeMode") == "RESPONSE_STREAM",
                uid,
                f"InvokeMode {p.get('InvokeMode')!r}, expected 'RESPONSE_STREAM' (tokens must stream)",
            )
            self.expect(p.get("AuthType") == "NONE", uid, f"AuthType {p.get('AuthType')!r}: the app checks keys itself")
            target = self.referenced_id(p.get("TargetFunctionArn"))
            self.expect(
                modes.get(target) == "streaming",
                uid,
                f"targets {target!r} whose LAMBDA_INVOKE_MODE is {modes.get(target)!r}, expected 'streaming'",
            )
            cors = p.get("Cors", {})
            headers = {h.lower() for h in cors.get("AllowHeaders", [])}
            methods = {m.upper() for m in cors.get("AllowMethods", [])}
            self.expect(
                CORS_HEADERS <= headers or "*" in headers,
                uid,
                f"Cors.AllowHeaders lacks {sorted(CORS_HEADERS - headers)}",
            )
            self.expect(
                CORS_METHODS <= methods or "*" in methods,
                uid,
                f"Cors.AllowMethods lacks {sorted(CORS_METHODS - methods)}",
            )
            perms = [
                r.get("Properties", {})
                for r in self.of_type("AWS::Lambda::Permission").values()
                if self.referenced_id(r.get("Properties", {}).get("FunctionName")) == target
            ]
            self.expect(
                any(
                    q.get("Action") == "lambda:InvokeFunctionUrl" and q.get("FunctionUrlAuthType") == "NONE"
                    for q in perms
                ),
                uid,
                "no public lambda:InvokeFunctionUrl permission",
            )
            self.expect(
                any(q.get("Action") == "lambda:InvokeFunction" and q.get("InvokedViaFunctionUrl") for q in perms),
                uid,
                "no lambda:InvokeFunction permission with InvokedViaFunctionUrl (required for public URLs)",
            )

    def http_api(self, modes: dict[str, str]) -> None:
        apis = self.of_type("AWS::ApiGatewayV2::Api")
        if not self.expect(len(apis) == 1, "Resources", f"{len(apis)} AWS::ApiGatewayV2::Api, expected 1"):
            return
        aid, api = next(iter(apis.items()))
        body = api.get("Properties", {}).get("Body", {})
        route = body.get("paths", {}).get("/{proxy+}", {}).get("x-amazon-apigateway-any-method")
        if not self.expect(route is not None, aid, "no ANY /{proxy+} route"):
            return
        integ = route.get("x-amazon-apigateway-integration", {})
        self.expect(integ.get("payloadFormatVersion") == "2.0", aid, "integration payloadFormatVersion must be '2.0'")
        uri = json.dumps(integ.get("uri"))
        targets = [f for f in modes if re.search(rf"\${{{re.escape(f)}\.Arn}}", uri)]
        self.expect(
            len(targets) == 1, aid, f"route integration targets {targets or uri}, expected one of our functions"
        )
        for fid in targets:
            self.expect(
                modes[fid] == "buffered", aid, f"route targets {fid} in {modes[fid]!r} mode; HTTP APIs need 'buffered'"
            )
            most = self.param_max(self.props(fid).get("Timeout"))
            self.expect(
                most is not None and most <= HTTP_API_MAX_SECONDS,
                fid,
                f"Timeout can reach {most} s; behind an HTTP API it must stay <= {HTTP_API_MAX_SECONDS} s",
            )
        cors = api.get("Properties", {}).get("CorsConfiguration") or body.get("x-amazon-apigateway-cors", {})
        headers = {h.lower() for h in cors.get("AllowHeaders", cors.get("allowHeaders", []))}
        self.expect(CORS_HEADERS <= headers, aid, f"CORS allow headers lack {sorted(CORS_HEADERS - headers)}")

    def iam(self, kinds: dict[str, str]) -> None:
        """`kinds`: function logical id -> "http" | "batch". Each role may only use the services its functions use
        (ROLE_SERVICES), write only to their log groups, and is never shared by both kinds."""
        secrets = set(self.of_type("AWS::SecretsManager::Secret"))
        grants_secret = False
        users: dict[str, set[str]] = {}
        for fid, rid in self.function_roles().items():
            users.setdefault(rid, set()).add(fid)
        for rid, role in self.of_type("AWS::IAM::Role").items():
            p = role.get("Properties", {})
            self.expect(
                not p.get("ManagedPolicyArns"),
                rid,
                f"ManagedPolicyArns {p.get('ManagedPolicyArns')!r}: managed policies grant on '*' (write inline ones)",
            )
            fns = users.get(rid, set())
            if not self.expect(bool(fns), rid, "used by no function: remove it"):
                continue
            role_kinds = {kinds.get(f, "http") for f in fns}
            self.expect(
                len(role_kinds) <= 1,
                rid,
                f"shared by {sorted(fns)}: HTTP and batch functions need different grants, give each kind its own role",
            )
            services = set.intersection(*(ROLE_SERVICES[k] for k in role_kinds))
            own_groups = {
                self.referenced_id(self.props(f).get("LoggingConfig", {}).get("LogGroup")) for f in fns
            } - {None}
            for pol in p.get("Policies", []):
                where = f"{rid}.Policies[{pol.get('PolicyName')}]"
                statements = pol.get("PolicyDocument", {}).get("Statement", [])
                for i, st in enumerate(statements if isinstance(statements, list) else [statements]):
                    if st.get("Effect") != "Allow":
                        continue
                    w = f"{where}.Statement[{i}]"
                    actions = _as_list(st.get("Action"))
                    resources = _as_list(st.get("Resource"))
                    self.expect("NotResource" not in st and "NotAction" not in st, w, "NotResource/NotAction")
                    self.expect(
                        not any(isinstance(a, str) and (a == "*" or a.endswith(":*")) for a in actions),
                        w,
                        f"wildcard action in {actions}",
                    )
                    self.expect(
                        not any(_is_wildcard_resource(r) for r in resources), w, f"wildcard resource in {resources}"
                    )
                    for a in actions:
                        service = a.split(":", 1)[0].lower() if isinstance(a, str) else None
                        self.expect(
                            service in services,
                            w,
                            f"{a} in the role of {sorted(fns)}, which use only {sorted(services)}",
                        )
                    if any(isinstance(a, str) and a.lower().startswith("logs:") for a in actions):
                        bad = [
                            r
                            for r in resources
                            if not (
                                isinstance(r, dict)
                                and "Fn::GetAtt" in r
                                and self.referenced_id(r) in own_groups
                                and _as_list(r["Fn::GetAtt"])[-1:] == ["Arn"]
                            )
                        ]
                        self.expect(not bad, w, f"logs on {bad}, expected only !GetAtt of {sorted(own_groups)}.Arn")
                    sm = [a for a in actions if isinstance(a, str) and a.lower().startswith("secretsmanager:")]
                    if sm:
                        self.expect(
                            sm == ["secretsmanager:GetSecretValue"],
                            w,
                            f"secretsmanager actions {sm}, expected only GetSecretValue",
                        )
                        ok = len(resources) == 1 and self.referenced_id(resources[0]) in secrets
                        self.expect(ok, w, f"GetSecretValue on {resources}, expected only !Ref of the keys secret")
                        grants_secret = grants_secret or ok
        self.expect(grants_secret, "IAM", "no role grants secretsmanager:GetSecretValue on the keys secret")
        for rid in self.of_type("AWS::IAM::Policy") | self.of_type("AWS::IAM::ManagedPolicy"):
            self.expect(False, rid, "standalone IAM policies: keep every grant inline in the function role")

    def batch(self, batch_fns: list[str]) -> None:
        """The batch pipeline: bucket -> (notification on the input prefix) -> function -> queue -> function, with a
        dead-letter queue, and the visibility timeout the function's timeout needs."""
        if not self.expect(len(batch_fns) == 1, "Resources", f"batch functions {batch_fns}, expected exactly one"):
            return
        fid = batch_fns[0]
        env = self.env_of(fid)
        buckets = self.of_type("AWS::S3::Bucket")
        if not self.expect(len(buckets) == 1, "Resources", f"{len(buckets)} AWS::S3::Bucket, expected 1 (BatchBucket)"):
            return
        bid = next(iter(buckets))
        bp = self.props(bid)
        name = self.sub_text(bp.get("BucketName"))
        self.expect(
            name is not None,
            bid,
            "BucketName must be set: the function and its role name the bucket by it (a !Ref BatchBucket there is a "
            "circular dependency through the notification)",
        )
        self.expect(
            name is not None and self.sub_text(env.get("BATCH_BUCKET")) == name,
            fid,
            f"BATCH_BUCKET {env.get('BATCH_BUCKET')!r} is not {bid}'s BucketName (repeat the same !Sub)",
        )
        pab = bp.get("PublicAccessBlockConfiguration", {})
        flags = ("BlockPublicAcls", "BlockPublicPolicy", "IgnorePublicAcls", "RestrictPublicBuckets")
        self.expect(all(pab.get(f) is True for f in flags), bid, f"PublicAccessBlockConfiguration must set {flags}")
        self.notification(bid, fid)
        self.expect(
            any(
                q.get("Principal") == "s3.amazonaws.com"
                and q.get("Action") == "lambda:InvokeFunction"
                and (q.get("SourceAccount") or q.get("SourceArn"))
                for q in (r.get("Properties", {}) for r in self.of_type("AWS::Lambda::Permission").values())
                if self.referenced_id(q.get("FunctionName")) == fid
            ),
            fid,
            "no lambda:InvokeFunction permission for s3.amazonaws.com limited by SourceAccount/SourceArn",
        )

        mappings = {
            mid: m.get("Properties", {})
            for mid, m in self.of_type("AWS::Lambda::EventSourceMapping").items()
            if self.referenced_id(m.get("Properties", {}).get("FunctionName")) == fid
        }
        if not self.expect(len(mappings) == 1, fid, f"event source mappings {sorted(mappings)}, expected one (SQS)"):
            return
        mid, m = next(iter(mappings.items()))
        qid = self.referenced_id(m.get("EventSourceArn"))
        queues = self.of_type("AWS::SQS::Queue")
        if not self.expect(qid in queues, mid, f"EventSourceArn {m.get('EventSourceArn')!r}: not a queue here"):
            return
        self.expect(
            "ReportBatchItemFailures" in (m.get("FunctionResponseTypes") or []),
            mid,
            "FunctionResponseTypes lacks ReportBatchItemFailures: the function's batchItemFailures would be ignored "
            "(a batch is then all done or all retried)",
        )
        size = self.param_max(m.get("BatchSize", 10))
        self.expect(
            size is not None and (size <= SQS_MAX_BATCH_WITHOUT_WINDOW or "MaximumBatchingWindowInSeconds" in m),
            mid,
            f"BatchSize can reach {size}: above {SQS_MAX_BATCH_WITHOUT_WINDOW} needs MaximumBatchingWindowInSeconds",
        )
        conc = self.values(m.get("ScalingConfig", {}).get("MaximumConcurrency"))
        self.expect(
            conc is not None and min(conc) >= 2 and max(conc) <= 1000,
            mid,
            f"ScalingConfig.MaximumConcurrency {conc}: set it (2 to 1000) to bound the fan-out",
        )
        self.expect(
            self.referenced_id(env.get("BATCH_QUEUE_URL")) == qid and "Ref" in (env.get("BATCH_QUEUE_URL") or {}),
            fid,
            f"BATCH_QUEUE_URL must be !Ref {qid} (the queue the event source reads)",
        )
        self.visibility(qid, fid)
        self.redrive(qid)
        self.batch_role(fid, name, qid)

    def notification(self, bid: str, fid: str) -> None:
        confs = self.props(bid).get("NotificationConfiguration", {}).get("LambdaConfigurations", [])
        mine = [c for c in confs if self.referenced_id(c.get("Function")) == fid]
        if not self.expect(len(mine) == 1, bid, f"{len(mine)} notifications to {fid}, expected one (SAM Events: S3)"):
            return
        conf = mine[0]
        event = str(conf.get("Event", ""))
        self.expect(
            event.startswith("s3:ObjectCreated:"), bid, f"notification on {event!r}, expected s3:ObjectCreated:*"
        )
        rules = {
            str(r.get("Name", "")).lower(): r.get("Value")
            for r in conf.get("Filter", {}).get("S3Key", {}).get("Rules", [])
        }
        prefix = rules.get("prefix") or ""
        if self.expect(
            not OUTPUT_PREFIX.startswith(prefix),
            bid,
            f"notification prefix {prefix!r} also matches {OUTPUT_PREFIX!r}, where the function writes: every result "
            f"would trigger it again (recursion); filter on {INPUT_PREFIX!r}",
        ):
            self.expect(prefix == INPUT_PREFIX, bid, f"notification prefix {prefix!r}, expected {INPUT_PREFIX!r}")
        suffix = rules.get("suffix") or ""
        self.expect(suffix == INPUT_SUFFIX, bid, f"notification suffix {suffix!r}, expected {INPUT_SUFFIX!r}")

    def visibility(self, qid: str, fid: str) -> None:
        """For every timeout the function can have: visibility >= timeout (a message must not reappear while an
        instance still runs it) and >= 6 x timeout (AWS's advice for SQS event sources)."""
        timeout = self.props(fid).get("Timeout", 3)
        tparam = timeout.get("Ref") if isinstance(timeout, dict) else None
        timeouts = self.values(timeout)
        if not self.expect(timeouts is not None, fid, f"Timeout {timeout!r}: cannot tell its values"):
            return
        before = len(self.failures)
        vis_expr = self.props(qid).get("VisibilityTimeout", 30)
        for t in timeouts:  # ascending: report the first timeout that breaks a rule, not every one
            if len(self.failures) > before:
                return
            vis = self.evaluate(vis_expr, {tparam: t} if tparam else {})
            at = f"with Timeout {t:g} s"
            if not self.expect(vis is not None, qid, f"VisibilityTimeout {vis_expr!r}: cannot evaluate it {at}"):
                return
            low, high = min(vis), max(vis)
            if not self.expect(
                low >= t,
                qid,
                f"VisibilityTimeout {low:g} s < the function's Timeout {t:g} s: a chunk would be handed to a second "
                "instance while the first still runs it",
            ):
                continue
            self.expect(
                low >= SQS_VISIBILITY_FACTOR * t,
                qid,
                f"VisibilityTimeout {low:g} s < {SQS_VISIBILITY_FACTOR} x Timeout {t:g} s (AWS's advice for an SQS "
                "event source)",
            )
            self.expect(high <= SQS_MAX_VISIBILITY, qid, f"VisibilityTimeout {high:g} s > SQS's {SQS_MAX_VISIBILITY} s")

    def redrive(self, qid: str) -> None:
        q = self.props(qid)
        rp = q.get("RedrivePolicy")
        if not self.expect(
            isinstance(rp, dict),
            qid,
            "no RedrivePolicy: a poison chunk would be retried until it expires instead of landing in a dead-letter "
            "queue",
        ):
            return
        dlq = self.referenced_id(rp.get("deadLetterTargetArn"))
        if self.expect(
            dlq in self.of_type("AWS::SQS::Queue") and dlq != qid,
            qid,
            f"RedrivePolicy.deadLetterTargetArn {rp.get('deadLetterTargetArn')!r}: expected !GetAtt <another "
            "queue>.Arn",
        ):
            keep = self.values(q.get("MessageRetentionPeriod", SQS_DEFAULT_RETENTION))
            dlq_keep = self.values(self.props(dlq).get("MessageRetentionPeriod", SQS_DEFAULT_RETENTION))
            self.expect(
                keep is not None and dlq_keep is not None and min(dlq_keep) >= max(keep),
                dlq,
                "MessageRetentionPeriod below the source queue's: a moved message keeps its first enqueue time and "
                "would expire early",
            )
            self.expect(
                "RedrivePolicy" not in self.props(dlq), dlq, "a dead-letter queue with a RedrivePolicy of its own"
            )
        counts = self.values(rp.get("maxReceiveCount"))
        self.expect(
            counts is not None and min(counts) >= 1,
            qid,
            f"RedrivePolicy.maxReceiveCount {rp.get('maxReceiveCount')!r}: expected !Ref MaxReceiveCount (>= 1)",
        )

    def batch_role(self, fid: str, bucket: str | None, qid: str) -> None:
        """The batch function's role grants S3 on the batch bucket's prefixes and SQS on the chunk queue, and no
        more; and all of what the handlers and the SQS event source need."""
        rid = self.function_roles().get(fid)
        if not self.expect(rid in self.of_type("AWS::IAM::Role"), fid, "Role must be a role of this template"):
            return
        granted: dict[str, set] = {}
        queue_arn = {"Fn::GetAtt": [qid, "Arn"]}
        for pol in self.props(rid).get("Policies", []):
            statements = pol.get("PolicyDocument", {}).get("Statement", [])
            for i, st in enumerate(statements if isinstance(statements, list) else [statements]):
                if st.get("Effect") != "Allow":
                    continue
                w = f"{rid}.Policies[{pol.get('PolicyName')}].Statement[{i}]"
                actions = [a for a in _as_list(st.get("Action")) if isinstance(a, str)]
                resources = _as_list(st.get("Resource"))
                for a in actions:
                    service = a.split(":", 1)[0].lower()
                    if service == "s3":
                        self._s3_grant(w, a, resources, bucket, granted)
                    elif service == "sqs":
                        self.expect(a in SQS_ALLOWED_ACTIONS, w, f"{a}: not an action the batch function needs")
                        on_queue = all(self._same_queue_arn(r, queue_arn) for r in resources)
                        self.expect(on_queue, w, f"{a} on {resources}, expected only !GetAtt {qid}.Arn")
                        if on_queue:
                            granted.setdefault(a, set()).add("queue")
        for a in sorted(SQS_EVENT_SOURCE_ACTIONS | {"sqs:SendMessage"}):
            why = "the SQS event source" if a in SQS_EVENT_SOURCE_ACTIONS else "the S3 handler (fan-out)"
            self.expect("queue" in granted.get(a, set()), rid, f"no {a} on {qid}: {why} needs it")
        for a, prefixes in S3_GRANTS.items():
            for prefix in prefixes:
                where = "the bucket" if prefix is None else f"{prefix}*"
                self.expect(prefix in granted.get(a, set()), rid, f"no {a} on {where}: the batch function needs it")

    def _same_queue_arn(self, resource: Any, queue_arn: dict) -> bool:
        return resource == queue_arn or self.sub_text(resource) == self.sub_text(queue_arn)

    def _s3_grant(self, w: str, action: str, resources: list, bucket: str | None, granted: dict) -> None:
        allowed = S3_GRANTS.get(action)
        if not self.expect(allowed is not None, w, f"{action}: not an action the batch function needs"):
            return
        for r in resources:
            parsed = self.s3_resource(r)
            if not self.expect(parsed is not None, w, f"{action} on {r!r}: not an S3 ARN"):
                continue
            rb, key = parsed
            if not self.expect(rb == bucket, w, f"{action} on bucket {rb!r}, expected the batch bucket {bucket!r}"):
                continue
            if key is None:
                self.expect(None in allowed, w, f"{action} on the bucket ARN, expected objects under {allowed}")
                if None in allowed:
                    granted.setdefault(action, set()).add(None)
                continue
            prefix = next((p for p in allowed if p is not None and key == p + "*"), None)
            if prefix is not None:
                granted.setdefault(action, set()).add(prefix)
            elif action == "s3:PutObject" and _overlaps(key, INPUT_PREFIX):
                self.expect(
                    False,
                    w,
                    f"s3:PutObject on {key!r} reaches {INPUT_PREFIX!r}: a write there triggers the function "
                    "(recursion)",
                )
            else:
                whole = key.rstrip("*") == ""
                self.expect(
                    False,
                    w,
                    f"{action} on {key!r}"
                    + (" (the whole bucket)" if whole else "")
                    + f", expected exactly {[p + '*' for p in allowed if p]}",
                )

    def secret(self) -> None:
        secrets = self.of_type("AWS::SecretsManager::Secret")
        self.expect(len(secrets) == 1, "Resources", f"{len(secrets)} AWS::SecretsManager::Secret, expected 1")
        for sid, s in secrets.items():
            raw = s.get("Properties", {}).get("SecretString")
            try:
                doc = json.loads(raw) if isinstance(raw, str) else None
            except json.JSONDecodeError:
                doc = None
            self.expect(doc == {"keys": []}, sid, f"SecretString {raw!r}, expected '{{\"keys\":[]}}'")

    def outputs(self) -> None:
        outs = self.cfn.get("Outputs", {})
        for name in REQUIRED_OUTPUTS:
            self.expect(name in outs, "Outputs", f"{name} missing")
        url = outs.get("FunctionUrl", {}).get("Value", {})
        self.expect(
            self.referenced_id(url) in self.of_type("AWS::Lambda::Url") and "FunctionUrl" in json.dumps(url),
            "Outputs.FunctionUrl",
            "must be !GetAtt <the Function URL>.FunctionUrl",
        )
        arn = outs.get("KeysSecretArn", {}).get("Value")
        self.expect(
            self.referenced_id(arn) in self.of_type("AWS::SecretsManager::Secret"),
            "Outputs.KeysSecretArn",
            "must Ref the keys secret",
        )
        bucket = outs.get("BatchBucketName", {}).get("Value")
        self.expect(
            isinstance(bucket, dict) and "Ref" in bucket and bucket["Ref"] in self.of_type("AWS::S3::Bucket"),
            "Outputs.BatchBucketName",
            "must Ref the batch bucket",
        )
        queues = self.of_type("AWS::SQS::Queue")
        sources = {
            self.referenced_id(m.get("Properties", {}).get("EventSourceArn"))
            for m in self.of_type("AWS::Lambda::EventSourceMapping").values()
        } & set(queues)
        dlqs = {
            self.referenced_id((self.props(q).get("RedrivePolicy") or {}).get("deadLetterTargetArn")) for q in sources
        } & set(queues)
        for name, among in (("BatchQueueUrl", sources), ("BatchDeadLetterQueueUrl", dlqs)):
            url = outs.get(name, {}).get("Value")
            self.expect(
                isinstance(url, dict) and "Ref" in url and url["Ref"] in among,
                f"Outputs.{name}",
                f"must Ref {'the chunk queue' if name == 'BatchQueueUrl' else 'its dead-letter queue'} {sorted(among)}",
            )

    def package_script(self) -> None:
        """package.sh's defaults write the zips the template names: DEFAULT_OUT_DIR/BIN.zip for each default BIN."""
        script = ROOT / "infra" / "package.sh"
        text = script.read_text() if script.exists() else ""
        out_dir = re.search(r"^DEFAULT_OUT_DIR=(\S+)$", text, re.M)
        bins = re.search(r'^DEFAULT_BINS="([^"]*)"$', text, re.M)
        written = {f"{out_dir[1]}/{b}.zip" for b in bins[1].split()} if out_dir and bins else set()
        for package in (PACKAGE, BATCH_PACKAGE):
            self.expect(
                package in written,
                "infra/package.sh",
                f"must write the package the template uses ({package}; its defaults write {sorted(written)})",
            )

    def run(self) -> list[str]:
        self.parameters()
        modes, batch_fns = self.functions()
        self.expect(
            set(modes.values()) == INVOKE_MODES,
            "Resources",
            f"invoke modes {sorted(modes.values())}, expected one streaming and one buffered function",
        )
        self.function_url(modes)
        self.http_api(modes)
        self.iam({**{f: "http" for f in modes}, **{f: "batch" for f in batch_fns}})
        self.batch(batch_fns)
        self.secret()
        self.outputs()
        self.package_script()
        return self.failures


def _as_list(v: Any) -> list:
    return v if isinstance(v, list) else [v]


def _overlaps(key_pattern: str, prefix: str) -> bool:
    """Whether an object ARN's key pattern (`batches/*`, `*`, `batches/input/x`) reaches keys under `prefix`."""
    literal = key_pattern.split("*", 1)[0]
    return literal.startswith(prefix) or ("*" in key_pattern and prefix.startswith(literal))


def _is_wildcard_resource(r: Any) -> bool:
    """'*', or an ARN (literal or `Fn::Sub`) whose resource part is only a wildcard (`...:secret:*`, `...:*`)."""
    if isinstance(r, dict) and "Fn::Sub" in r:
        sub = r["Fn::Sub"]
        r = sub[0] if isinstance(sub, list) else sub
    if not isinstance(r, str):
        return False
    r = re.sub(r"\$\{[^}]*\}", "x", r)  # ${AWS::Partition} etc. hold colons of their own
    if r == "*":
        return True
    parts = r.split(":", 5)
    return r.startswith("arn:") and len(parts) == 6 and re.fullmatch(r"([\w-]+[:/])?\*", parts[5]) is not None


def check(sam: dict, cfn: dict) -> list[str]:
    """Every rule that the translated template `cfn` (from `sam`) breaks."""
    return Checker(sam, cfn).run()


# --- command line --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("translate", help="SAM -> CloudFormation JSON")
    t.add_argument("template", type=Path)
    t.add_argument("-o", "--out", type=Path, required=True)
    a = sub.add_parser("assert", help="check our rules on a translated template")
    a.add_argument("template", type=Path)
    a.add_argument("translated", type=Path)
    args = ap.parse_args(argv)

    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if not region:
        raise SystemExit("check_template.py: set AWS_DEFAULT_REGION (any region; nothing is called)")
    sam = load_template(args.template)
    if args.cmd == "translate":
        cfn = translate(sam, region)
        args.out.write_text(json.dumps(cfn, indent=2) + "\n")
        print(f"translated {args.template} -> {args.out} ({len(cfn.get('Resources', {}))} resources)")
        return 0
    cfn = json.loads(args.translated.read_text())
    failures = check(sam, cfn)
    for f in failures:
        print(f"  {f}", file=sys.stderr)
    if failures:
        print(f"{len(failures)} rule(s) broken", file=sys.stderr)
        return 1
    print(f"all rules hold ({args.template})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
