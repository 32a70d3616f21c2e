# EmoVLM-KD: `make quickstart` runs the whole pipeline on the built-in toy world (CPU, offline);
# `make test` runs the test suite. Both create .venv on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1
export HF_HUB_DISABLE_TELEMETRY := 1
export GRADIO_ANALYTICS_ENABLED := False
export TOKENIZERS_PARALLELISM := false

.PHONY: venv quickstart test bench browser-test clean-toy

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -r requirements-dev.txt
	touch $@

venv: $(VENV)/.installed

quickstart: venv
	bash scripts/quickstart.sh

test: venv
	$(PY) -m pytest tests -q

bench: venv
	$(PY) -m bench

clean-toy:
	rm -rf images/toy checkpoints/tiny-qwen2-vl outputs/toy
