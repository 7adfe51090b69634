"""PostgreSQL going away mid-run: one line and exit 3, the state unchanged, a re-run works.

The server is "lost" by ending every session on this run's test database with
pg_terminate_backend (what a restart or a failover does to the runbook's connections), at
the moment each test names.
"""

import io
import json

import psycopg
import pytest
from django.core.management import CommandError, call_command
from django.db import connections

from dbmigration import cutover, schema_rebuild
from dbmigration import freeze as fz
from dbmigration.errors import TargetError
from dbmigration.state import read_state, write_state
from tests.sources import make_people, prepared, source_path
from tests.test_cutover import migrated_state
from tests.test_rollback import assert_same_everywhere, seed_both

pytestmark = pytest.mark.django_db(databases="__all__", transaction=True)


@pytest.fixture
def state_file(settings, tmp_path):
    settings.STATE_FILE = tmp_path / "state.json"
    settings.REPORT_DIR = tmp_path / "reports"
    settings.LOG_DIR = tmp_path / "logs"
    settings.BACKUP_DIR = tmp_path / "backups"
    settings.SQLITE_PATH = source_path()
    return settings.STATE_FILE


@pytest.fixture
def cut():
    """cut() ends every session on the test database but the caller's own admin one."""
    cfg = connections.settings["postgresql"]
    admin = psycopg.connect(
        dbname="postgres", host=cfg["HOST"], port=cfg["PORT"] or 5432, user=cfg["USER"],
        autocommit=True,
    )  # fmt: skip
    ended = []

    def cut_now() -> None:
        rows = admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            [cfg["NAME"]],
        ).fetchall()
        ended.append(len(rows))

    yield cut_now
    admin.close()
    reconnect()
    assert ended and ended[0] > 0, "the test never cut a session"


def reconnect() -> None:
    """What a fresh process would have: no connection left from before the cut."""
    connections["postgresql"].close()
    connections["postgresql"].close_pool()


class CutOn(io.StringIO):
    """A command's stdout that cuts PostgreSQL when a progress line starts with prefix."""

    def __init__(self, prefix: str, cut) -> None:
        super().__init__()
        self.prefix, self.cut, self.done = prefix, cut, False

    def write(self, text: str) -> int:
        if text.startswith(self.prefix) and not self.done:
            self.done = True
            self.cut()
        return super().write(text)


def assert_one_line(error: Exception, during: str) -> None:
    message = str(error)
    assert "\n" not in message and "Traceback" not in message, message
    assert message.startswith(f"PostgreSQL went away during {during} ("), message


def test_switch_stage_1_gives_one_line_exit_3_and_a_rerun_switches(state_file, cut):
    seed_both()
    write_state(state_file, migrated_state())
    with pytest.raises(CommandError) as exc:
        call_command(
            "switch_to_postgresql", "--noinput", "--drain-seconds", "0", verbosity=2,
            stdout=CutOn("pre-sync:", cut),
        )  # fmt: skip
    assert exc.value.returncode == 3
    assert_one_line(exc.value, "the switch's presync step")
    assert "run switch_to_postgresql again" in str(exc.value)
    state = read_state(state_file)
    assert (state.phase, state.active_backend) == ("data_migrated", "sqlite")
    assert not fz.freeze_path_for(state_file).exists()
    reconnect()
    result = cutover.switch_to_postgresql(drain_seconds=0)
    assert result.state.active_backend == "postgresql"
    assert_same_everywhere()


def test_switch_catch_up_gives_one_line_and_stays_on_sqlite(state_file, cut):
    seed_both()
    write_state(state_file, migrated_state())

    frozen = []

    def progress(message: str) -> None:
        frozen.append(message == "write freeze on" or bool(frozen and frozen[-1]))
        if frozen[-1] and message.startswith("catch-up: accounts_user"):
            cut()  # in the frozen catch-up, not stage 1b's

    with pytest.raises(TargetError) as exc:
        cutover.switch_to_postgresql(drain_seconds=0, progress=progress)
    assert exc.value.returncode == 3
    assert_one_line(exc.value, "the switch's catch_up step")
    state = read_state(state_file)
    assert (state.phase, state.active_backend) == ("data_migrated", "sqlite")
    assert not fz.freeze_path_for(state_file).exists()  # writes go on, on SQLite
    report = json.loads(max(state_file.parent.glob("reports/migration_report_2*.json")).read_text())
    assert report["status"] == "failed" and report["error"] == str(exc.value)
    reconnect()
    assert cutover.switch_to_postgresql(drain_seconds=0).state.active_backend == "postgresql"


def test_migrate_data_index_rebuild_gives_one_line_and_resumes(state_file, cut, monkeypatch):
    make_people(3)
    prepared(source_path(), state_file)
    finish = schema_rebuild.Rebuilder.finish

    def cut_then_finish(self, *, abandon: bool = False) -> None:
        cut()  # while the keys and indexes of the loaded tables build
        finish(self, abandon=abandon)

    monkeypatch.setattr(schema_rebuild.Rebuilder, "finish", cut_then_finish)
    with pytest.raises(CommandError) as exc:
        call_command("migrate_data", stdout=io.StringIO(), stderr=io.StringIO())
    assert exc.value.returncode == 3
    assert_one_line(exc.value, "migrate_data's copy step")
    assert read_state(state_file).phase == "prepared"
    monkeypatch.undo()
    reconnect()
    out = io.StringIO()
    call_command("migrate_data", stdout=out, stderr=io.StringIO())
    assert "Verified" in out.getvalue()
    assert read_state(state_file).phase == "data_migrated"
