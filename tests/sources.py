"""The source databases tests start from, shared by the test modules.

- The test SQLite alias's file (``source_path``) and a few people in it (``make_people``);
  a damaged copy of it (``bad_copy``); a state file that says it was prepared (``prepared``).
- Hand-made SQLite files with awkward values (``make_source``), a corrupt one
  (``corrupt``) and a big one (``big_source``), for backups and preflight checks.
"""

from __future__ import annotations

import datetime as dt
import decimal
import os
import sqlite3
from pathlib import Path

from django.contrib.auth.models import Group
from django.db import connections

from accounts.models import KycVerification, LoginEvent, Membership, Organisation, User
from dbmigration import state as state_mod
from dbmigration.preflight import code_migrations
from dbmigration.sqlite_source import source_fingerprint

BASE_DIR = Path(__file__).resolve().parent.parent


def source_path() -> Path:
    return Path(connections["sqlite"].settings_dict["NAME"])


def make_people(n: int = 3) -> list[User]:
    org = Organisation.objects.using("sqlite").create(
        name="Acme Homes", kind="developer", metadata={"tier": 2, "ok": True}
    )
    users = []
    boss = None
    for i in range(n):
        user = User.objects.db_manager("sqlite").create_user(
            f"u{i}@example.ie", "pw", first_name=f"Ú{i}", invited_by=boss, organisation=org
        )
        boss = boss or user
        users.append(user)
    Membership.objects.using("sqlite").create(user=users[0], organisation=org, role="owner")
    KycVerification.objects.using("sqlite").create(
        user=users[0],
        document_type="passport",
        document_reference="P123",
        expires_on=dt.date(2030, 1, 2),
        risk_score=decimal.Decimal("12.30"),
        reviewed_at=dt.datetime(2026, 1, 2, 3, 4, 5, 600, tzinfo=dt.UTC),
    )
    LoginEvent.objects.using("sqlite").create(
        user=users[0], email_attempted="u0@example.ie", ip_address="10.0.0.1", success=True
    )
    group = Group.objects.using("sqlite").create(name="agents")
    users[0].groups.add(group)
    return users


def bad_copy(tmp_path, *statements: str) -> Path:
    """Copy the test source to tmp_path and damage it there (schema changes stay local)."""
    path = tmp_path / "source.sqlite3"
    src, dst = sqlite3.connect(source_path()), sqlite3.connect(path)
    src.backup(dst)
    src.close()
    dst.execute("PRAGMA ignore_check_constraints = ON")  # old databases lack these CHECKs
    for statement in statements:
        dst.execute(statement)
    dst.commit()
    dst.close()
    return path


def prepared(path, state_file, **fingerprint):
    state = state_mod.MigrationState(
        phase="prepared", source_fingerprint={**source_fingerprint(path), **fingerprint}
    )
    state_mod.write_state(state_file, state)


def make_source(path: Path, *, rows: int = 50, wal: bool = False, migrations=None) -> Path:
    """A SQLite file with awkward values and the code's django_migrations rows."""
    conn = sqlite3.connect(path)
    if wal:
        conn.execute("PRAGMA journal_mode=WAL")
    conn.executescript(
        """
        CREATE TABLE django_migrations (id INTEGER PRIMARY KEY, app TEXT, name TEXT,
                                        applied TEXT);
        CREATE TABLE item (id INTEGER PRIMARY KEY, name TEXT, data BLOB, price REAL);
        CREATE TABLE note (id INTEGER PRIMARY KEY, item_id INTEGER, body TEXT);
        """
    )
    names = code_migrations() if migrations is None else migrations
    conn.executemany(
        "INSERT INTO django_migrations (app, name, applied) VALUES (?, ?, '2026-01-01')",
        [n.split(".", 1) for n in names],
    )
    conn.executemany(
        "INSERT INTO item (name, data, price) VALUES (?, ?, ?)",
        [(f"item {i} ünïcode", bytes([i % 256, 0, 255]), i * 1.5) for i in range(rows)],
    )
    # invalid UTF-8 stored as text: the logical export must keep the bytes
    conn.execute("INSERT INTO note (item_id, body) VALUES (1, CAST(x'ff00fe' AS TEXT))")
    conn.commit()
    conn.close()
    return path


def corrupt(path: Path) -> Path:
    if not path.exists():
        make_source(path, rows=2000)
    data = bytearray(path.read_bytes())
    page = 4096
    data[page * 2 : page * 6] = os.urandom(page * 4)  # table pages, schema page intact
    path.write_bytes(bytes(data))
    return path


def big_source(path: Path) -> Path:
    make_source(path, rows=0)
    conn = sqlite3.connect(path)
    text = "x" * 200
    conn.executemany(
        "INSERT INTO item (name, data, price) VALUES (?, ?, ?)",
        ((f"{text}{i}", b"\x00" * 64, i / 7) for i in range(300_000)),
    )
    conn.commit()
    conn.close()
    return path
