"""The commands as an operator types them: one name per idea, defaults in --help, retention by
default, and one line with a documented exit code for every predictable mistake."""

from __future__ import annotations

import argparse
import json
import re
from io import StringIO

import psycopg
import pytest
from django.core.management import CommandError, call_command, get_commands, load_command_class

from dbmigration import backup
from dbmigration.management.runbook import DEFAULT_KEEP, resolve_keep
from dbmigration.state import MigrationState, write_state
from tests.sources import source_path
from tests.subprojects import must, subproject, unique_db_name

OUR_APPS = ("dbmigration", "accounts", "propcore")
# options every Django command has; Django words their help
DJANGOS_OWN = {"help", "verbosity", "settings", "pythonpath", "traceback", "no_color"}
DJANGOS_OWN |= {"force_color", "skip_checks", "version"}


def our_commands() -> dict[str, argparse.ArgumentParser]:
    return {
        name: load_command_class(app, name).create_parser("manage.py", name)
        for name, app in get_commands().items()
        if app in OUR_APPS
    }


def test_every_option_with_a_default_names_it_in_help():
    missing = []
    for name, parser in our_commands().items():
        formatter = parser._get_formatter()
        for action in parser._actions:
            if action.dest in DJANGOS_OWN or action.help == argparse.SUPPRESS:
                continue
            if not action.option_strings or action.default in (None, False, True, []):
                continue  # positionals, flags, and options that are off unless given
            if action.help is None or "default" not in formatter._expand_help(action):
                missing.append(f"{name} {action.option_strings[0]}")
    assert missing == []


def test_one_name_for_choosing_the_database():
    commands = our_commands()
    for name, parser in commands.items():
        visible = [a for a in parser._actions if a.help != argparse.SUPPRESS]
        shown = {s for a in visible for s in a.option_strings}
        assert "--backend" not in shown, name
        for action in parser._actions:
            if action.dest == "database" and action.help != argparse.SUPPRESS:
                assert action.option_strings == ["--database"], name
    for name in ("db_backup", "db_top_queries", "seed_demo", "refresh_analytics"):
        assert any(a.dest == "database" for a in commands[name]._actions), name
    backup_help = " ".join(commands["db_backup"].format_help().split())
    assert "--database {active,sqlite,postgresql}" in backup_help
    assert "--backend" not in backup_help


def test_keep_and_lock_timeout_read_alike_with_their_defaults():
    commands = our_commands()
    for name, lock_timeout in (("db_backup", 5), ("migration_prepare", 5), ("db_restore", 20)):
        text = " ".join(commands[name].format_help().split())
        assert "--lock-timeout SECONDS Seconds to wait for " in text, name
        assert f"before giving up (default: {lock_timeout:.1f})" in text, name
        if name != "db_restore":
            given = commands[name].parse_args([]).keep
            assert resolve_keep(given) == DEFAULT_KEEP, name
            assert resolve_keep(commands[name].parse_args(["--keep", "all"]).keep) is None
            assert f"'all' keeps every one (default: {DEFAULT_KEEP})" in text, name


def _backup(*args) -> str:
    out = StringIO()
    call_command("db_backup", *args, stdout=out)
    return out.getvalue()


@pytest.mark.django_db(databases="__all__", transaction=True)
def test_backups_are_pruned_by_default_and_the_old_option_name_still_works(settings, tmp_path):
    settings.BACKUP_DIR = tmp_path / "backups"
    settings.REPORT_DIR = tmp_path / "reports"
    settings.LOG_DIR = tmp_path / "logs"
    settings.STATE_FILE = tmp_path / "state.json"
    settings.SQLITE_PATH = source_path()
    for _ in range(DEFAULT_KEEP + 1):
        _backup("--database", "sqlite")
    assert len(backup.list_backups(settings.BACKUP_DIR)) == DEFAULT_KEEP
    assert "sqlite" in _backup("--backend", "sqlite")  # a script written for the old name
    assert len(backup.list_backups(settings.BACKUP_DIR)) == DEFAULT_KEEP
    _backup("--database", "sqlite", "--keep", "all")
    assert len(backup.list_backups(settings.BACKUP_DIR)) == DEFAULT_KEEP + 1
    with pytest.raises(CommandError, match="--keep: must be at least 1"):
        _backup("--keep", "0")
    listed = json.loads(_backup("--list", "--json"))
    assert listed["status"] == "ok" and len(listed["backups"]) == DEFAULT_KEEP + 1


def one_line_error(proc, *, code: int, says: str) -> None:
    """Exit code `code`, one line on stderr that says `says`, and no traceback."""
    assert proc.returncode == code, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0], proc.stderr


@pytest.fixture
def propcore(tmp_path):
    """propcore itself, in a directory of its own and a PostgreSQL database not yet created."""
    name = unique_db_name("ux_propcore")
    (tmp_path / "database").mkdir()
    env = {
        "PROPCORE_DATABASE_DIR": str(tmp_path / "database"),
        "POSTGRES_URL": f"postgres://postgres@127.0.0.1:5432/{name}",
        "PYTHONWARNINGS": "ignore",
    }
    with subproject("propcore.settings", pg_name=name, env=env) as run:
        yield run


def test_demo_data_commands_refuse_in_one_line_with_their_exit_code(propcore, tmp_path):
    run = propcore
    must(run("ensure_postgres"))  # an empty database: no schema yet
    one_line_error(
        run("seed_demo", "--users", "3"), code=7, says="Run: manage.py migrate --database sqlite"
    )
    one_line_error(
        run("seed_demo", "--users", "3", "--database", "postgresql"),
        code=2,
        says="Use --database sqlite",
    )
    one_line_error(
        run("refresh_analytics", "--database", "postgresql"),
        code=7,
        says="Run: manage.py migrate --database postgresql",
    )
    one_line_error(
        run(
            "refresh_analytics",
            "--database",
            "postgresql",
            extra_env={"POSTGRES_URL": "postgres://postgres@127.0.0.1:1/nowhere"},
        ),
        code=3,
        says="PostgreSQL at postgres@127.0.0.1:1/nowhere is not reachable",
    )
    must(run("migrate", "-v", "0"))
    must(run("seed_demo", "--users", "3"))
    one_line_error(run("seed_demo", "--users", "3"), code=9, says="Pass --reset")
    # after the switch SQLite is fenced and kept only for a rollback
    state = MigrationState(phase="switched", active_backend="postgresql")
    write_state(tmp_path / "database" / "state.json", state)
    one_line_error(
        run("seed_demo", "--users", "3", "--reset"), code=7, says="run rollback_to_sqlite first"
    )


def test_a_view_never_filled_gets_a_plain_refresh_without_a_flag(propcore):
    run = propcore
    must(run("ensure_postgres"))
    must(run("migrate", "--database", "postgresql", "-v", "0"))
    with psycopg.connect(run.pg_url, autocommit=True) as conn:  # as a restore without data
        conn.execute("REFRESH MATERIALIZED VIEW accounts_daily_analytics WITH NO DATA")
    out = must(run("refresh_analytics", "--database", "postgresql"))
    assert "(plain REFRESH: the view had never been filled)" in out
    out = must(run("refresh_analytics", "--database", "postgresql"))
    assert "Refreshed accounts_daily_analytics on 'postgresql'." in out  # CONCURRENTLY now


ROWS = re.compile(r"[\d,]+ rows? in \d+ tables?(?: \([^)]*\))?")


def test_seed_backup_prepare_and_verify_count_the_same_rows_and_say_what(propcore):
    run = propcore
    must(run("ensure_postgres"))
    must(run("migrate", "-v", "0"))
    seeded = must(run("seed_demo", "--users", "30"))
    holds = ROWS.search(seeded.splitlines()[-1])[0]  # "'sqlite' now holds ..."
    backup_out = must(run("db_backup"))
    assert len(ROWS.findall(backup_out)) == 1, backup_out  # one total, not two that differ
    backed_up = ROWS.search(backup_out)[0]
    prepare_out = must(run("migration_prepare"))
    prepared = ROWS.search(prepare_out.split("scanned ", 1)[1])[0]
    totals = re.findall(r"([\d,]+) rows?(?: converted)? in ", prepare_out)
    assert set(totals) == {prepared.split(" ")[0]}, prepare_out  # no other total
    copied = must(run("migrate_data"))
    verified = ROWS.search(copied.split("Verified ", 1)[1])[0]
    # the backup holds the whole file; the copy leaves django_migrations to migrate
    assert backed_up == holds
    assert re.fullmatch(
        r"[\d,]+ rows in \d+ tables \(\+[\d,]+ in \d+ of Django's own tables, "
        r"\+\d+ in django_migrations\)",
        holds,
    )
    without_migrations = re.sub(r", \+\d+ in django_migrations", "", holds)
    assert prepared == verified == without_migrations
