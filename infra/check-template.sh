#!/usr/bin/env bash
# make check-template: lint the SAM template, translate it to CloudFormation, lint that, and check our own rules.
#
#   infra/check-template.sh [TEMPLATE]          (default: template.yaml at the repository root)
#
# Tools come from INFRA_VENV (the Makefile passes $(CACHE)/infra-<hash>), else from PATH. Offline: a region is set
# for the linters and pseudo parameters, SAM telemetry is off, no credentials are read. Every stage runs (a failed
# translation skips the two that need its output); the exit status is 1 if any failed. TRANSLATED_OUT=FILE keeps the
# translated template.
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
template="${1:-$root/template.yaml}"
bin="${INFRA_VENV:+$INFRA_VENV/bin/}"
py="${bin}python"
[[ -n "$bin" ]] || py=python3

export AWS_DEFAULT_REGION="${AWS_DEFAULT_REGION:-us-east-1}"
export SAM_CLI_TELEMETRY=0
# No instance-metadata probes: nothing here talks to AWS (no credentials needed).
export AWS_EC2_METADATA_DISABLED=true

if [[ ! -f "$template" ]]; then
  echo "check-template: no template at $template" >&2
  exit 2
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# SAM CLI keeps state in ~/.aws-sam and `sam validate` asks PyPI for a newer version once a week: give it a private
# directory that says it just did, so the check stays offline and parallel runs share nothing.
export __SAM_CLI_APP_DIR="$work/sam"
mkdir -p "$__SAM_CLI_APP_DIR"
printf '{"lastVersionCheck": %s.0, "telemetryEnabled": false}\n' "$(date +%s)" >"$__SAM_CLI_APP_DIR/metadata.json" # a float, or SAM ignores it
translated="${TRANSLATED_OUT:-$work/translated.json}"
failed=()

stage() { # stage NAME COMMAND...: run, label the result
  local name="$1"
  shift
  echo "== $name"
  if "$@"; then
    echo "check-template: ok   $name"
  else
    echo "check-template: FAIL $name"
    failed+=("$name")
    return 1
  fi
}

# 1. SAM-aware lint of the source (cfn-lint through SAM CLI): structure, Globals, intrinsic references.
stage "sam validate --lint" "${bin}sam" validate --lint --region "$AWS_DEFAULT_REGION" -t "$template"

# 2. samtranslator -> CloudFormation JSON, local CodeUri replaced by a placeholder S3 location.
if stage "translate (samtranslator)" "$py" "$here/check_template.py" translate "$template" -o "$translated"; then
  # 3. cfn-lint on the generated resources: catches wrong property values (InvokeMode, CORS methods, ...) that
  #    the SAM-level lint lets through.
  stage "cfn-lint (translated)" "${bin}cfn-lint" --regions "$AWS_DEFAULT_REGION" --format parseable -- "$translated"
  # 4. What lambda-llm relies on (infra/check_template.py).
  stage "lambda-llm rules" "$py" "$here/check_template.py" assert "$template" "$translated"
fi

if ((${#failed[@]})); then
  printf 'check-template: %d stage(s) failed:' "${#failed[@]}"
  printf ' [%s]' "${failed[@]}"
  echo
  exit 1
fi
echo "check-template: $template passes every stage"
