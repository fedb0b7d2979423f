# Quick start: `make demo` runs one job end to end on CPU; `make test` runs the suite.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
DEMO_ENV := MODEL_PROFILE=tiny LOCAL_STORAGE_DIR=outputs MODELS_DIR=.cache/models DEVICE=cpu

.PHONY: install demo test lint clean

$(VENV)/.installed: builder/requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r builder/requirements.txt -r requirements-dev.txt
	touch $@

install: $(VENV)/.installed

demo: install
	$(DEMO_ENV) $(PY) handler.py --test_input "$$(cat test_input.json)"
	@echo "Files written under outputs/ (bucket keys):" && find outputs -type f | sort

lint: install
	$(PY) -m ruff check .
	$(VENV)/bin/hadolint Dockerfile

test: install lint
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) .cache outputs
