"""Running processes follow the state file; switch_to_postgresql refuses, plans and switches."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from io import StringIO
from pathlib import Path

import pytest
from django.conf import settings
from django.core.management import CommandError, call_command
from django.db import IntegrityError, connections, transaction
from django.http import HttpResponse
from django.urls import path

from accounts.models import LoginEvent, Organisation, User
from dbmigration import cutover, fence
from dbmigration import freeze as fz
from dbmigration.plan import build_plan
from dbmigration.state import MigrationState, read_state, write_state
from propcore import middleware
from tests.test_rollback import assert_same_everywhere, seed_both


def count_view(request):
    return HttpResponse(f"{connections['default'].vendor}:{Organisation.objects.count()}")


def create_view(request):
    Organisation.objects.using("sqlite").create(name="Straggler", kind="developer")
    return HttpResponse("created", status=201)


def session_view(request):
    request.session["basket"] = "flat"  # saved by SessionMiddleware after the view
    return HttpResponse("saved", status=201)


def signal_view(request):
    # the fenced write happens in a post_save receiver (connected by the test)
    LoginEvent.objects.using("sqlite").create(email_attempted="x@example.ie", success=True)
    return HttpResponse("saved", status=201)


class WriteAfterViewMiddleware:
    """Test-only: writes after the view has answered (an audit or stats middleware)."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        response = self.get_response(request)
        if request.path == "/after/":
            Organisation.objects.using("sqlite").create(name="After", kind="developer")
        return response


urlpatterns = [
    path("count/", count_view),
    path("create/", create_view),
    path("session/", session_view),
    path("signal/", signal_view),
    path("after/", lambda request: HttpResponse("ok", status=201)),
]


@pytest.fixture
def state_file(settings, tmp_path):
    settings.STATE_FILE = tmp_path / "state.json"
    settings.REPORT_DIR = tmp_path / "reports"
    settings.LOG_DIR = tmp_path / "logs"
    settings.BACKUP_DIR = tmp_path / "backups"
    return settings.STATE_FILE


@pytest.fixture
def restore_default():
    """Put the test run's 'default' connection back after a test re-pointed it."""
    saved_settings = dict(connections.settings["default"])
    saved_wrapper = connections["default"]
    saved_backend = middleware.watcher.backend
    yield
    for conn in connections.all(initialized_only=True):
        conn.close()
    middleware._close_default_pool()
    connections.settings["default"].clear()
    connections.settings["default"].update(saved_settings)
    connections["default"] = saved_wrapper
    middleware.watcher.backend = saved_backend
    middleware.watcher.generation += 1  # other threads' wrappers are refreshed too
    middleware.watcher._local.generation = middleware.watcher.generation


def set_active(state_file, backend):
    write_state(state_file, MigrationState(phase="switched", active_backend=backend))


@pytest.mark.urls(__name__)
@pytest.mark.django_db(databases="__all__", transaction=True)
def test_running_process_follows_state_file(client, state_file, restore_default):
    Organisation.objects.using("postgresql").create(name="On PG", kind="developer")
    set_active(state_file, "sqlite")
    assert client.get("/count/").content == b"sqlite:0"
    set_active(state_file, "postgresql")
    assert client.get("/count/").content == b"postgresql:1"
    assert middleware.watcher.backend == "postgresql"
    set_active(state_file, "sqlite")
    assert client.get("/count/").content == b"sqlite:0"


@pytest.mark.django_db(databases="__all__", transaction=True)
def test_sighup_forces_reread(state_file, restore_default, monkeypatch):
    set_active(state_file, "sqlite")
    middleware.watcher.poll()
    assert middleware.install_sighup()
    # the override changes what the process should use without touching the file
    monkeypatch.setenv("DATABASE_ACTIVE", "postgresql")
    assert middleware.watcher.poll() == "sqlite"  # unchanged file: no re-read
    os.kill(os.getpid(), signal.SIGHUP)
    assert middleware.watcher.poll() == "postgresql"
    assert middleware.watcher.refresh_thread()
    assert connections["default"].vendor == "postgresql"


@pytest.mark.urls(__name__)
@pytest.mark.django_db(databases="__all__", transaction=True)
def test_unreadable_state_file_refuses_writes(client, state_file):
    state_file.write_text("{not json")
    response = client.post("/count/")
    assert response.status_code == 503
    assert client.get("/count/").status_code == 200


def migrated_state(verify_status="ok"):
    """A state as migrate_data leaves it: every table done, its report says it verified."""
    done = {t.db_table: 0 for t in build_plan().tables}
    report = settings.REPORT_DIR / "migration_report_migrate_data.json"
    report.parent.mkdir(parents=True, exist_ok=True)
    steps = [{"name": "copy", "status": "ok"}, {"name": "verify", "status": verify_status}]
    report.write_text(json.dumps({"command": "migrate_data", "status": "ok", "steps": steps}))
    return MigrationState(
        phase="data_migrated", extra={"migrate_data": {"done": done}}, last_report=str(report)
    )


def test_switch_refuses_after_a_failed_verification(state_file):
    write_state(state_file, migrated_state(verify_status="failed"))
    with pytest.raises(CommandError, match="did not verify"):
        run_switch("--noinput")


def run_switch(*args):
    out = StringIO()
    call_command("switch_to_postgresql", *args, stdout=out)
    return out.getvalue()


@pytest.mark.parametrize(
    ("phase", "message"),
    [
        ("nothing", "phase 'nothing'; switch_to_postgresql needs 'data_migrated'"),
        ("prepared", "Run migrate_data next"),
        ("data_migrated", "migrate_data has not copied"),
    ],
)
def test_switch_refuses_before_a_verified_migration(state_file, phase, message):
    write_state(state_file, MigrationState(phase=phase))
    with pytest.raises(CommandError, match=message) as exc:
        run_switch("--noinput")
    assert exc.value.returncode == 7
    assert read_state(state_file).active_backend == "sqlite"


def test_switch_refuses_when_already_switched(state_file):
    write_state(state_file, MigrationState(phase="switched", active_backend="postgresql"))
    with pytest.raises(CommandError, match="Already switched"):
        run_switch("--noinput")


def test_dry_run_shows_plan_and_changes_nothing(state_file):
    state = migrated_state()
    write_state(state_file, state)
    before = state_file.read_bytes()
    out = run_switch("--dry-run")
    assert "final catch-up, under the lock: the logged rows that changed since the snapshot" in out
    assert "fence SQLite (triggers refuse every later write, from any process)" in out
    assert "Dry run" in out
    assert state_file.read_bytes() == before
    assert not fz.freeze_path_for(state_file).exists()


def test_switch_refuses_while_another_freeze_is_on(state_file):
    write_state(
        state_file,
        migrated_state(),
    )
    fz.freeze_on(fz.freeze_path_for(state_file), reason="someone else")
    with pytest.raises(CommandError, match="already on \\(someone else"):
        run_switch("--noinput")


def test_typed_confirmation_other_than_yes_cancels(state_file, monkeypatch):
    write_state(
        state_file,
        migrated_state(),
    )
    monkeypatch.setattr("builtins.input", lambda prompt: "no")
    with pytest.raises(CommandError, match="Switch cancelled") as exc:
        run_switch()
    assert exc.value.returncode == 9
    assert read_state(state_file).phase == "data_migrated"


@pytest.fixture
def migrated(state_file):
    """Both engines hold the same rows and the state says migrate_data finished."""
    org, users = seed_both()
    write_state(state_file, migrated_state())
    return org, users


def writes_on_sqlite(org, users):
    """The application keeps writing to SQLite between migrate_data and the switch."""
    lite = "sqlite"
    new = User.objects.db_manager(lite).create_user("late@example.ie", "pw")
    changed = User.all_objects.using(lite).get(pk=users[0].pk)
    changed.last_name = "Ó Briain"
    changed.save(using=lite)
    LoginEvent.objects.using(lite).filter(pk=3).delete()
    return new


@pytest.mark.django_db(databases="__all__", transaction=True)
def test_switch_catches_up_verifies_and_flips(state_file, migrated, settings):
    org, users = migrated
    early = User.objects.db_manager("sqlite").create_user("early@example.ie", "pw")
    late, last = [], []

    def app_writes_during_stage_1(message):
        # after the first snapshot: the unfrozen second pass (stage 1b) carries these
        if message.startswith("pre-sync:") and not late:
            late.append(writes_on_sqlite(org, users))
        # after the second snapshot, before the freeze: only the frozen catch-up can
        if message.startswith("stage 1b: carried") and not last:
            last.append(User.objects.db_manager("sqlite").create_user("last@example.ie", "pw"))
            User.all_objects.using("sqlite").filter(pk=users[1].pk).update(last_name="Ní Bhriain")
            # a row stage 1b carried, written again: logged again, past the watermark
            User.all_objects.using("sqlite").filter(pk=users[0].pk).update(first_name="Siobhán")

    result = cutover.switch_to_postgresql(drain_seconds=0, progress=app_writes_during_stage_1)
    state = read_state(state_file)
    assert (state.phase, state.active_backend) == ("switched", "postgresql")
    assert not fz.freeze_path_for(state_file).exists()
    for user in (early, late[0], last[0]):
        assert User.objects.using("postgresql").get(pk=user.pk).email == user.email
    assert User.all_objects.using("postgresql").get(pk=users[0].pk).last_name == "Ó Briain"
    assert User.all_objects.using("postgresql").get(pk=users[1].pk).last_name == "Ní Bhriain"
    assert User.all_objects.using("postgresql").get(pk=users[0].pk).first_name == "Siobhán"
    assert not LoginEvent.objects.using("postgresql").filter(pk=3).exists()
    report = json.loads(result.report_path.read_text())
    assert report["status"] == "ok"
    assert 0 < report["facts"]["write_freeze_seconds"] < 30
    steps = {s["name"]: s for s in report["steps"]}
    assert steps["presync"]["details"]["changed"] == 2  # the early user and its audit entry
    unfrozen = steps["catch_up_unfrozen"]["details"]["tables"]
    assert unfrozen["accounts_user"] == [1, 1, 0] and unfrozen["accounts_loginevent"] == [0, 0, 1]
    assert unfrozen["auditlog_logentry"] == [2, 0, 0]  # the audit trail of the late writes
    # frozen: only what was written after the second snapshot (a user made, two updated in
    # bulk: the updates have no audit entry, the creation one)
    tables = steps["catch_up"]["details"]["tables"]
    assert tables["accounts_user"] == [1, 2, 0] and "accounts_loginevent" not in tables
    assert tables["auditlog_logentry"] == [1, 0, 0]
    assert steps["verify"]["details"]["changed_rows_compared"] == 4
    assert steps["verify"]["details"]["ok"] is True
    # the frozen catch-up compared the logged rows only, and the fence dropped the log
    assert steps["change_log"]["details"] == {"logging": True}
    composite = [t for t in build_plan().tables if t.composite]
    assert steps["verify"]["details"]["tables_counted"] == len(composite)  # others: logged
    assert 4 <= steps["catch_up_unfrozen"]["details"]["keys_logged"] < 20
    assert steps["catch_up"]["details"]["keys_logged"] == 4  # past the second snapshot only
    assert not sqlite_log_objects()


def sqlite_log_objects() -> list[str]:
    conn = sqlite3.connect(connections.settings["sqlite"]["NAME"])
    try:
        return [
            r[0]
            for r in conn.execute(
                "SELECT name FROM sqlite_master WHERE name LIKE 'propcore\\_fence\\_log%' "
                "ESCAPE '\\'"
            )
        ]
    finally:
        conn.close()


@pytest.mark.django_db(databases="__all__", transaction=True)
def test_without_a_change_log_the_catch_up_compares_every_row(state_file, migrated, monkeypatch):
    org, users = migrated
    late = []

    def app_writes_during_stage_1(message):
        if message.startswith("pre-sync:") and not late:
            late.append(writes_on_sqlite(org, users))

    def busy(*args, **kwargs):
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(fence, "start_sqlite_change_log", busy)
    result = cutover.switch_to_postgresql(drain_seconds=0, progress=app_writes_during_stage_1)
    steps = {s["name"]: s for s in json.loads(result.report_path.read_text())["steps"]}
    assert steps["change_log"]["details"] == {"logging": False}
    assert steps["verify"]["details"]["tables_counted"] == len(build_plan().tables)
    assert steps["catch_up"]["details"]["tables"]["accounts_user"] == [1, 1, 0]
    assert User.objects.using("postgresql").filter(pk=late[0].pk).exists()
    assert_same_everywhere()


@pytest.mark.django_db(databases="__all__", transaction=True)
def test_the_switch_shows_the_catch_ups_rows_carried_and_rate(
    state_file, migrated, settings, monkeypatch
):
    from dbmigration.management.progress import ProgressRenderer

    org, users = migrated
    settings.DBMIGRATION = {**getattr(settings, "DBMIGRATION", {}), "PROGRESS_SECONDS": 0}
    note = ProgressRenderer.note
    late = []

    def app_writes_during_stage_1(renderer, message):
        # the renderer is the real one; the application writes while stage 1 runs
        if message.startswith("pre-sync:") and not late:
            late.append(writes_on_sqlite(org, users))
        note(renderer, message)

    monkeypatch.setattr(ProgressRenderer, "note", app_writes_during_stage_1)
    out = run_switch("--noinput", "--drain-seconds", "0")
    assert late and read_state(state_file).active_backend == "postgresql"
    # 1 + 1 users, 2 audit entries written, 1 login event deleted: 5 rows carried
    lines = [line for line in out.splitlines() if line.startswith("catch-up: rows ")]
    assert lines[0].startswith("catch-up: rows 0/5"), out  # stage 1b carries them
    assert any(line.startswith("catch-up: rows 5/5 (") and " rows/s" in line for line in lines)


@pytest.mark.django_db(databases="__all__", transaction=True)
def test_interrupted_switch_stays_on_sqlite_and_loses_nothing(state_file, migrated):
    org, users = migrated
    late = []

    def killed(message):
        if message.startswith("stage 1b: carried") and not late:
            late.append(writes_on_sqlite(org, users))  # after the second snapshot
        if message.startswith("catch-up: accounts_user") and late:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the frozen catch-up

    with pytest.raises(KeyboardInterrupt):
        cutover.switch_to_postgresql(state_file=state_file, drain_seconds=0, progress=killed)
    state = read_state(state_file)
    assert (state.phase, state.active_backend) == ("data_migrated", "sqlite")
    assert not fz.freeze_path_for(state_file).exists()  # writes resume, on SQLite
    new = late[0]
    assert User.objects.using("sqlite").filter(pk=new.pk).exists()
    # the catch-up is one transaction: nothing of it reached PostgreSQL
    assert not User.objects.using("postgresql").filter(pk=new.pk).exists()
    assert LoginEvent.objects.using("postgresql").filter(pk=3).exists()
    assert not list(Path(connections.settings["sqlite"]["NAME"]).parent.glob("*.cutover-*"))
    assert not sqlite_log_objects()  # no trigger of ours left on the live file
    # the application goes on writing to SQLite, then the switch is run again
    again = User.objects.db_manager("sqlite").create_user("after@example.ie", "pw")
    result = cutover.switch_to_postgresql(state_file=state_file, drain_seconds=0)
    assert result.state.active_backend == "postgresql"
    for pk in (new.pk, again.pk):
        assert User.objects.using("postgresql").filter(pk=pk).exists()
    assert_same_everywhere()


# --- the fence: SQLite's write lock is the drain, triggers refuse every later write ----------


def sqlite_path() -> Path:
    return Path(connections.settings["sqlite"]["NAME"])


def write_from_another_process(path: Path, timeout: float = 0.3) -> str:
    """Try one write through a plain sqlite3 connection in a new process; return its outcome."""
    script = (
        "import sqlite3, sys\n"
        "c = sqlite3.connect(sys.argv[1], timeout=float(sys.argv[2]))\n"
        "try:\n"
        "    c.execute(\"INSERT INTO item (name) VALUES ('other process')\"); c.commit()\n"
        "    print('written')\n"
        "except sqlite3.Error as exc:\n"
        "    print(exc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(path), str(timeout)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return done.stdout.strip()


def test_reading_the_source_keeps_the_write_lock(tmp_path):
    # regression: open_readonly checked the header with open()/close() in Python, and closing
    # any descriptor of the file dropped the process's POSIX locks: the switch's write lock
    path = tmp_path / "live.sqlite3"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE item (id INTEGER PRIMARY KEY, name TEXT)")
    conn.commit()
    conn.close()
    lock = fence.hold_sqlite_write_lock(path, timeout=1)
    try:
        from dbmigration.sqlite_source import open_readonly

        open_readonly(path).close()
        assert write_from_another_process(path) == "database is locked"
        lock.fence(["item"], reason="switched to PostgreSQL")
    finally:
        lock.release()
    refused = write_from_another_process(path)
    assert refused.startswith("propcore write fence: switched to PostgreSQL")
    assert fence.sqlite_fence(path)["reason"] == "switched to PostgreSQL"
    assert fence.lift_sqlite_fence(path) and fence.sqlite_fence(path) is None
    assert write_from_another_process(path) == "written"


@pytest.mark.django_db(databases="__all__", transaction=True)
def test_switch_waits_for_a_transaction_in_flight_and_fences_sqlite(state_file, migrated):
    committed = threading.Event()
    started = threading.Event()

    def slow_request():
        # began before the freeze, still inside its transaction when the freeze starts
        with transaction.atomic(using="sqlite"):
            Organisation.objects.using("sqlite").create(name="Slow", kind="developer")
            started.set()
            time.sleep(1.0)
        committed.set()
        connections.close_all()

    thread = threading.Thread(target=slow_request)

    def at(message):
        if message == "write freeze on":
            thread.start()
            started.wait(10)

    result = cutover.switch_to_postgresql(state_file=state_file, drain_seconds=10, progress=at)
    thread.join()
    assert committed.is_set()
    assert Organisation.objects.using("postgresql").filter(name="Slow").exists()  # carried
    steps = {s["name"]: s for s in json.loads(result.report_path.read_text())["steps"]}
    assert steps["drain"]["details"]["waited_seconds"] >= 0.5
    assert steps["fence_sqlite"]["status"] == "ok"
    # SQLite refuses every later write, from this process and from any other
    with pytest.raises(middleware.FenceRefused, match="propcore write fence"):
        Organisation.objects.using("sqlite").create(name="Too late", kind="developer")
    assert fence.sqlite_fence(sqlite_path())["reason"] == "switched to PostgreSQL"


@pytest.mark.django_db(databases="__all__", transaction=True)
def test_a_transaction_longer_than_the_drain_bound_stops_the_switch(state_file, migrated):
    holding, release = threading.Event(), threading.Event()

    def long_transaction():
        with transaction.atomic(using="sqlite"):
            Organisation.objects.using("sqlite").create(name="Long", kind="developer")
            holding.set()
            release.wait(10)
        connections.close_all()

    thread = threading.Thread(target=long_transaction)
    thread.start()
    holding.wait(10)
    try:
        with pytest.raises(fence.DrainTimeout, match="more than 0.5 s .* raise --drain-seconds"):
            cutover.switch_to_postgresql(state_file=state_file, drain_seconds=0.5)
    finally:
        release.set()
        thread.join()
    state = read_state(state_file)
    assert (state.phase, state.active_backend) == ("data_migrated", "sqlite")
    assert not fz.freeze_path_for(state_file).exists()
    assert fence.sqlite_fence(sqlite_path()) is None  # the application goes on writing
    assert Organisation.objects.using("sqlite").filter(name="Long").exists()


@pytest.mark.urls(__name__)
@pytest.mark.django_db(databases="__all__", transaction=True)
def test_a_write_refused_by_the_fence_answers_503_not_500(client, state_file):
    lock = fence.hold_sqlite_write_lock(sqlite_path(), timeout=5)
    lock.fence([Organisation._meta.db_table], reason="switched to PostgreSQL")
    lock.release()
    response = client.post("/create/")  # a straggler past the freeze check, on the old store
    assert response.status_code == 503
    assert response.json()["error"] == "write_freeze"
    assert int(response["Retry-After"]) >= 1
    fence.lift_sqlite_fence(sqlite_path())
    assert client.post("/create/").status_code == 201


def _organisation_after_login_event(sender, instance, created, using, **kwargs):
    Organisation.objects.using(using).create(name="For a login", kind="developer")


@pytest.mark.urls(__name__)
@pytest.mark.django_db(databases="__all__", transaction=True)
@pytest.mark.parametrize("where", ["view", "session save", "middleware after the view", "signal"])
def test_a_fence_refusal_answers_503_wherever_it_is_raised(client, state_file, settings, where):
    # regression: a refusal raised outside the view (SessionMiddleware saving the session,
    # a middleware writing after the view) reached Django's 500 handler, not our 503
    from django.contrib.sessions.models import Session
    from django.db.models.signals import post_save

    settings.MIDDLEWARE = [
        *settings.MIDDLEWARE,
        f"{__name__}.WriteAfterViewMiddleware",  # inside the others: its error is theirs
    ]
    client.raise_request_exception = False  # Django's signal still carries the exception
    url = {"view": "/create/", "session save": "/session/",
           "middleware after the view": "/after/", "signal": "/signal/"}[where]  # fmt: skip
    post_save.connect(_organisation_after_login_event, sender=LoginEvent)
    fenced = [Organisation._meta.db_table, Session._meta.db_table]
    lock = fence.hold_sqlite_write_lock(sqlite_path(), timeout=5)
    lock.fence(fenced, reason="switched to PostgreSQL")
    lock.release()
    try:
        # no freeze: a straggler that passed the middleware before it, writing after the flip
        refused = client.post(url)
        assert refused.status_code == 503, refused.content[:300]
        assert refused.json()["error"] == "write_freeze"
        assert refused["Retry-After"] == "1"  # the switch is over: retry at once, elsewhere
    finally:
        post_save.disconnect(_organisation_after_login_event, sender=LoginEvent)
        fence.lift_sqlite_fence(sqlite_path())
    assert client.post(url).status_code == 201


@pytest.mark.django_db(databases="__all__", transaction=True)
def test_a_sqlite_fence_refusal_is_no_integrity_error():
    # regression: the trigger's RAISE read as IntegrityError, which the session store's
    # create() takes for a key collision: it drew new keys and saved again, for ever
    from django.db import OperationalError

    lock = fence.hold_sqlite_write_lock(sqlite_path(), timeout=5)
    lock.fence([Organisation._meta.db_table], reason="switched to PostgreSQL")
    lock.release()
    try:
        with pytest.raises(OperationalError, match="propcore write fence") as refused:
            Organisation.objects.using("sqlite").create(name="Late", kind="developer")
        assert isinstance(refused.value, middleware.FenceRefused)
        assert not isinstance(refused.value, IntegrityError)
        assert fence.is_fence_refusal(refused.value)
    finally:
        fence.lift_sqlite_fence(sqlite_path())


@pytest.mark.django_db(databases="__all__", transaction=True)
def test_a_changed_row_that_arrives_wrong_is_refused(state_file, migrated, monkeypatch):
    org, users = migrated
    late = []
    apply = cutover.apply_source_changes

    def app_writes_during_stage_1(message):
        if message.startswith("pre-sync:") and not late:
            late.append(writes_on_sqlite(org, users))

    def applies_then_breaks(**kwargs):  # a faulty catch-up: one changed row arrives wrong
        done = apply(**kwargs)
        with connections["postgresql"].cursor() as cursor:
            cursor.execute(
                "UPDATE accounts_user SET last_name = 'wrong' WHERE id = %s", [users[0].pk]
            )
        return done

    monkeypatch.setattr(cutover, "apply_source_changes", applies_then_breaks)
    with pytest.raises(
        cutover.VerificationError, match=f"accounts_user: rows differ: .*{users[0].pk.hex}"
    ):
        cutover.switch_to_postgresql(drain_seconds=0, progress=app_writes_during_stage_1)
    assert read_state(state_file).active_backend == "sqlite"
