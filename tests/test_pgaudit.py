"""pgaudit as deploy/postgresql-audit.conf documents it, on a private cluster that preloads it:
DDL, role changes and personal-data reads are logged; passwords, values and rows are not.
"""

from __future__ import annotations

import re
from io import StringIO
from pathlib import Path

import psycopg
import pytest
from django.core.management import call_command
from django.db import connections

from dbmigration.pgaudit import pgaudit_check
from dbmigration.preflight import conninfo_from_settings
from dbmigration.roles import role_names, sync_roles
from tests.clusters import PrivateCluster

pytestmark = pytest.mark.slow

CONF = Path(__file__).resolve().parent.parent / "deploy" / "postgresql-audit.conf"
NAMES = role_names()  # a private cluster: no suffix needed
APP_PASSWORD = "Horse-battery-9f2-app"


@pytest.fixture(scope="module")
def audited():
    """A cluster with the documented pgaudit settings, a small schema and db_roles applied."""
    with PrivateCluster("propcore_pgaudit_") as cluster:
        cluster.include(CONF)
        cluster.restart()
        cluster.sql("CREATE DATABASE propcore")
        cluster.sql(
            "CREATE TABLE accounts_user (id bigint PRIMARY KEY, email varchar(254), "
            "password varchar(128)); "
            "CREATE TABLE accounts_organisation (id bigint PRIMARY KEY, email varchar(254)); "
            "CREATE TABLE accounts_membership (id bigint PRIMARY KEY, role varchar(20))",
            database="propcore",
        )
        sync_roles(conninfo=cluster.admin_conninfo("propcore"), names=NAMES)
        yield cluster


class LogWatch:
    """The server log lines written since it was created."""

    def __init__(self, cluster: PrivateCluster):
        self.cluster, self.start = cluster, len(cluster.log_text())

    def text(self) -> str:
        return self.cluster.log_text()[self.start :]

    def audit_lines(self) -> list[str]:
        return [line for line in self.text().splitlines() if "AUDIT: " in line]


def _app(cluster: PrivateCluster) -> psycopg.Connection:
    return psycopg.connect(cluster.url(user=NAMES.app, database="propcore"), autocommit=True)


def test_ddl_is_audited(audited):
    watch = LogWatch(audited)
    audited.sql("CREATE TABLE audit_probe (id int); DROP TABLE audit_probe", database="propcore")
    lines = watch.audit_lines()
    assert any(",DDL,CREATE TABLE," in line and "audit_probe" in line for line in lines), lines
    assert any(",DDL,DROP TABLE," in line for line in lines), lines


def test_role_changes_are_audited_without_the_password(audited):
    watch = LogWatch(audited)
    # both ways a password reaches the server: in clear, and as db_roles sends it (a verifier)
    audited.sql(f"ALTER ROLE {NAMES.app} PASSWORD '{APP_PASSWORD}'")
    sync_roles(
        conninfo=audited.admin_conninfo("propcore"), names=NAMES, passwords={"app": APP_PASSWORD}
    )
    audited.sql(f"GRANT {NAMES.developer} TO {NAMES.admin}")
    audited.sql(f"REVOKE {NAMES.developer} FROM {NAMES.admin}")
    lines = watch.audit_lines()
    assert sum(",ROLE,ALTER ROLE," in line for line in lines) == 2, lines
    assert any(",ROLE,GRANT ROLE," in line for line in lines), lines
    assert any(",ROLE,REVOKE ROLE," in line for line in lines), lines
    assert "PASSWORD <REDACTED>" in watch.text()
    assert APP_PASSWORD not in watch.text() and "SCRAM-SHA-256$" not in watch.text()


def test_personal_data_reads_and_writes_are_audited_without_their_values(audited):
    watch = LogWatch(audited)
    with _app(audited) as conn:
        conn.execute("SELECT email FROM accounts_user WHERE email = %s", ["who@example.ie"])
        conn.execute("UPDATE accounts_organisation SET email = %s", ["org@example.ie"])
        conn.execute("SELECT role FROM accounts_membership")  # no personal data: not audited
    lines = watch.audit_lines()
    assert any(
        f"{NAMES.app}@propcore" in line
        and "OBJECT" in line
        and ",READ,SELECT,TABLE,public.accounts_user," in line
        for line in lines
    ), lines
    assert any(",WRITE,UPDATE,TABLE,public.accounts_organisation," in line for line in lines)
    assert not any("accounts_membership" in line for line in lines), lines
    assert "example.ie" not in watch.text()  # statements carry $1, never the values


def test_a_bulk_copy_is_one_audit_line_not_one_per_row(audited):
    watch = LogWatch(audited)
    with (
        _app(audited) as conn,
        conn.cursor().copy("COPY accounts_user (id, email) FROM STDIN") as copy,
    ):
        for n in range(1, 5001):
            copy.write_row((n, f"user{n}@example.ie"))
    lines = watch.audit_lines()
    assert len(lines) == 1, lines
    assert re.search(r',WRITE,INSERT,TABLE,public\.accounts_user,"COPY accounts_user', lines[0])
    assert "example.ie" not in watch.text()


def test_db_test_postgresql_reports_pgaudit_configured(audited):
    out = StringIO()
    call_command(
        "db_test_postgresql",
        "--url",
        audited.url(database="propcore"),
        "--pool-max",
        "5",
        stdout=out,
    )
    line = next(x for x in out.getvalue().splitlines() if "pgaudit" in x)
    assert line.strip().startswith("pgaudit: ok - pgaudit ddl, role"), out.getvalue()
    assert f"through role {NAMES.auditor}" in line


def test_a_table_the_auditor_cannot_see_is_a_warning(audited):
    conninfo = audited.admin_conninfo("propcore")
    audited.sql(f"REVOKE SELECT ON accounts_user FROM {NAMES.auditor}", database="propcore")
    try:
        check = pgaudit_check(conninfo=conninfo, auditor_role=NAMES.auditor)
        assert check.ok and check.warning
        assert f"{NAMES.auditor} lacks SELECT/INSERT/UPDATE/DELETE on accounts_user" in check.detail
        assert "run db_roles" in check.detail
        other = pgaudit_check(conninfo=conninfo, auditor_role="auditor_elsewhere")
        assert "pgaudit.role is 'auditor' (want 'auditor_elsewhere')" in other.detail
    finally:
        sync_roles(conninfo=conninfo, names=NAMES)  # db_roles puts the grant back
    assert not pgaudit_check(conninfo=conninfo, auditor_role=NAMES.auditor).warning


@pytest.mark.django_db(databases=["postgresql"])
def test_a_server_without_pgaudit_is_a_warning_not_a_failure():
    # the shared server does not preload pgaudit
    check = pgaudit_check(
        conninfo=conninfo_from_settings(connections["postgresql"].settings_dict),
        auditor_role=NAMES.auditor,
    )
    assert check.ok and check.warning
    assert check.line().startswith("pgaudit: warning - pgaudit is not loaded")
    assert "deploy/postgresql-audit.conf" in check.line()
