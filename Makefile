# lambda-llm — set-up, build, test. Everything heavy is cached under $(CACHE), keyed by what produced it.
SHELL := /bin/bash
.DEFAULT_GOAL := help

CACHE       ?= $(HOME)/.cache/lambda-llm
PYTHON      ?= python3
MODEL_ID    := smollm2-135m-instruct
MODEL_DIR   := model-artifacts/$(MODEL_ID)
ORT_VERSION := 1.31.1

REQS        := model-artifacts/requirements.txt
VENV        := $(CACHE)/venv-$(shell cat $(REQS) | sha256sum | cut -c1-12)
PY          := $(VENV)/bin/python
CONVERTER   := $(REQS) model-artifacts/convert.py $(wildcard model-artifacts/lambda_llm_convert/*.py)
ARTIFACT    := $(CACHE)/artifacts/$(MODEL_ID)-$(shell cat $(CONVERTER) | sha256sum | cut -c1-12)
ORT_LIB     := $(CACHE)/onnxruntime-$(ORT_VERSION)/libonnxruntime.so
CLIENT_REQS := tests/clients/requirements.txt
CLIENT_VENV := $(CACHE)/clients-$(shell cat $(CLIENT_REQS) 2>/dev/null | sha256sum | cut -c1-12)
LEGACY_REQS := tests/clients/requirements-legacy.txt
LEGACY_VENV := $(CACHE)/clients-legacy-$(shell cat $(LEGACY_REQS) 2>/dev/null | sha256sum | cut -c1-12)
INFRA_REQS  := infra/requirements.txt
INFRA_VENV  := $(CACHE)/infra-$(shell cat $(INFRA_REQS) | sha256sum | cut -c1-12)
E2E_REQS    := tests/lambda_e2e/requirements.txt
E2E_VENV    := $(CACHE)/lambda-e2e-$(shell cat $(E2E_REQS) | sha256sum | cut -c1-12)
HARD_REQS   := tests/hardening/requirements.txt
HARD_VENV   := $(CACHE)/hardening-$(shell cat $(HARD_REQS) | sha256sum | cut -c1-12)

export CARGO_TARGET_DIR ?= $(CACHE)/target
export LAMBDA_LLM_ARTIFACT_DIR := $(ARTIFACT)
# The Rust tests that need AWS services start this moto server themselves (tests/support/moto.rs).
export MOTO_SERVER := $(INFRA_VENV)/bin/moto_server

.PHONY: help setup run test test-rust test-python test-clients test-lambda test-infra test-hardening soak check-template \
	lambda bench fuzz clean-cache

help:
	@echo "make run    build and serve the OpenAI-compatible API on 127.0.0.1:3000 (prints a dev key and a curl line)"
	@echo "make test   set up (cached) and run every test"
	@echo "make bench  compare this engine with llama.cpp on the same weights"
	@echo "make fuzz   the request parser and validator under libFuzzer for FUZZ_SECONDS (default 60)"
	@echo "make soak   the long hardening runs (100k hostile requests, 5 min of 50 streams, ...) and make fuzz"

## setup: Python venv (pinned), ONNX Runtime library from the PyPI wheel, the model artifact. Idempotent.
setup: $(VENV)/.ok $(INFRA_VENV)/.ok $(ORT_LIB) $(ARTIFACT)/manifest.json
	@ln -sfn $(ARTIFACT) $(MODEL_DIR).tmp && { [ -L $(MODEL_DIR) ] || rm -rf $(MODEL_DIR); } && mv -T $(MODEL_DIR).tmp $(MODEL_DIR)
	@for d in debug release; do mkdir -p $(CARGO_TARGET_DIR)/$$d && ln -sfn $(ORT_LIB) $(CARGO_TARGET_DIR)/$$d/libonnxruntime.so; done
	@echo "setup ok: venv $(VENV), model $(MODEL_DIR) -> $(ARTIFACT), ONNX Runtime $(ORT_LIB)"

# Every cache entry's path carries the hash of what produced it, so its rules need no prerequisites: a fresh clone's
# new file times must not rebuild what the hash says is already there.
$(VENV)/.ok:
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)

	$(PY) -m pip install --quiet -r $(REQS)
	touch $@

$(ORT_LIB): | $(VENV)/.ok
	mkdir -p $(dir $@)
	cp "$$($(PY) -c 'import onnxruntime, os; print(os.path.join(os.path.dirname(onnxruntime.__file__), "capi", "libonnxruntime.so.$(ORT_VERSION)"))')" $@.tmp
	mv $@.tmp $@

$(ARTIFACT)/manifest.json: | $(VENV)/.ok
	$(PY) model-artifacts/convert.py --out $(ARTIFACT) --id $(MODEL_ID)

run: setup
	cargo build --release --locked
	$(CARGO_TARGET_DIR)/release/lambda-llm serve --dev-key

test: setup test-rust test-python test-clients test-lambda test-infra test-hardening check-template

# The fuzz target (fuzz/, its own workspace, run by `make fuzz`) is type-checked here so it cannot rot unseen; after a
# change to the crate's dependencies, `cd fuzz && cargo update -p lambda-llm` brings its Cargo.lock along.
test-rust:
	cargo fmt --all -- --check
	cargo clippy --locked --all-targets -- -D warnings
	cargo test --locked
	cd fuzz && cargo check --locked --target-dir $(CACHE)/target-fuzz-check

test-python:
	$(PY) -m pytest model-artifacts/tests bench/tests -q

# Real clients against a real `lambda-llm serve`: the openai SDK 1.x, and the legacy 0.28.1 in its own venv.
test-clients: $(CLIENT_VENV)/.ok $(LEGACY_VENV)/.ok
	$(CLIENT_VENV)/bin/python -m pytest tests/clients -q --ignore=tests/clients/test_openai_legacy.py
	$(LEGACY_VENV)/bin/python -m pytest tests/clients/test_openai_legacy.py -q

$(CLIENT_VENV)/.ok:
	rm -rf $(CLIENT_VENV) && $(PYTHON) -m venv $(CLIENT_VENV)
	$(CLIENT_VENV)/bin/python -m pip install --quiet -r $(CLIENT_REQS)
	touch $@

$(LEGACY_VENV)/.ok:
	rm -rf $(LEGACY_VENV) && $(PYTHON) -m venv $(LEGACY_VENV)
	$(LEGACY_VENV)/bin/python -m pip install --quiet -r $(LEGACY_REQS)
	touch $@

# AWS tooling (SAM CLI, cfn-lint, boto3, moto, cargo-lambda), pinned.
$(INFRA_VENV)/.ok:
	rm -rf $(INFRA_VENV) && $(PYTHON) -m venv $(INFRA_VENV)
	$(INFRA_VENV)/bin/python -m pip install --quiet -r $(INFRA_REQS)
	touch $@

# The real http-function under `cargo lambda watch`, keys in Secrets Manager on moto, the openai SDK as client.
test-lambda: $(E2E_VENV)/.ok lambda
	cd tests/lambda_e2e && CARGO_LAMBDA_BIN=$(INFRA_VENV)/bin PYTHONDONTWRITEBYTECODE=1 \
		$(E2E_VENV)/bin/python -m pytest -p no:cacheprovider -q -s .

$(E2E_VENV)/.ok:
	rm -rf $(E2E_VENV) && $(PYTHON) -m venv $(E2E_VENV)
	$(E2E_VENV)/bin/python -m pip install --quiet -r $(E2E_REQS)
	touch $@

# Hardening (issue 7): hostile input, key attacks, rotation under load, faults, limits — on the debug binaries that
# `cargo test` just built (lambda-llm, http-function), moto and the cargo-lambda Runtime API emulator from the infra
# venv. Figures are printed at the end.
HARDENING = cd tests/hardening && CARGO_LAMBDA_BIN=$(INFRA_VENV)/bin PYTHONDONTWRITEBYTECODE=1 \
	$(HARD_VENV)/bin/python -m pytest -q -s .
test-hardening: $(HARD_VENV)/.ok $(INFRA_VENV)/.ok
	cargo build --locked --bins
	$(HARDENING)

# The long variants: 100k hostile requests, 5 minutes of 50 streams with RSS sampled, ...; then the fuzzer.
soak: setup $(HARD_VENV)/.ok
	cargo build --locked --bins
	HARDENING_SOAK=1 $(HARDENING)
	$(MAKE) fuzz FUZZ_SECONDS=$${FUZZ_SECONDS:-600}

$(HARD_VENV)/.ok:
	rm -rf $(HARD_VENV) && $(PYTHON) -m venv $(HARD_VENV)
	$(HARD_VENV)/bin/python -m pip install --quiet -r $(HARD_REQS)
	touch $@

test-infra: $(INFRA_VENV)/.ok
	PYTHONDONTWRITEBYTECODE=1 $(INFRA_VENV)/bin/python -m pytest -p no:cacheprovider -q infra/tests

check-template: $(INFRA_VENV)/.ok
	INFRA_VENV=$(INFRA_VENV) infra/check-template.sh

# build/lambda/http-function.zip and build/lambda/batch-function.zip (template.yaml's CodeUris): bootstrap +
# libonnxruntime.so + model/, both binaries from one `cargo lambda build`. ARCH=arm64 for Graviton; BIN=batch-function
# (or http-function) packages one of them.
ARCH ?= x86_64
BIN  ?= http-function batch-function
lambda: setup
	INFRA_VENV=$(INFRA_VENV) CACHE=$(CACHE) ARCH=$(ARCH) BIN="$(BIN)" infra/package.sh

# fuzz: the request parser and validator under libFuzzer (fuzz/, its own workspace) for FUZZ_SECONDS; `make soak` runs
# it. cargo-fuzz passes -Z flags, which the stable toolchain takes with RUSTC_BOOTSTRAP=1; no sanitizer (safe Rust:
# panics, overflow checks and debug assertions are the oracle). New inputs go to the cached corpus, crashes to
# fuzz/artifacts/. The first build (every dependency instrumented) takes about 25 minutes on two cores; it is cached.
CARGO_FUZZ_VERSION := 0.13.2
CARGO_FUZZ_ROOT    := $(CACHE)/cargo-fuzz-$(CARGO_FUZZ_VERSION)
FUZZ_SECONDS       ?= 60
FUZZ_CORPUS        := $(CACHE)/fuzz-corpus/parse_request

$(CARGO_FUZZ_ROOT)/bin/cargo-fuzz:
	cargo install cargo-fuzz --version $(CARGO_FUZZ_VERSION) --locked --root $(CARGO_FUZZ_ROOT)

fuzz: setup $(CARGO_FUZZ_ROOT)/bin/cargo-fuzz
	mkdir -p $(FUZZ_CORPUS)
	cd fuzz && PATH=$(CARGO_FUZZ_ROOT)/bin:$$PATH RUSTC_BOOTSTRAP=1 \
		MODEL_DIR=$(abspath $(MODEL_DIR)) ORT_DYLIB_PATH=$(ORT_LIB) \
		cargo fuzz run parse_request --sanitizer none --codegen-units 16 --target-dir $(CACHE)/target-fuzz \
		$(FUZZ_CORPUS) seeds/parse_request -- -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1

bench: setup
	cargo build --release --locked
	$(PY) bench/compare.py --binary $(CARGO_TARGET_DIR)/release/lambda-llm --model-dir $(MODEL_DIR) --out bench/results.md

clean-cache:
	rm -rf $(CACHE)
