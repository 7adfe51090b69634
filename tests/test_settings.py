"""Settings: aliases, the active backend, profiles and their pool sizes, secrets, slow queries."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.db import connections

from dbmigration.state import MigrationState, StateError, read_active_backend, write_state

ROOT = Path(__file__).resolve().parent.parent


def settings_in_subprocess(expr: str, **env) -> subprocess.CompletedProcess:
    """Evaluate expr on freshly imported settings under the given environment."""
    code = (
        "import django, json; django.setup(); from django.conf import settings; "
        f"print(json.dumps({expr}, default=str))"
    )
    full_env = {**os.environ, "DJANGO_SETTINGS_MODULE": "propcore.settings", **env}
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=full_env, capture_output=True, text=True
    )


@pytest.mark.parametrize(("profile", "max_size"), [("dev", 10), ("staging", 25), ("prod", 100)])
def test_pool_size_follows_the_profile(profile, max_size):
    result = settings_in_subprocess(
        "[settings.DATABASES['postgresql']['OPTIONS']['pool'], "
        "settings.DATABASES['postgresql']['CONN_MAX_AGE']]",
        PROPCORE_ENV=profile,
        SECRET_KEY="k",
        POSTGRES_URL="postgres://app:pw@127.0.0.1:5432/propcore",
    )
    assert result.returncode == 0, result.stderr
    pool, conn_max_age = json.loads(result.stdout)
    assert pool["max_size"] == max_size
    assert conn_max_age == 0


@pytest.mark.django_db(databases=["postgresql"])
def test_the_dev_pool_is_a_real_psycopg_pool():
    pool = connections["postgresql"].pool
    assert pool is not None and pool.max_size == 10


def test_prod_refuses_to_start_without_a_secret_key():
    result = settings_in_subprocess("1", PROPCORE_ENV="prod", SECRET_KEY="")
    assert result.returncode != 0
    assert "SECRET_KEY must be set in the environment for the prod profile" in result.stderr


def test_unknown_profile_is_refused():
    result = settings_in_subprocess("1", PROPCORE_ENV="production")
    assert "PROPCORE_ENV='production' is not a profile" in result.stderr


def test_default_alias_follows_the_state_file(tmp_path):
    db_dir = tmp_path / "database"
    write_state(
        db_dir / "state.json", MigrationState(phase="switched", active_backend="postgresql")
    )
    result = settings_in_subprocess(
        "[settings.ACTIVE_BACKEND, settings.DATABASES['default']['ENGINE']]",
        PROPCORE_DATABASE_DIR=str(db_dir),
    )
    assert json.loads(result.stdout) == ["postgresql", "django.db.backends.postgresql"]


def test_database_active_overrides_the_state_file(tmp_path):
    state = tmp_path / "state.json"
    write_state(state, MigrationState(active_backend="postgresql"))
    assert read_active_backend(state, environ={"DATABASE_ACTIVE": "sqlite"}) == "sqlite"
    assert read_active_backend(state, environ={}) == "postgresql"
    assert read_active_backend(tmp_path / "missing.json", environ={}) == "sqlite"
    with pytest.raises(StateError, match="DATABASE_ACTIVE='mysql'"):
        read_active_backend(state, environ={"DATABASE_ACTIVE": "mysql"})


@pytest.mark.django_db(databases=["postgresql", "sqlite"])
def test_slow_queries_are_logged_with_alias_and_without_parameters(settings, caplog):
    settings.SLOW_QUERY_MS = 50
    with caplog.at_level(logging.WARNING, logger="propcore.slow_query"):
        with connections["postgresql"].cursor() as cursor:
            cursor.execute("SELECT pg_sleep(%s), %s", [0.1, "secret-iban-IE29AIBK"])
        with connections["postgresql"].cursor() as cursor:
            cursor.execute("SELECT 1")  # fast: not logged
    messages = [r.getMessage() for r in caplog.records if r.name == "propcore.slow_query"]
    assert len(messages) == 1
    assert messages[0].startswith("slow query on postgresql: ")
    assert "pg_sleep" in messages[0]
    assert "secret-iban" not in messages[0]
