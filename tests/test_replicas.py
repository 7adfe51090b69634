"""Read replicas with a real primary and streaming standby (private clusters on free ports).

The router is the one settings.py installs; the test points REPLICA_ROUTING at two aliases
of its own (``scale_primary``, ``scale_replica``) and reads and writes ContentType rows,
whose table it creates on the private primary.
"""

import contextlib
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest
from django.contrib.contenttypes.models import ContentType
from django.db import ProgrammingError, close_old_connections, connections, transaction
from django.http import HttpResponse, JsonResponse, StreamingHttpResponse
from django.test import Client, RequestFactory
from django.urls import include, path

from dbmigration import health
from propcore import replicas
from propcore.pgserver import find_pg_bin
from propcore.pooling import persistent_connections
from propcore.replicas import (
    LSN_COOKIE,
    ReplicaStickinessMiddleware,
    read_alias,
    routing_context,
    use_primary,
)
from tests.clusters import as_postgres, start_server, streaming_pair

pytestmark = pytest.mark.slow

PRIMARY, REPLICA = "scale_primary", "scale_replica"
CHECK_INTERVAL = 0.2
MAX_LAG_BYTES = 1024 * 1024


@pytest.fixture(scope="module")
def pair():
    """A private primary and a streaming standby; yield (root, primary port, standby port)."""
    with streaming_pair("propcore_replicas_") as ports:
        yield ports


def _alias(port: int) -> dict:
    """The alias as settings.py builds a replica's: no pool, a kept connection, checked."""
    config = {**connections.settings["postgresql"], "HOST": "127.0.0.1", "PORT": port}
    return persistent_connections({**config, "NAME": "postgres"})


@pytest.fixture(scope="module")
def routed(pair, django_db_blocker):
    """Both aliases configured, the ContentType table on the primary, the router pointed at them."""
    _, p_port, s_port = pair
    connections.settings[PRIMARY] = _alias(p_port)
    connections.settings[REPLICA] = _alias(s_port)
    with django_db_blocker.unblock():
        with connections[PRIMARY].schema_editor() as editor:
            editor.create_model(ContentType)
        yield pair
        for alias in (PRIMARY, REPLICA):
            connections[alias].close()
    del connections.settings[PRIMARY], connections.settings[REPLICA]


@pytest.fixture
def router(routed, settings):
    settings.REPLICA_ROUTING = {
        "PRIMARY": PRIMARY,
        "ALIASES": [REPLICA],
        "MAX_LAG_BYTES": MAX_LAG_BYTES,
        "MAX_LAG_SECONDS": 60.0,
        "CHECK_INTERVAL": CHECK_INTERVAL,
    }
    replicas.replicas.reset()
    yield routed
    replicas.replicas.reset()


def _sql(port: int, query: str):
    with psycopg.connect(f"host=127.0.0.1 port={port} user=postgres dbname=postgres") as conn:
        conn.autocommit = True
        cursor = conn.execute(query)
        return cursor.fetchone() if cursor.description else None


def _wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def _on_replica(model: str) -> bool:
    try:
        return ContentType.objects.using(REPLICA).filter(app_label="scale", model=model).exists()
    except ProgrammingError:  # under load the table itself may not be replayed yet
        return False


@pytest.fixture
def replay_paused(router):
    _, _, s_port = router
    _sql(s_port, "SELECT pg_wal_replay_pause()")
    yield
    _sql(s_port, "SELECT pg_wal_replay_resume()")


def test_reads_land_on_the_standby_and_writes_on_the_primary(router):
    written = ContentType.objects.create(app_label="scale", model="first")
    assert written._state.db == PRIMARY
    _wait_for(lambda: _on_replica("first"))
    read = ContentType.objects.get(app_label="scale", model="first")
    assert read._state.db == REPLICA
    with connections[read._state.db].cursor() as cursor:
        cursor.execute("SELECT pg_is_in_recovery()")
        assert cursor.fetchone() == (True,)
    read.model = "first_renamed"
    read.save()  # read on the replica, saved on the primary
    assert ContentType.objects.using(PRIMARY).filter(model="first_renamed").exists()


def test_transactions_locks_and_use_primary_read_the_primary(router):
    with transaction.atomic(using=PRIMARY):
        assert read_alias() == PRIMARY
        assert ContentType.objects.select_for_update().filter(app_label="scale").db == PRIMARY
    with use_primary():
        assert ContentType.objects.filter(app_label="scale").db == PRIMARY
    assert ContentType.objects.filter(app_label="scale").db == REPLICA


def test_a_user_who_just_wrote_reads_their_own_write(router, replay_paused):
    factory = RequestFactory()

    def write(request):
        ContentType.objects.create(app_label="scale", model="own_write")
        found = ContentType.objects.filter(app_label="scale", model="own_write").exists()
        return HttpResponse(str(found))  # same request: the primary

    def read(request):
        found = ContentType.objects.filter(app_label="scale", model="own_write").exists()
        return HttpResponse(str(found))

    first = ReplicaStickinessMiddleware(write)(factory.post("/"))
    assert first.content == b"True"
    cookie = first.cookies[LSN_COOKIE].value
    # the next request carries the write's position: the paused standby is behind it
    next_request = factory.get("/")
    next_request.COOKIES[LSN_COOKIE] = cookie
    assert ReplicaStickinessMiddleware(read)(next_request).content == b"True"
    # the control: without the cookie the read goes to the standby, which has not replayed it
    assert ReplicaStickinessMiddleware(read)(factory.get("/")).content == b"False"


def test_stickiness_ends_when_the_replica_has_replayed_past_the_write(router):
    ContentType.objects.create(app_label="scale", model="caught_up")
    lsn = replicas.parse_lsn(_sql(router[1], "SELECT pg_current_wal_lsn()::text")[0])
    _wait_for(lambda: _on_replica("caught_up"))
    request = RequestFactory().get("/")
    request.COOKIES[LSN_COOKIE] = replicas.format_lsn(lsn)
    seen = []

    def read(request):
        seen.append(read_alias())
        return HttpResponse()

    response = ReplicaStickinessMiddleware(read)(request)
    assert seen == [REPLICA]
    assert response.cookies[LSN_COOKIE].value == ""  # dropped: every replica caught up


def test_a_lagging_standby_leaves_rotation_and_comes_back(router, replay_paused):
    _, p_port, _ = router
    assert replicas.replicas.in_rotation() == [REPLICA]
    # about 3 MB of WAL the paused standby cannot replay (the limit here is 1 MB)
    _sql(
        p_port, "CREATE TABLE filler AS SELECT repeat('x', 1000) AS x FROM generate_series(1, 3000)"
    )
    _sql(p_port, "DROP TABLE filler")
    _wait_for(lambda: replicas.replicas.in_rotation() == [])
    assert read_alias() == PRIMARY
    assert ContentType.objects.filter(app_label="scale").exists()  # served by the primary
    check = health.run_check("read_replicas")
    assert check.status == health.DEGRADED, check.message
    lagging = check.details["replicas"][0]
    assert lagging["alias"] == REPLICA and not lagging["in_rotation"]
    assert lagging["lag_bytes"] > MAX_LAG_BYTES
    _sql(router[2], "SELECT pg_wal_replay_resume()")
    _wait_for(lambda: replicas.replicas.in_rotation() == [REPLICA])
    assert read_alias() == REPLICA
    assert health.run_check("read_replicas").status == health.OK


def test_lag_is_measured_at_most_once_per_interval(router, settings, monkeypatch):
    settings.REPLICA_ROUTING = {**settings.REPLICA_ROUTING, "CHECK_INTERVAL": 60.0}
    measured = []
    real_measure = replicas.replicas._measure
    monkeypatch.setattr(
        replicas.replicas, "_measure", lambda config: measured.append(1) or real_measure(config)
    )
    for _ in range(200):
        assert read_alias() == REPLICA
    assert len(measured) == 1


def test_the_first_lag_check_runs_whatever_the_interval(router, settings):
    # regression: "never checked" was monotonic time 0.0, so an interval longer than the
    # machine's uptime meant no check and no replica at all
    settings.REPLICA_ROUTING = {**settings.REPLICA_ROUTING, "CHECK_INTERVAL": 1e12}
    assert replicas.replicas.in_rotation() == [REPLICA]


def test_with_the_standby_stopped_reads_still_succeed(router, settings):
    root, _, _ = router
    # no lag check will run in this test: the router finds the dead standby by itself
    settings.REPLICA_ROUTING = {**settings.REPLICA_ROUTING, "CHECK_INTERVAL": 600.0}
    with routing_context():
        assert ContentType.objects.filter(app_label="scale").db == REPLICA
        assert ContentType.objects.filter(app_label="scale").exists()  # a kept connection
    as_postgres(find_pg_bin("pg_ctl"), "-D", str(root / "standby"), "-m", "fast", "stop")
    close_old_connections()  # what Django does when the next request starts
    with routing_context():
        assert ContentType.objects.filter(app_label="scale").exists()
        assert read_alias() == PRIMARY
    assert replicas.replicas.in_rotation() == []
    check = health.run_check("read_replicas")
    assert check.status == health.DEGRADED
    assert check.details["replicas"][0]["error"]


def test_the_health_page_does_not_probe_replicas_as_databases():
    from propcore.health import health_checks

    checks = health_checks(["default", "replica1"], ["replica1"])
    probed = [kwargs.get("alias") for _, kwargs in checks]
    assert "default" in probed and "replica1" not in probed


# --- a replica that dies in the middle of a request ------------------------------------------

_killer = {}  # the standby's data directory, set by the test; emptied once it is stopped


def _stop_standby_mid_request(request):
    """Read (from the standby), kill the standby, read again: the second read fails there."""
    first = ContentType.objects.filter(app_label="scale").count()
    if _killer:
        as_postgres(
            find_pg_bin("pg_ctl"), "-D", str(_killer.pop("standby")), "-m", "immediate", "stop"
        )
    models = list(ContentType.objects.filter(app_label="scale").values_list("model", flat=True))
    return HttpResponse(f"{first} {len(models)}")


urlpatterns = [path("mid-request/", _stop_standby_mid_request)]


@pytest.fixture
def standby_running(router):
    """A running standby (an earlier test may have stopped it), running again afterwards."""
    root, _, s_port = router

    def start() -> None:
        if not (root / "standby" / "postmaster.pid").exists():
            start_server(root / "standby", s_port, root)
        connections[REPLICA].close()

    start()
    yield root / "standby"
    _killer.clear()
    start()


def test_a_read_whose_replica_dies_mid_request_is_retried_on_the_primary(
    router, settings, standby_running, caplog
):
    settings.ROOT_URLCONF = __name__
    settings.MIDDLEWARE = ["propcore.replicas.ReplicaStickinessMiddleware"]
    settings.REPLICA_ROUTING = {**settings.REPLICA_ROUTING, "CHECK_INTERVAL": 600.0}
    ContentType.objects.create(app_label="scale", model="mid_request")
    _wait_for(lambda: _on_replica("mid_request"))
    expected = ContentType.objects.using(PRIMARY).filter(app_label="scale").count()
    with routing_context():
        assert read_alias() == REPLICA  # the request's first read goes to the standby
    _killer["standby"] = standby_running
    with caplog.at_level(logging.WARNING, logger="propcore.replicas"):
        response = Client().get("/mid-request/")  # a 500 would raise here
    assert not _killer, "the view did not stop the standby"
    assert response.status_code == 200
    assert response.content.decode() == f"{expected} {expected}"
    retried = [r.getMessage() for r in caplog.records if r.name == "propcore.replicas"]
    assert len(retried) == 1
    assert f"read replica {REPLICA} failed during GET /mid-request/" in retried[0]
    assert "runs again on the primary" in retried[0]
    assert replicas.replicas.in_rotation() == []  # the dead standby left rotation


# --- web requests under row-level security: reads on the standby, as the app role ----------
#
# A database of the app on the private primary (migrated, the app's roles, two users of one
# firm and a staff user), ``default`` pointed at it as the app role (a pool of one, as in
# production), a replica alias on the standby as the app role, and the whole middleware
# stack (settings.MIDDLEWARE) in front of propcore.urls and a few views of this module.

RLS_DB = "propcore_rls"
RLS_ADMIN, RLS_REPLICA = "rls_admin", "rls_replica"
PASSWORD = "correct horse battery"


def _app_alias(port: int, user: str) -> dict:
    return {**_alias(port), "NAME": RLS_DB, "USER": user, "PASSWORD": ""}


def _ensure_standby(root: Path, s_port: int) -> None:
    if not (root / "standby" / "postmaster.pid").exists():  # an earlier test stopped it
        start_server(root / "standby", s_port, root)


def _replayed(p_port: int, s_port: int) -> bool:
    lsn = _sql(p_port, "SELECT pg_current_wal_lsn()::text")[0]
    return _sql(s_port, f"SELECT pg_last_wal_replay_lsn() >= '{lsn}'::pg_lsn")[0]


def _wait_replayed(p_port: int, s_port: int) -> None:
    lsn = _sql(p_port, "SELECT pg_current_wal_lsn()::text")[0]
    _wait_for(lambda: _sql(s_port, f"SELECT pg_last_wal_replay_lsn() >= '{lsn}'::pg_lsn")[0])


@pytest.fixture(scope="module")
def rls_app(pair, django_db_blocker):
    """The app's database on the pair: migrated, the app's roles, people; yield their ids."""
    from accounts.models import KycVerification, Membership, Organisation, User
    from dbmigration.preflight import conninfo_from_url
    from dbmigration.roles import role_names, sync_roles
    from tests.rls_fixtures import run_suffix

    root, p_port, s_port = pair
    _ensure_standby(root, s_port)
    _sql(p_port, f"CREATE DATABASE {RLS_DB}")
    url = f"postgres://postgres@127.0.0.1:{p_port}/{RLS_DB}"
    env = {**os.environ, "POSTGRES_URL": url, "POSTGRES_REPLICA_URLS": "", "POSTGRES_OWNER_URL": ""}
    subprocess.run(
        [sys.executable, "manage.py", "migrate", "--database", "postgresql", "-v", "0"],
        cwd=Path(__file__).resolve().parent.parent, env=env, check=True, capture_output=True,
        timeout=900,
    )  # fmt: skip
    names = role_names(suffix=run_suffix("replica"))
    sync_roles(conninfo=conninfo_from_url(url), names=names, owner_login=True)
    connections.settings[RLS_ADMIN] = {**_alias(p_port), "NAME": RLS_DB}
    with django_db_blocker.unblock():
        users = User.objects.db_manager(RLS_ADMIN)
        firm = Organisation.objects.using(RLS_ADMIN).create(name="Firm", kind="estate_agent")
        people = {}
        for key in ("a", "b"):
            user = users.create_user(f"{key}@example.ie", PASSWORD, phone=f"+3538700000{ord(key)}")
            Membership.objects.using(RLS_ADMIN).create(user=user, organisation=firm)
            for number in range(2):
                KycVerification.objects.using(RLS_ADMIN).create(
                    user=user, document_type="passport", document_reference=f"{key}-{number}"
                )
            people[key] = user
        people["staff"] = users.create_user(
            "staff@prop.ie", PASSWORD, is_staff=True, is_superuser=True
        )
        _wait_replayed(p_port, s_port)
        yield {"names": names, "people": people, "ports": (p_port, s_port), "root": root}
        connections[RLS_ADMIN].close()
    del connections.settings[RLS_ADMIN]


@pytest.fixture
def app_on_pair(rls_app, settings, django_db_blocker):
    """``default`` = the pair's primary as the app role; reads routed to the standby."""
    import copy

    from django.db import DEFAULT_DB_ALIAS
    from django.db.backends.postgresql.base import DatabaseWrapper

    p_port, s_port = rls_app["ports"]
    app = rls_app["names"].app
    _ensure_standby(rls_app["root"], s_port)
    base = copy.deepcopy(connections["postgresql"].settings_dict)
    base.update(HOST="127.0.0.1", PORT=p_port, NAME=RLS_DB, USER=app, PASSWORD="")
    base["OPTIONS"]["pool"] = {"min_size": 1, "max_size": 1, "timeout": 5}
    connections.settings[RLS_REPLICA] = _app_alias(s_port, app)
    original = connections[DEFAULT_DB_ALIAS]
    saved_pool = DatabaseWrapper._connection_pools.pop(DEFAULT_DB_ALIAS, None)
    wrapper = DatabaseWrapper(base, alias=DEFAULT_DB_ALIAS)
    connections[DEFAULT_DB_ALIAS] = wrapper
    settings.ROOT_URLCONF = __name__
    settings.REPLICA_ROUTING = {
        "PRIMARY": DEFAULT_DB_ALIAS,
        "ALIASES": [RLS_REPLICA],
        "MAX_LAG_BYTES": MAX_LAG_BYTES,
        "MAX_LAG_SECONDS": 60.0,
        "CHECK_INTERVAL": CHECK_INTERVAL,
    }
    replicas.replicas.reset()
    try:
        with django_db_blocker.unblock():
            yield rls_app
    finally:
        replicas.replicas.reset()
        wrapper.close()
        wrapper.close_pool()
        connections[DEFAULT_DB_ALIAS] = original
        if saved_pool is not None:
            DatabaseWrapper._connection_pools[DEFAULT_DB_ALIAS] = saved_pool
        connections[RLS_REPLICA].close()
        del connections[RLS_REPLICA]
        del connections.settings[RLS_REPLICA]


def _logged_in(app: dict, user) -> Client:
    """A client with a session made on the primary, once the standby has replayed it."""
    from propcore.rls import db_identity

    client = Client()
    with db_identity(user_id=user.pk, using=RLS_ADMIN):
        client.force_login(user)
    _wait_replayed(*app["ports"])
    return client


@contextlib.contextmanager
def _queries():
    """(alias, sql) of every statement this thread runs on the primary and the replica."""
    seen: list[tuple[str, str]] = []

    def recorder(alias):
        def wrapper(execute, sql, params, many, context):
            seen.append((alias, sql))
            return execute(sql, params, many, context)

        return wrapper

    with (
        connections["default"].execute_wrapper(recorder("default")),
        connections[RLS_REPLICA].execute_wrapper(recorder(RLS_REPLICA)),
    ):
        yield seen


def _where(seen, table: str) -> set[str]:
    return {alias for alias, sql in seen if f'"{table}"' in sql}


def _replica_state() -> tuple:
    """The replica connection after a request: (in a transaction?, app.user_id, app.role)."""
    connection = connections[RLS_REPLICA]
    connection.ensure_connection()
    status = connection.connection.info.transaction_status
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT coalesce(current_setting('app.user_id', true), ''), "
            "coalesce(current_setting('app.role', true), ''), pg_backend_pid()"
        )
        user_id, role, pid = cursor.fetchone()
    return status != psycopg.pq.TransactionStatus.IDLE, user_id, role, pid


def _standby_commits(s_port: int) -> int:
    return _sql(s_port, f"SELECT xact_commit FROM pg_stat_database WHERE datname = '{RLS_DB}'")[0]


def test_a_users_api_reads_run_on_the_standby_and_see_only_their_rows(app_on_pair):
    from accounts.models import KycVerification

    a, b = app_on_pair["people"]["a"], app_on_pair["people"]["b"]
    _, s_port = app_on_pair["ports"]
    own = {
        u: {str(k) for k in KycVerification.objects.using(RLS_ADMIN).filter(user=u).values_list(
            "pk", flat=True)}
        for u in (a, b)
    }  # fmt: skip
    commits = _standby_commits(s_port)
    pids = set()
    for user in (a, b, a):  # the same kept replica connection, one user after the other
        client = _logged_in(app_on_pair, user)
        with _queries() as seen:
            me = client.get("/api/me/").json()
            kyc = client.get("/api/me/kyc/").json()["kyc"]
        assert [u["id"] for u in me["user"]] == [str(user.pk)]
        assert {k["id"] for k in kyc} == own[user]
        # the session, the user row and the view's reads all ran on the standby
        for table in ("django_session", "accounts_user", "accounts_kycverification"):
            assert _where(seen, table) == {RLS_REPLICA}, (table, seen)
        assert LSN_COOKIE not in client.cookies  # nothing was written
        # the request's replica transaction ended with it: no identity left on the connection
        in_transaction, user_id, role, pid = _replica_state()
        assert (in_transaction, user_id, role) == (False, "", "")
        pids.add(pid)
    assert len(pids) == 1  # really the same server session on the standby
    with connections[RLS_REPLICA].cursor() as cursor:
        cursor.execute("SELECT pg_is_in_recovery()")
        assert cursor.fetchone() == (True,)
    connections[RLS_REPLICA].close()  # a backend that ends flushes its statistics
    _wait_for(lambda: _standby_commits(s_port) >= commits + 6)


def test_an_anonymous_request_on_the_standby_sees_no_user_row(app_on_pair):
    with _queries() as seen:
        response = Client().get("/t/users/").json()
    assert response == {"alias": RLS_REPLICA, "ids": [], "in_recovery": True}
    assert _where(seen, "accounts_user") == {RLS_REPLICA}
    assert Client().get("/api/me/").status_code == 401


def test_staff_see_every_user_on_the_standby_and_the_api_drops_the_role_there(app_on_pair):
    people = app_on_pair["people"]
    client = _logged_in(app_on_pair, people["staff"])
    with _queries() as seen:
        page = client.get("/admin/accounts/user/")
    assert page.status_code == 200
    for key in ("a", "b", "staff"):
        assert people[key].email in page.content.decode()
    assert _where(seen, "accounts_user") == {RLS_REPLICA}
    listed = client.get("/t/users/").json()
    assert listed["alias"] == RLS_REPLICA
    assert set(listed["ids"]) == {str(people[k].pk) for k in ("a", "b", "staff")}
    # the API sets role '' after the staff identity reached the replica's transaction:
    # the replica must get the change too, or the staff would see everyone's KYC checks
    with _queries() as seen:
        assert client.get("/api/me/kyc/").json()["kyc"] == []
        me = client.get("/api/me/").json()["user"]
    assert [u["id"] for u in me] == [str(people["staff"].pk)]
    assert _where(seen, "accounts_kycverification") == {RLS_REPLICA}


def test_a_user_who_writes_reads_the_write_in_that_request_and_the_next(app_on_pair):
    p_port, s_port = app_on_pair["ports"]
    a = app_on_pair["people"]["a"]
    client = _logged_in(app_on_pair, a)
    _sql(s_port, "SELECT pg_wal_replay_pause()")
    try:
        with _queries() as seen:
            written = client.post("/t/rename/", {"first_name": "Aoife"}).json()
        assert written == {"alias": "default", "first_name": "Aoife"}  # same request
        assert LSN_COOKIE in client.cookies
        assert not _replayed(p_port, s_port)  # the standby has not seen the write
        assert client.get("/api/me/").json()["user"][0]["first_name"] == "Aoife"
        # the control: another session of the same user, without the cookie, reads the
        # paused standby, which still has the old name
        other = Client()
        other.cookies["sessionid"] = client.cookies["sessionid"].value
        assert other.get("/api/me/").json()["user"][0]["first_name"] == ""
    finally:
        _sql(s_port, "SELECT pg_wal_replay_resume()")
    assert "accounts_user" in " ".join(sql for alias, sql in seen if alias == "default")


def test_a_login_is_read_back_from_the_primary_until_the_standby_has_replayed_it(app_on_pair):
    """The login looks the user up on the primary; its session is read back through the cookie."""
    p_port, s_port = app_on_pair["ports"]
    _sql(s_port, "SELECT pg_wal_replay_pause()")
    try:
        client = Client()
        with _queries() as seen:
            response = client.post(
                "/admin/login/?next=/admin/", {"username": "staff@prop.ie", "password": PASSWORD}
            )
        assert response.status_code == 302, response.content.decode()[:300]
        assert _where(seen, "accounts_user") == {"default"}
        assert LSN_COOKIE in client.cookies
        assert not _replayed(p_port, s_port)
        assert client.get("/admin/accounts/user/").status_code == 200
        # the control: the same session without the cookie reads the paused standby, which
        # has no such session yet: not signed in
        other = Client()
        other.cookies["sessionid"] = client.cookies["sessionid"].value
        assert other.get("/admin/accounts/user/").status_code == 302
    finally:
        _sql(s_port, "SELECT pg_wal_replay_resume()")
    _wait_replayed(p_port, s_port)
    replayed = Client()  # (the control's client lost the cookie: Django drops an empty session's)
    replayed.cookies["sessionid"] = client.cookies["sessionid"].value
    with _queries() as seen:
        assert replayed.get("/admin/accounts/user/").status_code == 200
    assert _where(seen, "django_session") == {RLS_REPLICA}


def test_reads_in_the_views_own_transaction_or_locks_stay_on_the_primary(app_on_pair):
    client = _logged_in(app_on_pair, app_on_pair["people"]["a"])
    assert client.get("/t/own-transaction/").json() == {
        "before": RLS_REPLICA,
        "in_atomic": "default",
        "for_update": "default",
        "use_primary": "default",
        # an identity set inside the view's own atomic() could be undone there alone
        "after_identity_in_atomic": "default",
    }
    assert _replica_state()[:3] == (False, "", "")


def test_a_failing_request_ends_its_replica_transaction(app_on_pair):
    a = app_on_pair["people"]["a"]
    client = _logged_in(app_on_pair, a)
    client.raise_request_exception = False
    assert client.get("/t/read-then-fail/").status_code == 500
    assert _replica_state()[:3] == (False, "", "")
    assert [u["id"] for u in client.get("/api/me/").json()["user"]] == [str(a.pk)]


def test_a_streaming_body_reads_with_the_requests_identity_and_only_its_rows(app_on_pair):
    """Its body is made after the middlewares returned: in a transaction of its own, on the
    primary, with the identity the view ended with (the old way it read with none: no rows)."""
    people = app_on_pair["people"]
    response = _logged_in(app_on_pair, people["a"]).get("/t/stream/")
    assert b"".join(response.streaming_content).decode() == f"default {people['a'].pk}"
    assert _replica_state()[:3] == (False, "", "")
    # the audit log's CSV export, as staff: every entry, not the header alone
    staff = _logged_in(app_on_pair, people["staff"])
    export = staff.get("/admin/auditlog/logentry/export.csv")
    assert export.status_code == 200
    lines = b"".join(export.streaming_content).decode().splitlines()
    assert len(lines) > 3, lines
    assert any(people["a"].email in line for line in lines[1:])


@pytest.fixture
def standby_to_kill(app_on_pair):
    """The standby's data directory, for a view to stop; running again afterwards."""
    root, s_port = app_on_pair["root"], app_on_pair["ports"][1]
    yield root / "standby"
    _killer.clear()
    connections[RLS_REPLICA].close()
    _ensure_standby(root, s_port)


def test_with_the_standby_dying_mid_request_a_user_gets_their_rows_from_the_primary(
    app_on_pair, standby_to_kill, settings, caplog
):
    # no lag check in this request: the router finds the dead standby by itself
    settings.REPLICA_ROUTING = {**settings.REPLICA_ROUTING, "CHECK_INTERVAL": 600.0}
    a = app_on_pair["people"]["a"]
    client = _logged_in(app_on_pair, a)
    _killer["standby"] = standby_to_kill
    with caplog.at_level(logging.WARNING, logger="propcore.replicas"), _queries() as seen:
        response = client.get("/t/users-kill/")
    assert RLS_REPLICA in _where(seen, "accounts_user")  # the first read, before the stop
    assert not _killer, "the view did not stop the standby"
    assert response.status_code == 200
    assert response.json() == {"first": [str(a.pk)], "second": [str(a.pk)]}
    assert any("runs again on the primary" in r.getMessage() for r in caplog.records)
    # later requests: the standby is out of rotation, the primary serves them
    with _queries() as seen:
        assert [u["id"] for u in client.get("/api/me/").json()["user"]] == [str(a.pk)]
    assert _where(seen, "accounts_user") == {"default"}


def test_under_gunicorn_concurrent_users_read_only_their_rows_from_the_standby(
    app_on_pair, settings, tmp_path
):
    """The app as deployed (gunicorn, 2 workers x 4 threads, propcore.settings, the app role,
    POSTGRES_REPLICA_URLS): users A and B and anonymous clients at once, on kept replica
    connections shared by turns; each answer holds the requester's rows only."""
    import http.client
    import signal
    from concurrent.futures import ThreadPoolExecutor

    from accounts.models import KycVerification
    from dbmigration.state import MigrationState, write_state

    p_port, s_port = app_on_pair["ports"]
    app = app_on_pair["names"].app
    people = app_on_pair["people"]
    own = {
        str(u.pk): {str(k) for k in KycVerification.objects.using(RLS_ADMIN).filter(user=u)
                    .values_list("pk", flat=True)}
        for u in (people["a"], people["b"])
    }  # fmt: skip
    cookies = {
        str(u.pk): _logged_in(app_on_pair, u).cookies["sessionid"].value
        for u in (people["a"], people["b"])
    }
    write_state(
        tmp_path / "state.json", MigrationState(phase="switched", active_backend="postgresql")
    )
    port = _free_tcp_port()
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "propcore.settings",
        "PROPCORE_ENV": "dev",
        "DEBUG": "false",
        "SECRET_KEY": settings.SECRET_KEY,  # the sessions above are signed with it
        "ALLOWED_HOSTS": "127.0.0.1",
        "PROPCORE_DATABASE_DIR": str(tmp_path),
        "SQLITE_PATH": str(tmp_path / "unused.sqlite3"),
        "POSTGRES_URL": f"postgres://{app}@127.0.0.1:{p_port}/{RLS_DB}",
        "POSTGRES_REPLICA_URLS": f"postgres://{app}@127.0.0.1:{s_port}/{RLS_DB}",
        "POSTGRES_OWNER_URL": "",
    }
    log = tmp_path / "gunicorn.log"
    gunicorn = subprocess.Popen(
        [str(Path(sys.executable).with_name("gunicorn")), "propcore.wsgi:application",
         "-b", f"127.0.0.1:{port}", "-w", "2", "-k", "gthread", "--threads", "4"],
        cwd=Path(__file__).resolve().parent.parent, env=env, stdout=subprocess.DEVNULL,
        stderr=log.open("wb"), start_new_session=True,
    )  # fmt: skip

    def get(path: str, user_id: str | None) -> tuple[int, dict]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        try:
            headers = {"Cookie": f"sessionid={cookies[user_id]}"} if user_id else {}
            conn.request("GET", path, headers=headers)
            response = conn.getresponse()
            return response.status, json.loads(response.read() or b"{}")
        finally:
            conn.close()

    try:
        deadline = time.monotonic() + 90
        while True:
            assert gunicorn.poll() is None, log.read_text()[-3000:]
            with contextlib.suppress(OSError):
                if get("/api/me/", None)[0] == 401:
                    break
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.3)
        commits = _standby_commits(s_port)
        who = [*cookies, None] * 40
        paths = ["/api/me/", "/api/me/kyc/"] * 60
        with ThreadPoolExecutor(12) as pool:
            answers = list(
                pool.map(lambda job: (job, get(job[1], job[0])), zip(who, paths, strict=True))
            )
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(gunicorn.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            gunicorn.wait(timeout=30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(gunicorn.pid, signal.SIGKILL)
    for (user_id, target), (status, body) in answers:
        if user_id is None:
            assert (status, body) == (401, {"error": "Sign in first."})
        elif target == "/api/me/":
            assert status == 200 and [u["id"] for u in body["user"]] == [user_id], body
        else:
            assert status == 200 and {k["id"] for k in body["kyc"]} == own[user_id], body
    # each signed-in request committed its transaction on the standby (the workers' backends
    # have ended: their statistics are flushed)
    _wait_for(lambda: _standby_commits(s_port) >= commits + 80)


def _free_tcp_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _users_seen(request):
    from accounts.models import User

    users = User.objects.all()
    with connections[users.db].cursor() as cursor:
        cursor.execute("SELECT pg_is_in_recovery()")
        in_recovery = cursor.fetchone()[0]
    ids = sorted(str(pk) for pk in users.values_list("pk", flat=True))
    return JsonResponse({"alias": users.db, "ids": ids, "in_recovery": in_recovery})


def _rename(request):
    from accounts.models import User

    User.objects.filter(pk=request.user.pk).update(first_name=request.POST["first_name"])
    users = User.objects.filter(pk=request.user.pk)
    return JsonResponse({"alias": users.db, "first_name": users.get().first_name})


def _own_transaction(request):
    from accounts.models import User
    from propcore.rls import set_identity

    seen = {"before": User.objects.all().db}
    with transaction.atomic():
        seen["in_atomic"] = User.objects.all().db
    seen["for_update"] = User.objects.select_for_update().db
    with use_primary():
        seen["use_primary"] = User.objects.all().db
    with transaction.atomic():
        set_identity(user_id=request.user.pk, using="default")
    seen["after_identity_in_atomic"] = User.objects.all().db
    return JsonResponse(seen)


def _read_then_fail(request):
    from accounts.models import User

    assert User.objects.all().db == RLS_REPLICA
    list(User.objects.all())
    raise RuntimeError("the view failed after reading")


def _stream(request):
    from accounts.models import User

    def body():
        users = User.objects.all()
        yield f"{users.db} {' '.join(str(pk) for pk in users.values_list('pk', flat=True))}"

    return StreamingHttpResponse(body())


def _users_kill(request):
    from accounts.models import User

    first = sorted(str(pk) for pk in User.objects.values_list("pk", flat=True))
    if _killer:
        as_postgres(
            find_pg_bin("pg_ctl"), "-D", str(_killer.pop("standby")), "-m", "immediate", "stop"
        )
    second = sorted(str(pk) for pk in User.objects.values_list("pk", flat=True))
    return JsonResponse({"first": first, "second": second})


urlpatterns += [
    path("t/users/", _users_seen),
    path("t/rename/", _rename),
    path("t/own-transaction/", _own_transaction),
    path("t/read-then-fail/", _read_then_fail),
    path("t/stream/", _stream),
    path("t/users-kill/", _users_kill),
    path("", include("propcore.urls")),
]
