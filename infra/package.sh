#!/usr/bin/env bash
# make lambda: build the Lambda binaries and assemble the deployable zips that template.yaml names, one per binary.
#
#   infra/package.sh                  build both binaries with one `cargo lambda build` (x86_64) and write
#                                     build/lambda/http-function.zip and build/lambda/batch-function.zip
#   BIN=batch-function infra/package.sh   only that one (BIN: one or more of DEFAULT_BINS, space-separated)
#   ARCH=arm64 infra/package.sh       for Graviton (deploy with Architecture=arm64); needs the Rust target
#                                     aarch64-unknown-linux-gnu (rustup target add ...; rustup's servers, not a registry)
#
# Each zip (checked: layout, ELF machine, <= 250 MB unzipped):
#   bootstrap               the binary: http-function (HttpFunction, HttpBufferedFunction) or batch-function
#   libonnxruntime.so       ONNX Runtime 1.31.1 for ARCH; the binary finds it beside itself
#   model/                  every file of the model artifact: manifest.json, model.onnx(.data), tokenizer.json
# Lambda unpacks it in /var/task, so the template sets MODEL_DIR=/var/task/model.
#
# Inputs (environment; the Makefile sets the first three):
#   INFRA_VENV        venv of infra/requirements.txt (cargo-lambda, ziglang); else cargo-lambda from PATH
#   CACHE             ~/.cache/lambda-llm: where `make setup` put the x86_64 library and where the arm64 one goes
#   CARGO_TARGET_DIR  cargo's target dir; cargo lambda writes $CARGO_TARGET_DIR/lambda/<bin>/bootstrap
#   ARCH              x86_64 (default) or arm64
#   BIN               the binaries to package (default: DEFAULT_BINS below, both)
#   ORT_LIB           the library to ship (default: $CACHE/onnxruntime-1.31.1[-aarch64]/libonnxruntime.so)
#   MODEL_DIR         the model artifact (default: model-artifacts/smollm2-135m-instruct, made by `make setup`)
#   BOOTSTRAP_DIR     package DIR/<bin>/bootstrap instead of building (cargo lambda's --lambda-dir layout)
#   BOOTSTRAP         with a single BIN: package this binary instead of building (tests, or one built elsewhere)
#   OUT_DIR           where the zips go, as <bin>.zip (default below: template.yaml's CodeUris, checked by
#                     make check-template)
#   OUT               with a single BIN: the zip's path instead
set -euo pipefail

DEFAULT_OUT_DIR=build/lambda
DEFAULT_BINS="http-function batch-function"
ORT_VERSION=1.31.1

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
cd "$root"

ARCH="${ARCH:-x86_64}"
CACHE="${CACHE:-$HOME/.cache/lambda-llm}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$CACHE/target}"
MODEL_DIR="${MODEL_DIR:-model-artifacts/smollm2-135m-instruct}"
OUT_DIR="${OUT_DIR:-$DEFAULT_OUT_DIR}"
read -r -a bins <<<"${BIN:-$DEFAULT_BINS}"
py=python3
if [[ -n "${INFRA_VENV:-}" ]]; then
  py="$INFRA_VENV/bin/python"
  export PATH="$INFRA_VENV/bin:$PATH" # `cargo lambda` finds cargo-lambda and zig here
fi

die() {
  echo "package: $*" >&2
  exit 1
}

((${#bins[@]})) || die "BIN is empty: expected one or more of: $DEFAULT_BINS"
for b in "${bins[@]}"; do
  [[ " $DEFAULT_BINS " == *" $b "* ]] || die "BIN=$b: expected one or more of: $DEFAULT_BINS"
done
if ((${#bins[@]} > 1)); then
  [[ -z "${BOOTSTRAP:-}" ]] || die "BOOTSTRAP packages one binary: set BIN to one of $DEFAULT_BINS (or use BOOTSTRAP_DIR)"
  [[ -z "${OUT:-}" ]] || die "OUT names one zip: set BIN to one binary (or use OUT_DIR)"
fi

case "$ARCH" in
  x86_64) target=x86_64-unknown-linux-gnu wheel_platforms=() lib_dir="$CACHE/onnxruntime-$ORT_VERSION" ;;
  arm64)
    target=aarch64-unknown-linux-gnu
    wheel_platforms=(--platform manylinux_2_28_aarch64 --platform manylinux_2_27_aarch64 --platform manylinux2014_aarch64)
    lib_dir="$CACHE/onnxruntime-$ORT_VERSION-aarch64"
    ;;
  *) die "ARCH=$ARCH: expected x86_64 or arm64 (template parameter Architecture)" ;;
esac

# --- ONNX Runtime for ARCH -----------------------------------------------------------------------------------------
# x86_64: the library `make setup` copied from the onnxruntime wheel. arm64: the same file from the aarch64 wheel,
# fetched once with pip (the registry's ordinary client) and cached beside it.
ORT_LIB="${ORT_LIB:-$lib_dir/libonnxruntime.so}"
if [[ ! -f "$ORT_LIB" ]]; then
  [[ "$ARCH" == arm64 ]] || die "$ORT_LIB missing: run \`make setup\`"
  dl="$(mktemp -d)"
  trap 'rm -rf "$dl"' EXIT
  echo "package: fetching onnxruntime==$ORT_VERSION for aarch64 (pip download)"
  "$py" -m pip download --quiet --no-deps --only-binary=:all: "${wheel_platforms[@]}" \
    --python-version 3.11 --implementation cp -d "$dl" "onnxruntime==$ORT_VERSION"
  wheel=("$dl"/onnxruntime-*.whl)
  mkdir -p "$lib_dir"
  "$py" - "${wheel[0]}" "$ORT_LIB.tmp" "$ORT_VERSION" <<'EOF'
import sys, zipfile
wheel, out, version = sys.argv[1:]
with zipfile.ZipFile(wheel) as z, open(out, "wb") as f:
    f.write(z.read(f"onnxruntime/capi/libonnxruntime.so.{version}"))
EOF
  mv "$ORT_LIB.tmp" "$ORT_LIB"
fi

# --- the model: the manifest names the ONNX Runtime it was converted and tested with -------------------------------
[[ -f "$MODEL_DIR/manifest.json" ]] || die "$MODEL_DIR/manifest.json missing: run \`make setup\`"
model_ort="$("$py" -c 'import json,sys; print(json.load(open(sys.argv[1])).get("ort_version",""))' "$MODEL_DIR/manifest.json")"
[[ "$model_ort" == "$ORT_VERSION" ]] || die "$MODEL_DIR was made for ONNX Runtime '$model_ort', packaging $ORT_VERSION"

# --- the binaries: one cargo build for all of them (shared dependencies compile once) --------------------------------
if [[ -z "${BOOTSTRAP:-}" && -z "${BOOTSTRAP_DIR:-}" ]]; then
  command -v cargo-lambda >/dev/null || die "cargo-lambda not found: set INFRA_VENV (make lambda does) or install it"
  bin_args=()
  for b in "${bins[@]}"; do bin_args+=(--bin "$b"); done
  # cargo lambda links with zig for an old glibc (provided.al2023 has 2.34), whatever this machine's glibc is, and
  # copies each built binary to <lambda-dir>/<bin>/bootstrap.
  cargo lambda build --release --locked "${bin_args[@]}" --target "$target" --lambda-dir "$CARGO_TARGET_DIR/lambda"
  BOOTSTRAP_DIR="$CARGO_TARGET_DIR/lambda"
fi

# --- assemble and check, per binary ----------------------------------------------------------------------------------
for b in "${bins[@]}"; do
  bootstrap="${BOOTSTRAP:-$BOOTSTRAP_DIR/$b/bootstrap}"
  out="${OUT:-$OUT_DIR/$b.zip}"
  [[ -f "$bootstrap" ]] || die "$bootstrap missing"
  "$py" "$here/lambda_zip.py" build --out "$out" --bootstrap "$bootstrap" --lib "$ORT_LIB" --model-dir "$MODEL_DIR" \
    --arch "$ARCH"
  "$py" "$here/lambda_zip.py" check "$out" --arch "$ARCH"
  echo "package: $out ($b, $ARCH) ready for sam deploy (template.yaml's CodeUri)"
done
# build/ holds only generated files: keep it out of git without touching the repository's .gitignore.
if [[ -z "${OUT:-}" && "$OUT_DIR" == "$DEFAULT_OUT_DIR" && ! -f build/.gitignore ]]; then
  printf '# generated by infra/package.sh\n*\n' >build/.gitignore
fi
