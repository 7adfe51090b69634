"""Running processes follow the state file; switch_to_postgresql refuses, plans and switches."""

import json
import os
import signal
from io import StringIO
from pathlib import Path

import pytest
from django.conf import settings
from django.core.management import CommandError, call_command
from django.db import connections
from django.http import HttpResponse
from django.urls import path

from accounts.models import LoginEvent, Organisation, User
from dbmigration import cutover
from dbmigration import freeze as fz
from dbmigration.plan import build_plan
from dbmigration.state import MigrationState, read_state, write_state
from propcore import middleware
from tests.test_rollback import assert_same_everywhere, seed_both


def count_view(request):
    return HttpResponse(f"{connections['default'].vendor}:{Organisation.objects.count()}")


urlpatterns = [path("count/", count_view)]


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
        ("prepared", "Run migration_prepare and migrate_data first"),
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
    assert "final catch-up, under the lock: rows changed in SQLite since the snapshot" in out
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
    with pytest.raises(CommandError, match="Switch cancelled"):
        run_switch()
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
    late = []

    def app_writes_during_stage_1(message):
        # after the snapshot, before the freeze: only the frozen catch-up can carry these
        if message.startswith("pre-sync:") and not late:
            late.append(writes_on_sqlite(org, users))

    result = cutover.switch_to_postgresql(drain_seconds=0, progress=app_writes_during_stage_1)
    state = read_state(state_file)
    assert (state.phase, state.active_backend) == ("switched", "postgresql")
    assert not fz.freeze_path_for(state_file).exists()
    for user in (early, late[0]):
        assert User.objects.using("postgresql").get(pk=user.pk).email == user.email
    assert User.all_objects.using("postgresql").get(pk=users[0].pk).last_name == "Ó Briain"
    assert not LoginEvent.objects.using("postgresql").filter(pk=3).exists()
    report = json.loads(result.report_path.read_text())
    assert report["status"] == "ok"
    assert 0 < report["facts"]["write_freeze_seconds"] < 30
    steps = {s["name"]: s for s in report["steps"]}
    assert steps["presync"]["details"]["changed"] == 2  # the early user and its audit entry
    tables = steps["catch_up"]["details"]["tables"]
    assert tables["accounts_user"] == [1, 1, 0] and tables["accounts_loginevent"] == [0, 0, 1]
    assert tables["auditlog_logentry"] == [2, 0, 0]  # the audit trail of the late writes
    assert steps["verify"]["details"]["changed_rows_compared"] == 4
    assert steps["verify"]["details"]["ok"] is True


@pytest.mark.django_db(databases="__all__", transaction=True)
def test_interrupted_switch_stays_on_sqlite_and_loses_nothing(state_file, migrated):
    org, users = migrated
    late = []

    def killed(message):
        if message.startswith("pre-sync:") and not late:
            late.append(writes_on_sqlite(org, users))  # after the snapshot
        if message.startswith("catch-up: accounts_user"):
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
    # the application goes on writing to SQLite, then the switch is run again
    again = User.objects.db_manager("sqlite").create_user("after@example.ie", "pw")
    result = cutover.switch_to_postgresql(state_file=state_file, drain_seconds=0)
    assert result.state.active_backend == "postgresql"
    for pk in (new.pk, again.pk):
        assert User.objects.using("postgresql").filter(pk=pk).exists()
    assert_same_everywhere()
