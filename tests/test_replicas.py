"""Read replicas with a real primary and streaming standby (private clusters on free ports).

The router is the one settings.py installs; the test points REPLICA_ROUTING at two aliases
of its own (``scale_primary``, ``scale_replica``) and reads and writes ContentType rows,
whose table it creates on the private primary.
"""

import logging
import time

import psycopg
import pytest
from django.contrib.contenttypes.models import ContentType
from django.db import ProgrammingError, close_old_connections, connections, transaction
from django.http import HttpResponse
from django.test import Client, RequestFactory
from django.urls import path

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
from tests.test_health import _run, _start, streaming_pair

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
    _run(find_pg_bin("pg_ctl"), "-D", str(root / "standby"), "-m", "fast", "stop")
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
        _run(find_pg_bin("pg_ctl"), "-D", str(_killer.pop("standby")), "-m", "immediate", "stop")
    models = list(ContentType.objects.filter(app_label="scale").values_list("model", flat=True))
    return HttpResponse(f"{first} {len(models)}")


urlpatterns = [path("mid-request/", _stop_standby_mid_request)]


@pytest.fixture
def standby_running(router):
    """A running standby (an earlier test may have stopped it), running again afterwards."""
    root, _, s_port = router

    def start() -> None:
        if not (root / "standby" / "postmaster.pid").exists():
            _start(root / "standby", s_port, root)
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
