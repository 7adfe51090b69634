# The README's two commands: `make demo` and `make test`.  Both install what they need.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
DEMO_USERS ?= 10000
# the server's major version, for Debian's extension packages (postgresql-15-pgaudit)
PG_MAJOR ?= $(or $(shell pg_config --version 2>/dev/null | sed -E 's/^PostgreSQL ([0-9]+).*/\1/'),15)
# setuptools' build backend warns (experimental ext-modules, editable install) through pip -q
PIP_QUIET := PYTHONWARNINGS=ignore PIP_DISABLE_PIP_VERSION_CHECK=1

.PHONY: install test lint demo bench bench-load clean

$(STAMP): pyproject.toml dbmigration/_copytext.c
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] >= (3, 11)' 2>/dev/null || { echo "Python 3.11 is required (found: $(PYTHON))"; exit 1; }
	@test -f /usr/include/sqlite3.h || apt-get install -y -q libsqlite3-dev || { echo "SQLite's C headers are missing: install libsqlite3-dev (the copy's C formatter needs them)"; exit 1; }
	@command -v chromium >/dev/null || { apt-get update -q && apt-get install -y -q chromium; } || { echo "Chromium is missing: install Debian's chromium package (the admin's browser tests drive it)"; exit 1; }
	@command -v pgbackrest >/dev/null || { apt-get update -q && apt-get install -y -q pgbackrest; } || { echo "pgBackRest is missing: install Debian's pgbackrest package (point-in-time recovery, db_pitr)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PIP_QUIET) $(PY) -m pip install -q --upgrade pip
	$(PIP_QUIET) $(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)
	@command -v faketime >/dev/null || { apt-get update -q && apt-get install -y -q faketime; } || { echo "faketime is missing: install Debian's faketime package (tests/test_pitr.py ages pgBackRest's backups to test retention by days)"; exit 1; }
	@test -x /usr/sbin/pgbouncer || { apt-get update -q && apt-get install -y -q pgbouncer; } || { echo "PgBouncer is missing: install Debian's pgbouncer package (the transaction-pooling tests start one)"; exit 1; }
	@test -f /usr/lib/postgresql/$(PG_MAJOR)/lib/pgaudit.so || { apt-get update -q && apt-get install -y -q postgresql-$(PG_MAJOR)-pgaudit; } || { echo "pgaudit is missing: install Debian's postgresql-$(PG_MAJOR)-pgaudit package (the audit tests preload it)"; exit 1; }

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) manage.py makemigrations --check --dry-run
	DJANGO_SETTINGS_MODULE=tests.settings $(PY) manage.py makemigrations --check --dry-run

test: lint
	$(VENV)/bin/pytest

# The demo runs in its own corner (var/demo/, database propcore_demo) so it never touches
# database/ or the propcore database; each run starts from scratch.
DEMO_DIR := var/demo/database
DEMO_URL := $(or $(DEMO_POSTGRES_URL),postgres://postgres@127.0.0.1:5432/propcore_demo)
DEMO_ENV := PROPCORE_DATABASE_DIR=$(CURDIR)/$(DEMO_DIR) POSTGRES_URL=$(DEMO_URL)
DEMO_MANAGE := $(DEMO_ENV) $(PY) manage.py

demo: install
	rm -rf $(DEMO_DIR) && mkdir -p $(DEMO_DIR)
	$(DEMO_MANAGE) ensure_postgres --recreate
	$(DEMO_MANAGE) migrate -v 0
	$(DEMO_MANAGE) seed_demo --users $(DEMO_USERS)
	$(DEMO_MANAGE) db_backup
	$(DEMO_MANAGE) db_test_postgresql
	$(DEMO_MANAGE) migration_prepare
	$(DEMO_MANAGE) migrate_data
	$(DEMO_MANAGE) switch_to_postgresql --noinput
	$(DEMO_MANAGE) refresh_analytics
	$(DEMO_MANAGE) db_backup
	$(DEMO_MANAGE) db_health_check
	$(DEMO_MANAGE) migration_status
	@echo "--- and back: rollback to SQLite, then the second switch ---"
	$(DEMO_MANAGE) rollback_to_sqlite --noinput
	$(DEMO_MANAGE) migration_prepare
	$(DEMO_MANAGE) migrate_data
	$(DEMO_MANAGE) switch_to_postgresql --noinput
	$(DEMO_MANAGE) db_backup
	@echo "--- summary ---"
	@$(DEMO_MANAGE) migration_status --summary

# The benchmark (README "Benchmark"): migrate_data vs the physical limit, pgloader and
# dumpdata+loaddata on the same demo data.  pgloader comes from Debian's package.
BENCH_USERS ?= 100000
BENCH_ARGS  ?=

bench: install
	command -v pgloader >/dev/null || { apt-get update -q && apt-get install -y -q pgloader; } || echo "pgloader could not be installed: the benchmark will say so"
	$(PY) bench/run.py --users $(BENCH_USERS) $(BENCH_ARGS)

# The load test (README "Latency budget at 1M users"): gunicorn on private PostgreSQL servers
# (primary, streaming standby, PgBouncer on ports 55171-55174), native pool vs PgBouncer vs a
# replica.  The data is built once per scale under var/bench/ (1M users: about 20 minutes
# on 2 busy cores), then each run takes about 3 minutes per mode.
LOAD_USERS ?= 1000000
LOAD_ARGS  ?=

bench-load: install
	$(PY) bench/load.py --users $(LOAD_USERS) $(LOAD_ARGS)

clean:
	rm -rf $(VENV) var .pytest_cache .ruff_cache
