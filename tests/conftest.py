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
