"""The write freeze, through Django's test client: writes answer 503, reads go on."""

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from django.conf import settings
from django.db import connections
from django.http import HttpResponse
from django.urls import path

from accounts.models import Organisation
from dbmigration import fence
from dbmigration import freeze as fz
from dbmigration.state import MigrationState, read_state, write_file_atomic, write_state
from tests.test_cutover import restore_default  # noqa: F401  (a fixture)


def write_on_get(request):
    """A badly behaved read: it writes."""
    Organisation.objects.create(name="Sneaky", kind="developer")
    return HttpResponse("wrote")


def read_only(request):
    return HttpResponse(str(Organisation.objects.count()))


urlpatterns = [path("sneaky/", write_on_get), path("count/", read_only)]


@pytest.fixture
def state_file(settings, tmp_path):
    settings.STATE_FILE = tmp_path / "state.json"
    return settings.STATE_FILE


@pytest.fixture
def flag(state_file):
    return fz.freeze_path_for(state_file)


def test_freeze_on_off_records_reason_and_duration(flag):
    held = fz.freeze_on(flag, reason="cutover test")
    data = json.loads(flag.read_text())
    assert data["reason"] == "cutover test" and data["token"] == held.token
    assert fz.read_freeze(flag).reason == "cutover test"
    with pytest.raises(fz.FreezeError, match="already frozen"):
        fz.freeze_on(flag, reason="second")
    assert fz.still_held(flag, held)
    lasted = fz.freeze_off(flag, held)
    assert lasted is not None and lasted >= 0
    assert not flag.exists() and fz.read_freeze(flag) is None


def test_expired_freeze_is_ignored_and_can_be_replaced(flag):
    old = fz.freeze_on(flag, reason="crashed", max_seconds=0.01)
    time.sleep(0.05)
    assert fz.read_freeze(flag) is None
    assert not fz.still_held(flag, old)
    new = fz.freeze_on(flag, reason="next")
    assert fz.freeze_off(flag, old) is None  # not ours any more: left in place
    assert fz.read_freeze(flag).token == new.token


def test_context_manager_lifts_freeze_on_error(flag):
    with pytest.raises(RuntimeError), fz.write_freeze(flag, reason="boom"):
        assert fz.read_freeze(flag) is not None
        raise RuntimeError
    assert not flag.exists()


@pytest.mark.django_db(databases="__all__")
@pytest.mark.parametrize("method", ["post", "put", "patch", "delete"])
def test_writes_answer_503_with_retry_after(client, flag, method):
    fz.freeze_on(flag, reason="switching")
    response = getattr(client, method)("/admin/login/", {"username": "x", "password": "y"})
    assert response.status_code == 503
    assert 1 <= int(response["Retry-After"]) <= 60
    assert "switching" in response.json()["detail"]


@pytest.mark.django_db(databases="__all__")
def test_reads_go_on_and_writes_resume_after(client, flag):
    held = fz.freeze_on(flag, reason="switching")
    assert client.get("/admin/login/").status_code == 200
    fz.freeze_off(flag, held)
    response = client.post("/admin/login/", {"username": "x", "password": "y"})
    assert response.status_code == 200  # the login form again, with its error


@pytest.mark.urls(__name__)
@pytest.mark.django_db(databases="__all__", transaction=True)
def test_a_read_that_writes_is_refused(client, flag):
    client.raise_request_exception = False  # as in production: the view's error becomes a response
    fz.freeze_on(flag, reason="switching")
    assert client.get("/count/").content == b"0"
    response = client.get("/sneaky/")
    assert response.status_code == 503
    assert Organisation.objects.count() == 0
    fz.freeze_off(flag)
    assert client.get("/sneaky/").status_code == 200
    assert Organisation.objects.count() == 1


@pytest.mark.urls(__name__)
@pytest.mark.django_db(databases="__all__", transaction=True)
def test_writes_resume_after_a_frozen_request_that_opened_its_connection(client, flag):
    client.raise_request_exception = False
    held = fz.freeze_on(flag, reason="switching")
    for conn in connections.all():
        conn.close()  # the request opens it: the slow-query logger's wrapper comes after ours
    assert client.get("/sneaky/").status_code == 503
    fz.freeze_off(flag, held)
    assert client.get("/sneaky/").status_code == 200
    assert Organisation.objects.count() == 1


# --- the freeze as a lease: it ends when its owner dies ---------------------------------------

HOLDER = """
import sys, time
from dbmigration import fence
from dbmigration import freeze as fz
held = fz.freeze_on(sys.argv[1], reason="held by a child", expected_seconds=3)
print(held.token, flush=True)
time.sleep(3600)
"""


def start_holder(flag):
    """A real process that takes the freeze and then hangs, renewing its lease."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(flag)], stdout=subprocess.PIPE, text=True
    )
    token = proc.stdout.readline().strip()
    assert token, "the holder did not take the freeze"
    return proc, token


def test_heartbeat_renews_the_lease_while_the_owner_lives(flag):
    held = fz.freeze_on(flag, reason="long", lease_seconds=1.5)
    try:
        time.sleep(3.5)  # more than twice the lease: only renewals keep it
        current = fz.read_freeze(flag)
        assert current is not None and current.token == held.token
        assert time.time() - current.renewed_at < 1.5
        assert fz.still_held(flag, held)
    finally:
        fz.freeze_off(flag, held)
    assert not flag.exists()


def test_a_killed_owner_voids_its_freeze_at_once_and_the_next_one_takes_over(flag):
    proc, token = start_holder(flag)
    try:
        assert fz.read_freeze(flag).token == token
        with pytest.raises(fz.FreezeError, match="that process is alive"):
            fz.freeze_on(flag, reason="second")
        proc.kill()  # kill -9; not reaped yet: a zombie is dead all the same
        time.sleep(0.1)
        leftover = fz.inspect_freeze(flag)
        assert leftover.token == token and fz.read_freeze(flag) is None
        assert "is gone" in leftover.void_reason()
        mine = fz.freeze_on(flag, reason="next command")
        assert "held by a child" in mine.replaced and "is gone" in mine.replaced
        fz.freeze_off(flag, mine)
    finally:
        proc.kill()
        proc.wait()


def test_a_reused_pid_does_not_keep_a_freeze(flag):
    now = time.time()
    ghost = fz.Freeze(
        "switch", now, now + 600, "someone pid 1", "t0k", host=fz.HOST, pid=os.getpid(),
        pid_started="1", pid_namespace=fz.PID_NAMESPACE, renewed_at=now,
    )  # fmt: skip
    write_file_atomic(flag, json.dumps(dataclasses.asdict(ghost)))
    assert fz.read_freeze(flag) is None  # our pid, but not the process that started at "1"
    assert "is gone" in fz.inspect_freeze(flag).void_reason()


def test_an_owner_on_another_host_holds_while_it_renews(flag):
    now = time.time()
    remote = fz.Freeze(
        "switch", now, now + 600, "ops@elsewhere pid 7", "t0k", host="elsewhere", pid=7,
        renewed_at=now,
    )  # fmt: skip
    write_file_atomic(flag, json.dumps(dataclasses.asdict(remote)))
    assert fz.read_freeze(flag) is not None  # pid 7 means nothing here: only the lease tells
    remote.renewed_at = now - fz.LEASE_SECONDS - 1
    write_file_atomic(flag, json.dumps(dataclasses.asdict(remote)))
    assert fz.read_freeze(flag) is None
    assert "stopped renewing it 6 s ago" in fz.inspect_freeze(flag).void_reason()


def test_an_unreadable_flag_freezes_for_one_lease(flag):
    flag.write_text("{half written")
    assert fz.read_freeze(flag).reason == "unreadable freeze file"
    old = time.time() - fz.LEASE_SECONDS - 1
    os.utime(flag, (old, old))
    assert fz.read_freeze(flag) is None


def test_clear_void_removes_only_a_dead_owners_freeze(flag):
    live = fz.freeze_on(flag, reason="alive")
    assert fz.clear_void(flag) is None and flag.exists()
    fz.freeze_off(flag, live)
    proc, _ = start_holder(flag)
    proc.kill()
    proc.wait()
    assert fz.clear_void(flag).reason == "held by a child"
    assert not flag.exists()


@pytest.mark.django_db(databases="__all__")
def test_middleware_ignores_a_dead_owners_freeze_and_retry_after_is_the_estimate(client, flag):
    proc, _ = start_holder(flag)  # expects to lift it in 3 s
    try:
        response = client.post("/admin/login/", {"username": "x", "password": "y"})
        assert response.status_code == 503
        assert 1 <= int(response["Retry-After"]) <= 3
    finally:
        proc.kill()
        proc.wait()
    response = client.post("/admin/login/", {"username": "x", "password": "y"})
    assert response.status_code == 200  # the login form again: the write went through


# --- kill -9 of the switch and of the rollback in their frozen catch-up -----------------------


def runbook_env(db_dir, pause_at: str | None = None) -> dict:
    """The environment of a manage.py subprocess on this test run's databases."""
    pg = connections.settings["postgresql"]
    url = f"postgres://{pg['USER']}:{pg['PASSWORD'] or ''}@{pg['HOST']}:{pg['PORT']}/{pg['NAME']}"
    env = {
        **os.environ,
        "PROPCORE_DATABASE_DIR": str(db_dir),
        "SQLITE_PATH": str(connections.settings["sqlite"]["NAME"]),
        "POSTGRES_URL": url,
    }
    env.pop("PROPCORE_TEST_PAUSE_AT", None)
    if pause_at:
        env["PROPCORE_TEST_PAUSE_AT"] = pause_at  # test-only: hang there, to be killed
    return env


def manage(*args) -> list[str]:
    return [sys.executable, str(settings.BASE_DIR / "manage.py"), *args]


def kill_when_frozen(proc, flag, client) -> float:
    """kill -9 the paused holder; return how long until a write through the app succeeds."""
    deadline = time.monotonic() + 120
    while not (flag.exists() and fz.read_freeze(flag)):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the command never froze writes"
        time.sleep(0.05)
    time.sleep(0.5)  # now inside the catch-up (paused)
    assert client.get("/sneaky/").status_code == 503  # frozen while its owner lives
    proc.kill()
    killed = time.monotonic()
    while (status := client.get("/sneaky/").status_code) == 503:
        assert time.monotonic() - killed < 30, "writes never came back"
        time.sleep(0.05)
    back = time.monotonic() - killed
    assert status == 200
    proc.wait()
    return back


@pytest.fixture
def runbook_dir(settings, tmp_path):
    db_dir = tmp_path / "db"
    settings.STATE_FILE = db_dir / "state.json"
    settings.REPORT_DIR, settings.LOG_DIR = db_dir / "reports", db_dir / "logs"
    settings.BACKUP_DIR = db_dir / "backups"
    return db_dir


@pytest.mark.slow
@pytest.mark.urls(__name__)
@pytest.mark.django_db(databases="__all__", transaction=True)
def test_kill_9_of_the_switch_mid_catch_up_blocks_writes_one_lease_at_most(client, runbook_dir):
    from tests.test_cutover import migrated_state
    from tests.test_rollback import seed_both

    client.raise_request_exception = False
    seed_both()
    write_state(settings.STATE_FILE, migrated_state())
    flag = fz.freeze_path_for(settings.STATE_FILE)
    sqlite_file = Path(connections.settings["sqlite"]["NAME"])
    proc = subprocess.Popen(
        manage("switch_to_postgresql", "--noinput", "--drain-seconds", "0"),
        env=runbook_env(runbook_dir, pause_at="switch_catch_up"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    back = kill_when_frozen(proc, flag, client)
    assert back < fz.LEASE_SECONDS  # the owner is dead on this host: void at once
    assert flag.exists()  # nobody removed it by hand
    assert list(sqlite_file.parent.glob(f"{sqlite_file.name}.cutover-*"))  # the killed snapshot
    written = Organisation.objects.using("sqlite").get(name="Sneaky")  # the write after the kill

    again = subprocess.run(
        manage("switch_to_postgresql", "--noinput", "--drain-seconds", "0"),
        env=runbook_env(runbook_dir),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0, again.stderr
    assert "Took over a leftover write freeze by" in again.stdout
    assert "switch_to_postgresql" in again.stdout and "is gone" in again.stdout
    state = read_state(settings.STATE_FILE)
    assert (state.phase, state.active_backend) == ("switched", "postgresql")
    assert Organisation.objects.using("postgresql").filter(pk=written.pk).exists()
    assert not flag.exists()
    assert not list(sqlite_file.parent.glob(f"{sqlite_file.name}.cutover-*"))


@pytest.mark.slow
@pytest.mark.urls(__name__)
@pytest.mark.usefixtures("restore_default")
@pytest.mark.django_db(databases="__all__", transaction=True)
def test_kill_9_of_the_rollback_mid_catch_up_blocks_writes_one_lease_at_most(client, runbook_dir):
    from tests.test_rollback import assert_same_everywhere, seed_both, write_on_postgresql

    client.raise_request_exception = False
    org, users = seed_both()
    write_state(settings.STATE_FILE, MigrationState(phase="switched", active_backend="postgresql"))
    write_on_postgresql(org, users)
    flag = fz.freeze_path_for(settings.STATE_FILE)
    sqlite_file = Path(connections.settings["sqlite"]["NAME"])
    proc = subprocess.Popen(
        manage("rollback_to_sqlite", "--noinput", "--drain-seconds", "0"),
        env=runbook_env(runbook_dir, pause_at="rollback_catch_up"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    back = kill_when_frozen(proc, flag, client)
    assert back < fz.LEASE_SECONDS
    assert list(sqlite_file.parent.glob(f"{sqlite_file.name}.rollback-*"))
    written = Organisation.objects.using("postgresql").get(name="Sneaky")  # on PostgreSQL, live
    assert read_state(settings.STATE_FILE).active_backend == "postgresql"

    again = subprocess.run(
        manage("rollback_to_sqlite", "--noinput", "--drain-seconds", "0"),
        env=runbook_env(runbook_dir),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0, again.stderr
    assert "Took over a leftover write freeze by" in again.stdout
    assert "Removed the working copies of killed runs" in again.stdout
    state = read_state(settings.STATE_FILE)
    assert (state.phase, state.active_backend) == ("rolled_back", "sqlite")
    assert Organisation.objects.using("sqlite").filter(pk=written.pk).exists()
    assert_same_everywhere()
    assert not flag.exists()
    assert not list(sqlite_file.parent.glob(f"{sqlite_file.name}.rollback-*"))


@pytest.mark.django_db(databases="__all__", transaction=True)
def test_rollback_whose_freeze_ran_out_refuses_to_swap_and_names_freeze_timeout(runbook_dir):
    from io import StringIO

    from django.core.management import CommandError, call_command

    from tests.test_rollback import seed_both, write_on_postgresql

    org, users = seed_both()
    write_state(settings.STATE_FILE, MigrationState(phase="switched", active_backend="postgresql"))
    write_on_postgresql(org, users)
    with pytest.raises(CommandError) as exc:
        call_command(
            "rollback_to_sqlite", "--noinput", "--drain-seconds", "0.2",
            "--freeze-timeout", "0.1", stdout=StringIO(),
        )  # fmt: skip
    assert exc.value.returncode == fz.FreezeError.returncode
    assert "raise --freeze-timeout" in str(exc.value)
    state = read_state(settings.STATE_FILE)
    assert (state.phase, state.active_backend) == ("switched", "postgresql")
    assert not fz.freeze_path_for(settings.STATE_FILE).exists()


# --- kill -9 of the switch after it fenced SQLite, before it flipped the state -----------------


@pytest.mark.slow
@pytest.mark.urls(__name__)
@pytest.mark.django_db(databases="__all__", transaction=True)
@pytest.mark.parametrize(
    "recovery",
    [
        "request",
        "migration_status",
        "db_health_check",
        "rollback_to_sqlite",
        "switch_to_postgresql",
    ],  # fmt: skip
)
def test_kill_9_between_the_fence_and_the_flip_leaves_no_orphaned_fence(
    client, runbook_dir, recovery
):
    # regression: SQLite stayed fenced with the state still naming it active, so every
    # write was refused until someone dropped the fence's triggers by hand
    from tests.test_cutover import migrated_state
    from tests.test_rollback import assert_same_everywhere, seed_both

    client.raise_request_exception = False
    seed_both()
    write_state(settings.STATE_FILE, migrated_state())
    sqlite_file = Path(connections.settings["sqlite"]["NAME"])
    proc = subprocess.Popen(
        manage("switch_to_postgresql", "--noinput", "--drain-seconds", "0"),
        env=runbook_env(runbook_dir, pause_at="switch_fenced"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 180
    while fence.sqlite_fence(sqlite_file) is None:  # committed just before the pause point
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the switch never fenced SQLite"
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    state = read_state(settings.STATE_FILE)
    assert (state.phase, state.active_backend) == ("data_migrated", "sqlite")  # never flipped
    orphan = fence.sqlite_fence(sqlite_file)
    assert orphan["owner"]["pid"] == proc.pid and fence.owner_gone(orphan)

    if recovery == "request":  # the first refused write lifts it; its retry goes through
        assert client.get("/sneaky/").status_code == 503
        while (status := client.get("/sneaky/").status_code) == 503:
            assert time.monotonic() < deadline + 10, "writes never came back"
            time.sleep(0.2)
        assert status == 200
    else:
        done = subprocess.run(
            manage(recovery, "--noinput") if "_to_" in recovery else manage(recovery),
            env=runbook_env(runbook_dir),
            capture_output=True,
            text=True,
            timeout=300,
        )
        said = done.stdout + done.stderr
        assert "ifted the" in said, said
        assert f"write fence on SQLite by {orphan['owner']['owner']}" in said
        if recovery == "db_health_check":
            assert done.returncode == 1, said  # degraded: it says what it did
        else:
            assert done.returncode == 0, said
    if recovery == "switch_to_postgresql":  # finished: everything SQLite held is on PostgreSQL
        state = read_state(settings.STATE_FILE)
        assert (state.phase, state.active_backend) == ("switched", "postgresql")
        assert fence.sqlite_fence(sqlite_file)["owner"]["pid"] != proc.pid  # the new switch's
        assert_same_everywhere()
        return
    assert fence.sqlite_fence(sqlite_file) is None
    assert read_state(settings.STATE_FILE).active_backend == "sqlite"
    assert client.get("/sneaky/").status_code == 200  # writes go on, on SQLite
    assert Organisation.objects.using("sqlite").filter(name="Sneaky").exists()
