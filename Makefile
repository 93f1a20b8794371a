# Two commands do all the set-up: `make demo` and `make test`. Both create .venv on first use.
# Installs go through constraints.txt, which pins torch==2.13.0 (the CPU wheel) and every other version.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench bench-llama clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test,hub]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/gptlab demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/train_throughput.py
	$(BIN)/python benchmarks/generate_throughput.py

# gptlab against llama.cpp on the same weights (benchmarks/llama_cpp_compare.py). The `bench` extra is
# llama-cpp-python, which PyPI ships as source only: pip compiles llama.cpp, about 12 minutes on 2 cores,
# once. -e keeps the package editable, as the set-up above installs it.
$(VENV)/.bench-installed: $(STAMP)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[bench]'
	touch $@

bench-llama: $(VENV)/.bench-installed
	$(BIN)/python benchmarks/llama_cpp_compare.py

clean:
	rm -rf $(VENV) runs
