#!/usr/bin/env python3
"""Puts a keys document into the API keys secret (Secrets Manager `PutSecretValue`), checked first.

  python infra/put_keys.py --stack-name lambda-llm lambda-llm-keys.json        # replace the whole document
  lambda-llm keys new --name bob --print-entry | python infra/put_keys.py --stack-name lambda-llm --add -
  python infra/put_keys.py --secret-id ARN --remove key_7Hq2                    # drop entries by id
  python infra/put_keys.py --secret-id ARN --dry-run FILE                       # print, put nothing

The document is DESIGN.md's `{"keys": [...]}` (what `lambda-llm keys` writes locally), checked like the server checks
it, so a bad document never reaches the functions (they would keep their last good one and log an error). `--add` and
`--remove` read the current value and write a new version; running instances see it within KEYS_CACHE_TTL_SECONDS
(new keys at once). Credentials, region and AWS_ENDPOINT_URL (e.g. a local moto server) come from the usual
AWS environment; the secret is named by --secret-id, or found as the stack's KeysSecretArn output.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from datetime import datetime
from typing import Any

HASH = re.compile(r"^sha256:[0-9a-fA-F]{64}$")
PLAINTEXT_KEY = re.compile(r"sk-llm-[0-9A-Za-z]{40}")
SECRET_OUTPUT = "KeysSecretArn"


class DocumentError(ValueError):
    """A keys document the server would refuse, or one that leaks a key."""


def check_document(doc: Any) -> dict:
    """The document with hashes lowercased, or DocumentError naming the entry (by position and id, never by hash)."""
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise DocumentError('expected a JSON object {"keys": [...]}')
    if PLAINTEXT_KEY.search(json.dumps(doc)):
        raise DocumentError("the document contains a plaintext API key (sk-llm-...); store only its sha256 hash")
    ids, hashes = set(), set()
    for i, k in enumerate(doc["keys"]):
        where = f"entry #{i}"
        if not isinstance(k, dict):
            raise DocumentError(f"{where}: not an object")
        kid = k.get("id")
        where = f"entry #{i} (id {kid!r})"
        if not isinstance(kid, str) or not kid.strip():
            raise DocumentError(f"{where}: `id` must be a non-empty string")
        if not isinstance(k.get("name"), str):
            raise DocumentError(f"{where}: `name` must be a string")
        h = k.get("hash")
        if not isinstance(h, str) or not HASH.match(h):
            raise DocumentError(f'{where}: `hash` must be "sha256:" followed by 64 hex digits')
        k["hash"] = h.lower()
        for limit in ("rpm", "tpm"):
            v = k.get(limit)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise DocumentError(f"{where}: `{limit}` must be an integer >= 1 (leave it out for no limit)")
        models = k.get("models", ["*"])
        if not isinstance(models, list) or not all(isinstance(m, str) and m for m in models):
            raise DocumentError(f'{where}: `models` must be a list of model ids or "*"')
        expires = k.get("expires_at")
        if expires is not None and not _is_rfc3339(expires):
            raise DocumentError(f"{where}: `expires_at` must be an RFC 3339 time (2027-01-01T00:00:00Z)")
        if not isinstance(k.get("disabled", False), bool):
            raise DocumentError(f"{where}: `disabled` must be true or false")
        if kid in ids:
            raise DocumentError(f"{where}: duplicate `id`")
        if k["hash"] in hashes:
            raise DocumentError(f"{where}: duplicate `hash` (the same key listed twice)")
        ids.add(kid)
        hashes.add(k["hash"])
    return doc


def _is_rfc3339(v: Any) -> bool:
    if not isinstance(v, str) or not re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)$", v):
        return False
    try:
        datetime.fromisoformat(v.replace("Z", "+00:00"))
    except ValueError:
        return False
    return True


def parse_input(text: str) -> dict:
    """A whole document, one entry (`keys new --print-entry`), or entries one per line."""
    text = text.strip()
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        try:
            value = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            raise DocumentError(f"input is not JSON: {e}") from e
    if isinstance(value, dict) and "keys" in value:
        return value
    if isinstance(value, dict) and "hash" in value:
        return {"keys": [value]}
    if isinstance(value, list):
        return {"keys": value}
    raise DocumentError('expected a keys document {"keys": [...]}, an entry, or entries one per line')


def secret_id_from_stack(session: Any, stack: str) -> str:
    cfn = session.client("cloudformation", endpoint_url=os.environ.get("AWS_ENDPOINT_URL"))
    outputs = cfn.describe_stacks(StackName=stack)["Stacks"][0].get("Outputs", [])
    for o in outputs:
        if o["OutputKey"] == SECRET_OUTPUT:
            return o["OutputValue"]
    raise SystemExit(f"put_keys: stack {stack} has no {SECRET_OUTPUT} output (is it lambda-llm's template.yaml?)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--secret-id", help="the secret's ARN or name")
    where.add_argument("--stack-name", help=f"find the secret as this stack's {SECRET_OUTPUT} output")
    ap.add_argument("file", nargs="?", help="keys document / entries ('-' = stdin); not with --remove alone")
    ap.add_argument("--add", action="store_true", help="add the file's entries to the current document")
    ap.add_argument("--remove", action="append", default=[], metavar="ID", help="remove the entry with this id")
    ap.add_argument("--dry-run", action="store_true", help="check and print the new document; put nothing")
    args = ap.parse_args(argv)
    if args.file is None and not args.remove:
        ap.error("give a FILE, or --remove ID")
    if args.file is not None and args.remove and not args.add:
        ap.error("FILE with --remove replaces everything; use --add FILE --remove ID to combine")

    import boto3  # imported late: --help and argument errors work without it

    session = boto3.session.Session()
    sm = session.client("secretsmanager", endpoint_url=os.environ.get("AWS_ENDPOINT_URL"))
    secret_id = args.secret_id or secret_id_from_stack(session, args.stack_name)
    try:
        incoming = None
        if args.file is not None:
            text = sys.stdin.read() if args.file == "-" else open(args.file, encoding="utf-8").read()
            incoming = parse_input(text)
        if args.add or args.remove:
            current = check_document(json.loads(sm.get_secret_value(SecretId=secret_id)["SecretString"]))
            missing = [i for i in args.remove if i not in {k["id"] for k in current["keys"]}]
            if missing:
                raise DocumentError(f"--remove: no entry with id {missing}")
            current["keys"] = [k for k in current["keys"] if k["id"] not in args.remove]
            current["keys"] += incoming["keys"] if incoming else []
            doc = current
        else:
            doc = incoming
        doc = check_document(doc)
    except (DocumentError, json.JSONDecodeError, OSError) as e:
        print(f"put_keys: {e}", file=sys.stderr)
        return 1
    body = json.dumps(doc, separators=(",", ":"))
    ids = ", ".join(k["id"] for k in doc["keys"]) or "none"
    if args.dry_run:
        print(json.dumps(doc, indent=2))
        print(f"put_keys: dry run; would put {len(doc['keys'])} key(s) ({ids}) into {secret_id}", file=sys.stderr)
        return 0
    version = sm.put_secret_value(SecretId=secret_id, SecretString=body)["VersionId"]
    print(f"put_keys: {len(doc['keys'])} key(s) ({ids}) -> {secret_id} (version {version})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
