"""Backups: two formats, manifests, verification, retention, encryption, restore, failures."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from io import StringIO
from pathlib import Path

import pytest
from django.conf import settings
from django.core.management import CommandError, call_command
from django.db import connections
from django.test import override_settings

from dbmigration import backup
from dbmigration.errors import BackupError, SourceError
from dbmigration.preflight import code_migrations, conninfo_from_settings
from dbmigration.sqlite_source import file_sha256, row_counts
from tests.sources import BASE_DIR, big_source, corrupt, make_source


def test_backup_two_formats_manifest_and_verification(tmp_path):
    source = make_source(tmp_path / "src.sqlite3", rows=120)
    info = backup.create_sqlite_backup(sqlite_path=source, backup_dir=tmp_path / "b")
    assert info.verified and info.path.is_dir() and not info.path.name.endswith(".partial")
    manifest = json.loads((info.path / "manifest.json").read_text())
    assert manifest["verified"] is True
    assert manifest["row_counts"] == {
        "django_migrations": len(code_migrations()),
        "item": 120,
        "note": 1,
    }
    assert manifest["migrations"] == code_migrations()
    assert manifest["source"] == str(source.resolve())
    assert manifest["source_size"] == source.stat().st_size
    assert manifest["tool_version"].startswith("propcore")
    assert {"integrity_check", "checksums_reread", "jsonl_row_counts_equal"} <= set(
        manifest["checks"]
    )
    for f in manifest["files"]:
        assert file_sha256(info.path / f["name"]) == f["sha256"]
    lines = (info.path / "jsonl" / "item.jsonl").read_text().splitlines()
    assert json.loads(lines[0]) == {"$table": "item", "$columns": ["id", "name", "data", "price"]}
    assert len(lines) == 121
    first = json.loads(lines[1])
    assert first["name"] == "item 0 ünïcode" and first["price"] == 0.0
    assert first["data"] == {"$blob": "AAD/"}
    note = json.loads((info.path / "jsonl" / "note.jsonl").read_text().splitlines()[1])
    assert note["body"] == {"$text_b64": "/wD+"}
    # storage classes survive: a valid-UTF-8 BLOB is not confused with TEXT
    assert backup._json_value(b"abc") == {"$blob": "YWJj"}
    assert backup._json_value(backup._RawText(b"abc")) == "abc"
    assert backup._json_value(float("inf")) == {"$float": "inf"}
    snap = sqlite3.connect(info.path / "db.sqlite3")
    assert snap.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    assert row_counts(snap) == manifest["row_counts"]


def test_backup_is_consistent_while_a_writer_runs(tmp_path):
    """A WAL writer adds pairs of rows in one transaction; every snapshot holds whole pairs."""
    source = make_source(tmp_path / "live.sqlite3", rows=0, wal=True)
    stop = threading.Event()
    written = []

    def writer():
        conn = sqlite3.connect(source, timeout=10, isolation_level=None)
        i = 0
        while not stop.is_set():
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO item (name) VALUES (?)", (f"w{i}",))
            conn.execute("INSERT INTO note (item_id, body) VALUES (?, 'x')", (i,))
            conn.execute("COMMIT")
            i += 1
            written.append(i)
        conn.close()

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        infos = []
        deadline = time.monotonic() + 30
        # keep snapshotting until the writer has committed plenty between our snapshots
        while len(infos) < 4 or (len(written) < 50 and time.monotonic() < deadline):
            time.sleep(0.05)
            infos.append(backup.create_sqlite_backup(sqlite_path=source, backup_dir=tmp_path / "b"))
    finally:
        stop.set()
        thread.join()
    counts = [i.row_counts["item"] for i in infos]
    assert len(written) > 50 and counts == sorted(counts) and counts[-1] > 0
    for info in infos:
        # the note table holds the 1 seed row plus one per pair
        assert info.row_counts["note"] == info.row_counts["item"] + 1
        snap = sqlite3.connect(info.path / "db.sqlite3")
        assert row_counts(snap) == info.row_counts
        snap.close()


def test_list_keep_and_command(tmp_path):
    source = make_source(tmp_path / "src.sqlite3")
    backup_dir = tmp_path / "b"
    for _ in range(3):
        backup.create_sqlite_backup(sqlite_path=source, backup_dir=backup_dir)
    assert len(backup.list_backups(backup_dir)) == 3
    with override_settings(SQLITE_PATH=source, BACKUP_DIR=backup_dir, ACTIVE_BACKEND="sqlite"):
        out = StringIO()
        call_command("db_backup", "--keep", "2", stdout=out)
        assert "Backup verified" in out.getvalue()
        kept = backup.list_backups(backup_dir)
        assert len(kept) == 2
        out = StringIO()
        call_command("db_backup", "--list", stdout=out)
        assert all(k.name in out.getvalue() for k in kept)
        out = StringIO()
        call_command("db_backup", "--list", "--json", stdout=out)
        listed = json.loads(out.getvalue())
        assert listed["status"] == "ok" and listed["ok"] is True
        assert [b["name"] for b in listed["backups"]] == [k.name for k in kept]
        first = listed["backups"][0]
        assert first["kind"] == "sqlite" and first["verified"] is True
        assert first["rows"] == sum(kept[0].row_counts.values()) and first["size_bytes"] > 0
        assert backup.last_verified_backup(backup_dir).name == kept[-1].name
        with pytest.raises(CommandError, match="at least 1"):
            call_command("db_backup", "--keep", "0", stdout=StringIO())


def test_retention_leaves_pgbackrest_records_to_pgbackrest(tmp_path):
    """A run of pg_dump backups with the default --keep must not delete the record of a
    pgBackRest backup: --list and backup_age would stop seeing a restorable backup."""
    from tests.test_health import make_backup

    backup_dir = tmp_path / "b"
    pgbackrest = make_backup(backup_dir, age_hours=5, kind="postgresql")
    manifest = json.loads((pgbackrest / backup.MANIFEST).read_text())
    manifest["checks"] = {"pgbackrest": {"label": "20261201-101010F", "type": "full"}}
    (pgbackrest / backup.MANIFEST).write_text(json.dumps(manifest))
    dumps = [make_backup(backup_dir, age_hours=h, kind="postgresql") for h in (3, 2, 1)]
    removed = backup.apply_retention(backup_dir, keep=1)
    assert sorted(removed) == sorted(dumps[:2])
    assert pgbackrest.exists() and dumps[2].exists()


def test_encrypted_backup_round_trip(tmp_path, monkeypatch):
    source = make_source(tmp_path / "src.sqlite3")
    info = backup.create_sqlite_backup(
        sqlite_path=source, backup_dir=tmp_path / "b", encrypt_key="s3cret passphrase"
    )
    assert info.encrypted
    names = sorted(p.name for p in info.path.rglob("*") if p.is_file())
    assert "db.sqlite3" not in names and "db.sqlite3.enc" in names
    raw = (info.path / "db.sqlite3.enc").read_bytes()
    assert b"SQLite format 3" not in raw and b"item 0" not in raw
    target = make_source(tmp_path / "target.sqlite3", rows=3)
    with pytest.raises(BackupError, match="does not decrypt"):
        backup.restore_sqlite_backup(
            backup=info.path,
            sqlite_path=target,
            backup_dir=tmp_path / "b",
            code_migrations=code_migrations(),
            encrypt_key="wrong",
        )
    result = backup.restore_sqlite_backup(
        backup=info.path,
        sqlite_path=target,
        backup_dir=tmp_path / "b",
        code_migrations=code_migrations(),
        encrypt_key="s3cret passphrase",
    )
    assert row_counts(sqlite3.connect(target))["item"] == 50
    assert result.safety_backup is not None


def test_restore_keeps_current_database_and_verifies(tmp_path, monkeypatch):
    source = make_source(tmp_path / "src.sqlite3", rows=10)
    backup_dir = tmp_path / "b"
    info = backup.create_sqlite_backup(sqlite_path=source, backup_dir=backup_dir)
    conn = sqlite3.connect(source)
    conn.execute("DELETE FROM item WHERE id > 3")
    conn.commit()
    conn.close()
    monkeypatch.setattr("builtins.input", lambda prompt: "src.sqlite3")  # the typed file name
    with override_settings(
        SQLITE_PATH=source, BACKUP_DIR=backup_dir, STATE_FILE=tmp_path / "state.json"
    ):
        out = StringIO()
        call_command("db_restore", info.name, "--replace-live-database", stdout=out)
    assert "Previous database kept as backup" in out.getvalue()
    assert row_counts(sqlite3.connect(source))["item"] == 10
    safety = [b for b in backup.list_backups(backup_dir) if b.label == "pre-restore"]
    assert len(safety) == 1 and safety[0].row_counts["item"] == 3


def test_restore_refuses_tampered_files_and_other_migrations(tmp_path):
    backup_dir = tmp_path / "b"
    source = make_source(tmp_path / "src.sqlite3")
    good = backup.create_sqlite_backup(sqlite_path=source, backup_dir=backup_dir)
    with (good.path / "jsonl" / "item.jsonl").open("a") as fh:
        fh.write("{}\n")
    other = make_source(
        tmp_path / "other.sqlite3", migrations=[*code_migrations(), "accounts.9999_future"]
    )
    future = backup.create_sqlite_backup(sqlite_path=other, backup_dir=backup_dir)
    before = file_sha256(source)
    with override_settings(SQLITE_PATH=source, BACKUP_DIR=backup_dir):
        with pytest.raises(CommandError, match="checksum of jsonl/item.jsonl differs") as exc:
            call_command("db_restore", str(good.path), stdout=StringIO())
        assert exc.value.returncode == BackupError.returncode
        with pytest.raises(CommandError, match="does not match this code's migrations"):
            call_command("db_restore", str(future.path), stdout=StringIO())
        with pytest.raises(CommandError, match="not a propcore backup"):
            call_command("db_restore", "nope", stdout=StringIO())
    assert file_sha256(source) == before


@pytest.mark.parametrize(
    "kind, message",
    [
        ("missing", "does not exist"),
        ("not_sqlite", "is not a SQLite database"),
        ("corrupt", "is corrupt"),
        ("locked", "is locked by another writer"),
    ],
)
def test_bad_sources_fail_clearly_and_leave_nothing(tmp_path, kind, message):
    path = tmp_path / "bad.sqlite3"
    holder = None
    if kind == "not_sqlite":
        path.write_text("id,name\n1,not a database\n")
    elif kind == "corrupt":
        corrupt(path)
    elif kind == "locked":
        make_source(path)
        holder = sqlite3.connect(path, isolation_level=None)
        holder.execute("BEGIN EXCLUSIVE")
        holder.execute("INSERT INTO item (name) VALUES ('held')")
    backup_dir = tmp_path / "b"
    try:
        with (
            override_settings(SQLITE_PATH=path, BACKUP_DIR=backup_dir, ACTIVE_BACKEND="sqlite"),
            pytest.raises(CommandError, match=message) as exc,
        ):
            call_command("db_backup", "--lock-timeout", "0.2", stdout=StringIO())
    finally:
        if holder:
            holder.execute("ROLLBACK")
            holder.close()
    assert exc.value.returncode == SourceError.returncode
    assert len(str(exc.value).splitlines()) <= 2
    assert not list(backup_dir.glob("*")) or not [p for p in backup_dir.iterdir() if p.is_dir()]


def test_disk_full_removes_partial_backup(tmp_path):
    assert os.geteuid() == 0, "this test mounts a tiny tmpfs and needs root"
    source = make_source(tmp_path / "src.sqlite3", rows=20000)
    size = source.stat().st_size
    mount = tmp_path / "small"
    mount.mkdir()
    # room for the snapshot but not for the JSON Lines export after it
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size + size // 4}", "tmpfs", str(mount)],
        check=True,
    )
    try:
        with pytest.raises(BackupError, match="Disk full") as exc:
            backup.create_sqlite_backup(sqlite_path=source, backup_dir=mount / "b")
        assert "nothing was marked good" in str(exc.value)
        assert [p.name for p in (mount / "b").iterdir()] == [".lock"]
        assert backup.list_backups(mount / "b") == []
    finally:
        # lazy: an open handle left by a failing assertion must not leave the mount behind
        subprocess.run(["umount", "-l", str(mount)], check=True)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_mid_backup_removes_partial(tmp_path, sig):
    source = big_source(tmp_path / "big.sqlite3")
    db_dir = tmp_path / "db"
    env = {
        **os.environ,
        "PROPCORE_DATABASE_DIR": str(db_dir),
        "SQLITE_PATH": str(source),
        "POSTGRES_URL": settings.POSTGRES_URL,
        "DATABASE_ACTIVE": "sqlite",
    }
    proc = subprocess.Popen(
        [sys.executable, str(BASE_DIR / "manage.py"), "db_backup"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    backup_dir = db_dir / "backups"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not list(backup_dir.glob("*.partial/jsonl")):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.01)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert f"interrupted by {sig.name}" in err and "Traceback" not in err
    assert not list(backup_dir.glob("*.partial"))
    assert backup.list_backups(backup_dir) == []


@pytest.mark.django_db(databases="__all__", transaction=True)
def test_pg_dump_backup_with_verify_restore(tmp_path):
    import psycopg

    from accounts.models import User

    User.objects.db_manager("postgresql").create_user("pgbackup@example.ie", "x")
    conninfo = conninfo_from_settings(connections["postgresql"].settings_dict)
    stop, written = threading.Event(), []

    def writer():
        # rows committed while the dump runs must be in neither the counts nor the dump
        with psycopg.connect(**conninfo, autocommit=True) as conn:
            while not stop.is_set():
                conn.execute(
                    "INSERT INTO django_session VALUES (%s, 'x', now())", [f"k{len(written)}"]
                )
                written.append(1)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        while len(written) < 20:
            time.sleep(0.01)
        info = backup.create_pg_backup(
            conninfo=conninfo, backup_dir=tmp_path / "b", verify_restore=True
        )
    finally:
        stop.set()
        thread.join()
    assert info.verified and info.kind == "postgresql"
    assert 0 < info.row_counts["django_session"] < len(written)
    assert info.row_counts["accounts_user"] == 1
    assert info.checks["pg_restore_list"] == "ok" and info.checks["table_data_entries"] > 5
    assert info.checks["verify_restore"]["row_counts_equal"] is True
    assert "accounts.0003_analytics_view" in info.migrations
    assert file_sha256(info.path / "db.dump") == info.files[0].sha256
    # the scratch database is named after the one verified; other databases on a shared
    # server may well have "_verify_" in their names
    scratch = connections["postgresql"].settings_dict["NAME"] + "_verify_%"
    with connections["postgresql"].cursor() as cur:
        cur.execute("SELECT count(*) FROM pg_database WHERE datname LIKE %s", [scratch])
        assert cur.fetchone()[0] == 0


def test_restore_dry_run_writes_nothing_and_a_corrupt_database_is_replaced(tmp_path, monkeypatch):
    backup_dir = tmp_path / "b"
    source = make_source(tmp_path / "src.sqlite3", rows=2000)
    info = backup.create_sqlite_backup(sqlite_path=source, backup_dir=backup_dir)
    corrupt(source)
    damaged = source.read_bytes()
    monkeypatch.setattr("builtins.input", lambda prompt: "src.sqlite3")  # the typed file name
    with override_settings(
        SQLITE_PATH=source, BACKUP_DIR=backup_dir, STATE_FILE=tmp_path / "state.json"
    ):
        out = StringIO()
        call_command("db_restore", info.name, "--dry-run", stdout=out)
        assert "would keep the current database" in out.getvalue()
        assert source.read_bytes() == damaged and len(list_dirs(backup_dir)) == 1
        out = StringIO()
        call_command("db_restore", info.name, "--replace-live-database", stdout=out)
    assert "raw copy in" in out.getvalue()
    (raw,) = [p for p in list_dirs(backup_dir) if p.name.endswith("pre-restore-raw")]
    assert (raw / "src.sqlite3").read_bytes() == damaged
    assert row_counts(sqlite3.connect(source))["item"] == 2000


def list_dirs(path: Path) -> list[Path]:
    return [p for p in path.iterdir() if p.is_dir()]
