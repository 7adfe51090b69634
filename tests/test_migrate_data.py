"""The migrate_data command, end to end, plus resume after an interruption."""

import json
import re
import sqlite3
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command
from django.db import connections
from django.test import override_settings

from accounts.models import LoginEvent, User
from dbmigration import state as state_mod
from dbmigration.copy import copy_data
from dbmigration.done_marks import done_tables
from dbmigration.plan import build_plan
from dbmigration.sqlite_source import content_sha256, file_sha256
from dbmigration.verify import Side, verify
from tests.sources import bad_copy, make_people, prepared, source_path

ALL = pytest.mark.django_db(databases="__all__", transaction=True)


@pytest.fixture
def dirs(tmp_path):
    with override_settings(
        STATE_FILE=tmp_path / "state.json",
        REPORT_DIR=tmp_path / "reports",
        LOG_DIR=tmp_path / "logs",
        SQLITE_PATH=source_path(),
    ):
        yield tmp_path


def run(*args, **kwargs) -> str:
    out = StringIO()
    call_command("migrate_data", *args, stdout=out, stderr=StringIO(), **kwargs)
    return out.getvalue()


def verified_all(out: str) -> bool:
    """The verification line covers every planned table, Django's own counted apart."""
    found = re.search(r"Verified ([\d,]+) rows in (\d+) tables?(?: \(\+[\d,]+ in (\d+) of)?", out)
    return bool(found) and int(found[2]) + int(found[3] or 0) == len(build_plan().tables)


@ALL
def test_refuses_before_prepare(dirs):
    with pytest.raises(CommandError, match="in phase .nothing.. Run migration_prepare") as caught:
        run()
    assert caught.value.returncode == 7


@ALL
# a schema change needs the prepare again, however far the copy got (--sync carries rows)
@pytest.mark.parametrize("phase", ["prepared", "data_migrated"])
def test_refuses_a_stale_prepare(dirs, phase):
    make_people(1)
    prepared(source_path(), dirs / "state.json", schema_sha256="0" * 64)
    state = state_mod.read_state(dirs / "state.json")
    state.phase = phase
    state_mod.write_state(dirs / "state.json", state)
    with pytest.raises(CommandError, match="schema changed since migration_prepare") as caught:
        run()
    assert caught.value.returncode == 2
    assert "Run migration_prepare again" in str(caught.value)
    assert str(caught.value).count("Run ") == 1  # one next step, not a choice


@ALL
def test_copy_verify_report_and_rerun(dirs):
    make_people(3)
    prepared(source_path(), dirs / "state.json")
    before = file_sha256(source_path())
    out = run()
    assert verified_all(out) and "migrate_data (copy) done." in out
    assert file_sha256(source_path()) == before
    state = state_mod.read_state(dirs / "state.json")
    assert state.phase == "data_migrated"
    assert state.source_fingerprint["sha256"] == before
    report = json.loads(next((dirs / "reports").glob("*.json")).read_text())
    users = report["facts"]["tables"]["accounts_user"]
    assert (users["rows_read"], users["rows_written"], users["rows_rejected"]) == (3, 3, 0)
    assert users["source_checksum"] == users["target_checksum"] != ""
    assert "rows_per_second" in users and "seconds" in users
    # re-running after success copies nothing and verifies again
    again = run()
    assert "already-done" in again and verified_all(again)
    assert User.objects.using("postgresql").count() == 3
    assert run(verbosity=0) == ""
    checked = run("--verify-only")
    assert verified_all(checked) and "migrate_data (verify-only) done." in checked
    User.objects.using("postgresql").update(first_name="tampered")
    with pytest.raises(CommandError, match="Verification failed") as caught:
        run("--verify-only")
    assert caught.value.returncode == 6 and "accounts_user: same row count (3)" in str(caught.value)


@ALL
def test_bad_row_stops_and_phase_stays(dirs, tmp_path):
    make_people(2)
    path = bad_copy(tmp_path, "UPDATE accounts_user SET first_name = 'x' || char(0) || 'y'")
    prepared(path, dirs / "state.json")
    with override_settings(SQLITE_PATH=path), pytest.raises(CommandError) as caught:
        run()
    assert caught.value.returncode == 5
    assert "accounts_user pk=" in str(caught.value) and "NUL byte" in str(caught.value)
    listed = next((dirs / "reports").glob("rejects_*.jsonl")).read_text().splitlines()
    assert len(listed) == 2 and "Every row is listed in" in str(caught.value)
    assert state_mod.read_state(dirs / "state.json").phase == "prepared"
    with override_settings(SQLITE_PATH=path):
        out = run("--quarantine")
    assert "quarantined" in out
    report = sorted((dirs / "reports").glob("*.json"))[-1]
    facts = json.loads(report.read_text())["facts"]
    assert facts["rejected_total"] >= 2  # both users, and the rows pointing at them
    assert facts["reject_file"].endswith(".jsonl")


@ALL
def test_sync_command_carries_changes(dirs):
    users = make_people(2)
    prepared(source_path(), dirs / "state.json")
    run()
    User.objects.using("sqlite").filter(pk=users[1].pk).update(last_name="Later")
    out = run("--sync")  # a changed row is no stale prepare: --sync carries it
    assert "Synced" in out
    assert User.objects.using("postgresql").get(pk=users[1].pk).last_name == "Later"


@ALL
def test_resume_after_interruption(tmp_path):
    make_people(3)
    state = tmp_path / "state.json"

    def interrupt(table, done, total):
        if table == "accounts_loginevent" and done > 0:
            raise KeyboardInterrupt  # Ctrl-C in the middle of a table

    with pytest.raises(KeyboardInterrupt):
        copy_data(sqlite_path=source_path(), state_file=state, progress=interrupt)
    sha = content_sha256(source_path())
    done = done_tables(state, source_sha256=sha)
    assert "accounts_user" in done and "accounts_loginevent" not in done
    assert not LoginEvent.objects.using("postgresql").exists()  # the half table rolled back
    with connections["postgresql"].cursor() as cur:
        cur.execute("SELECT count(*) FROM pg_indexes WHERE indexname = 'login_created_idx'")
        assert cur.fetchone()[0] == 0  # still dropped, remembered in the state file
    result = copy_data(sqlite_path=source_path(), state_file=state)
    status = {t.table: t.status for t in result.tables}
    assert status["accounts_user"] == "already-done"
    assert status["accounts_loginevent"] == "copied"
    assert result.schema_problems == []
    check = verify(source=Side(sqlite_path=source_path()), target=Side(alias="postgresql"))
    assert check.ok
    third = copy_data(sqlite_path=source_path(), state_file=state)
    assert {t.status for t in third.tables} == {"already-done"}


@ALL
def test_source_change_invalidates_done_markers(tmp_path):
    make_people(1)
    state = tmp_path / "state.json"
    copy_data(sqlite_path=source_path(), state_file=state)
    conn = sqlite3.connect(source_path())
    conn.execute("UPDATE accounts_user SET last_name = 'Changed'")
    conn.commit()
    conn.close()
    result = copy_data(sqlite_path=source_path(), state_file=state)
    assert {t.status for t in result.tables} == {"copied"}
    assert User.objects.using("postgresql").get().last_name == "Changed"


@ALL
def test_killed_connection_mid_table_then_resume(tmp_path):
    """PostgreSQL drops our session in the middle of a table; the next run finishes the job."""
    import psycopg

    from dbmigration.errors import TargetError

    make_people(3)
    state = tmp_path / "state.json"
    params = connections["postgresql"].get_connection_params()

    def kill(table, done, total):
        if table == "accounts_loginevent" and done > 0:
            pid = connections["postgresql"].connection.info.backend_pid  # busy in COPY
            with psycopg.connect(**params, autocommit=True) as other:
                other.execute("SELECT pg_terminate_backend(%s)", [pid])

    with pytest.raises(TargetError, match="Nothing of this table was kept"):
        copy_data(sqlite_path=source_path(), state_file=state, progress=kill)
    connections["postgresql"].close()
    done = done_tables(state, source_sha256=content_sha256(source_path()))
    assert "accounts_user" in done and "accounts_loginevent" not in done
    result = copy_data(sqlite_path=source_path(), state_file=state)
    assert {t.table for t in result.tables if t.status == "copied"} >= {"accounts_loginevent"}
    check = verify(source=Side(sqlite_path=source_path()), target=Side(alias="postgresql"))
    assert check.ok, check.problems(Side(sqlite_path=source_path()), Side(alias="postgresql"))


@ALL
def test_tables_subset_leaves_the_phase(dirs):
    make_people(2)
    prepared(source_path(), dirs / "state.json")
    out = run("--tables", "accounts_organisation", "accounts.User", "--no-verify")
    assert "accounts_user" in out and "accounts_loginevent" not in out
    assert User.objects.using("postgresql").count() == 2
    assert state_mod.read_state(dirs / "state.json").phase == "prepared"

    with pytest.raises(CommandError, match="Unknown table"):
        run("--tables", "no_such_table")


@ALL
@pytest.mark.slow
def test_sigterm_mid_copy_stops_both_lanes_and_the_next_run_resumes(tmp_path):
    """A real process, a real signal, while two tables load at once."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from django.conf import settings

    pg = connections["postgresql"].settings_dict
    url = f"postgres://{pg['USER']}:{pg['PASSWORD'] or ''}@{pg['HOST']}:{pg['PORT']}/{pg['NAME']}"
    db_dir, source = tmp_path / "db", tmp_path / "source.sqlite3"
    env = {
        **os.environ,
        "PROPCORE_DATABASE_DIR": str(db_dir),
        "SQLITE_PATH": str(source),
        "POSTGRES_URL": url,
        "DATABASE_ACTIVE": "sqlite",
    }
    manage = [sys.executable, str(settings.BASE_DIR / "manage.py")]
    for args in (["migrate", "--database", "sqlite", "-v", "0"], ["seed_demo", "--users", "20000"]):
        subprocess.run(manage + args, env=env, check=True, capture_output=True)
    prepared(source, db_dir / "state.json")
    proc = subprocess.Popen(
        manage + ["migrate_data", "--no-verify", "-v", "0"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    with connections["postgresql"].cursor() as cur:
        while time.monotonic() < deadline:  # both lanes busy: two COPYs running
            cur.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND query LIKE 'COPY%%' AND state = 'active'"  # not other checkouts' COPYs
            )
            if cur.fetchone()[0] == 2:
                break
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert "Interrupted by SIGTERM" in err and "Run migrate_data again" in err
    state = state_mod.read_state(db_dir / "state.json")
    assert state.phase == "prepared"
    done = done_tables(db_dir / "state.json", source_sha256=content_sha256(source))
    assert "accounts_loginevent" not in done  # the biggest table was still loading
    again = subprocess.run(
        manage + ["migrate_data"], env=env, capture_output=True, text=True, timeout=300
    )
    assert again.returncode == 0, again.stderr
    assert "Verified" in again.stdout
    assert state_mod.read_state(db_dir / "state.json").phase == "data_migrated"


def _children(pid: int) -> list[int]:
    import os

    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            name = stat.split("(", 1)[1].rsplit(")", 1)[0]
            state, ppid = stat.rsplit(")", 1)[1].split()[:2]
            # not an exited one (PID 1 here reaps late), nor file_sha256's short sha256sum:
            # the test waits for the verification
            if int(ppid) == pid and state != "Z" and name != "sha256sum":
                found.append(int(entry))
    return found


def _holders(directory) -> set[int]:
    """Processes with a file under `directory` open (deleted ones too)."""
    import os

    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            for fd in os.listdir(f"/proc/{entry}/fd"):
                if os.readlink(f"/proc/{entry}/fd/{fd}").startswith(str(directory)):
                    found.add(int(entry))
        except OSError:
            continue
    return found


@ALL
@pytest.mark.slow
def test_kill_9_during_verification_leaves_no_process_and_no_open_file(tmp_path):
    """Issue 16: a forked checksum process outlived a kill -9 of migrate_data by 40
    minutes, holding the SQLite file open.  Verification runs on threads now: nothing is
    left when the process dies."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from django.conf import settings

    pg = connections["postgresql"].settings_dict
    url = f"postgres://{pg['USER']}:{pg['PASSWORD'] or ''}@{pg['HOST']}:{pg['PORT']}/{pg['NAME']}"
    db_dir, source = tmp_path / "db", tmp_path / "source.sqlite3"
    env = {
        **os.environ,
        "PROPCORE_DATABASE_DIR": str(db_dir),
        "SQLITE_PATH": str(source),
        "POSTGRES_URL": url,
        "DATABASE_ACTIVE": "sqlite",
    }
    manage = [sys.executable, str(settings.BASE_DIR / "manage.py")]
    for args in (["migrate", "--database", "sqlite", "-v", "0"], ["seed_demo", "--users", "20000"]):
        subprocess.run(manage + args, env=env, check=True, capture_output=True)
    prepared(source, db_dir / "state.json")
    proc = subprocess.Popen(
        manage + ["migrate_data", "-v", "0"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    children: list[int] = []
    with connections["postgresql"].cursor() as cur:
        while time.monotonic() < deadline:  # verifying: the range sums' query, or a child
            children = _children(proc.pid)
            cur.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND state = 'active' AND query LIKE '%%GROUP BY 1'"
            )
            if cur.fetchone()[0] or children:
                break
            assert proc.poll() is None, "migrate_data ended before its verification was seen"
            time.sleep(0.005)
    assert time.monotonic() < deadline
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    time.sleep(0.5)
    survivors = [pid for pid in children if os.path.exists(f"/proc/{pid}")]
    assert not survivors, f"processes left behind: {survivors}"
    assert not _holders(tmp_path), "the SQLite file is still held open"


@ALL
def test_plan_lists_tables_rows_and_order_and_copies_nothing(dirs):
    make_people(3)
    prepared(source_path(), dirs / "state.json")
    state_before = (dirs / "state.json").read_text()
    before = file_sha256(source_path())
    out = run("--plan")
    lines = out.splitlines()
    order = [t.db_table for t in build_plan().tables]
    numbered = [re.match(r"\s*\d+\. (.+?)\s+[\d,]+ rows$", line) for line in lines]
    listed = [m.group(1) for m in numbered if m]
    assert listed == order  # foreign-key order, the order the copy loads
    user_line = next(line for line in lines if " accounts_user " in line)
    assert user_line.rstrip().endswith("3 rows")
    summary = re.search(r"Plan: ([\d,]+) rows in (\d+) tables? \(\+[\d,]+ in (\d+) of", out)
    assert summary and int(summary[2]) + int(summary[3]) == len(order), out
    assert out.rstrip().endswith("; nothing was copied.")
    # nothing touched: no state move, no report, no rows on PostgreSQL, the file unchanged
    assert (dirs / "state.json").read_text() == state_before
    assert not (dirs / "reports").exists()
    assert User.objects.using("postgresql").count() == 0
    assert file_sha256(source_path()) == before

    from django.conf import settings

    policies = {"accounts.LoginEvent": {"policy": "skip", "reason": "rebuilt from the logs"}}
    with override_settings(
        DBMIGRATION={**getattr(settings, "DBMIGRATION", {}), "MODEL_POLICIES": policies}
    ):
        out = run("--plan")
    assert "skipped accounts.LoginEvent: rebuilt from the logs" in out
    assert " accounts_loginevent " not in out


@ALL
def test_plan_as_json_lists_the_same_tables_and_rows(dirs):
    make_people(3)
    prepared(source_path(), dirs / "state.json")
    document = json.loads(run("--plan", "--json"))
    assert (document["status"], document["ok"], document["changed"]) == ("ok", True, False)
    tables = document["tables"]
    assert [t["table"] for t in tables] == [t.db_table for t in build_plan().tables]
    assert [t["order"] for t in tables] == list(range(1, len(tables) + 1))
    users = next(t for t in tables if t["table"] == "accounts_user")
    assert users["source_rows"] == 3
    assert document["rows"] == sum(t["source_rows"] or 0 for t in tables)
    assert not (dirs / "reports").exists()  # a plan writes nothing, in JSON too
    with pytest.raises(CommandError, match="--json goes with --plan") as caught:
        run("--json")
    assert caught.value.returncode == 2
