"""Read-only access to the SQLite source, and the facts that prove it was not changed."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

from dbmigration.errors import SourceError

SQLITE_MAGIC = b"SQLite format 3\x00"


def file_sha256(path: Path, *, chunk_size: int = 1 << 20) -> str:
    """Return the SHA-256 of a file, read in chunks (bounded memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


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
    with open(path, "rb") as fh:
        if fh.read(16) != SQLITE_MAGIC:
            raise SourceError(
                f"{path} is not a SQLite database (bad header). Point SQLITE_PATH at the "
                "platform's database file."
            )
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=timeout)
    if raw_text:
        conn.text_factory = bytes  # text as stored: invalid UTF-8 must be seen, not replaced
    return conn


def data_version_and_schema(conn: sqlite3.Connection) -> dict:
    """Facts that change when anything writes to the database file."""
    return {
        "schema_version": conn.execute("PRAGMA schema_version").fetchone()[0],
        "page_count": conn.execute("PRAGMA page_count").fetchone()[0],
    }
