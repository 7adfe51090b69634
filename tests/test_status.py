"""migration_status: phase, last report, last verified backup, what to run next."""

from __future__ import annotations

import getpass
import json
import sqlite3
import time
from io import StringIO

from django.core.management import call_command
from django.test import override_settings

from dbmigration import state as state_mod
from dbmigration.backup import create_sqlite_backup
from dbmigration.sqlite_source import source_fingerprint
from dbmigration.status import migration_status
from tests.sources import make_source


def _status(tmp_path, source) -> str:
    out = StringIO()
    with override_settings(
        SQLITE_PATH=source,
        STATE_FILE=tmp_path / "state.json",
        BACKUP_DIR=tmp_path / "backups",
        REPORT_DIR=tmp_path / "reports",
    ):
        call_command("migration_status", stdout=out)
    return out.getvalue()


def test_fresh_install_says_prepare_first(tmp_path):
    out = _status(tmp_path, make_source(tmp_path / "s.sqlite3"))
    assert "Phase:          nothing" in out
    assert "none of sqlite verified yet (run db_backup)" in out
    assert "Next:           migration_prepare" in out


def test_prepared_then_stale(tmp_path):
    source = make_source(tmp_path / "s.sqlite3")
    info = create_sqlite_backup(sqlite_path=source, backup_dir=tmp_path / "backups")
    report = tmp_path / "reports" / "migration_report_20260101T000000000000Z.json"
    report.parent.mkdir()
    report.write_text('{"command": "migration_prepare", "status": "ok"}')
    state_mod.transition(
        tmp_path / "state.json",
        "prepared",
        source_fingerprint=source_fingerprint(source),
        last_report=str(report),
        last_backup=str(info.path),
    )
    out = _status(tmp_path, source)
    assert "Phase:          prepared (active backend: sqlite)" in out
    assert f"{report} (migration_prepare: ok)" in out
    assert f"Last backup:    {info.path} (sqlite" in out and "verified" in out
    assert "Next:           migrate_data" in out and "Stale" not in out

    conn = sqlite3.connect(source)
    conn.execute("INSERT INTO item (name) VALUES ('new')")  # rows change on a live site
    conn.commit()
    assert "Stale" not in _status(tmp_path, source)
    conn.execute("CREATE INDEX item_name ON item (name)")  # the schema must not
    conn.commit()
    conn.close()
    out = _status(tmp_path, source)
    assert "Stale prepare:  schema_sha256 changed since migration_prepare" in out
    next_line = "Next:           migration_prepare (the SQLite schema or migrations changed since"
    assert next_line in out


def test_a_newer_failed_report_is_shown(tmp_path):
    source = make_source(tmp_path / "s.sqlite3")
    reports = tmp_path / "reports"
    reports.mkdir()
    (reports / "migration_report_20260101T000000000000Z.json").write_text(
        '{"command": "migration_prepare", "status": "ok"}'
    )
    (reports / "migration_report_20260102T000000000000Z.json").write_text(
        '{"command": "migration_prepare", "status": "failed"}'
    )
    result = migration_status(
        state_file=tmp_path / "state.json",
        backup_dir=tmp_path / "backups",
        sqlite_path=source,
        report_dir=reports,
    )
    assert result.last_report.endswith("20260102T000000000000Z.json")
    assert result.last_report_status == "migration_prepare: failed"
    assert result.next_step == "migration_prepare"


def test_after_the_switch_next_is_a_postgresql_backup_not_nothing(tmp_path):
    source = make_source(tmp_path / "s.sqlite3")
    create_sqlite_backup(sqlite_path=source, backup_dir=tmp_path / "backups")
    state_mod.write_state(
        tmp_path / "state.json",
        state_mod.MigrationState(phase="switched", active_backend="postgresql"),
    )
    out = _status(tmp_path, source)
    # the SQLite backup holds none of PostgreSQL's writes: it is not the last backup any more
    assert "Last backup:    none of postgresql verified yet (run db_backup)" in out
    assert "Next:           db_backup: nothing protects the live PostgreSQL yet" in out
    assert "Next:           nothing" not in out


def test_after_the_switch_and_a_postgresql_backup_next_is_watching(tmp_path):
    from dbmigration.backup import MANIFEST, BackupInfo

    source = make_source(tmp_path / "s.sqlite3")
    path = tmp_path / "backups" / "20260101T000000Z-postgresql"
    path.mkdir(parents=True)
    info = BackupInfo(
        path=path, kind="postgresql", created_at="2026-01-01T00:00:00+00:00", verified=True
    )
    (path / MANIFEST).write_text(json.dumps(info.to_manifest()))
    state_mod.write_state(
        tmp_path / "state.json",
        state_mod.MigrationState(phase="switched", active_backend="postgresql"),
    )
    out = _status(tmp_path, source)
    assert f"Last backup:    {path} (postgresql" in out
    assert "Next:           PostgreSQL is live: back it up daily (db_backup)" in out
    assert "rollback_to_sqlite only if you must go back" in out


def test_status_and_health_show_a_freeze_its_owner_and_age_and_a_void_one(tmp_path, settings):
    from dbmigration import freeze as fz
    from dbmigration import health
    from tests.test_freeze import start_holder

    source = make_source(tmp_path / "s.sqlite3")
    settings.STATE_FILE = tmp_path / "state.json"
    flag = fz.freeze_path_for(settings.STATE_FILE)
    assert "Write freeze:   none" in _status(tmp_path, source)

    proc, _ = start_holder(flag)  # a live owner: another process, renewing its lease
    try:
        time.sleep(1.2)
        out = _status(tmp_path, source)
        assert f"Write freeze:   ON by {getpass.getuser()}@" in out
        assert f"pid {proc.pid} (held by a child)" in out and " s old, renewed " in out
        check = health.run_check("migration_phase")
        assert check.status == health.DEGRADED
        assert "writes frozen for " in check.message and f"pid {proc.pid}" in check.message
        assert check.details["write_freeze"]["void"] is None
        assert check.details["write_freeze"]["age_seconds"] >= 1
    finally:
        proc.kill()
        proc.wait()
    out = _status(tmp_path, source)
    assert "Write freeze:   left over by" in out
    assert "void (its owner" in out and "is gone): writes go on" in out
    check = health.run_check("migration_phase")
    assert "was left over, void (its owner" in check.message
    assert flag.exists()  # a read-only command and the health check change nothing


def _status_json(tmp_path, source) -> dict:
    out = StringIO()
    with override_settings(
        SQLITE_PATH=source,
        STATE_FILE=tmp_path / "state.json",
        BACKUP_DIR=tmp_path / "backups",
        REPORT_DIR=tmp_path / "reports",
    ):
        call_command("migration_status", "--json", stdout=out)
    return json.loads(out.getvalue())


def test_json_has_stable_keys_and_the_last_completed_step(tmp_path):
    source = make_source(tmp_path / "s.sqlite3")
    body = _status_json(tmp_path, source)
    assert body["status"] == "ok" and body["ok"] is True
    assert body["phase"] == "nothing" and body["active_backend"] == "sqlite"
    assert body["next_step"] == "migration_prepare"
    assert body["last_completed_step"] is None and body["last_backup"] is None

    info = create_sqlite_backup(sqlite_path=source, backup_dir=tmp_path / "backups")
    state_mod.transition(
        tmp_path / "state.json", "prepared", source_fingerprint=source_fingerprint(source)
    )
    # a later refusal writes a failed report but moves no state: the state stays the prepare
    reports = tmp_path / "reports"
    reports.mkdir()
    (reports / "migration_report_29990101T000000000000Z.json").write_text(
        '{"command": "migrate_data", "status": "refused"}'
    )
    body = _status_json(tmp_path, source)
    assert body["last_completed_step"].startswith("migration_prepare at ")
    assert body["last_report"]["status"] == "migrate_data: refused"
    assert body["last_backup"] == {
        "path": str(info.path),
        "kind": "sqlite",
        "created_at": info.created_at,
        "verified": True,
    }
    assert body["history"][-1]["to"] == "prepared"
    text = _status(tmp_path, source)
    assert "Last completed: migration_prepare at " in text
