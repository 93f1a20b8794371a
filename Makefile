# Two commands do all the set-up: `make demo` and `make test`. Both create .venv on first use.
# Installs go through constraints.txt, which pins torch==2.13.0 (the CPU wheel) and every other version.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test,hub]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/gptlab demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/train_throughput.py
	$(BIN)/python benchmarks/generate_throughput.py

clean:
	rm -rf $(VENV) runs
