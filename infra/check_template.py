#!/usr/bin/env python3
"""Translates template.yaml (SAM) to plain CloudFormation offline, and asserts what lambda-llm relies on.

`sam validate --lint` checks SAM resources weakly (a wrong `InvokeMode` passes), so check-template.sh lints the
CloudFormation that samtranslator produces, and this script checks our own rules on it: the streaming Function URL,
the buffered HTTP API function, the runtime, the package path, least-privilege IAM, log retention, the keys secret.

  python infra/check_template.py translate template.yaml -o translated.json
  python infra/check_template.py assert template.yaml translated.json

Offline: needs a region (AWS_DEFAULT_REGION, for pseudo parameters), no credentials, no network.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent

# The contract with `make lambda` (infra/package.sh) and the http-function binary.
PACKAGE = "build/lambda/http-function.zip"  # CodeUri, relative to the repository root (package.sh DEFAULT_OUT)
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
}
REQUIRED_OUTPUTS = ("FunctionUrl", "HttpApiUrl", "KeysSecretArn")
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

    def functions(self) -> dict[str, str]:
        """Checks every function; returns logical id -> LAMBDA_INVOKE_MODE."""
        modes: dict[str, str] = {}
        fns = self.of_type("AWS::Lambda::Function")
        self.expect(bool(fns), "Resources", "no AWS::Lambda::Function")
        for fid, fn in fns.items():
            p, w = fn.get("Properties", {}), f"{fid}"
            self.expect(p.get("Runtime") == RUNTIME, w, f"Runtime {p.get('Runtime')!r}, expected {RUNTIME!r}")
            self.expect(p.get("Handler") == HANDLER, w, f"Handler {p.get('Handler')!r}, expected {HANDLER!r}")
            self.expect(p.get("PackageType", "Zip") == "Zip", w, "PackageType must be Zip")
            code = p.get("Code", {})
            key = code.get("S3Key") if code.get("S3Bucket") == LOCAL_BUCKET else None
            self.expect(key == PACKAGE, w, f"code {code!r}, expected CodeUri {PACKAGE!r} (what `make lambda` writes)")
            self.expect(not p.get("Layers"), w, "Layers: the model and library ship in the zip (template comment)")
            archs = [self.resolve(a) for a in p.get("Architectures", [{"Ref": "Architecture"}])]
            self.expect(
                p.get("Architectures") == [{"Ref": "Architecture"}],
                w,
                f"Architectures {p.get('Architectures')!r}, expected [!Ref Architecture] (default {archs})",
            )
            env = p.get("Environment", {}).get("Variables", {})
            self.expect(
                env.get("MODEL_DIR") == MODEL_DIR, w, f"MODEL_DIR {env.get('MODEL_DIR')!r}, expected {MODEL_DIR!r}"
            )
            secret = self.referenced_id(env.get("API_KEYS_SECRET_ID"))
            self.expect(
                secret in self.of_type("AWS::SecretsManager::Secret"),
                w,
                "API_KEYS_SECRET_ID must Ref the template's AWS::SecretsManager::Secret",
            )
            self.expect(env.get("LOG_FORMAT") == "json", w, f"LOG_FORMAT {env.get('LOG_FORMAT')!r}, expected 'json'")
            self.expect("RUST_LOG" in env, w, "RUST_LOG not set")
            self.expect("KEYS_CACHE_TTL_SECONDS" in env, w, "KEYS_CACHE_TTL_SECONDS not set")
            # The library sits beside bootstrap; keys come from the secret; the SDK talks to AWS itself; the binary
            # strips stage prefixes on its own (with lambda_http's switch too, a segment named like the stage goes).
            forbidden = ("ORT_DYLIB_PATH", "API_KEYS_FILE", "AWS_ENDPOINT_URL", "AWS_LAMBDA_HTTP_IGNORE_STAGE_IN_PATH")
            for var in forbidden:
                self.expect(var not in env, w, f"{var} must not be set in Lambda")
            mode = env.get("LAMBDA_INVOKE_MODE")
            if self.expect(
                mode in INVOKE_MODES, w, f"LAMBDA_INVOKE_MODE {mode!r}, expected one of {sorted(INVOKE_MODES)}"
            ):
                modes[fid] = mode
            group = self.referenced_id(p.get("LoggingConfig", {}).get("LogGroup"))
            if self.expect(
                group in self.of_type("AWS::Logs::LogGroup"), w, "LoggingConfig.LogGroup must Ref a LogGroup here"
            ):
                retention = self.resolve(self.props(group).get("RetentionInDays"))
                self.expect(retention is not None, group, "RetentionInDays not set (logs would be kept forever)")
        return modes

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

    def iam(self) -> None:
        secrets = set(self.of_type("AWS::SecretsManager::Secret"))
        grants_secret = False
        for rid, role in self.of_type("AWS::IAM::Role").items():
            p = role.get("Properties", {})
            self.expect(
                not p.get("ManagedPolicyArns"),
                rid,
                f"ManagedPolicyArns {p.get('ManagedPolicyArns')!r}: managed policies grant on '*' (write inline ones)",
            )
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

    def package_script(self) -> None:
        script = ROOT / "infra" / "package.sh"
        text = script.read_text() if script.exists() else ""
        self.expect(
            re.search(rf"^DEFAULT_OUT={re.escape(PACKAGE)}$", text, re.M) is not None,
            "infra/package.sh",
            f"must write the package the template uses (DEFAULT_OUT={PACKAGE})",
        )

    def run(self) -> list[str]:
        self.parameters()
        modes = self.functions()
        self.expect(
            set(modes.values()) == INVOKE_MODES,
            "Resources",
            f"invoke modes {sorted(modes.values())}, expected one streaming and one buffered function",
        )
        self.function_url(modes)
        self.http_api(modes)
        self.iam()
        self.secret()
        self.outputs()
        self.package_script()
        return self.failures


def _as_list(v: Any) -> list:
    return v if isinstance(v, list) else [v]


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
