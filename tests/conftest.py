"""Shared fixtures.  Tests run against the real PostgreSQL server and real SQLite files."""

import pytest
from django.db import connections


@pytest.fixture
def pg():
    """The PostgreSQL test connection (fails, never skips, when the server is missing)."""
    return connections["postgresql"]


@pytest.fixture
def lite():
    """The SQLite test connection (a real file)."""
    return connections["sqlite"]


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
