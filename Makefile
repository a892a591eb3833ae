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

# The linter and formatter check the code first (configured in pyproject.toml). mypy is
# configured there too but not run here yet: older errors remain (issue 11).
test: $(STAMP)
	$(VENV)/bin/ruff check captum_fullgrad tests benchmarks
	$(VENV)/bin/ruff format --check captum_fullgrad tests benchmarks
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) demo-out .pytest_cache .hypothesis
