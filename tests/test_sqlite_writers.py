"""SQLite as the platform runs on it (WAL): concurrent writers queue instead of failing, and a
change committed in WAL mode still shows in the source fingerprint."""

import sqlite3
import subprocess
import sys

import pytest
from django.db import connections

from accounts.models import Organisation
from dbmigration import state as state_mod
from dbmigration.sqlite_source import source_fingerprint
from tests.test_freeze import manage, runbook_env

pytestmark = pytest.mark.django_db(databases="__all__", transaction=True)

# an admin-style edit: read the object, change it, save it (with its audit entry), in one
# transaction; Django's default deferred transactions fail these with "database is locked"
WRITER = """
import sys
import django
django.setup()
from django.db import OperationalError, transaction
from accounts.models import Organisation

pk, times = sys.argv[1], int(sys.argv[2])
failed = 0
for _ in range(times):
    try:
        with transaction.atomic(using="sqlite"):
            org = Organisation.objects.using("sqlite").get(pk=pk)
            org.metadata = {"edits": org.metadata.get("edits", 0) + 1}
            org.save(using="sqlite")
    except OperationalError as exc:
        failed += 1
        print("failed:", exc, flush=True)
print("failed", failed)
"""
WRITERS, EDITS = 4, 40


def test_the_sqlite_alias_waits_its_turn():
    from propcore import settings as production

    options = production.DATABASES["sqlite"]["OPTIONS"]
    assert options["transaction_mode"] == "IMMEDIATE" and options["timeout"] >= 10
    # WAL: readers run beside the writer (rollback.swap_in writes into the file, no rename)
    assert options["init_command"] == "PRAGMA journal_mode=WAL"
    with connections["sqlite"].cursor() as cursor:
        assert cursor.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_concurrent_edits_from_several_processes_all_commit(tmp_path):
    org = Organisation.objects.using("sqlite").create(name="Busy", kind="estate_agent", metadata={})
    connections["sqlite"].close()
    env = runbook_env(tmp_path / "db")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(org.pk), str(EDITS)],
            env={**env, "DJANGO_SETTINGS_MODULE": "propcore.settings"},  # as deployed
            cwd=manage()[1].rsplit("/", 1)[0],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(WRITERS)
    ]
    outputs = [proc.communicate(timeout=300) for proc in procs]
    for proc, (out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err
        assert "database is locked" not in out + err
        assert out.strip().endswith("failed 0"), out
    org.refresh_from_db(using="sqlite")
    assert org.metadata["edits"] == WRITERS * EDITS  # none lost, none failed


def test_a_row_change_leaves_the_prepare_fresh_a_schema_change_makes_it_stale(tmp_path):
    # rows may change while the site runs (the copy reads a snapshot, --sync carries the
    # rest); the schema may not
    org = Organisation.objects.using("sqlite").create(name="Before", kind="estate_agent")
    path = connections.settings["sqlite"]["NAME"]
    prepared = state_mod.MigrationState(
        phase="prepared", source_fingerprint=source_fingerprint(path)
    )
    Organisation.objects.using("sqlite").filter(pk=org.pk).update(name="Afterr")  # same size
    assert state_mod.stale_reasons(prepared, source_fingerprint(path)) == []
    with connections["sqlite"].cursor() as cursor:
        cursor.execute("CREATE TABLE schema_probe (x integer)")
    try:
        reasons = state_mod.stale_reasons(prepared, source_fingerprint(path))
        assert "schema_sha256 changed since migration_prepare" in reasons
    finally:
        with connections["sqlite"].cursor() as cursor:
            cursor.execute("DROP TABLE schema_probe")


# another process of the site: writes and closes its connection (the last to close, it thinks)
CLOSER = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=20)
for _ in range(50):
    conn.execute("INSERT INTO t VALUES (randomblob(3000))")
conn.close()
"""


def test_hashing_the_file_keeps_this_process_s_wal_locks(tmp_path):
    # reading the file in-process dropped this connection's SHARED lock; the other process's
    # close then deleted the -wal and -shm under it, and later commits were silently lost
    path = tmp_path / "live.sqlite3"
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        assert conn.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal"
        conn.execute("CREATE TABLE t (x)")
        conn.execute("INSERT INTO t VALUES (1)")
        source_fingerprint(path)  # hashes the file and its -wal, as the runbook does
        for _ in range(2):
            subprocess.run([sys.executable, "-c", CLOSER, str(path)], check=True)
            for _ in range(50):
                conn.execute("INSERT INTO t VALUES (randomblob(3000))")
    finally:
        conn.close()
    check = sqlite3.connect(path)
    try:
        assert check.execute("SELECT count(*) FROM t").fetchone()[0] == 201
        assert check.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        check.close()
