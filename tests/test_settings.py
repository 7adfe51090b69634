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
        ALLOWED_HOSTS="prop.ie",
        POSTGRES_URL="postgres://app:pw@127.0.0.1:5432/propcore?sslmode=verify-full",
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


# the documented production variables (README "Encrypted connections")
PROD_URL = "postgres://app:s3cret@db.prop.internal:5432/propcore?sslmode=verify-full&sslrootcert=/etc/propcore/pg-ca.crt"
PROD = {
    "PROPCORE_ENV": "prod",
    "SECRET_KEY": "v8Qm3-Zr7pT2xW9kLcN4hJ6sD1fG5aY0uE8iO3bV7nM2qR4tX6zK9wC1",
    "ALLOWED_HOSTS": "prop.ie,www.prop.ie",
    "POSTGRES_URL": PROD_URL,
}


def manage_py(*args: str, **env) -> subprocess.CompletedProcess:
    """Run manage.py in a fresh process under the given environment."""
    full_env = {**os.environ, "DJANGO_SETTINGS_MODULE": "propcore.settings", **env}
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({"PROPCORE_ENV": "prod", "SECRET_KEY": ""}, ["SECRET_KEY", "prod profile", "set it"]),
        ({"PROPCORE_ENV": "production"}, ["PROPCORE_ENV='production'", "dev, staging, prod"]),
        ({**PROD, "PROPCORE_ENV": "staging", "POSTGRES_URL": ""}, ["POSTGRES_URL"]),
        # staging and prod: HTTPS needs the host names, PostgreSQL a verified server
        ({**PROD, "ALLOWED_HOSTS": ""}, ["ALLOWED_HOSTS", "prod profile", "prop.ie"]),
        ({**PROD, "PROPCORE_ENV": "staging", "ALLOWED_HOSTS": ""}, ["ALLOWED_HOSTS", "staging"]),
        ({**PROD, "POSTGRES_URL": "postgres://app:s3cret@db:5432/x"}, ["POSTGRES_URL", "prefer"]),
        ({**PROD, "POSTGRES_URL": PROD_URL.replace("verify-full", "require")}, ["require"]),
        ({**PROD, "POSTGRES_URL": PROD_URL.replace("verify-full", "verify-ca")}, ["verify-ca"]),
        ({**PROD, "POSTGRES_URL": PROD_URL.replace("verify-full", "verify_full")}, ["not know"]),
        (
            {**PROD, "PGSSLMODE": "disable", "POSTGRES_URL": "postgres://app:s3cret@db/x"},
            ["PGSSLMODE"],
        ),
        ({**PROD, "POSTGRES_OWNER_URL": "postgres://o:s3cret@db/x"}, ["POSTGRES_OWNER_URL"]),
        (
            {**PROD, "POSTGRES_ADMIN_URL": "postgres://a:s3cret@db/x?sslmode=allow"},
            ["POSTGRES_ADMIN_URL"],
        ),
        ({**PROD, "POSTGRES_REPLICA_URLS": "postgres://r:s3cret@db2/x"}, ["POSTGRES_REPLICA_URLS"]),
        (
            {
                **PROD,
                "POSTGRES_ALLOW_SSLMODE_REQUIRE": "true",
                "POSTGRES_URL": "postgres://a:s3cret@db/x",
            },
            ["POSTGRES_URL", "sslmode=prefer"],
        ),
        # a '/' in the password ends the host part early: it must be percent-encoded
        ({"POSTGRES_URL": "postgres://app:s3cr/et@127.0.0.1:5432/x"}, ["POSTGRES_URL", "%2F"]),
        ({"POSTGRES_URL": "postgres://app:s3cret@127.0.0.1:54x2/x"}, ["POSTGRES_URL", "port"]),
        # no scheme, and a typo: both used to check another database without a word
        ({"POSTGRES_URL": "127.0.0.1:5432/x"}, ["POSTGRES_URL", "postgres://"]),
        ({"POSTGRES_URL": "postgresql:/127.0.0.1/x"}, ["POSTGRES_URL", "postgres://"]),
        ({"POSTGRES_URL": "postgres://app:s3cret@127.0.0.1:5432"}, ["names no database"]),
        ({"DATABASE_ACTIVE": "mysql"}, ["DATABASE_ACTIVE='mysql'", "sqlite or postgresql"]),
        ({"SLOW_QUERY_MS": "1s"}, ["SLOW_QUERY_MS='1s' is not a number", "milliseconds"]),
    ],
)
def test_a_settings_mistake_is_one_line_naming_the_variable_and_the_fix(env, names):
    result = manage_py("check", **env)
    assert result.returncode == 78, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr  # no traceback
    assert lines[0].startswith("Settings error: ")
    for name in names:
        assert name in lines[0]
    assert "s3cr" not in result.stderr
    assert result.stdout == ""


def test_a_good_postgres_url_still_passes(tmp_path):
    result = manage_py(
        "check", POSTGRES_URL="postgres://app:s3cr%2Fet@127.0.0.1:5432/x?sslmode=prefer"
    )
    assert result.returncode == 0, result.stderr
    assert "System check identified no issues" in result.stdout


@pytest.mark.parametrize("profile", ["prod", "staging"])
def test_check_deploy_is_clean_with_the_documented_production_variables(profile):
    result = manage_py(
        "check", "--deploy", "--fail-level", "WARNING", **{**PROD, "PROPCORE_ENV": profile}
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "System check identified no issues (0 silenced)." in result.stdout


def test_check_deploy_in_dev_still_warns():
    # dev is unchanged: plain HTTP, no HSTS (the warnings prove the check is really run)
    result = manage_py("check", "--deploy", PROPCORE_ENV="dev")
    assert result.returncode == 0, result.stderr
    for warning in ("security.W004", "security.W008", "security.W012", "security.W016"):
        assert warning in result.stderr


@pytest.mark.parametrize(
    "env",
    [
        {
            "POSTGRES_ALLOW_SSLMODE_REQUIRE": "true",
            "POSTGRES_URL": PROD_URL.replace("verify-full", "require"),
        },
        # a Unix socket never leaves the machine: libpq ignores sslmode there
        {"POSTGRES_OWNER_URL": "postgres://owner:s3cret@%2Frun%2Fpostgresql/propcore"},
        {"PGSSLMODE": "verify-full", "POSTGRES_URL": "postgres://app:s3cret@db.prop.internal/x"},
    ],
)
def test_accepted_postgres_tls_settings_in_prod(env):
    result = manage_py("check", **{**PROD, **env})
    assert result.returncode == 0, result.stderr


def test_dev_accepts_any_sslmode():
    result = manage_py(
        "check", POSTGRES_URL="postgres://app:s3cret@127.0.0.1:5432/x?sslmode=disable"
    )
    assert result.returncode == 0, result.stderr
