"""Real roles in the test database, for tests/test_roles.py and tests/test_rls.py.

Roles are cluster-wide and other checkouts test on the same server at the same time, so
every run names its roles with its own suffix (test suffix + process id) and drops them
(after giving what they own back to the test's superuser) when the module ends.
"""

from __future__ import annotations

import os

import psycopg
import pytest
from django.db import connections

from dbmigration.preflight import conninfo_from_settings
from dbmigration.roles import drop_roles, role_names, sync_roles


def run_suffix(tag: str = "") -> str:
    from django.conf import settings

    return f"{settings.TEST_SUFFIX}_{tag}{os.getpid()}".lower()


def superuser_conninfo() -> dict:
    """The test database, as the superuser the tests run as."""
    return conninfo_from_settings(connections["postgresql"].settings_dict)


def connect_as(role: str, **kwargs) -> psycopg.Connection:
    return psycopg.connect(**{**superuser_conninfo(), "user": role, "password": None}, **kwargs)


@pytest.fixture(scope="module")
def roles(django_db_setup, django_db_blocker):
    """The five roles, owning and granted on the migrated test database."""
    with django_db_blocker.unblock():
        conninfo = superuser_conninfo()
        superuser = conninfo.get("user") or "postgres"
        names = role_names(suffix=run_suffix())
        # trust authentication here: no passwords; the owner logs in, as the runbook does
        sync_roles(conninfo=conninfo, names=names, owner_login=True)
        # pooled Django connections opened before the owner changed keep nothing stale
        connections["postgresql"].close()
        try:
            yield names
        finally:
            connections["postgresql"].close()
            drop_roles(conninfo=conninfo, names=names, new_owner=superuser)
