"""security_scan's database posture, on a private cluster (roles and settings are cluster-wide).

The cluster gets the test database's schema (pg_dump -s: tables, RLS, policies, functions)
and db_roles' five roles, SSL, pgaudit preloaded and a log collector: a well-kept server.
Each test plants one weakness, asserts its finding and severity, and takes it back.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from datetime import timedelta
from io import StringIO

import psycopg
import pytest
from django.core.management import CommandError, call_command
from django.db import connections
from django.utils import timezone

from dbmigration.roles import role_names, sync_roles
from propcore.pgserver import find_pg_bin
from security import conf
from security.models import SecurityFinding
from security.scan import db_posture
from tests.clusters import PrivateCluster

pytestmark = pytest.mark.django_db(databases=["default", "postgresql"], transaction=True)

PORT = 55141  # this helper's range: 55140-55149
ADMIN_PW, APP_PW, OWNER_PW = "admin-pw-scan", "app-pw-scan", "owner-pw-scan"
NAMES = role_names()


def conninfo(cluster: PrivateCluster, user="postgres", password=ADMIN_PW, **extra) -> dict:
    """Over TCP with a password, as a remote application or operator would connect."""
    return {"host": "127.0.0.1", "port": cluster.port, "user": user, "password": password,
            "dbname": "propcore", **extra}  # fmt: skip


@pytest.fixture(scope="module")
def cluster(django_db_setup, django_db_blocker):
    server = PrivateCluster(
        "propcore_posture_",
        conf={
            "shared_preload_libraries": "pgaudit",
            "logging_collector": True,  # so that pg_current_logfile() names the log
            "log_directory": "log",
            "log_filename": "postgresql.log",
            "log_timezone": "UTC",
        },
        hba=["host all all 127.0.0.1/32 scram-sha-256"],
        superuser_password=ADMIN_PW,
        port=PORT,
        tls=True,
    )
    with server:
        server.sql("CREATE DATABASE propcore ENCODING 'UTF8' TEMPLATE template0")
        # the migrated test database's schema, as the runbook's migrate would leave it
        with django_db_blocker.unblock():
            test_db = connections["postgresql"].settings_dict["NAME"]
        schema = subprocess.run(
            [find_pg_bin("pg_dump"), "-h", "127.0.0.1", "-U", "postgres", "-s", "--no-owner",
             "--no-privileges", test_db],
            check=True, capture_output=True, text=True,
        ).stdout  # fmt: skip
        subprocess.run(
            [find_pg_bin("psql"), "-q", "-v", "ON_ERROR_STOP=1", "-h", str(server.root), "-p",
             str(server.port), "-U", "postgres", "-d", "propcore"],
            input=schema, check=True, capture_output=True, text=True,
        )  # fmt: skip
        sync_roles(
            conninfo=server.admin_conninfo("propcore"),
            names=NAMES,
            passwords={"app": APP_PW, "owner": OWNER_PW},
            owner_login=True,
        )
        yield server


@contextlib.contextmanager
def admin(cluster):
    with psycopg.connect(**cluster.admin_conninfo("propcore"), autocommit=True) as conn:
        yield conn


@contextlib.contextmanager
def app_session(cluster, *, sslmode="require"):
    """The application connected, as it would be while the scan runs."""
    with psycopg.connect(**conninfo(cluster, NAMES.app, APP_PW), sslmode=sslmode) as conn:
        conn.execute("SELECT 1")
        yield conn


def posture(cluster, *, since, app_user=NAMES.app, **overrides):
    options = {**conf.DEFAULTS, "SSL_EXEMPT_LOOPBACK": False, **overrides}
    return db_posture.scan(
        conninfo=conninfo(cluster),
        app_user=app_user,
        names=NAMES,
        since=since,
        until=timezone.now() + timedelta(minutes=1),
        options=options,
    )


def kinds(result) -> list[tuple[str, str, str]]:
    return sorted((f.kind, f.severity, f.subject) for f in result.findings)


def test_a_well_kept_server_scans_clean(cluster):
    since = timezone.now() - timedelta(seconds=1)
    with app_session(cluster):  # over SSL, from 127.0.0.1, loopback not exempt
        result = posture(cluster, since=since)
    assert kinds(result) == []
    assert result.notes == []  # the log was found (pg_current_logfile) and read


PLANTS = {
    "no-force": (
        "ALTER TABLE accounts_loginevent NO FORCE ROW LEVEL SECURITY",
        "ALTER TABLE accounts_loginevent FORCE ROW LEVEL SECURITY",
        [("rls_weak", "critical", "accounts_loginevent")],
    ),
    "open-policy": (
        "CREATE POLICY scan_open ON accounts_kycverification USING (true)",
        "DROP POLICY scan_open ON accounts_kycverification",
        [("rls_weak", "critical", "accounts_kycverification")],
    ),
    "superuser": (
        "CREATE ROLE rogue_admin SUPERUSER LOGIN",
        "DROP ROLE rogue_admin",
        [("role_privileged", "critical", "rogue_admin")],
    ),
    "bypassrls": (
        "CREATE ROLE rogue_reader BYPASSRLS",
        "DROP ROLE rogue_reader",
        [("role_privileged", "critical", "rogue_reader")],
    ),
    "app-owns-a-table": (
        f'ALTER TABLE accounts_organisation OWNER TO "{NAMES.app}"',
        f'ALTER TABLE accounts_organisation OWNER TO "{NAMES.owner}"',
        [("app_as_owner", "critical", NAMES.app)],
    ),
}


@pytest.mark.parametrize("plant", list(PLANTS))
def test_each_planted_weakness_is_found(cluster, plant):
    break_sql, repair_sql, expected = PLANTS[plant]
    since = timezone.now() - timedelta(seconds=1)
    with admin(cluster) as conn:
        conn.execute(break_sql)
    try:
        assert kinds(posture(cluster, since=since)) == expected
    finally:
        with admin(cluster) as conn:
            conn.execute(repair_sql)
    assert kinds(posture(cluster, since=since)) == []


def test_the_app_logging_in_as_the_owner(cluster):
    found = posture(cluster, since=timezone.now(), app_user=NAMES.owner).findings
    assert [(f.kind, f.severity, f.subject) for f in found] == [
        ("app_as_owner", "critical", NAMES.owner)
    ]
    assert "has BYPASSRLS" in found[0].detail and f"is {NAMES.owner}" in found[0].detail


def test_a_documented_bypassrls_role_is_allowed(cluster):
    with admin(cluster) as conn:
        conn.execute("CREATE ROLE reporting_reader BYPASSRLS")
    try:
        allowed = [NAMES.owner, NAMES.developer, "reporting_reader"]
        assert kinds(posture(cluster, since=timezone.now(), ALLOWED_BYPASSRLS=allowed)) == []
    finally:
        with admin(cluster) as conn:
            conn.execute("DROP ROLE reporting_reader")


def test_connections_without_ssl(cluster):
    with app_session(cluster, sslmode="disable"), app_session(cluster):
        found = posture(cluster, since=timezone.now()).findings
        assert [(f.kind, f.severity, f.subject, f.count) for f in found] == [
            ("ssl_missing", "warning", NAMES.app, 1)
        ]
        assert found[0].evidence == {"addresses": ["127.0.0.1"]}
        # loopback is exempt by default: a local dev server is not a finding
        assert posture(cluster, since=timezone.now(), SSL_EXEMPT_LOOPBACK=True).findings == []


def test_failed_postgresql_logins_from_the_server_log(cluster):
    since = timezone.now() - timedelta(seconds=1)
    # sslmode=require: with libpq's default 'prefer' each refused attempt is logged twice
    # (it retries without SSL)
    for _ in range(6):
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(
                **conninfo(cluster, NAMES.app, "wrong-password", sslmode="require"),
                connect_timeout=3,
            )
    for _ in range(2):  # under the threshold
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(
                **conninfo(cluster, "nobody_here", "x", sslmode="require"), connect_timeout=3
            )
    time.sleep(0.5)  # the log collector writes asynchronously
    found = posture(cluster, since=since).findings
    assert [(f.kind, f.severity, f.subject, f.count) for f in found] == [
        ("pg_auth_failures", "warning", NAMES.app, 6)
    ]
    assert posture(cluster, since=since, PG_AUTH_FAILURES=2).findings[-1].subject == "nobody_here"
    # an unreadable log is an info line, not a finding
    result = posture(cluster, since=since, POSTGRES_LOG="/nonexistent/postgresql.log")
    assert result.findings == []
    assert result.notes == ["server log not read: /nonexistent/postgresql.log is not readable "
                            "by this process"]  # fmt: skip


def test_the_command_records_posture_findings(cluster, settings):
    settings.POSTGRES_ADMIN_URL = cluster.url(password=ADMIN_PW, database="propcore")
    settings.POSTGRES_URL = cluster.url(user=NAMES.owner, password=OWNER_PW, database="propcore")
    out = StringIO()
    with pytest.raises(CommandError) as exc:
        call_command("security_scan", "--database", "postgresql", "--since", "1h", stdout=out)
    assert exc.value.returncode == 2
    assert f"[critical] Application connects as an owner or superuser: {NAMES.owner}" in (
        out.getvalue()
    )
    # the failed logins of the test before are within the hour too
    assert f"[warning] Failed PostgreSQL authentications: {NAMES.app}" in out.getvalue()
    assert "recorded: 2 new, 0 updated, 0 reopened" in out.getvalue()
    assert SecurityFinding.objects.using("postgresql").filter(kind="app_as_owner").count() == 1


def test_pgaudit_not_loaded(cluster):
    cluster.configure(shared_preload_libraries="")
    cluster.restart()
    try:
        found = posture(cluster, since=timezone.now()).findings
        assert [(f.kind, f.severity) for f in found] == [("pgaudit_off", "warning")]
        assert found[0].subject == f"127.0.0.1:{cluster.port}"
    finally:
        cluster.configure(shared_preload_libraries="pgaudit")
        cluster.restart()
    assert posture(cluster, since=timezone.now()).findings == []
