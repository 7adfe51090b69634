"""Shared fixtures.  Tests run against the real PostgreSQL server and real SQLite files."""

import os
from pathlib import Path

import psycopg
import pytest
from django.conf import settings
from django.db import connections


def pytest_sessionstart(session):
    """Remove the -wal/-shm a killed run left beside the SQLite test file.

    Django re-creates the test file by deleting only the file itself; in WAL mode SQLite then
    finds the old run's -wal beside the new file and answers "disk I/O error" to every test.
    """
    name = Path(settings.DATABASES["sqlite"]["TEST"]["NAME"])
    for suffix in ("-wal", "-shm"):
        Path(f"{name}{suffix}").unlink(missing_ok=True)


@pytest.fixture
def pg():
    """The PostgreSQL test connection (fails, never skips, when the server is missing)."""
    return connections["postgresql"]


@pytest.fixture
def lite():
    """The SQLite test connection (a real file)."""
    return connections["sqlite"]


@pytest.fixture
def empty_postgres_database():
    """The postgresql alias pointed at an empty database, as after a drop and re-create."""
    name = f"propcore_empty_{os.getpid()}"
    admin = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')
    connection = connections["postgresql"]
    connection.close()  # its connection and pool still point at the test database
    connection.close_pool()
    saved = connection.settings_dict["NAME"]
    connection.settings_dict["NAME"] = name
    yield name
    connection.close()
    connection.close_pool()
    connection.settings_dict["NAME"] = saved
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def postgres_down():
    """Point the postgresql alias at a port nobody listens on, then put it back."""
    connection = connections["postgresql"]
    connection.close_pool()
    cfg = connection.settings_dict  # the same dict as connections.settings["postgresql"]
    saved = cfg["PORT"], cfg["OPTIONS"]["pool"]
    cfg["PORT"] = 1
    cfg["OPTIONS"]["pool"] = {**saved[1], "timeout": 1.0}
    yield
    connection.close_pool()
    cfg["PORT"], cfg["OPTIONS"]["pool"] = saved


@pytest.fixture(autouse=True)
def _lift_write_fences(request):
    """A switch leaves the SQLite test file fenced and a rollback the PostgreSQL test database:
    lift both after each database test, before pytest-django flushes them for the next one."""
    # read before the test: some tests point the aliases elsewhere for a while
    sqlite_cfg, pg_cfg = (
        dict(connections.settings["sqlite"]),
        dict(connections.settings["postgresql"]),
    )
    yield
    if request.node.get_closest_marker("django_db") is None:
        return
    import psycopg

    from dbmigration import fence

    fence.lift_sqlite_fence(sqlite_cfg["NAME"])
    params = {"dbname": pg_cfg["NAME"], "host": pg_cfg["HOST"], "user": pg_cfg["USER"]}
    with psycopg.connect(**params, port=pg_cfg["PORT"] or 5432, autocommit=True) as conn:
        conn.execute(f"DROP FUNCTION IF EXISTS {fence.PG_FUNCTION}() CASCADE")


@pytest.fixture(autouse=True)
def _forget_slow_queries():
    """The slow-query record is per process: one test's slow queries (or a loaded machine's)
    must not make the next test's health check degraded."""
    from propcore.query_timing import RECENT_SLOW_QUERIES

    RECENT_SLOW_QUERIES.clear()
    yield
