"""Read-only access to the SQLite source, and the facts that prove it was not changed."""

from __future__ import annotations

import errno
import hashlib
import os
import re
import sqlite3
import subprocess
from datetime import UTC, datetime
from pathlib import Path

from dbmigration import freeze as fz
from dbmigration.errors import SourceError

SQLITE_MAGIC = b"SQLite format 3\x00"


def file_sha256(path: Path) -> str:
    """Return the SHA-256 of a file, computed by sha256sum in a child process.

    Never by opening the file here: closing any descriptor of a database file drops every
    POSIX lock this process holds on it.  In WAL mode that includes the SHARED lock each open
    connection keeps, so another process closing its connection believes it is the last,
    deletes the -wal and -shm under ours, and later commits are lost (checked: 50 of 150
    rows).  Locks belong to a process, so a child's open and close cannot touch them.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(errno.ENOENT, "No such file", os.fspath(path))
    try:
        done = subprocess.run(
            ["sha256sum", "--", os.fspath(path)], capture_output=True, text=True, check=True
        )
    except subprocess.CalledProcessError as exc:
        raise OSError(f"sha256sum {path} failed: {exc.stderr.strip()}") from None
    return done.stdout.split()[0].lstrip("\\")


def checkpoint(path: Path, *, timeout: float = 1.0) -> bool:
    """Move the -wal's commits into the file and empty the -wal; say whether it did.

    Content hashes of a WAL database are stable only then: otherwise the same rows hash
    differently before and after SQLite's own checkpoint (the last connection's close)."""
    path = Path(path)
    wal = path.with_name(path.name + "-wal")
    if not (wal.exists() and wal.stat().st_size):
        return True
    try:
        conn = sqlite3.connect(path, timeout=timeout, isolation_level=None)
    except sqlite3.Error:
        return False
    try:
        busy = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
    except sqlite3.Error:  # read-only file, a writer past the timeout: hash as it is
        return False
    finally:
        conn.close()
    return busy == 0


def content_sha256(path: Path) -> str:
    """What the rows are, as a hash: the file's SHA-256, combined with its -wal's when
    commits are still there (in WAL mode the main file may not change when rows do)."""
    path = Path(path)
    checkpoint(path)
    wal = path.with_name(path.name + "-wal")
    wal_sha = file_sha256(wal) if wal.exists() and wal.stat().st_size else None
    return combined_sha256(file_sha256(path), wal_sha)


def combined_sha256(main_sha256: str, wal_sha256: str | None) -> str:
    """content_sha256 from the two hashes a source fingerprint holds."""
    if not wal_sha256:
        return main_sha256  # no -wal: the file's own hash, as before WAL mode
    return hashlib.sha256(f"{main_sha256}+{wal_sha256}".encode()).hexdigest()


def open_readonly(
    path: Path, *, timeout: float = 5.0, raw_text: bool = False
) -> sqlite3.Connection:
    """Open the SQLite file read-only (URI mode=ro); raise SourceError with a fix if we can't."""
    path = Path(path)
    if not path.exists():
        raise SourceError(
            f"SQLite database {path} does not exist. Check SQLITE_PATH or the 'sqlite' entry "
            "in DATABASES."
        )
    not_sqlite = SourceError(
        f"{path} is not a SQLite database (bad header). Point SQLITE_PATH at the "
        "platform's database file."
    )
    # the header is checked by SQLite itself, never by opening the file here: closing any
    # descriptor of the file drops every POSIX lock this process holds on it, such as the
    # write lock the switch holds while it reads the last changes (see fence.py)
    if path.stat().st_size == 0:
        raise not_sqlite
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=timeout)
    try:
        conn.execute("PRAGMA schema_version")
    except sqlite3.DatabaseError as exc:
        conn.close()
        if "not a database" in str(exc):
            raise not_sqlite from None
        raise translate_sqlite_error(path, exc) from exc
    if raw_text:
        conn.text_factory = bytes  # text as stored: invalid UTF-8 must be seen, not replaced
    return conn


def snapshot_to(path: Path, dest: Path) -> Path:
    """Copy the live file as of one instant (online backup API: consistent, WAL included)."""
    src = sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True, timeout=20)
    dst = sqlite3.connect(dest)
    try:
        src.backup(dst)
        # a self-contained file: read-only connections to a WAL copy would leave -wal/-shm
        dst.execute("PRAGMA journal_mode=DELETE").fetchone()
    except sqlite3.Error as exc:
        raise translate_sqlite_error(Path(path), exc) from exc
    finally:
        dst.close()
        src.close()
    return Path(dest)


def temp_copy_path(sqlite_path: Path, kind: str) -> Path:
    """Where a run keeps its working copy: beside the file, named by run kind, time and pid."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    return sqlite_path.with_name(f"{sqlite_path.name}.{kind}-{stamp}-pid{os.getpid()}")


def remove_leftover_copies(sqlite_path: Path) -> list[str]:
    """Delete the working copies (and their -wal/-journal) of killed switches and rollbacks.

    A copy whose process still runs on this host is left alone; one without a pid in its
    name predates the pid naming and can only be a leftover.
    """
    removed = []
    for kind in ("cutover", "rollback"):
        for path in sorted(sqlite_path.parent.glob(f"{sqlite_path.name}.{kind}-*")):
            owner = re.search(r"-pid(\d+)", path.name)
            if owner and fz.process_start(int(owner.group(1))) is not None:
                continue
            path.unlink(missing_ok=True)
            removed.append(path.name)
    return removed


def remove_copy(path: Path) -> None:
    """Delete a working copy and whatever SQLite kept beside it."""
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def data_version_and_schema(conn: sqlite3.Connection) -> dict:
    """Facts that change when anything writes to the database file."""
    return {
        "schema_version": conn.execute("PRAGMA schema_version").fetchone()[0],
        "page_count": conn.execute("PRAGMA page_count").fetchone()[0],
    }


# --- added for prepare/backup (issue 3) --------------------------------------------


def translate_sqlite_error(path: Path, exc: sqlite3.Error) -> SourceError:
    """Turn a sqlite3 error on the source into a SourceError that names cause and fix."""
    text = str(exc)
    if "locked" in text or "busy" in text:
        return SourceError(
            f"SQLite database {path} is locked by another writer ({text}). Wait for it to "
            "finish or stop the process holding the lock, then run the command again."
        )
    if "not a database" in text or "malformed" in text or "corrupt" in text:
        return SourceError(
            f"SQLite database {path} is corrupt ({text}). Restore it from a backup "
            "(db_restore) or repair it with the sqlite3 '.recover' command first."
        )
    return SourceError(f"SQLite database {path} cannot be read ({text}).")


def list_tables(conn: sqlite3.Connection) -> list[str]:
    """Return the user tables of the database, sorted (no sqlite_* internals)."""
    rows = conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' "
        "ORDER BY name"
    ).fetchall()
    return [r[0] if isinstance(r[0], str) else r[0].decode() for r in rows]


def quote_ident(name: str) -> str:
    """Quote an identifier for SQLite."""
    return '"' + name.replace('"', '""') + '"'


def row_counts(conn: sqlite3.Connection) -> dict[str, int]:
    """Return {table: row count} for every user table."""
    return {
        t: conn.execute(f"SELECT count(*) FROM {quote_ident(t)}").fetchone()[0]
        for t in list_tables(conn)
    }


def applied_migrations(conn: sqlite3.Connection) -> list[str]:
    """Return the applied Django migrations as sorted 'app.name' strings ([] if none)."""
    exists = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'django_migrations'"
    ).fetchone()
    if not exists:
        return []
    rows = conn.execute("SELECT app, name FROM django_migrations").fetchall()
    return sorted(f"{_s(a)}.{_s(n)}" for a, n in rows)


def _s(value) -> str:
    return value.decode() if isinstance(value, bytes) else value


def schema_sha256(conn: sqlite3.Connection) -> str:
    """A hash of the schema's SQL (tables, indexes, views, triggers), without the write fence's
    objects: the runbook adds and removes those, the application's schema is the rest."""
    rows = conn.execute(
        "SELECT type, name, tbl_name, coalesce(sql, '') FROM sqlite_master "
        "WHERE substr(name, 1, 7) <> 'sqlite_' AND substr(name, 1, 14) <> 'propcore_fence' "
        "ORDER BY type, name"
    ).fetchall()
    return hashlib.sha256(repr(rows).encode()).hexdigest()


def source_fingerprint(path: Path, *, timeout: float = 5.0) -> dict:
    """Facts about the source: file and WAL hashes, counts, and the schema and migrations
    (only the last two must stay equal for a prepare to hold: rows change on a live site)."""
    path = Path(path)
    checkpoint(path)
    conn = open_readonly(path, timeout=timeout)
    try:
        facts = data_version_and_schema(conn)
        facts["schema_sha256"] = schema_sha256(conn)
        facts["migrations"] = applied_migrations(conn)
        counts = row_counts(conn)
    except sqlite3.Error as exc:
        raise translate_sqlite_error(path, exc) from exc
    finally:
        conn.close()
    wal = path.with_name(path.name + "-wal")
    wal_size = wal.stat().st_size if wal.exists() else 0
    return {
        "path": str(path.resolve()),
        "sha256": file_sha256(path),
        "size": path.stat().st_size,
        # commits not yet checkpointed live only in the -wal file
        "wal_sha256": file_sha256(wal) if wal_size else None,
        "wal_size": wal_size,
        **facts,
        "row_counts": counts,
        "rows_total": sum(counts.values()),
    }
