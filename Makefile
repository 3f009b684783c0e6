# Quick start: `make demo`, `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
SHARED ?= ../shared
TRACE  := $(SHARED)/data/gpt_oss_20b/gptoss20b_decode_routing_tokens.npz

.PHONY: setup demo replay test bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/eplbd demo --trace $(TRACE)

replay: $(STAMP)
	$(BIN)/eplbd replay $(TRACE) --num-gpus 8 --num-redundant 8 --window-size 200 --step-interval 200 --policy default,incremental --expert-bytes 24883200

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_policy.py
	$(BIN)/python benchmarks/bench_policy_movement.py
	$(BIN)/python benchmarks/bench_reporter.py
	$(BIN)/python benchmarks/bench_rearrange.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
