# Quick start: `make demo` runs one job end to end on CPU; `make test` runs the suite. `make help` lists all.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
DEMO_ENV := MODEL_PROFILE=tiny LOCAL_STORAGE_DIR=outputs MODELS_DIR=.cache/models DEVICE=cpu
INPUT ?= test_input.json

.DEFAULT_GOAL := help
.PHONY: help install demo run test image-test lint schema clean

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-z-]+:.*## / {printf "  make %-12s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(VENV)/.installed: builder/requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r builder/requirements.txt -r requirements-dev.txt
	touch $@

install: $(VENV)/.installed ## create .venv with the worker's and the tests' packages

demo: install ## run test_input.json end to end on CPU with tiny models (files land in outputs/)
	@$(DEMO_ENV) $(PY) handler.py --test_input "$$(cat test_input.json)"
	@echo "Files written under outputs/ (bucket keys):" >&2 && find outputs -type f | sort >&2

run: install ## run your own payload file on CPU with tiny models: make run INPUT=payload.json
	@$(DEMO_ENV) $(PY) handler.py --test_input "$$(cat $(INPUT))"

lint: install ## ruff and hadolint
	$(PY) -m ruff check .
	$(VENV)/bin/hadolint Dockerfile

test: install lint ## lint, then the whole test suite (CPU, tiny models, a local S3 server)
	$(PY) -m pytest -q

image-test: ## build the Dockerfile (no weights) and run the image: jobs, a bad payload, unwritable dirs (root or a Docker daemon)
	bash tests/image_test.sh

schema: install ## regenerate docs/job.schema.json from the payload models
	$(PY) -m src.schema

clean: ## remove .venv, cached test models and outputs/
	rm -rf $(VENV) .cache outputs
