# bitscout — the two commands a newcomer runs: `make demo` and `make test`.
# Each creates the environment in .venv at the repository root and installs what it needs.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CACHE ?= .cache
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: venv test lint typecheck demo demo-llm demo-local bench bench-quick clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch==2.13.0 is pinned in pyproject (the CPU wheel pip takes from local disk)
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP)

lint: venv
	$(VENV)/bin/ruff check bitscout search service workers tests benchmarks
	$(VENV)/bin/lint-imports

typecheck: venv
	$(VENV)/bin/mypy bitscout

test: venv lint
	$(PY) -m pytest -q

# The main job: a real search of the MiniLM model fine-tuned on BBC topics.
demo: venv
	$(PY) -m benchmarks.demo --cache $(CACHE)

# A causal LM: SmolLM2-135M (fisher, 4.25 average bits) on token windows of BBC articles; perplexity.
demo-llm: venv
	$(PY) -m benchmarks.demo --llm --cache $(CACHE)

bench: venv
	$(PY) -m benchmarks.run --cache $(CACHE)

bench-quick: venv
	$(PY) -m benchmarks.run --cache $(CACHE) --quick

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
