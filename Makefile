# `make test` and `make serve` install everything they need into .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test test-py312 serve proto clean peers peers-bench

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,build]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	OMP_NUM_THREADS=2 $(BIN)/python -m pytest -q

# The unit tests under Python 3.12, the Python of the NGC Triton image the Dockerfile builds on. PyPI has
# torch 2.13.0 for 3.12 only as its CUDA build (this machine's disk holds the CPU wheel for 3.11 only):
# about 1.5 GB to download and 5 GB installed in .venv312; it runs on the CPU. Measured from a fresh clone: 269 s
# (install and the unit tests).
PY312 ?= $(or $(lastword $(sort $(wildcard $(HOME)/.pyenv/versions/3.12.*/bin/python3.12))),$(shell command -v python3.12))
VENV312 := .venv312
STAMP312 := $(VENV312)/.installed

$(STAMP312): pyproject.toml
	@test -n "$(PY312)" || { echo "test-py312: no python3.12 found; set PY312=/path/to/python3.12" >&2; exit 2; }
	test -x $(VENV312)/bin/python || $(PY312) -m venv $(VENV312)
	$(VENV312)/bin/python -m pip install -q --upgrade pip
	$(VENV312)/bin/python -m pip install -q -e '.[test,build]'
	touch $(STAMP312)

test-py312: $(STAMP312)
	OMP_NUM_THREADS=2 $(VENV312)/bin/python -m pytest -q -p no:cacheprovider tests/unit

# Serves the embedded tiny model: the public gRPC API on :8000 (Triton behind it), /metrics on :8002,
# until Ctrl-C / SIGTERM. Settings: NIM_* variables (docs/operations.md).
serve: $(STAMP)
	$(BIN)/dgemma serve

# Regenerates service/api/ from proto/ (the stubs are committed; a test checks they are current).
proto: $(STAMP)
	$(BIN)/python tools/gen_proto.py

# The field's own tools (guidellm, lm-eval, LangChain, grpcurl, genai-perf) in their own venv, .venv-peers, from a
# pinned requirements file: guidellm 0.8 needs numpy>=2, the project's nvidia-pytriton caps numpy<2, so they cannot
# share .venv (docs/benchmarks.md, "The field's own tools"). About 6 min and 2.2 GB (torch 2.13.0 CPU, which
# guidellm requires, from this machine's local wheel). genai-perf's perf_analyzer is the binary in tritonclient
# 2.50.0's wheel (the last one built for glibc 2.35; this Debian 12 has 2.36), installed without its
# dependencies (it would pin numpy<2); it needs Debian's libb64-0d. x86_64 only.
# `make peers-bench` runs them all against `dgemma serve`.
PEERS_VENV := .venv-peers
PEERS_STAMP := $(PEERS_VENV)/.installed

$(PEERS_STAMP): benchmarks/peers/requirements.txt
	test -x $(PEERS_VENV)/bin/python || $(PY) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/python -m pip install -q --upgrade pip
	$(PEERS_VENV)/bin/python -m pip install -q -r benchmarks/peers/requirements.txt
	$(PEERS_VENV)/bin/python -m pip install -q --no-deps tritonclient==2.50.0
	@ldconfig -p | grep -q libb64.so.0d || (apt-get update -q && apt-get install -y -q libb64-0d) \
	  || echo "make peers: no libb64-0d: genai-perf's perf_analyzer will not start" >&2
	touch $(PEERS_STAMP)

peers: $(PEERS_STAMP)

peers-bench: $(STAMP) $(PEERS_STAMP)
	$(BIN)/python benchmarks/peers.py

clean:
	rm -rf $(VENV) $(VENV312) $(PEERS_VENV) .pytest_cache .hypothesis
