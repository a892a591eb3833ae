# Two entry points: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test install clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# Reinstall only when the package metadata changes.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/captum-fullgrad demo --out demo-out

# The linter, the formatter and the type checker check the code first (all configured in
# pyproject.toml), then the tests run.
test: $(STAMP)
	$(VENV)/bin/ruff check captum_fullgrad tests benchmarks
	$(VENV)/bin/ruff format --check captum_fullgrad tests benchmarks
	$(VENV)/bin/mypy
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) demo-out .pytest_cache .hypothesis
