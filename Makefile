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

export CARGO_TARGET_DIR ?= $(CACHE)/target
export LAMBDA_LLM_ARTIFACT_DIR := $(ARTIFACT)

.PHONY: help setup run test test-rust test-python bench fmt lint clean-cache

help:
	@echo "make run    build and run lambda-llm on the bundled model"
	@echo "make test   set up (cached) and run every test"
	@echo "make bench  compare this engine with llama.cpp on the same weights"

## setup: Python venv (pinned), ONNX Runtime library from the PyPI wheel, the model artifact. Idempotent.
setup: $(VENV)/.ok $(ORT_LIB) $(ARTIFACT)/manifest.json
	@ln -sfn $(ARTIFACT) $(MODEL_DIR).tmp && { [ -L $(MODEL_DIR) ] || rm -rf $(MODEL_DIR); } && mv -T $(MODEL_DIR).tmp $(MODEL_DIR)
	@for d in debug release; do mkdir -p $(CARGO_TARGET_DIR)/$$d && ln -sfn $(ORT_LIB) $(CARGO_TARGET_DIR)/$$d/libonnxruntime.so; done
	@echo "setup ok: venv $(VENV), model $(MODEL_DIR) -> $(ARTIFACT), ONNX Runtime $(ORT_LIB)"

$(VENV)/.ok: $(REQS)
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)

	$(PY) -m pip install --quiet -r $(REQS)
	touch $@

$(ORT_LIB): $(VENV)/.ok
	mkdir -p $(dir $@)
	cp "$$($(PY) -c 'import onnxruntime, os; print(os.path.join(os.path.dirname(onnxruntime.__file__), "capi", "libonnxruntime.so.$(ORT_VERSION)"))')" $@.tmp
	mv $@.tmp $@

$(ARTIFACT)/manifest.json: $(VENV)/.ok $(CONVERTER)
	$(PY) model-artifacts/convert.py --out $(ARTIFACT) --id $(MODEL_ID)

run: setup
	cargo build --release --locked
	$(CARGO_TARGET_DIR)/release/lambda-llm chat "What is the capital of France?"

test: setup test-rust test-python

test-rust:
	cargo fmt --all -- --check
	cargo clippy --locked --all-targets -- -D warnings
	cargo test --locked

test-python:
	$(PY) -m pytest model-artifacts/tests -q

bench: setup
	cargo build --release --locked
	$(PY) bench/compare.py --binary $(CARGO_TARGET_DIR)/release/lambda-llm --model-dir $(MODEL_DIR) --out bench/results.md

clean-cache:
	rm -rf $(CACHE)
