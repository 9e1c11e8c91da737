# Two commands on a fresh machine: `make demo` and `make test`. Each sets up what it needs.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.setup-done
SAMPLE := build/sample_drive

.PHONY: setup test lint pytest demo sample bench clean

setup: $(STAMP)

# Re-runs only when a requirements file or the package metadata changes (idempotent, ~1 s).
$(STAMP): setup.py setup.cfg package.xml requirements-torch.txt requirements-ros.txt requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q -r requirements-torch.txt
	$(BIN)/python -m pip install -q -r requirements-ros.txt -r requirements-dev.txt
	$(BIN)/python -m pip install -q -e '.[clip,export,pointclip,report,train]'
	touch $@

lint: setup
	$(BIN)/ruff check .

pytest: setup
	$(BIN)/python -m pytest

test: lint pytest

sample: setup
	$(BIN)/clip2scene sample --out $(SAMPLE) --frames 60 --seed 0

# Sample drives -> label-efficient training -> export -> evaluation -> the node on a replay.
demo: setup
	$(BIN)/clip2scene demo --out demo-report --work build/demo

bench: setup
	$(BIN)/clip2scene bench codecs --json build/bench_codecs.json

clean:
	rm -rf build .pytest_cache
