# Every target creates the virtual environment when it is missing: `make run` and
# `make test` are all a fresh machine needs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: run test lint bench fuzz soak clean system-packages

FUZZ_SECONDS ?= 60
SOAK_SECONDS ?= 60

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/python examples/demo.py

lint: $(STAMP)
	$(BIN)/ruff check mcpmeter tests examples benchmarks fuzz
	$(BIN)/ruff format --check mcpmeter tests examples benchmarks fuzz
	$(BIN)/mypy

# System packages some tests need (the HTML report rendered in headless Chromium), installed
# when missing (as root, with apt-get): the tests that need them fail rather than skip.
system-packages:
	@test -x /usr/bin/chromium || { echo "installing chromium (apt-get)"; \
	  (apt-get install -y -q chromium >/dev/null 2>&1 || \
	   (apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null)); }

test: lint system-packages
	MCPMETER_REQUIRE_CHROMIUM=1 $(BIN)/pytest

bench: $(STAMP)
	$(BIN)/python benchmarks/relay_bench.py
	$(BIN)/python benchmarks/report_bench.py
	$(BIN)/python benchmarks/report_bench.py --postgres --rounds 1
	$(BIN)/python benchmarks/http_bench.py
	$(BIN)/python benchmarks/listen_bench.py
	$(BIN)/python benchmarks/store_bench.py
	$(BIN)/python benchmarks/budget_bench.py
	$(BIN)/python benchmarks/exit_bench.py

# The frame parser under libFuzzer (atheris); new corpus entries go to .fuzz-corpus/.
fuzz: $(STAMP)
	mkdir -p .fuzz-corpus && cp fuzz/corpus/* .fuzz-corpus/
	$(BIN)/python fuzz/frame_fuzz.py -max_total_time=$(FUZZ_SECONDS) .fuzz-corpus

# Many wrappers, a million calls, random faults; not part of `make test`.
soak: $(STAMP)
	$(BIN)/python benchmarks/soak.py --seconds $(SOAK_SECONDS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
