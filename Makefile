# The README's two commands: `make demo` and `make test`.  Both install what they need.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
DEMO_USERS ?= 2000

.PHONY: install test lint demo bench clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "Python 3.11 is required ($(PYTHON) not found)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) manage.py makemigrations --check --dry-run

test: lint
	$(VENV)/bin/pytest

demo: install
	$(PY) manage.py ensure_postgres
	$(PY) manage.py migrate --database sqlite
	$(PY) manage.py migrate --database postgresql
	$(PY) manage.py seed_demo --users $(DEMO_USERS)
	$(PY) manage.py refresh_analytics
	curl -fsS "http://localhost/health/" >/dev/null 2>&1 || $(PY) manage.py check --database sqlite --database postgresql

clean:
	rm -rf $(VENV) var .pytest_cache .ruff_cache
