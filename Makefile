# The README's two commands: `make demo` (build the sample run, open the dashboard) and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
RUN ?= runs/demo
PORT ?= 8501

.PHONY: demo test lint venv bench clean

# torch is installed first and pinned: the CPU wheel lies on disk, and an open `torch` requirement resolved in a
# fresh environment could pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed

demo: venv
	@if [ -f $(RUN)/snapshot.duckdb ]; then echo "reusing the sample run in $(RUN)"; \
	else $(BIN)/fgtrac demo --no-app --out $(RUN); fi
	$(BIN)/fgtrac app $(RUN) --port $(PORT)

lint: venv
	$(BIN)/ruff check .

test: lint
	$(BIN)/pytest -q

# the bench-only extra (dattri, measured side by side with fgtrac's influence forms)
bench: venv
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) runs test-artifacts .pytest_cache .ruff_cache
