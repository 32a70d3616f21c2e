# EmoVLM-KD: `make quickstart` runs the whole pipeline on the built-in toy world (CPU, offline);
# `make test` runs the test suite; `make mutations` checks that it notices the method's parts
# switched off. All create .venv on first use.
# `make reproduce DATA=FI` runs the pipeline on a real dataset with the paper's settings
# (scripts/reproduce.sh; env NPROC, BASE_URL, MODEL, DATA_ROOT, OUT pass through).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1
export HF_HUB_DISABLE_TELEMETRY := 1
export GRADIO_ANALYTICS_ENABLED := False
export TOKENIZERS_PARALLELISM := false

.PHONY: venv quickstart test bench mutations reproduce preflight gpu-check browser-test clean-toy

$(VENV)/.installed: requirements.txt requirements-dev.txt requirements-tracking.txt
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

# Switches off each defining part of the method in a temporary copy and checks a test fails
# (6-25 minutes on 2 cores; not part of `make test`). ARGS="--only NAME" or ARGS=--list.
mutations: venv
	$(PY) scripts/mutations.py $(ARGS)

reproduce: venv
	@if [ -z "$(DATA)" ]; then echo "usage: make reproduce DATA=<dataname>  (e.g. DATA=FI)"; exit 2; fi
	PY=$(PY) bash scripts/reproduce.sh $(DATA)

# Measures the run `make reproduce DATA=...` would make on this machine before making it: the
# environment, the data, short timed runs of every stage, the projected time and memory
# (docs/reproducing.md#preflight). ARGS passes more flags, e.g. ARGS="--nproc 4 --device_memory 80".
preflight: venv
	@if [ -z "$(DATA)" ]; then echo "usage: make preflight DATA=<dataname>  (e.g. DATA=FI)"; exit 2; fi
	$(PY) -m engine.preflight --dataname $(DATA) --vlm_config configs/paper_vlm.yaml \
	  --distill_config configs/paper_distill.yaml --gate_config configs/paper_gate.yaml $(ARGS)

# On a GPU machine: the tests marked `cuda` and the preflight on the toy world (docs/gpu.md).
gpu-check: venv
	PY=$(PY) bash scripts/gpu_check.sh

$(VENV)/.browser: $(VENV)/.installed requirements-browser.txt
	$(PY) -m pip install -r requirements-browser.txt
	touch $@

# Headless Chromium drives the demo page; Chromium itself comes from Debian, not pip.
browser-test: venv
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
	  echo "needs Chromium and its driver: sudo apt-get install -y chromium chromium-driver"; exit 1; fi
	@$(MAKE) --no-print-directory $(VENV)/.browser
	$(PY) -m pytest tests/browser_check.py -q -s -p no:cacheprovider

clean-toy:
	rm -rf images/toy checkpoints/tiny-qwen2-vl checkpoints/tiny-qwen2-5-vl checkpoints/tiny-qwen3-vl checkpoints/tiny-llava-onevision outputs/toy
