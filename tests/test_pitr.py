"""Point-in-time recovery with pgBackRest on a private cluster (dbmigration.pitr, db_pitr).

One cluster for the module, archiving into a repository under a temp dir: setup --apply,
restart, full backup, rows (T1), a mistaken delete (T2), restore to between them into a
scratch cluster; then an unwritable repository turns the health check degraded.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
import time
from datetime import UTC, datetime, timedelta
from io import StringIO
from pathlib import Path

import psycopg
import pytest
from django.conf import settings
from django.core.management import CommandError, call_command
from django.db import connections
from django.test import override_settings

from dbmigration import backup, health, pitr
from dbmigration.errors import RestoreTargetError
from dbmigration.state import MigrationState, write_state
from propcore.pgserver import find_pg_bin
from tests.clusters import HOST, PrivateCluster, as_postgres, conf_value, give_to_postgres

pytestmark = pytest.mark.slow


FAKETIME_LIB = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"  # Debian's faketime
LIVE_DB = "propcore_live"  # the application's database; 'postgres' stays for maintenance


class DebianCluster(PrivateCluster):
    """A private cluster with its config files outside the data directory, as Debian keeps them
    (the layout of the server on 127.0.0.1:5432 here, which db_pitr setup must handle)."""

    @property
    def etc(self) -> Path:
        return self.root / "etc"

    def init(self) -> DebianCluster:
        super().init()
        self.etc.mkdir()
        for name in ("postgresql.conf", "pg_hba.conf", "pg_ident.conf"):
            shutil.move(self.data / name, self.etc / name)
        self.configure(
            data_directory=str(self.data),
            hba_file=str(self.etc / "pg_hba.conf"),
            ident_file=str(self.etc / "pg_ident.conf"),
            autovacuum=False,  # the tests' "quiet" instants must see no commit after them
        )
        give_to_postgres(self.etc, *self.etc.iterdir())
        return self

    def configure(self, **settings) -> None:
        conf_file = self.etc / "postgresql.conf"
        if not conf_file.exists():  # before init() moved it
            return super().configure(**settings)
        with conf_file.open("a") as out:
            out.writelines(f"{key} = {conf_value(value)}\n" for key, value in settings.items())

    def start(self) -> None:
        as_postgres(
            find_pg_bin("pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w",
            "-o", f"-c config_file={self.etc / 'postgresql.conf'}", "start",
        )  # fmt: skip

    def sql(self, query: str, *params, dbname: str = LIVE_DB):
        return super().sql(query, *params, database=dbname)


@pytest.fixture(scope="module")
def cluster():
    """A private cluster the postgresql alias points at, with PITR settings under a temp dir."""
    node = DebianCluster("propcore_pitr_")
    root = node.root
    alias = connections.settings["postgresql"]
    saved = alias["HOST"], alias["PORT"], alias["NAME"]
    pitr_settings = {
        "STANZA": f"pitr_{os.getpid()}",
        "CONFIG": str(root / "pgbackrest" / "pgbackrest.conf"),
        "REPO_PATH": str(root / "pgbackrest" / "repo"),
    }
    override = override_settings(
        DBMIGRATION={**settings.DBMIGRATION, "PITR": pitr_settings, "REPORT_DIR": root / "reports"},
        STATE_FILE=root / "state.json",
        BACKUP_DIR=root / "backups",
        REPORT_DIR=root / "reports",
        LOG_DIR=root / "logs",
    )
    try:
        node.init().start()
        node.sql(f"CREATE DATABASE {LIVE_DB}", dbname="postgres")
        alias["HOST"], alias["PORT"], alias["NAME"] = HOST, node.port, LIVE_DB
        override.enable()
        yield node
    finally:
        override.disable()
        alias["HOST"], alias["PORT"], alias["NAME"] = saved
        for data in root.iterdir():  # the live cluster and any restored scratch cluster
            if (data / "postmaster.pid").exists():
                as_postgres(find_pg_bin("pg_ctl"), "-D", str(data), "-m", "immediate", "stop")
        shutil.rmtree(root, ignore_errors=True)


def _call(*args: str) -> str:
    out = StringIO()
    call_command("db_pitr", *args, stdout=out)
    return out.getvalue()


def test_setup_backup_and_restore_to_before_the_mistake(cluster):
    out = _call("setup", "--apply")
    assert "restart PostgreSQL for archive_mode" in out, out
    cluster.restart()
    assert cluster.sql("SHOW archive_command")[0][0] == pitr.archive_command()
    assert "check passed" in _call("check")
    config = Path(settings.DBMIGRATION["PITR"]["CONFIG"]).read_text()
    assert "repo1-retention-full=2" in config and "process-max=" in config

    cluster.sql("CREATE TABLE ledger (id int PRIMARY KEY, note text)")
    cluster.sql("INSERT INTO ledger SELECT g, 'before the backup' FROM generate_series(1, 50) g")
    before_backup = datetime.now(UTC)
    time.sleep(1)
    assert "full backup" in _call("backup", "--type", "full")

    cluster.sql("INSERT INTO ledger SELECT g, 'T1' FROM generate_series(51, 80) g")  # T1
    time.sleep(1.1)
    between = cluster.sql("SELECT clock_timestamp()")[0][0]
    time.sleep(1.1)
    cluster.sql("DELETE FROM ledger WHERE id > 10")  # T2: the mistake
    _call("check")  # switches WAL: the delete's commit reaches the repository

    scratch = cluster.root / "restored"
    try:
        out = _call("restore", "--to-time", between.isoformat(), "--target-dir", str(scratch))
        assert "recovery stopping before" in out, out
        assert f"pg_ctl -D {scratch} promote" in out
        port = int(out.split("127.0.0.1:")[1].split(".")[0])
        url = f"host=127.0.0.1 port={port} user=postgres dbname={LIVE_DB}"
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT count(*) FROM ledger").fetchone()[0] == 80
            assert conn.execute("SELECT count(*) FROM ledger WHERE note = 'T1'").fetchone() == (30,)
            assert conn.execute("SELECT pg_is_in_recovery()").fetchone()[0]  # paused, unpromoted
        assert "ledger" in out and " 80" in out  # the command's row counts
        assert cluster.sql("SELECT count(*) FROM ledger")[0][0] == 10  # the live one untouched
    finally:
        pitr.stop_restored(scratch)

    with pytest.raises(RestoreTargetError, match="before the first backup"):
        pitr.restore(to_time=before_backup, target_dir=cluster.root / "too_early")
    with pytest.raises(RestoreTargetError, match="in the future"):
        pitr.restore(
            to_time=datetime.now(UTC) + timedelta(hours=1), target_dir=cluster.root / "future"
        )
    with pytest.raises(RestoreTargetError, match="is not empty"):
        pitr.restore(to_time=between, target_dir=scratch)
    quiet = cluster.sql("SELECT clock_timestamp()")[0][0]  # no commit after it (autovacuum off)
    _call("check")
    with pytest.raises(RestoreTargetError, match="past the archived WAL"):
        pitr.restore(to_time=quiet, target_dir=cluster.root / "too_late")

    result = health.run_check("pitr")
    assert result.status == health.OK, result.message
    assert "full" in result.details["backups"]


def test_restore_drill_matches_the_live_counts_and_is_recorded(cluster):
    cluster.sql("CREATE TABLE IF NOT EXISTS ledger (id int PRIMARY KEY, note text)")
    cluster.sql("INSERT INTO ledger SELECT g, 'drill' FROM generate_series(1000, 1020) g")
    assert "diff backup" in _call("backup", "--type", "diff")
    cluster.sql("INSERT INTO ledger VALUES (2000, 'after the diff backup')")
    out = StringIO()
    call_command("db_restore_drill", "--scratch-dir", str(cluster.root), stdout=out)
    assert "checksums match" in out.getvalue(), out.getvalue()
    record = pitr.last_drill()
    assert record.ok and record.tables >= 1 and record.seconds > 0
    assert "ledger" in record.checksummed
    assert not list(cluster.root.glob("propcore_drill_*"))  # the scratch cluster is gone
    result = health.run_check("pitr")
    assert result.status == health.OK and "last drill ok" in result.message, result.message

    pitr.drill_record_path().write_text(
        json.dumps({**dataclasses.asdict(record), "ok": False, "message": "3 tables differ"})
    )
    result = health.run_check("pitr")
    assert result.status == health.DEGRADED
    assert "restore drill failed: 3 tables differ" in result.message
    pitr.drill_record_path().unlink()


def _restore(*args: str, answer: str | None = None, mp=None) -> str:
    if answer is not None:
        mp.setattr("builtins.input", lambda text: answer)
    out = StringIO()
    call_command("db_restore", *args, stdout=out)
    return out.getvalue()


def _private_tempdir(cluster, monkeypatch) -> Path:
    """Where db_restore's temporary scratch directories go during this test (to count them)."""
    temp = cluster.root / f"tmp_{time.monotonic_ns()}"
    temp.mkdir(mode=0o755)
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    return temp


def _databases(cluster) -> set[str]:
    return {row[0] for row in cluster.sql("SELECT datname FROM pg_database", dbname="postgres")}


def test_db_backup_and_db_restore_to_a_time_beside_and_over_the_live_database(cluster, monkeypatch):
    cluster.sql("CREATE TABLE orders (id int PRIMARY KEY, note text)")
    cluster.sql("INSERT INTO orders SELECT g, 'before' FROM generate_series(1, 40) g")
    out = StringIO()
    call_command("db_backup", "--backend", "postgresql", stdout=out)
    assert "pgBackRest diff backup" in out.getvalue() and "verified" in out.getvalue(), out
    out = StringIO()
    call_command("db_backup", "--list", "--json", stdout=out)
    listed = json.loads(out.getvalue())["backups"]
    made = listed[-1]["pgbackrest"]
    assert made["type"] == "diff" and made["label"] == pitr.info().backups[-1].label
    assert listed[-1]["kind"] == "postgresql"
    with pytest.raises(CommandError, match="--keep does not apply to pgBackRest backups"):
        call_command("db_backup", "--backend", "postgresql", "--keep", "1", stdout=StringIO())

    cluster.sql("INSERT INTO orders SELECT g, 'T1' FROM generate_series(41, 60) g")  # T1
    time.sleep(1.1)
    between = cluster.sql("SELECT clock_timestamp()")[0][0]
    time.sleep(1.1)
    cluster.sql("DELETE FROM orders WHERE note = 'T1'")  # T2: the mistake
    cluster.sql("INSERT INTO orders VALUES (1000, 'after the mistake')")
    _call("check")
    at = between.isoformat(sep=" ")

    databases = _databases(cluster)
    out = _restore("--to-time", at, "--dry-run")
    assert f"Would restore pgBackRest backup {pitr.info().backups[-1].label}" in out, out
    assert f"into database {LIVE_DB}_at_" in out and _databases(cluster) == databases

    # beside the live one: the safe default
    temp = _private_tempdir(cluster, monkeypatch)
    out = _restore("--to-time", at, "--target-db", "inspect_orders")
    assert "recovery stopping before" in out and "beside the live one" in out, out
    assert cluster.sql("SELECT count(*) FROM orders", dbname="inspect_orders")[0][0] == 60
    assert cluster.sql("SELECT count(*) FROM orders")[0][0] == 41  # the live one untouched
    assert not list(temp.iterdir())  # the scratch cluster and its directory are gone

    # over the live one: refused while the application runs on it, unless the name is typed
    write_state(settings.STATE_FILE, MigrationState(phase="switched", active_backend="postgresql"))
    with pytest.raises(CommandError, match="is the live database") as caught:
        _restore("--to-time", at, "--target-db", LIVE_DB)
    with pytest.raises(CommandError, match="under --noinput: the application runs on it") as caught:
        _restore("--to-time", at, "--replace-live-database", "--noinput")
    assert caught.value.returncode == 9
    with pytest.raises(CommandError, match="Cancelled: nothing was restored"):
        _restore("--to-time", at, "--replace-live-database", answer="yes", mp=monkeypatch)
    assert cluster.sql("SELECT count(*) FROM orders")[0][0] == 41
    before = _databases(cluster)
    out = _restore("--to-time", at, "--replace-live-database", answer=LIVE_DB, mp=monkeypatch)
    assert "the previous database is kept as" in out, out
    assert cluster.sql("SELECT count(*) FROM orders WHERE note = 'T1'")[0][0] == 20
    assert cluster.sql("SELECT count(*) FROM orders WHERE id = 1000")[0][0] == 0
    (kept,) = _databases(cluster) - before
    assert kept.startswith(f"{LIVE_DB}_before_pitr_")
    assert cluster.sql("SELECT count(*) FROM orders WHERE id = 1000", dbname=kept)[0][0] == 1
    write_state(settings.STATE_FILE, MigrationState())


def test_db_restore_to_a_time_it_cannot_reach_is_one_clear_line(cluster, monkeypatch):
    first = pitr.info().backups[0]
    cases = [
        (first.started.isoformat(sep=" "), "is before the first backup"),
        ((datetime.now(UTC) + timedelta(hours=1)).isoformat(sep=" "), "in the future"),
    ]
    quiet = cluster.sql("SELECT clock_timestamp()")[0][0]  # no commit after it
    _call("check")
    cases.append((quiet.isoformat(sep=" "), "past the archived WAL"))
    before = _databases(cluster)
    temp = _private_tempdir(cluster, monkeypatch)
    for to_time, message in cases:
        with pytest.raises(CommandError, match=re.escape(message)) as caught:
            _restore("--to-time", to_time)
        assert "\n" not in str(caught.value) and caught.value.returncode == 4, caught.value
    assert not list(temp.iterdir())
    assert _databases(cluster) == before  # nothing half-restored left behind

    pitr_settings = {**settings.DBMIGRATION["PITR"], "STANZA": "no_such_stanza"}
    with (
        override_settings(DBMIGRATION={**settings.DBMIGRATION, "PITR": pitr_settings}),
        pytest.raises(CommandError, match="no stanza 'no_such_stanza'") as caught,
    ):
        _restore("--to-time", quiet.isoformat(sep=" "))
    assert "\n" not in str(caught.value) and "run db_pitr setup" in str(caught.value)


def test_retention_by_days_is_shown_and_pgbackrest_expires_what_it_no_longer_covers(
    cluster, monkeypatch
):
    pitr_settings = {**settings.DBMIGRATION["PITR"], "RETENTION_FULL_DAYS": 2}
    with override_settings(DBMIGRATION={**settings.DBMIGRATION, "PITR": pitr_settings}):
        out = _call("status")
        assert "full backups covering the last 2 days of recovery" in out
        assert "rerun db_pitr setup" in out  # the written config still keeps 2 by count
        _call("setup")
        config = Path(pitr_settings["CONFIG"]).read_text()
        assert "repo1-retention-full-type=time" in config and "repo1-retention-full=2" in config
        out = _call("status")
        assert "rerun db_pitr setup" not in out and "recovery window: from" in out, out
        old = pitr.info().backups
        assert len([b for b in old if b.type == "full"]) == 1
        call_command("db_backup", "--backend", "postgresql", "--type", "full", stdout=StringIO())
        newest = pitr.info().backups[-1]
        assert len(pitr.info().backups) == len(old) + 1  # nothing is 2 days old yet

        # three days later (pgBackRest's clock moved by faketime): only the newest full
        # backup is needed to cover two days of recovery
        monkeypatch.setenv("LD_PRELOAD", FAKETIME_LIB)
        monkeypatch.setenv("FAKETIME", "+3d")
        _call("expire")
        monkeypatch.delenv("LD_PRELOAD")
        monkeypatch.delenv("FAKETIME")
        kept = pitr.info().backups
        assert [b.label for b in kept] == [newest.label], kept
        recorded = [
            b.checks["pgbackrest"]["label"]
            for b in backup.list_backups(settings.BACKUP_DIR)
            if "pgbackrest" in b.checks
        ]
        assert recorded == [newest.label]  # records of expired backups went with them
        _call("setup")  # back to retention by count for the tests after this one


def test_archive_failure_makes_health_degraded_with_the_fix(cluster):
    archive = Path(settings.DBMIGRATION["PITR"]["REPO_PATH"]) / "archive"
    modes = {}
    try:
        for path in [archive, *archive.rglob("*")]:
            if path.is_dir():
                modes[path] = path.stat().st_mode
                path.chmod(0o500)  # the server's user can no longer write the repository
        cluster.sql("CREATE TABLE more_rows AS SELECT generate_series(1, 100) AS id")
        cluster.sql("SELECT pg_switch_wal()")
        for _ in range(150):
            if cluster.sql("SELECT failed_count FROM pg_stat_archiver")[0][0]:
                break
            time.sleep(0.2)
        result = health.run_check("pitr")
        assert result.status == health.DEGRADED, result.message
        assert "WAL archiving is failing" in result.message
        assert "make the repository writable" in result.message
    finally:
        for path, mode in modes.items():
            path.chmod(mode)


@pytest.mark.parametrize(
    ("to_time", "message"),
    [
        ("yesterday", "is not a time: write 2026-12-01 10:15:00+00"),
        ("2026-12-01 10:15:00", "has no time zone"),
    ],
)
def test_restore_refuses_a_time_it_cannot_read(to_time, message, tmp_path):
    with pytest.raises(CommandError, match=re.escape(message)) as caught:
        _call("restore", "--to-time", to_time, "--target-dir", str(tmp_path / "x"))
    assert caught.value.returncode in (2, RestoreTargetError.returncode)
    assert not (tmp_path / "x").exists()
