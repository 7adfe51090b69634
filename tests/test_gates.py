"""Safety gates: no way around them, and every refusal names the one command to run next."""

import json
import os
import re
import sqlite3
import subprocess
import sys
from io import StringIO
from pathlib import Path

import psycopg
import pytest
from django.core.management import CommandError, call_command

from dbmigration import errors
from dbmigration import state as state_mod
from dbmigration.reports import RunReport
from dbmigration.state import MigrationState, read_state, write_state
from propcore import pgserver

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def state_file(settings, tmp_path):
    settings.STATE_FILE = tmp_path / "state.json"
    settings.REPORT_DIR = tmp_path / "reports"
    settings.LOG_DIR = tmp_path / "logs"
    settings.BACKUP_DIR = tmp_path / "backups"
    return settings.STATE_FILE


# --- ensure_postgres --recreate ------------------------------------------------------------


@pytest.fixture
def target(settings):
    """A scratch target database holding one marker table, as POSTGRES_URL."""
    name = f"propcore_gates_target_{os.getpid()}"
    settings.POSTGRES_URL = f"postgres://postgres@127.0.0.1:5432/{name}"
    pgserver.drop_database(settings.POSTGRES_URL)
    pgserver.ensure_database(settings.POSTGRES_URL)
    with psycopg.connect(settings.POSTGRES_URL, autocommit=True) as conn:
        conn.execute("CREATE TABLE marker (id int)")
    yield name
    pgserver.drop_database(settings.POSTGRES_URL)


def marker_survives(url: str) -> bool:
    with psycopg.connect(url) as conn:
        return conn.execute("SELECT to_regclass('marker') IS NOT NULL").fetchone()[0]


def recreate(*args: str) -> str:
    out = StringIO()
    call_command("ensure_postgres", "--recreate", *args, stdout=out)
    return out.getvalue()


@pytest.mark.parametrize(
    ("phase", "backend"), [("switched", "postgresql"), ("data_migrated", "sqlite")]
)
def test_recreate_refuses_to_drop_a_live_or_migrated_database(
    settings, state_file, target, phase, backend
):
    write_state(state_file, MigrationState(phase=phase, active_backend=backend))
    with pytest.raises(CommandError, match=f"Refusing to drop database '{target}'") as exc:
        recreate()
    assert exc.value.returncode == errors.NotConfirmed.returncode == 9
    assert "--drop-live-database" in str(exc.value)
    # the flag alone is not enough without a person to type the name
    with pytest.raises(CommandError, match="under --noinput") as exc:
        recreate("--drop-live-database", "--noinput")
    assert exc.value.returncode == 9
    assert marker_survives(settings.POSTGRES_URL)


def test_recreate_of_a_live_database_needs_its_name_typed(
    settings, state_file, target, monkeypatch
):
    write_state(state_file, MigrationState(phase="switched", active_backend="postgresql"))
    prompts = []

    def answer(text):
        prompts.append(text)
        return "yes"

    monkeypatch.setattr("builtins.input", answer)
    out = StringIO()
    with pytest.raises(CommandError, match="Cancelled: nothing was dropped") as exc:
        call_command("ensure_postgres", "--recreate", "--drop-live-database", stdout=out)
    assert exc.value.returncode == 9
    assert marker_survives(settings.POSTGRES_URL)
    # the prompt says what will happen before asking
    assert f"This DROPS database '{target}'" in out.getvalue()
    assert "every write since the switch lives there" in out.getvalue()
    assert prompts == [f"    Type the database name '{target}' to drop it: "]

    monkeypatch.setattr("builtins.input", lambda text: target)
    out = recreate("--drop-live-database")
    assert f"{target} (database recreated)" in out
    assert not marker_survives(settings.POSTGRES_URL)


def test_recreate_before_the_migration_needs_no_confirmation(settings, state_file, target):
    write_state(state_file, MigrationState(phase="prepared"))
    assert "(database recreated)" in recreate("--noinput")
    assert not marker_survives(settings.POSTGRES_URL)


# --- after the live database was dropped anyway ----------------------------------------------


@pytest.mark.django_db(databases="__all__", transaction=True)
def test_rollback_after_postgresql_lost_its_tables_is_one_line_not_a_traceback(
    state_file, empty_postgres_database
):
    write_state(state_file, MigrationState(phase="switched", active_backend="postgresql"))
    before = state_file.read_bytes()
    with pytest.raises(CommandError) as exc:
        call_command("rollback_to_sqlite", "--noinput", "--drain-seconds", "0", stdout=StringIO())
    assert exc.value.returncode == errors.TargetError.returncode
    first = str(exc.value).splitlines()[0]
    assert first.startswith("PostgreSQL lacks") and "accounts_kycverification" in first
    assert "rollback_to_sqlite --discard-postgres-writes" in first
    assert state_file.read_bytes() == before
    assert not list(state_file.parent.glob("backups/*"))  # failed before the pre-rollback backup


# --- refusals name one command that can run now ----------------------------------------------

REFUSALS = [
    (phase, target)
    for phase in state_mod.PHASES
    for target in state_mod.COMMAND_FOR_PHASE
    if target not in state_mod.TRANSITIONS[phase]
]


@pytest.mark.parametrize(("phase", "target"), REFUSALS)
def test_every_refusal_names_one_command_that_is_allowed_now(phase, target):
    with pytest.raises(state_mod.StateError) as exc:
        state_mod.require_phase(MigrationState(phase=phase), target)
    message = str(exc.value)
    advised = re.findall(r"(?<!Cannot )\brun (\w+)", message, flags=re.IGNORECASE)
    assert len(advised) == 1, message
    phase_of = {command: p for p, command in state_mod.COMMAND_FOR_PHASE.items()}
    # following the advice must not be refused in turn (no circles)
    assert phase_of[advised[0]] in state_mod.TRANSITIONS[phase], message


def test_switch_refuses_without_printing_a_plan_it_will_not_run(state_file):
    write_state(state_file, MigrationState(phase="prepared"))
    out = StringIO()
    with pytest.raises(CommandError, match="Run migrate_data next") as exc:
        call_command("switch_to_postgresql", "--noinput", stdout=out)
    assert exc.value.returncode == 7
    assert out.getvalue() == ""


def test_the_readme_exit_code_table_lists_every_code_the_engine_uses():
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Exit codes") :]
    documented = {int(code) for code in re.findall(r"^\| `(\d+)` \|", table, flags=re.M)}
    from dbmigration.backup import BackupInterrupted
    from dbmigration.freeze import FreezeError
    from dbmigration.rollback import DiscardNotConfirmed

    classes = [
        *errors.MigrationError.__subclasses__(),
        errors.MigrationError,
        BackupInterrupted,
        FreezeError,
        DiscardNotConfirmed,
    ]
    assert {cls.returncode for cls in classes} <= documented
    assert {0, 1, 2, 78, 130} <= documented


# --- messages: what was interrupted, what is missing -----------------------------------------


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--verify-only"], "during verification: nothing was copied or changed. Run "
         "migrate_data --verify-only again."),
        (["--sync"], "during the --sync catch-up: its one transaction rolled back"),
        ([], "during the copy. The tables being loaded were rolled back"),
    ],
)  # fmt: skip
def test_an_interruption_says_what_was_interrupted(monkeypatch, args, said):
    from dbmigration.management.commands import migrate_data as command

    def interrupted(**kwargs):  # what the SIGTERM handler raises inside the engine
        raise KeyboardInterrupt("signal 15")

    monkeypatch.setattr(command, "migrate_data", interrupted)
    with pytest.raises(CommandError, match=f"Interrupted by SIGTERM {re.escape(said)}") as exc:
        call_command("migrate_data", *args, verbosity=0, stdout=StringIO())
    assert exc.value.returncode == 130


@pytest.mark.parametrize("command", ["db_backup", "migration_prepare"])
def test_encrypt_without_its_key_is_a_settings_error(monkeypatch, state_file, command):
    monkeypatch.delenv("PROPCORE_BACKUP_KEY", raising=False)
    with pytest.raises(
        CommandError, match="--encrypt needs the key in \\$PROPCORE_BACKUP_KEY"
    ) as exc:
        call_command(command, "--encrypt", stdout=StringIO())
    assert exc.value.returncode == errors.ConfigError.returncode == 78


# --- db_restore over the live SQLite file ----------------------------------------------------


@pytest.fixture
def live_sqlite(settings, state_file, tmp_path):
    """A live SQLite file with 10 rows, a verified backup of it, then 7 rows deleted."""
    from dbmigration.backup import create_sqlite_backup
    from tests.sources import make_source

    source = make_source(tmp_path / "live.sqlite3", rows=10)
    info = create_sqlite_backup(sqlite_path=source, backup_dir=settings.BACKUP_DIR)
    with sqlite3.connect(source) as conn:
        conn.execute("DELETE FROM item WHERE id > 3")
    settings.SQLITE_PATH = source
    return source, info


def restore(name: str, *args: str) -> str:
    out = StringIO()
    call_command("db_restore", name, *args, stdout=out)
    return out.getvalue()


def test_restore_refuses_to_replace_the_live_sqlite_file(live_sqlite):
    source, info = live_sqlite
    before = source.read_bytes()
    with pytest.raises(
        CommandError, match="Refusing to replace .*live.sqlite3: the applica"
    ) as exc:
        restore(info.name)
    assert exc.value.returncode == 9 and "--replace-live-database" in str(exc.value)
    with pytest.raises(CommandError, match="under --noinput") as exc:
        restore(info.name, "--replace-live-database", "--noinput")
    assert exc.value.returncode == 9
    assert source.read_bytes() == before
    assert "would keep the current database" in restore(info.name, "--dry-run")  # no gate


def test_restore_of_the_live_file_needs_its_name_typed(live_sqlite, monkeypatch):
    source, info = live_sqlite
    before = source.read_bytes()
    prompts = []
    monkeypatch.setattr("builtins.input", lambda text: prompts.append(text) or "yes")
    with pytest.raises(CommandError, match="Cancelled: nothing was restored") as exc:
        restore(info.name, "--replace-live-database")
    assert exc.value.returncode == 9 and source.read_bytes() == before
    assert prompts == ["    Type the file name 'live.sqlite3' to continue: "]
    monkeypatch.setattr("builtins.input", lambda text: "live.sqlite3")
    out = restore(info.name, "--replace-live-database")
    assert f"Backup {info.name} verified" in out and "This REPLACES" in out and "Restored" in out
    with sqlite3.connect(source) as conn:
        assert conn.execute("SELECT count(*) FROM item").fetchone() == (10,)


def test_restore_after_the_switch_needs_no_confirmation(live_sqlite, state_file):
    # SQLite is no longer written; a rollback carries every PostgreSQL row back into it
    write_state(state_file, MigrationState(phase="switched", active_backend="postgresql"))
    _, info = live_sqlite
    assert "Restored" in restore(info.name, "--noinput")


# --- read-only commands leave no trace -------------------------------------------------------


def test_read_only_commands_create_no_file(tmp_path):
    """Status, health and listing commands on a fresh machine: nothing appears on disk."""
    database_dir = tmp_path / "database"  # does not exist: the SQLite file, state, backups
    code = (
        "import django; django.setup()\n"
        "from io import StringIO\n"
        "from django.core.management import CommandError, call_command\n"
        "for args in (['migration_status'], ['db_health_check'], ['db_health_check', '--json'],"
        " ['db_backup', '--list'], ['switch_to_postgresql', '--dry-run']):\n"
        "    try:\n"
        "        call_command(*args, stdout=StringIO())\n"
        "    except CommandError as exc:\n"
        "        print(args[0], exc.returncode)\n"
    )
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "propcore.settings",
        "PROPCORE_DATABASE_DIR": str(database_dir),
    }
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    # health is down (no SQLite file) and the switch refuses; neither creates anything
    assert result.stdout.split("\n")[:2] == ["db_health_check 2", "db_health_check 2"]
    assert not database_dir.exists(), sorted(database_dir.rglob("*"))


# --- an unreachable target is exit 3 with its cause, not a pool-timeout traceback -----------


@pytest.mark.django_db(databases="__all__", transaction=True)
@pytest.mark.parametrize(
    ("command", "phase", "backend"),
    [
        (["migrate_data"], "prepared", "sqlite"),
        (["migrate_data", "--verify-only"], "data_migrated", "sqlite"),
        (["rollback_to_sqlite", "--noinput"], "switched", "postgresql"),
    ],
)
def test_an_unreachable_target_is_a_target_error(
    state_file, postgres_down, command, phase, backend
):
    write_state(state_file, MigrationState(phase=phase, active_backend=backend))
    before = state_file.read_bytes()
    with pytest.raises(CommandError, match=r"PostgreSQL at .* is not reachable") as exc:
        call_command(*command, verbosity=0, stdout=StringIO(), stderr=StringIO())
    assert exc.value.returncode == errors.TargetError.returncode
    assert "Fix: start the server or correct POSTGRES_URL" in str(exc.value)
    assert state_file.read_bytes() == before


@pytest.mark.django_db(databases="__all__", transaction=True)
def test_switch_to_an_unreachable_target_is_a_target_error(state_file, postgres_down):
    from tests.test_cutover import migrated_state

    write_state(state_file, migrated_state())
    with pytest.raises(CommandError, match=r"PostgreSQL at .* is not reachable") as exc:
        call_command("switch_to_postgresql", "--noinput", verbosity=0, stdout=StringIO())
    assert exc.value.returncode == errors.TargetError.returncode
    assert read_state(state_file).active_backend == "sqlite"


@pytest.mark.parametrize(
    ("raised", "recorded"),
    [
        (KeyboardInterrupt(), "interrupted by Ctrl-C"),
        (KeyboardInterrupt("signal 15"), "interrupted by SIGTERM"),
        (
            errors.TargetError("PostgreSQL at x is not reachable"),
            "PostgreSQL at x is not reachable",
        ),
    ],
)
def test_the_report_says_what_stopped_a_step(tmp_path, raised, recorded):
    run = RunReport.open("migrate_data", report_dir=tmp_path, log_dir=tmp_path)
    with pytest.raises(type(raised)), run.step("verify"):
        raise raised
    report = json.loads(run.finish("failed").read_text())
    assert report["steps"][0]["name"] == "verify"
    assert report["steps"][0]["error"] == recorded  # not "KeyboardInterrupt"


# --- the target's identity: the database migration_prepare checked, and no other ------------


def identity_of_the_test_target() -> dict:
    from django.db import connections

    from dbmigration.preflight import conninfo_from_settings, target_identity

    return target_identity(conninfo_from_settings(connections.settings["postgresql"]))


@pytest.mark.django_db(databases="__all__", transaction=True)
@pytest.mark.parametrize(
    ("changed", "why"),
    [
        ({"database_oid": 1}, "a database dropped and created again since"),
        ({"system_identifier": "1"}, "another server"),
    ],
)
@pytest.mark.parametrize(
    ("command", "phase", "backend"),
    [
        (["migrate_data"], "prepared", "sqlite"),
        (["rollback_to_sqlite", "--noinput"], "switched", "postgresql"),
    ],
)
def test_another_target_than_the_prepared_one_is_refused(
    state_file, command, phase, backend, changed, why
):
    recorded = {**identity_of_the_test_target(), **changed, "where": "app@db-old:5432/propcore"}
    write_state(
        state_file,
        MigrationState(phase=phase, active_backend=backend, extra={"target": recorded}),
    )
    before = state_file.read_bytes()
    with pytest.raises(CommandError, match="is not the target migration_prepare checked") as exc:
        call_command(*command, verbosity=0, stdout=StringIO(), stderr=StringIO())
    assert exc.value.returncode == errors.TargetError.returncode
    assert f"(app@db-old:5432/propcore): it is {why}" in str(exc.value)
    assert "Point POSTGRES_URL back at it, or run migration_prepare" in str(exc.value)
    assert state_file.read_bytes() == before


@pytest.mark.django_db(databases="__all__", transaction=True)
def test_the_same_target_passes_the_identity_check(state_file):
    from django.db import connections

    from dbmigration.preflight import conninfo_from_settings, require_same_target

    recorded = {**identity_of_the_test_target(), "where": "renamed-host:5432/x"}
    require_same_target(recorded, conninfo_from_settings(connections.settings["postgresql"]))
    require_same_target(None, conninfo_from_settings(connections.settings["postgresql"]))


@pytest.mark.django_db(databases="__all__", transaction=True)
def test_switch_to_another_target_than_the_migrated_one_is_refused(state_file):
    from tests.test_cutover import migrated_state

    state = migrated_state()
    state.extra["target"] = {**identity_of_the_test_target(), "database_oid": 1, "where": "old"}
    write_state(state_file, state)
    with pytest.raises(CommandError, match="is not the target migration_prepare checked") as exc:
        call_command("switch_to_postgresql", "--noinput", verbosity=0, stdout=StringIO())
    assert exc.value.returncode == 3
    assert read_state(state_file).active_backend == "sqlite"
