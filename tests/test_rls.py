"""Row-level security: real roles, real policies, the API and raw SQL as app_service.

The test suite itself connects as the superuser ``postgres``, which bypasses every policy;
so everything here that proves isolation connects as the run's own app_service (or owner)
role, made by tests/rls_fixtures.py.
"""

from __future__ import annotations

import copy

import psycopg
import pytest
from django.db import DEFAULT_DB_ALIAS, ProgrammingError, connections
from django.db.backends.postgresql.base import DatabaseWrapper
from django.test import Client
from django.urls import path
from psycopg_pool import ConnectionPool

from accounts.models import KycVerification, LoginEvent, Membership, Organisation, User
from dbmigration.roles import sync_roles
from propcore.middleware import _close_default_pool
from propcore.rls import db_identity
from tests import rls_fixtures
from tests import test_cutover as cutover_tests
from tests.rls_fixtures import connect_as, superuser_conninfo

pytestmark = pytest.mark.django_db(databases=["default", "postgresql", "sqlite"], transaction=True)

roles = rls_fixtures.roles  # the module's roles, dropped at its end
restore_default = cutover_tests.restore_default

PASSWORD = "correct horse battery"
PROTECTED = [
    "accounts_user",
    "accounts_kycverification",
    "accounts_loginevent",
    "accounts_membership",
    "auditlog_logentry",
]


@pytest.fixture
def people(roles):
    """Two users in one firm, an outsider and a staff user, each with KYC checks and logins."""
    users = User.objects.db_manager("postgresql")
    firm = Organisation.objects.using("postgresql").create(
        name="Ó Briain Estates", kind="estate_agent"
    )
    other_firm = Organisation.objects.using("postgresql").create(name="Other", kind="solicitor")
    made = {}
    for key, org in (("a", firm), ("b", firm), ("c", other_firm)):
        user = users.create_user(f"{key}@example.ie", PASSWORD, phone=f"+35387000000{ord(key)}")
        Membership.objects.using("postgresql").create(user=user, organisation=org)
        for number in range(2):
            KycVerification.objects.using("postgresql").create(
                user=user, document_type="passport", document_reference=f"{key}-{number}"
            )
        for success in (True, False):
            LoginEvent.objects.using("postgresql").create(
                user=user, email_attempted=user.email, success=success
            )
        made[key] = user
    made["staff"] = users.create_user("staff@prop.ie", PASSWORD, is_staff=True, is_superuser=True)
    LoginEvent.objects.using("postgresql").create(email_attempted="nobody@x.ie", success=False)
    return made


def ids(conn, sql, params=()):
    return {row[0] for row in conn.execute(sql, params)}


def as_user(conn, user_id, role=""):
    conn.execute(
        "SELECT set_config('app.user_id', %s, true), set_config('app.role', %s, true)",
        [str(user_id) if user_id else "", role],
    )


# --- raw SQL as app_service -----------------------------------------------------------------------


def test_without_an_identity_app_service_sees_no_row(roles, people):
    with connect_as(roles.app) as conn:
        for table in PROTECTED:
            assert conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0] == 0, table
        # organisations are not a person's data
        assert conn.execute("SELECT count(*) FROM accounts_organisation").fetchone()[0] == 2
    with psycopg.connect(**superuser_conninfo()) as conn:
        assert conn.execute("SELECT count(*) FROM accounts_user").fetchone()[0] == 4


def test_a_user_sees_only_their_own_rows(roles, people):
    a, b, c = people["a"], people["b"], people["c"]
    with connect_as(roles.app) as conn, conn.transaction():
        as_user(conn, a.pk)
        assert ids(conn, "SELECT id FROM accounts_user") == {a.pk}
        assert ids(conn, "SELECT user_id FROM accounts_kycverification") == {a.pk}
        assert conn.execute("SELECT count(*) FROM accounts_kycverification").fetchone()[0] == 2
        assert ids(conn, "SELECT user_id FROM accounts_loginevent") == {a.pk}
        # colleagues' memberships are visible, the other firm's are not
        assert ids(conn, "SELECT user_id FROM accounts_membership") == {a.pk, b.pk}
        assert c.pk not in ids(conn, "SELECT user_id FROM accounts_membership")
        # an unprotected join cannot reach another user's row either
        assert ids(
            conn,
            "SELECT u.email FROM accounts_organisation o "
            "JOIN accounts_user u ON u.organisation_id = o.id OR true",
        ) == {a.email}


def test_writes_to_another_users_rows_are_refused(roles, people):
    a, b = people["a"], people["b"]
    with connect_as(roles.app) as conn:
        with conn.transaction():
            as_user(conn, a.pk)
            cur = conn.execute("UPDATE accounts_user SET first_name = 'x' WHERE id = %s", [b.pk])
            assert cur.rowcount == 0
            cur = conn.execute("DELETE FROM accounts_kycverification WHERE user_id = %s", [b.pk])
            assert cur.rowcount == 0
            cur = conn.execute("UPDATE accounts_user SET first_name = 'me' WHERE id = %s", [a.pk])
            assert cur.rowcount == 1
        for statement, params in (
            (
                "INSERT INTO accounts_kycverification (id, user_id, document_type, "
                "document_reference, document_country, status, notes, created_at, updated_at) "
                "VALUES (gen_random_uuid(), %s, 'passport', 'x', 'IE', 'pending', '', now(), "
                "now())",
                [b.pk],
            ),
            ("UPDATE accounts_kycverification SET user_id = %s", [b.pk]),  # hand my rows over
        ):
            refused = pytest.raises(psycopg.errors.InsufficientPrivilege, match="row-level")
            with refused, conn.transaction():
                as_user(conn, a.pk)
                conn.execute(statement, params)
    assert User.objects.using("postgresql").get(pk=b.pk).first_name == ""
    assert KycVerification.objects.using("postgresql").filter(user=b).count() == 2


def test_a_bad_identity_fails_closed(roles, people):
    with connect_as(roles.app) as conn:
        with conn.transaction():
            as_user(conn, "")  # set, but empty: nullif makes it NULL
            assert conn.execute("SELECT count(*) FROM accounts_user").fetchone()[0] == 0
        with pytest.raises(psycopg.errors.InvalidTextRepresentation), conn.transaction():
            as_user(conn, "' OR true --")
            conn.execute("SELECT count(*) FROM accounts_user")


def test_staff_role_sees_what_the_admin_needs(roles, people):
    with connect_as(roles.app) as conn, conn.transaction():
        as_user(conn, people["staff"].pk, role="staff")
        assert conn.execute("SELECT count(*) FROM accounts_user").fetchone()[0] == 4
        assert conn.execute("SELECT count(*) FROM accounts_loginevent").fetchone()[0] == 7


@pytest.mark.parametrize(
    "table",
    [
        "accounts_user",
        "accounts_kycverification",
        "accounts_loginevent",
        "accounts_membership",
        "auditlog_logentry",
    ],
)
def test_a_query_without_where_finds_the_users_rows_through_an_index(roles, people, table):
    """The policy is the query's only filter (the API's plain querysets): it must use an index.

    With "user_id = me OR staff" PostgreSQL could only scan the whole table.
    """
    with connect_as(roles.app) as conn, conn.transaction():
        as_user(conn, people["a"].pk)
        conn.execute("SET LOCAL enable_seqscan = off")  # tiny tables: make the choice visible
        plan = "\n".join(row[0] for row in conn.execute(f"EXPLAIN SELECT * FROM {table}"))
    assert "Seq Scan" not in plan, plan
    assert "Index" in plan, plan


def test_identity_does_not_outlive_its_transaction_on_a_pool_of_one(roles, people):
    """The leak of django-rls PR #69: one pooled connection, user A, then B, then nobody."""
    a, b = people["a"], people["b"]
    info = {**superuser_conninfo(), "user": roles.app}
    info.pop("password", None)
    conninfo = psycopg.conninfo.make_conninfo(**info)
    with ConnectionPool(conninfo, min_size=1, max_size=1, open=True) as pool:
        seen = []
        for user in (a, b, None):
            with pool.connection() as conn, conn.transaction():
                if user:
                    as_user(conn, user.pk)
                pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
                seen.append((pid, ids(conn, "SELECT id FROM accounts_user")))
        with pool.connection() as conn:
            assert conn.execute("SELECT current_setting('app.user_id', true)").fetchone()[0] == ""
    assert len({pid for pid, _ in seen}) == 1  # really the same server session
    assert [users for _, users in seen] == [{a.pk}, {b.pk}, set()]


def test_the_owner_is_bound_by_force_and_sees_all_through_bypassrls(roles, people):
    """The runbook connects as the (non-superuser) owner: FORCE binds it, BYPASSRLS frees it."""
    with connect_as(roles.owner) as conn:
        assert conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()
        assert conn.execute("SELECT count(*) FROM accounts_user").fetchone()[0] == 4
    with psycopg.connect(**superuser_conninfo(), autocommit=True) as su:
        su.execute(f'ALTER ROLE "{roles.owner}" NOBYPASSRLS')
    try:
        with connect_as(roles.owner) as conn:
            assert conn.execute("SELECT count(*) FROM accounts_user").fetchone()[0] == 0
    finally:
        sync_roles(conninfo=superuser_conninfo(), names=roles)
    with connect_as(roles.owner) as conn:
        assert conn.execute("SELECT count(*) FROM accounts_kycverification").fetchone()[0] == 6


def test_a_deploy_login_granted_the_owner_role_runs_as_the_owner(roles, people):
    """NOLOGIN owner: the deploy login is granted it and sets it with libpq's options."""
    deploy = f"deploy{rls_fixtures.run_suffix()}"
    with psycopg.connect(**superuser_conninfo(), autocommit=True) as su:
        su.execute(f'CREATE ROLE "{deploy}" LOGIN NOINHERIT')
        su.execute(f'GRANT "{roles.owner}" TO "{deploy}"')
    try:
        denied = pytest.raises(psycopg.errors.InsufficientPrivilege)
        with connect_as(deploy) as conn, denied:  # without the role: nothing of its own
            conn.execute("SELECT count(*) FROM accounts_user")
        with connect_as(deploy, options=f"-c role={roles.owner}") as conn:
            assert conn.execute("SELECT current_user").fetchone()[0] == roles.owner
            assert conn.execute("SELECT count(*) FROM accounts_user").fetchone()[0] == 4
    finally:
        with psycopg.connect(**superuser_conninfo(), autocommit=True) as su:
            su.execute(f'DROP ROLE "{deploy}"')


# --- Django as app_service: db_identity, the middleware, the API, the login --------------


@pytest.fixture
def app_default(roles):
    """``default`` connects as app_service with a pool of one connection, as in production."""
    base = copy.deepcopy(connections["postgresql"].settings_dict)
    base.update(USER=roles.app, PASSWORD="")
    base["OPTIONS"]["pool"] = {"min_size": 1, "max_size": 1, "timeout": 5}
    original = connections[DEFAULT_DB_ALIAS]
    saved_pool = DatabaseWrapper._connection_pools.pop(DEFAULT_DB_ALIAS, None)
    wrapper = DatabaseWrapper(base, alias=DEFAULT_DB_ALIAS)
    connections[DEFAULT_DB_ALIAS] = wrapper
    try:
        yield wrapper
    finally:
        wrapper.close()
        wrapper.close_pool()
        connections[DEFAULT_DB_ALIAS] = original
        if saved_pool is not None:
            DatabaseWrapper._connection_pools[DEFAULT_DB_ALIAS] = saved_pool


def test_db_identity_for_jobs(app_default, people):
    a = people["a"]
    assert KycVerification.objects.count() == 0
    with db_identity(user_id=a.pk):
        assert set(KycVerification.objects.values_list("user_id", flat=True)) == {a.pk}
        assert KycVerification.objects.exclude(user=a).update(notes="x") == 0
    assert KycVerification.objects.count() == 0  # gone with its transaction
    with db_identity(user_id=people["staff"].pk, role="staff"):
        assert KycVerification.objects.count() == 6


def test_a_job_writing_rows_of_nobody_says_it_is_the_system(app_default, people):
    """Audit entries without an actor and unknown logins belong to no user: role 'system'."""
    a = people["a"]

    def check():
        KycVerification.objects.create(user=a, document_type="passport", document_reference="J")

    with pytest.raises(ProgrammingError, match="row-level security"), db_identity(user_id=a.pk):
        check()  # its audit entry, actor-less, could not be read back (INSERT ... RETURNING)
    with db_identity(user_id=a.pk, role="system"):
        check()
        LoginEvent.objects.create(email_attempted="who@x.ie", success=False)
        assert LoginEvent.objects.filter(user__isnull=True).count() == 2
    with db_identity(user_id=a.pk):
        assert not LoginEvent.objects.filter(user__isnull=True).exists()
    assert KycVerification.objects.using("postgresql").filter(user=a).count() == 3


def logged_in(user) -> Client:
    client = Client()
    # login() saves last_login (through the database the user came from): a row of their own
    with db_identity(user_id=user.pk, using=user._state.db or DEFAULT_DB_ALIAS):
        client.force_login(user)
    return client


def test_the_api_shows_each_user_only_their_own_rows(app_default, people):
    a, b = people["a"], people["b"]
    expected = {
        user: {
            "kyc": {
                str(k.pk) for k in KycVerification.objects.using("postgresql").filter(user=user)
            },
            "logins": set(
                LoginEvent.objects.using("postgresql")
                .filter(user=user)
                .values_list("pk", flat=True)
            ),
        }
        for user in (a, b)
    }
    pids = []
    for user in (a, b, a):
        client = logged_in(user)
        me = client.get("/api/me/").json()
        assert [u["id"] for u in me["user"]] == [str(user.pk)]
        assert me["user"][0]["email"] == user.email and "password" not in me["user"][0]
        kyc = client.get("/api/me/kyc/").json()["kyc"]
        assert {k["id"] for k in kyc} == expected[user]["kyc"]
        logins = client.get("/api/me/logins/").json()["logins"]
        assert {e["id"] for e in logins} == expected[user]["logins"]
        export = client.get("/api/me/export/").json()
        assert {k["user_id"] for k in export["kyc"]} == {str(user.pk)}
        assert [m["user_id"] for m in export["memberships"]] == [str(user.pk)]
        assert {e["actor_id"] for e in export["audit_entries"]} <= {str(user.pk)}
        # after the request the pooled connection carries no identity
        with app_default.cursor() as cursor:
            cursor.execute("SELECT current_setting('app.user_id', true), pg_backend_pid()")
            setting, pid = cursor.fetchone()
        assert setting == ""
        pids.append(pid)
        app_default.close()  # back to the pool of one
    assert len(set(pids)) == 1


def test_the_api_drops_the_staff_role(app_default, people):
    staff = people["staff"]
    client = logged_in(staff)
    assert [u["id"] for u in client.get("/api/me/").json()["user"]] == [str(staff.pk)]
    assert client.get("/api/me/kyc/").json()["kyc"] == []


def test_the_api_needs_a_session(app_default, people):
    response = Client().get("/api/me/kyc/")
    assert response.status_code == 401
    assert response.json() == {"error": "Sign in first."}
    assert logged_in(people["a"]).post("/api/me/").status_code == 405


def test_staff_see_every_user_in_the_admin(app_default, people):
    response = logged_in(people["staff"]).get("/admin/accounts/user/")
    assert response.status_code == 200
    for key in ("a", "b", "c"):
        assert people[key].email in response.content.decode()


def test_a_streaming_body_reads_with_the_requests_identity(app_default, people):
    """The audit export's rows are read after the request's transaction ended: it gets one of
    its own with the same identity (before, it read with none and sent the header alone)."""
    response = logged_in(people["staff"]).get("/admin/auditlog/logentry/export.csv")
    assert response.status_code == 200
    lines = b"".join(response.streaming_content).decode().splitlines()
    assert len(lines) > 10, lines
    assert any(people["c"].email in line for line in lines[1:])
    with app_default.cursor() as cursor:
        cursor.execute("SELECT current_setting('app.user_id', true)")
        assert cursor.fetchone()[0] == ""


def test_login_finds_the_user_under_row_level_security(roles, app_default, people):
    client = Client()
    response = client.post(
        "/admin/login/?next=/admin/", {"username": "staff@prop.ie", "password": PASSWORD}
    )
    assert response.status_code == 302, response.content.decode()[:500]
    assert client.get("/admin/").status_code == 200
    refused = Client().post(
        "/admin/login/?next=/admin/", {"username": "staff@prop.ie", "password": "wrong"}
    )
    assert refused.status_code == 200 and b"correct email" in refused.content
    assert logged_in(people["staff"]).get("/admin/").status_code == 200
    # the login's lookup is no way around the policies: it answers one id, for app roles only
    with connect_as(app_default.settings_dict["USER"]) as conn:
        assert conn.execute("SELECT accounts_login_user_id('a@example.ie')").fetchone()[0] == (
            people["a"].pk
        )
    for other in (roles.analytics, roles.developer):
        denied = pytest.raises(psycopg.errors.InsufficientPrivilege)
        with connect_as(other) as conn, denied:
            conn.execute("SELECT accounts_login_user_id('a@example.ie')")


def write_then_fail(request):
    User.objects.filter(pk=request.user.pk).update(first_name="half-done")
    raise RuntimeError("the view failed after writing")


urlpatterns = [path("write-then-fail/", write_then_fail)]


@pytest.mark.urls("tests.test_rls")
def test_a_failed_request_rolls_its_writes_back(app_default, people):
    """The middleware's transaction ends in a rollback when the response is a 5xx."""
    a = people["a"]
    client = logged_in(a)
    client.raise_request_exception = False
    assert client.get("/write-then-fail/").status_code == 500
    assert User.objects.using("postgresql").get(pk=a.pk).first_name == ""


# --- the runbook as the owner, the application as app_service ----------------------------------


@pytest.fixture
def runbook_as_owner(roles, settings, tmp_path):
    """The runbook's files in tmp_path; the postgresql alias logs in as the (non-superuser) owner.

    The alias's settings dict is shared by every thread's connection, so the copy's worker
    threads connect as the owner too.
    """
    from pathlib import Path

    settings.SQLITE_PATH = Path(connections.settings["sqlite"]["NAME"])
    settings.STATE_FILE = tmp_path / "state.json"
    settings.BACKUP_DIR = tmp_path / "backups"
    settings.REPORT_DIR = tmp_path / "reports"
    settings.LOG_DIR = tmp_path / "logs"
    pg_settings = connections.settings["postgresql"]
    superuser = pg_settings["USER"]
    connections["postgresql"].close()
    connections["postgresql"].close_pool()
    pg_settings["USER"] = roles.owner
    try:
        yield settings
    finally:
        connections["postgresql"].close()
        connections["postgresql"].close_pool()
        pg_settings["USER"] = superuser


def run_command(name, *args):
    from io import StringIO

    from django.core.management import call_command

    out = StringIO()
    call_command(name, *args, stdout=out, stderr=StringIO(), verbosity=1)
    return out.getvalue()


def log_in_as(role: str) -> None:
    """This process's postgresql alias (and so a re-pointed default) logs in as ``role``."""
    for conn in connections.all(initialized_only=True):
        conn.close()
    connections["postgresql"].close_pool()
    _close_default_pool()
    connections.settings["postgresql"]["USER"] = role


@pytest.mark.slow
def test_runbook_end_to_end_with_the_app_as_app_service(roles, runbook_as_owner, restore_default):
    """seed -> prepare -> migrate -> switch, as the owner -> requests and writes as app_service,
    under RLS -> rollback, as the owner: every row, those writes included, comes back."""
    from dbmigration.state import read_state

    with connections["postgresql"].cursor() as cursor:
        cursor.execute("SELECT current_user, rolsuper FROM pg_roles WHERE rolname = current_user")
        assert cursor.fetchone() == (roles.owner, False)
    run_command("seed_demo", "--users", "25")
    run_command("migration_prepare")
    run_command("migrate_data")
    run_command("switch_to_postgresql", "--noinput", "--drain-seconds", "0")
    assert read_state(runbook_as_owner.STATE_FILE).active_backend == "postgresql"
    # the owner sees every row (BYPASSRLS): the copy and its verification were complete
    pg_users = User.all_objects.using("postgresql")
    assert pg_users.count() == User.all_objects.using("sqlite").count() == 25
    buyer = pg_users.filter(is_staff=False, deleted_at__isnull=True).first()
    buyer_kyc = KycVerification.objects.using("postgresql").filter(user=buyer).count()

    # the application: CutoverMiddleware moves 'default' to the postgresql alias, app_service
    log_in_as(roles.app)
    admin = Client()
    response = admin.post(
        "/admin/login/?next=/admin/", {"username": "admin1@prop.ie", "password": "propcore-demo"}
    )
    assert response.status_code == 302  # found through the SECURITY DEFINER lookup
    assert connections[DEFAULT_DB_ALIAS].settings_dict["USER"] == roles.app
    assert admin.get("/api/me/").json()["user"][0]["email"] == "admin1@prop.ie"
    client = logged_in(buyer)
    kyc = client.get("/api/me/kyc/").json()["kyc"]
    assert {k["user_id"] for k in kyc} <= {str(buyer.pk)} and len(kyc) == buyer_kyc
    # a job: for the buyer, as the system (its audit entry has no actor)
    with db_identity(user_id=buyer.pk, role="system"):
        written = KycVerification.objects.create(
            user=buyer, document_type="passport", document_reference="E2E-1"
        )
        assert User.objects.count() == 1
    assert User.objects.count() == 0  # no identity, no rows

    log_in_as(roles.owner)
    run_command("rollback_to_sqlite", "--noinput", "--drain-seconds", "0")
    state = read_state(runbook_as_owner.STATE_FILE)
    assert (state.phase, state.active_backend) == ("rolled_back", "sqlite")
    back = KycVerification.objects.using("sqlite").get(pk=written.pk)
    assert (back.user_id, back.document_reference) == (buyer.pk, "E2E-1")
    assert KycVerification.objects.using("sqlite").filter(user=buyer).count() == buyer_kyc + 1
