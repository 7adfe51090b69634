"""Every runbook command leaves a log and a JSON report, refusals included, with who/what/where."""

from __future__ import annotations

import json
import subprocess
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command
from django.db import connections
from django.test import override_settings

from dbmigration.reports import RunReport
from tests.sources import make_source

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def dirs(tmp_path):
    with override_settings(
        STATE_FILE=tmp_path / "state.json",
        REPORT_DIR=tmp_path / "reports",
        LOG_DIR=tmp_path / "logs",
        BACKUP_DIR=tmp_path / "backups",
        SQLITE_PATH=make_source(tmp_path / "s.sqlite3"),
        ACTIVE_BACKEND="sqlite",
    ):
        yield tmp_path


def only_report(tmp_path) -> dict:
    (path,) = (tmp_path / "reports").glob("migration_report_*.json")
    return json.loads(path.read_text())


def test_a_refusal_before_the_run_is_a_step_with_its_exit_code(dirs, monkeypatch):
    monkeypatch.setitem(connections.settings["postgresql"], "PASSWORD", "s3cret-pw")
    with pytest.raises(CommandError, match="Run migration_prepare") as caught:
        call_command("migrate_data", stdout=StringIO(), stderr=StringIO())
    assert caught.value.returncode == 7
    report = only_report(dirs)
    assert report["command"] == "migrate_data" and report["status"] == "refused"
    assert report["exit_code"] == 7
    (step,) = report["steps"]
    assert step["name"] == "checks" and step["status"] == "refused"
    assert "Run migration_prepare" in step["error"]
    assert "error" not in report["facts"]
    # what an auditor asks first
    cfg = connections.settings["postgresql"]
    assert report["target"] == f"{cfg['USER']}@{cfg['HOST']}:{cfg['PORT'] or 5432}/{cfg['NAME']}"
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    assert report["git_commit"] == head.stdout.strip()
    assert report["tool_version"] == "0.1.0"
    assert report["command_line"] and "@" in report["user"]
    log = Path(report["log_path"]).read_text()
    assert "step checks: refused" in log and "exit code 7" in log
    assert "s3cret-pw" not in json.dumps(report) and "s3cret-pw" not in log
    # the status shows the refusal as the last report, and no completed step as the state
    out = StringIO()
    call_command("migration_status", "--json", stdout=out)
    status = json.loads(out.getvalue())
    assert status["phase"] == "nothing" and status["last_completed_step"] is None
    assert status["last_report"]["status"] == "migrate_data: refused"


def test_an_error_outside_every_step_moves_into_a_step(tmp_path):
    run = RunReport.open("migration_prepare", report_dir=tmp_path / "r", log_dir=tmp_path / "l")
    run.facts["error"] = "Cannot run migration_prepare now"
    report = json.loads(run.finish("failed").read_text())
    assert report["steps"] == [
        {
            "name": "checks",
            "status": "failed",
            "seconds": 0.0,
            "details": {},
            "warnings": [],
            "error": "Cannot run migration_prepare now",
        }
    ]
    assert "error" not in report["facts"] and report["exit_code"] == 1


def test_db_backup_writes_a_report_and_per_table_counts_in_the_log(dirs):
    call_command("db_backup", stdout=StringIO())
    report = only_report(dirs)
    assert report["command"] == "db_backup" and report["status"] == "ok"
    assert report["exit_code"] == 0
    (step,) = report["steps"]
    assert step["name"] == "backup_sqlite" and step["details"]["tables"]["item"] == {"rows": 50}
    log = Path(report["log_path"]).read_text()
    assert "backup_sqlite item: rows 50" in log


def test_a_refused_backup_is_recorded_too(dirs):
    # a refusal of the run, not of the command line (a bad option value is a usage error)
    (dirs / "s.sqlite3").unlink()
    with pytest.raises(CommandError) as caught:
        call_command("db_backup", stdout=StringIO())
    report = only_report(dirs)
    assert report["status"] in ("refused", "failed")
    assert report["exit_code"] == caught.value.returncode != 0
    assert report["steps"][-1]["error"]
