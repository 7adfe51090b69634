"""migration_status: phase, last report, last verified backup, what to run next."""

from __future__ import annotations

import sqlite3
from io import StringIO

from django.core.management import call_command
from django.test import override_settings

from dbmigration import state as state_mod
from dbmigration.backup import create_sqlite_backup
from dbmigration.sqlite_source import source_fingerprint
from dbmigration.status import migration_status
from tests.test_backup import make_source


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
    assert "none verified yet (run db_backup)" in out
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
    assert "Next:           migration_prepare (the source changed since it ran)" in out


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
