"""db_roles, security_check and the app-role report, against real roles on the real server."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.test import override_settings

from dbmigration.roles import role_names, sync_roles
from dbmigration.security import app_role_check, check_security
from tests import rls_fixtures
from tests.rls_fixtures import connect_as, run_suffix, superuser_conninfo

roles = rls_fixtures.roles  # the module's roles, dropped at its end

pytestmark = pytest.mark.django_db(databases=["postgresql"], transaction=True)

ROOT = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def as_superuser():
    with psycopg.connect(**superuser_conninfo(), autocommit=True) as conn:
        yield conn


def run_db_roles(names, *args) -> str:
    out = io.StringIO()
    with override_settings(DB_ROLE_SUFFIX=names.app.removeprefix("app_service")):
        call_command("db_roles", *args, stdout=out)
    return out.getvalue()


def test_a_second_run_finds_nothing_to_change(roles):
    result = sync_roles(conninfo=superuser_conninfo(), names=roles, apply=False)
    assert result.changes == []
    assert "nothing to change" in run_db_roles(roles, "--no-password")
    assert "nothing to change" in run_db_roles(roles, "--check")


def test_plan_prints_the_sql_and_creates_nothing(roles):
    names = role_names(suffix=run_suffix("plan"))
    out = run_db_roles(names, "--plan")
    assert f'CREATE ROLE "{names.app}" LOGIN NOBYPASSRLS' in out
    assert f'GRANT DELETE, INSERT, SELECT, UPDATE ON TABLE "accounts_user" TO "{names.app}"' in out
    assert "TRUNCATE" not in out
    with as_superuser() as conn:
        assert not conn.execute(
            "SELECT 1 FROM pg_roles WHERE rolname = ANY(%s)", [names.all()]
        ).fetchall()


@pytest.mark.parametrize(
    "breakage, reported",
    [
        (
            'GRANT TRUNCATE ON accounts_user TO "{app}"',
            "{app} has extra TRUNCATE on accounts_user",
        ),
        (
            'REVOKE INSERT ON accounts_kycverification FROM "{app}"',
            "{app} lacks INSERT on accounts_kycverification",
        ),
        ('ALTER ROLE "{app}" BYPASSRLS', "role {app} has bypassrls=True (want False)"),
        ('ALTER ROLE "{analytics}" SUPERUSER', "role {analytics} has superuser=True (want False)"),
        (
            'ALTER TABLE accounts_loginevent OWNER TO "{app}"',
            "accounts_loginevent is owned by {app}, not {owner}",
        ),
        (
            'GRANT SELECT (email) ON accounts_user TO "{developer}"',
            "{developer} has extra SELECT on accounts_user.email",
        ),
    ],
    ids=["extra-grant", "missing-grant", "bypassrls", "superuser", "app-owns", "developer-email"],
)
def test_check_reports_drift_and_a_run_repairs_it(roles, breakage, reported):
    fill = {
        "app": roles.app,
        "owner": roles.owner,
        "developer": roles.developer,
        "analytics": roles.analytics,
    }
    with as_superuser() as conn:
        conn.execute(breakage.format(**fill))
    out = io.StringIO()
    suffix = roles.app.removeprefix("app_service")
    with pytest.raises(CommandError) as exc, override_settings(DB_ROLE_SUFFIX=suffix):
        call_command("db_roles", "--check", stdout=out)
    assert exc.value.returncode == 1
    assert reported.format(**fill) in out.getvalue()
    assert "changed" in run_db_roles(roles, "--no-password")
    assert sync_roles(conninfo=superuser_conninfo(), names=roles, apply=False).changes == []


def test_passwords_come_from_the_environment_and_never_show(roles, monkeypatch):
    secret = "s3cret-Never-Printed"
    for kind in ("app", "admin", "developer", "analytics"):
        monkeypatch.setenv(f"PROPCORE_{kind.upper()}_DB_PASSWORD", secret + kind)
    out = run_db_roles(roles)
    plan = run_db_roles(roles, "--plan")
    assert secret not in out and secret not in plan
    assert f"role {roles.app}: set its password" in out
    with as_superuser() as conn:
        stored = conn.execute(
            "SELECT rolpassword FROM pg_authid WHERE rolname = %s", [roles.app]
        ).fetchone()[0]
    assert stored.startswith("SCRAM-SHA-256$") and secret not in stored


def test_without_a_password_or_a_terminal_it_refuses(roles, monkeypatch):
    for kind in ("app", "admin", "developer", "analytics"):
        monkeypatch.delenv(f"PROPCORE_{kind.upper()}_DB_PASSWORD", raising=False)
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    with pytest.raises(CommandError, match="PROPCORE_APP_DB_PASSWORD or pass --no-password"):
        run_db_roles(roles)


@pytest.mark.parametrize(
    "statement",
    [
        "CREATE TABLE intruder (id int)",
        "ALTER TABLE accounts_user ADD COLUMN intruder int",
        "DROP TABLE accounts_loginevent",
        "TRUNCATE accounts_user",
        "CREATE INDEX intruder ON accounts_user (phone)",
        "DELETE FROM django_migrations",
    ],
)
def test_app_service_cannot_change_the_schema(roles, statement):
    with connect_as(roles.app) as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute(statement)


def test_developer_reads_no_personal_column(roles):
    with connect_as(roles.developer) as conn:
        conn.execute("SELECT id, status, role, kyc_status, created_at FROM accounts_user")
        conn.execute("SELECT id, user_id, status, document_type FROM accounts_kycverification")
    for column in ("email", "phone", "first_name", "password"):
        with (
            connect_as(roles.developer) as conn,
            pytest.raises(psycopg.errors.InsufficientPrivilege),
        ):
            conn.execute(f"SELECT {column} FROM accounts_user")
    for statement in (
        "SELECT document_reference FROM accounts_kycverification",
        "SELECT ip_address FROM accounts_loginevent",
        "SELECT * FROM accounts_user",
        "UPDATE accounts_user SET status = 'closed'",
    ):
        with (
            connect_as(roles.developer) as conn,
            pytest.raises(psycopg.errors.InsufficientPrivilege),
        ):
            conn.execute(statement)


def test_analytics_reads_the_aggregates_and_no_person(roles):
    with connect_as(roles.analytics) as conn:
        conn.execute("SELECT day, metric, total FROM accounts_daily_analytics").fetchall()
    for table in ("accounts_user", "accounts_kycverification", "accounts_loginevent"):
        with (
            connect_as(roles.analytics) as conn,
            pytest.raises(psycopg.errors.InsufficientPrivilege),
        ):
            conn.execute(f"SELECT id FROM {table}")


# --- security_check ---------------------------------------------------------------------------


def test_security_check_passes_on_the_migrated_schema(roles):
    report = check_security(conninfo=superuser_conninfo(), app_role=roles.app)
    assert report.findings == []
    assert {"accounts_user", "accounts_kycverification", "accounts_loginevent",
            "accounts_membership", "auditlog_logentry"} <= set(report.protected)  # fmt: skip
    out = io.StringIO()
    call_command("security_check", "--app-role", roles.app, stdout=out)
    assert "Row-level security is in force." in out.getvalue()


@pytest.mark.parametrize(
    "breakage, repair, kind, relation",
    [
        (
            "ALTER TABLE accounts_loginevent NO FORCE ROW LEVEL SECURITY",
            "ALTER TABLE accounts_loginevent FORCE ROW LEVEL SECURITY",
            "rls_missing",
            "accounts_loginevent",
        ),
        (
            "CREATE POLICY open_door ON accounts_kycverification FOR SELECT USING (true)",
            "DROP POLICY open_door ON accounts_kycverification",
            "policy_open",
            "accounts_kycverification",
        ),
        (
            "CREATE POLICY fail_open ON accounts_user FOR SELECT "
            "USING (email = current_setting('app.user_id', true))",
            "DROP POLICY fail_open ON accounts_user",
            "policy_open",
            "accounts_user",
        ),
        (
            "CREATE VIEW user_emails AS SELECT id, email FROM accounts_user",
            "DROP VIEW user_emails",
            "view_definer",
            "user_emails",
        ),
        (
            'ALTER TABLE accounts_organisation OWNER TO "{app}"',
            'ALTER TABLE accounts_organisation OWNER TO "{owner}"',
            "app_role",
            "accounts_organisation",
        ),
        (
            "CREATE TABLE notes (id int, author_id uuid REFERENCES accounts_user (id))",
            "DROP TABLE notes",
            "rls_missing",
            "notes",
        ),
    ],
    ids=["no-force", "always-true", "no-nullif", "definer-view", "app-owns", "new-table"],
)
def test_security_check_fails_on_each_weakness(roles, breakage, repair, kind, relation):
    fill = {"app": roles.app, "owner": roles.owner}
    with as_superuser() as conn:
        conn.execute(breakage.format(**fill))
        try:
            report = check_security(conninfo=superuser_conninfo(), app_role=roles.app)
            assert (kind, relation) in {(f.kind, f.relation) for f in report.findings}
            with pytest.raises(CommandError) as exc:
                call_command("security_check", "--app-role", roles.app, stdout=io.StringIO())
            assert exc.value.returncode == 1
        finally:
            conn.execute(repair.format(**fill))


def test_a_security_invoker_view_passes(roles):
    with as_superuser() as conn:
        conn.execute(
            "CREATE VIEW user_statuses WITH (security_invoker = true) AS "
            "SELECT id, status FROM accounts_user"
        )
        try:
            assert check_security(conninfo=superuser_conninfo(), app_role=roles.app).ok
        finally:
            conn.execute("DROP VIEW user_statuses")


def test_a_new_user_table_needs_an_index_on_its_user_column(roles):
    with as_superuser() as conn:
        conn.execute(
            "CREATE TABLE notes (id int, author_id uuid REFERENCES accounts_user (id)); "
            "ALTER TABLE notes ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY; "
            "CREATE POLICY notes_self ON notes USING "
            "(author_id = nullif(current_setting('app.user_id', true), '')::uuid)"
        )
        try:
            report = check_security(conninfo=superuser_conninfo(), app_role=roles.app)
            assert [(f.kind, f.relation) for f in report.findings] == [("index_missing", "notes")]
            conn.execute("CREATE INDEX notes_author ON notes (author_id)")
            assert check_security(conninfo=superuser_conninfo(), app_role=roles.app).ok
        finally:
            conn.execute("DROP TABLE notes")


# --- which role the application uses -----------------------------------------------------------


def test_app_role_check_fails_in_prod_for_a_superuser_or_owner(roles):
    superuser = app_role_check(conninfo=superuser_conninfo(), strict=True)
    assert not superuser.ok and "superuser" in superuser.detail
    assert app_role_check(conninfo=superuser_conninfo(), strict=False).ok  # dev: a warning
    owner = app_role_check(conninfo={**superuser_conninfo(), "user": roles.owner}, strict=True)
    assert not owner.ok and "owner of" in owner.detail
    app = app_role_check(conninfo={**superuser_conninfo(), "user": roles.app}, strict=True)
    assert app.ok and not app.warning and roles.app in app.detail


def test_runbook_commands_connect_with_the_owner_url():
    code = (
        "import sys, django; sys.argv = ['manage.py', sys.argv[1]]; django.setup(); "
        "from django.conf import settings; print(settings.DATABASES['postgresql']['USER'])"
    )
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "propcore.settings",
        "POSTGRES_URL": "postgres://app_service@127.0.0.1:5432/propcore",
        "POSTGRES_OWNER_URL": "postgres://propcore_owner@127.0.0.1:5432/propcore",
    }

    def user_for(command):
        return subprocess.run(
            [sys.executable, "-c", code, command],
            env=env, cwd=ROOT, capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip

    assert user_for("migrate") == "propcore_owner"
    assert user_for("migrate_data") == "propcore_owner"
    assert user_for("runserver") == "app_service"
    assert user_for("db_test_postgresql") == "app_service"


def test_db_test_postgresql_reports_the_app_role_and_fails_in_prod_for_a_superuser(settings):
    from propcore.profiles import get_profile

    out = io.StringIO()
    call_command("db_test_postgresql", stdout=out)
    user = superuser_conninfo()["user"]
    assert f"app_role: warning - the application connects as {user} (superuser" in out.getvalue()
    settings.PROFILE = get_profile("prod")
    out = io.StringIO()
    with pytest.raises(CommandError, match="app_role") as exc:
        call_command("db_test_postgresql", "--pool-max", "10", stdout=out)
    assert exc.value.returncode == 3
    assert "Fix: connect POSTGRES_URL as app_service" in out.getvalue()


def test_db_roles_without_a_superuser_says_what_to_do(roles):
    from dbmigration.errors import RolesError

    names = role_names(suffix=run_suffix("refused"))
    with pytest.raises(RolesError, match="run it as a superuser \\(POSTGRES_ADMIN_URL\\)") as exc:
        sync_roles(conninfo={**superuser_conninfo(), "user": roles.app}, names=names)
    assert exc.value.returncode == 3
    with as_superuser() as conn:
        assert not conn.execute(
            "SELECT 1 FROM pg_roles WHERE rolname = ANY(%s)", [names.all()]
        ).fetchall()
