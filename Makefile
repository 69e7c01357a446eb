# `make test` and `make serve` install everything they need into .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test serve proto clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	OMP_NUM_THREADS=2 $(BIN)/python -m pytest -q

# Serves the embedded tiny model: the public gRPC API on :8000 (Triton behind it), /metrics on :8002,
# until Ctrl-C / SIGTERM. Settings: NIM_* variables (docs/operations.md).
serve: $(STAMP)
	$(BIN)/dgemma serve

# Regenerates service/api/ from proto/ (the stubs are committed; a test checks they are current).
proto: $(STAMP)
	$(BIN)/python tools/gen_proto.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
