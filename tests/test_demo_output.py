"""`make demo` reads clean: no unexpanded variables, the whole runbook, a summary at the end;
the runbook's bulk statements raise no slow-query WARNING in its output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from io import StringIO
from pathlib import Path

from django.core.management import call_command
from django.test import override_settings

from propcore import query_timing

ROOT = Path(__file__).resolve().parent.parent


def demo_commands(**env) -> list[str]:
    clean = {k: v for k, v in os.environ.items() if k != "DEMO_POSTGRES_URL"}
    found = subprocess.run(
        ["make", "-n", "demo"], cwd=ROOT, env={**clean, **env}, capture_output=True, text=True
    )
    assert found.returncode == 0, found.stderr
    return found.stdout.splitlines()


def test_the_demo_runs_the_whole_runbook_with_expanded_urls():
    lines = demo_commands()
    assert not any("${" in line or "$${" in line for line in lines)
    assert any("POSTGRES_URL=postgres://postgres@127.0.0.1:5432/propcore_demo " in x for x in lines)
    managed = [line.split("manage.py ", 1)[1] for line in lines if "manage.py " in line]
    assert managed.index("db_test_postgresql") < managed.index("migration_prepare")
    assert managed.count("switch_to_postgresql --noinput") == 2
    first, second = [i for i, c in enumerate(managed) if c.startswith("switch_to_postgresql")]
    assert "rollback_to_sqlite --noinput" in managed[first:second]
    assert "migration_status" in managed
    assert managed[-1] == "migration_status --summary"
    own = demo_commands(DEMO_POSTGRES_URL="postgres://postgres@127.0.0.1:5432/mine")
    assert any("POSTGRES_URL=postgres://postgres@127.0.0.1:5432/mine " in x for x in own)


class _Connection:
    alias = "postgresql"

    def __init__(self):
        self.execute_wrappers = []


def test_runbook_commands_log_no_slow_query_warnings(monkeypatch):
    for command in ("migrate_data", "switch_to_postgresql", "refresh_analytics"):
        monkeypatch.setattr(sys, "argv", ["manage.py", command])
        conn = _Connection()
        query_timing.install(None, conn)
        assert conn.execute_wrappers == [], command
    monkeypatch.setattr(sys, "argv", ["manage.py", "runserver"])
    conn = _Connection()
    query_timing.install(None, conn)
    assert len(conn.execute_wrappers) == 1  # the application's queries are still timed


def test_the_summary_says_what_the_reports_prove(tmp_path):
    reports = tmp_path / "reports"
    reports.mkdir()
    copy = {
        "command": "migrate_data",
        "status": "ok",
        "facts": {"tables": {"accounts_user": {"rows_written": 10_000}}},
        "steps": [
            {"name": "verify", "details": {"tables": {"accounts_user": {"target_rows": 10_000}}}}
        ],
    }
    switch = {"command": "switch_to_postgresql", "status": "ok", "steps": []}
    switch["facts"] = {"write_freeze_seconds": 0.42}
    refused = {"command": "migrate_data", "status": "refused", "steps": [], "facts": {}}
    for n, report in enumerate((copy, switch, refused)):
        (reports / f"migration_report_2026010{n}T000000Z.json").write_text(json.dumps(report))
    out = StringIO()
    with override_settings(
        STATE_FILE=tmp_path / "state.json",
        REPORT_DIR=reports,
        BACKUP_DIR=tmp_path / "backups",
        SQLITE_PATH=tmp_path / "none.sqlite3",
    ):
        call_command("migration_status", "--summary", stdout=out)
    text = out.getvalue()
    assert "Reports:        3 in " in text
    assert "Rows copied:    10,000 rows in 1 table, by the last full copy" in text
    assert "Rows verified:  10,000 rows in 1 table" in text
    assert "Write freeze:   0.42 s (switch_to_postgresql)" in text
    assert "Not ok:         migration_report_20260102T000000Z.json (migrate_data: refused)" in text
