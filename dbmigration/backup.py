"""Backups: consistent snapshots, manifests, verification, retention and restore.

A backup lives in ``<backup_dir>/<timestamp>/`` and is written first under
``<timestamp>.partial/``; only after it verified is the manifest written with
``verified: true`` and the directory renamed.  Anything that stops a backup half way
(an error, disk full, SIGINT/SIGTERM) removes the partial directory, so a backup that
is listed is a backup that verified.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import math
import os
import shutil
import signal
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from dbmigration.errors import BackupError, MigrationError, SourceError, TargetError
from dbmigration.sqlite_source import (
    applied_migrations,
    file_sha256,
    list_tables,
    open_readonly,
    quote_ident,
    row_counts,
    translate_sqlite_error,
)

MANIFEST = "manifest.json"
SNAPSHOT = "db.sqlite3"
PG_DUMP = "db.dump"
PARTIAL = ".partial"
ENC_SUFFIX = ".enc"
KEY_ENV = "PROPCORE_BACKUP_KEY"
CHUNK = 1 << 20  # bytes per read/encrypt step: memory stays bounded whatever the size

Progress = Callable[[str], None] | None


class BackupInterrupted(BackupError):
    """SIGINT or SIGTERM arrived while a backup was being written."""

    returncode = 130


def tool_version() -> str:
    """Return the propcore version that wrote a backup."""
    try:
        from importlib.metadata import version

        return f"propcore {version('propcore')}"
    except Exception:  # not installed as a package (running from a checkout)
        return "propcore (checkout)"


@dataclasses.dataclass
class BackupFile:
    name: str  # relative to the backup directory, as stored on disk
    sha256: str
    size: int
    plain_sha256: str | None = None  # when encrypted: the checksum before encryption


@dataclasses.dataclass
class BackupInfo:
    """One backup as its manifest describes it."""

    path: Path
    kind: str  # sqlite | postgresql
    created_at: str
    verified: bool = False
    files: list[BackupFile] = dataclasses.field(default_factory=list)
    row_counts: dict[str, int] = dataclasses.field(default_factory=dict)
    migrations: list[str] = dataclasses.field(default_factory=list)
    source: str = ""
    source_size: int = 0
    tool_version: str = ""
    encrypted: bool = False
    seconds: float = 0.0
    label: str = ""
    checks: dict = dataclasses.field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    def to_manifest(self) -> dict:
        data = dataclasses.asdict(self)
        data.pop("path")
        return data

    @classmethod
    def from_manifest(cls, path: Path) -> BackupInfo:
        data = json.loads((path / MANIFEST).read_text())
        files = [BackupFile(**f) for f in data.pop("files", [])]
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(path=path, files=files, **{k: v for k, v in data.items() if k in known})


@dataclasses.dataclass
class RestoreResult:
    restored_from: Path
    target: Path
    safety_backup: BackupInfo | None
    row_counts: dict[str, int]
    seconds: float
    dry_run: bool = False
    raw_copy: Path | None = None  # when the current database was too damaged to snapshot


# --- interruption and disk-full handling ------------------------------------------------


def _backup_interrupted(signame: str) -> BaseException:
    return BackupInterrupted(
        f"Backup interrupted by {signame}; the partial backup was removed and nothing was "
        "marked good. Run the backup again."
    )


@contextlib.contextmanager
def signals_as_errors(make_error: Callable[[str], BaseException] = _backup_interrupted):
    """Turn SIGTERM and SIGINT into make_error(signal name) so cleanup code runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum, frame):
        raise make_error(signal.Signals(signum).name)

    previous = {s: signal.signal(s, _raise) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _is_disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return isinstance(exc, sqlite3.Error) and "full" in str(exc)


@contextlib.contextmanager
def _partial_dir(backup_dir: Path, *, label: str):
    """Yield a fresh partial directory; remove it unless the body renamed it to final."""
    try:
        backup_dir.mkdir(parents=True, exist_ok=True)
        lock_fh = open(backup_dir / ".lock", "w")  # noqa: SIM115 - held for the whole backup
    except OSError as exc:
        raise BackupError(
            f"Cannot write backups to {backup_dir} ({exc.strerror}). Fix: make it writable, "
            "free space, or use --backup-dir elsewhere."
        ) from None
    try:
        try:
            fcntl.flock(lock_fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BackupError(
                f"Another backup is running in {backup_dir}; wait for it to finish."
            ) from None
        # we hold the lock, so any partial directory left here is from a killed run
        for stale in backup_dir.glob(f"*{PARTIAL}"):
            shutil.rmtree(stale, ignore_errors=True)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        name = f"{stamp}-{label}" if label else stamp
        partial = backup_dir / f"{name}{PARTIAL}"
        partial.mkdir()
        try:
            with signals_as_errors():
                yield partial, backup_dir / name
        except MigrationError:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        except BaseException as exc:
            shutil.rmtree(partial, ignore_errors=True)
            if _is_disk_full(exc):
                raise BackupError(
                    f"Disk full while writing a backup under {backup_dir} ({exc}); the partial "
                    "backup was removed and nothing was marked good. Free space there (or "
                    "use --backup-dir elsewhere) and run again."
                ) from exc
            if isinstance(exc, KeyboardInterrupt):
                raise _backup_interrupted("SIGINT") from exc
            if isinstance(exc, OSError):
                raise BackupError(
                    f"Could not write the backup under {backup_dir} ({exc}); the partial "
                    "backup was removed."
                ) from exc
            raise
    finally:
        lock_fh.close()


# --- SQLite snapshot and logical export ---------------------------------------------------


class _RawText(bytes):
    """A TEXT value exactly as stored (SQLite does not validate UTF-8)."""


def _json_value(value):
    """Encode one SQLite value for JSON Lines, losslessly and keeping its storage class."""
    if isinstance(value, _RawText):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return {"$text_b64": base64.b64encode(value).decode()}
    if isinstance(value, bytes):
        return {"$blob": base64.b64encode(value).decode()}
    if isinstance(value, float) and not math.isfinite(value):
        return {"$float": repr(value)}
    return value


def _export_jsonl(snapshot: Path, out_dir: Path, *, progress: Progress) -> dict[str, tuple]:
    """Stream every table of the snapshot to <table>.jsonl; return {table: (rows, sha256)}."""
    out_dir.mkdir()
    conn = open_readonly(snapshot)
    conn.text_factory = _RawText  # TEXT arrives tagged, BLOB as plain bytes
    results = {}
    cur = conn.cursor()
    try:
        for table in list_tables(conn):
            cur.execute(f"SELECT * FROM {quote_ident(table)}")
            cols = [d[0] for d in cur.description]
            digest, rows = hashlib.sha256(), 0
            with open(out_dir / f"{table}.jsonl", "wb") as fh:
                header = json.dumps({"$table": table, "$columns": cols}) + "\n"
                fh.write(header.encode())
                digest.update(header.encode())
                while batch := cur.fetchmany(2000):
                    chunk = "".join(
                        json.dumps(dict(zip(cols, map(_json_value, row), strict=True))) + "\n"
                        for row in batch
                    ).encode()
                    fh.write(chunk)
                    digest.update(chunk)
                    rows += len(batch)
                fh.flush()
                os.fsync(fh.fileno())
            results[table] = (rows, digest.hexdigest())
            if progress:
                progress(f"exported {table}: {rows:,} rows")
    finally:
        # an unfinished statement would keep the file open after close() (zombie connection)
        cur.close()
        conn.close()
    return results


def _snapshot(sqlite_path: Path, dest: Path, *, lock_timeout: float) -> tuple[dict, list[str]]:
    """Copy a consistent snapshot with the online backup API; return (counts, migrations)."""
    src = open_readonly(sqlite_path, timeout=lock_timeout)
    src.isolation_level = None  # we manage the read transaction ourselves
    try:
        try:
            # one read transaction: the counts and the copied pages are the same snapshot
            src.execute("BEGIN")
            counts = row_counts(src)
            migrations = applied_migrations(src)
            out = sqlite3.connect(dest)
            try:
                src.backup(out)
                # the copy is a self-contained file: no -wal beside it to lose
                out.execute("PRAGMA journal_mode=DELETE").fetchone()
            finally:
                out.close()
            src.execute("COMMIT")
        except sqlite3.Error as exc:
            if _is_disk_full(exc):
                raise
            raise translate_sqlite_error(sqlite_path, exc) from exc
    finally:
        src.close()
    return counts, migrations


def verify_snapshot(path: Path, expected_counts: dict[str, int]) -> dict:
    """Reopen a snapshot read-only: integrity_check ok and counts equal; raise BackupError."""
    conn = open_readonly(path)
    try:
        integrity = [r[0] for r in conn.execute("PRAGMA integrity_check").fetchall()]
        counts = row_counts(conn)
    except sqlite3.Error as exc:
        raise BackupError(f"Backup file {path} does not open as SQLite ({exc}).") from exc
    finally:
        conn.close()
    if integrity != ["ok"]:
        raise BackupError(f"Backup file {path} fails integrity_check: {integrity[:3]}.")
    if counts != expected_counts:
        diff = {
            t: (expected_counts.get(t), counts.get(t))
            for t in set(counts) | set(expected_counts)
            if counts.get(t) != expected_counts.get(t)
        }
        raise BackupError(f"Backup {path} row counts differ from the source (source, copy): {diff}")
    return {"integrity_check": "ok", "row_counts_equal": True}


def create_sqlite_backup(
    *,
    sqlite_path: Path,
    backup_dir: Path,
    label: str = "",
    encrypt_key: str | None = None,
    keep: int | None = None,
    lock_timeout: float = 5.0,
    progress: Progress = None,
) -> BackupInfo:
    """Snapshot the SQLite source in two formats, verify both, and mark the backup good."""
    sqlite_path, backup_dir = Path(sqlite_path), Path(backup_dir)
    start = time.perf_counter()
    _check_keep(keep)
    open_readonly(sqlite_path).close()  # missing / not SQLite: fail before creating anything
    with _partial_dir(backup_dir, label=label) as (partial, final):
        snapshot = partial / SNAPSHOT
        counts, migrations = _snapshot(sqlite_path, snapshot, lock_timeout=lock_timeout)
        if progress:
            # no row total here: the command's summary says what its total counts
            progress(f"snapshot taken ({len(counts)} tables); exporting JSON Lines")
        exported = _export_jsonl(snapshot, partial / "jsonl", progress=progress)
        info = BackupInfo(
            path=final,
            kind="sqlite",
            created_at=datetime.now(UTC).isoformat(),
            row_counts=counts,
            migrations=migrations,
            source=str(sqlite_path.resolve()),
            source_size=sqlite_path.stat().st_size,
            tool_version=tool_version(),
            label=label,
        )
        info.files.append(BackupFile(SNAPSHOT, file_sha256(snapshot), snapshot.stat().st_size))
        for table, (_, digest) in exported.items():
            rel = f"jsonl/{table}.jsonl"
            info.files.append(BackupFile(rel, digest, (partial / rel).stat().st_size))
        info.checks = verify_snapshot(snapshot, counts)
        bad = {t: (counts.get(t), n) for t, (n, _) in exported.items() if counts.get(t) != n}
        if bad or set(exported) != set(counts):
            raise BackupError(f"JSON Lines export row counts differ from the snapshot: {bad}")
        info.checks["jsonl_row_counts_equal"] = True
        if encrypt_key:
            _encrypt_files(partial, info, encrypt_key)
        _finish(partial, final, info, start)
    if keep is not None:
        apply_retention(backup_dir, keep=keep)
    return info


def _finish(partial: Path, final: Path, info: BackupInfo, start: float) -> None:
    """Re-read every checksum from disk, then write the verified manifest and rename."""
    verify_files(partial, info)
    info.checks["checksums_reread"] = True
    info.verified = True
    info.seconds = round(time.perf_counter() - start, 3)
    with open(partial / MANIFEST, "w") as fh:
        json.dump(info.to_manifest(), fh, indent=2)
        fh.flush()
        os.fsync(fh.fileno())
    os.rename(partial, final)
    info.path = final


def verify_files(path: Path, info: BackupInfo, *, key: str | None = None) -> None:
    """Re-read every file of a backup and compare its SHA-256 to the manifest."""
    for f in info.files:
        file = path / f.name
        if not file.exists():
            raise BackupError(f"Backup {path} is missing {f.name}; it cannot be trusted.")
        actual = file_sha256(file)
        if actual != f.sha256:
            raise BackupError(
                f"Backup {path}: checksum of {f.name} differs from its manifest "
                f"({actual[:12]} != {f.sha256[:12]}); the file was changed or damaged."
            )
        if f.plain_sha256 and key:
            digest = hashlib.sha256()
            for chunk in _decrypt_chunks(file, key):
                digest.update(chunk)
            if digest.hexdigest() != f.plain_sha256:
                raise BackupError(f"Backup {path}: {f.name} does not decrypt to its checksum.")


# --- encryption at rest ----------------------------------------------------------------------


def _fernet(key: str):
    try:
        from cryptography.fernet import Fernet
    except ImportError:  # pragma: no cover - cryptography is a declared dependency
        raise BackupError(
            "Encryption needs the 'cryptography' package: pip install cryptography."
        ) from None
    # any passphrase works: derive the 32-byte Fernet key from it
    raw = hashlib.sha256(key.encode()).digest()
    return Fernet(base64.urlsafe_b64encode(raw))


def _encrypt_files(partial: Path, info: BackupInfo, key: str) -> None:
    """Encrypt each file in CHUNK-sized Fernet tokens (length-prefixed), then drop plaintext."""
    fernet = _fernet(key)
    for f in info.files:
        plain = partial / f.name
        target = plain.with_name(plain.name + ENC_SUFFIX)
        with open(plain, "rb") as src, open(target, "wb") as dst:
            while chunk := src.read(CHUNK):
                token = fernet.encrypt(chunk)
                dst.write(len(token).to_bytes(4, "big") + token)
            dst.flush()
            os.fsync(dst.fileno())
        plain.unlink()
        f.plain_sha256, f.name = f.sha256, f.name + ENC_SUFFIX
        f.sha256, f.size = file_sha256(target), target.stat().st_size
        digest = hashlib.sha256()
        for chunk in _decrypt_chunks(target, key):
            digest.update(chunk)
        if digest.hexdigest() != f.plain_sha256:  # proves the key and the file agree
            raise BackupError(f"{target} does not decrypt to the file it was made from.")
    info.encrypted = True


def _decrypt_chunks(path: Path, key: str):
    from cryptography.fernet import InvalidToken

    fernet = _fernet(key)
    with open(path, "rb") as fh:
        while head := fh.read(4):
            token = fh.read(int.from_bytes(head, "big"))
            try:
                yield fernet.decrypt(token)
            except InvalidToken:
                raise BackupError(
                    f"{path} does not decrypt with the key in {KEY_ENV}; set the key the backup "
                    "was made with."
                ) from None


def decrypt_file(path: Path, dest: Path, *, key: str) -> None:
    """Decrypt an encrypted backup file to dest, chunk by chunk."""
    with open(dest, "wb") as out:
        for chunk in _decrypt_chunks(path, key):
            out.write(chunk)


# --- listing, retention, verification of stored backups --------------------------------------


def list_backups(backup_dir: Path) -> list[BackupInfo]:
    """Return the verified backups under backup_dir, oldest first (partial ones never)."""
    backup_dir = Path(backup_dir)
    if not backup_dir.exists():
        return []
    found = []
    for path in sorted(p for p in backup_dir.iterdir() if p.is_dir()):
        if path.name.endswith(PARTIAL) or not (path / MANIFEST).exists():
            continue
        try:
            info = BackupInfo.from_manifest(path)
        except (ValueError, TypeError, OSError):
            continue
        if info.verified:
            found.append(info)
    return found


def last_verified_backup(backup_dir: Path, *, kind: str | None = None) -> BackupInfo | None:
    """Return the newest verified backup (of kind, sqlite or postgresql, if given), or None."""
    backups = [b for b in list_backups(backup_dir) if kind is None or b.kind == kind]
    return backups[-1] if backups else None


def _check_keep(keep: int | None) -> None:
    if keep is not None and keep < 1:
        raise BackupError("--keep must be at least 1: retention never deletes every backup.")


def apply_retention(backup_dir: Path, *, keep: int) -> list[Path]:
    """Delete all but the newest keep verified backups of each kind; return what was removed.

    Records of pgBackRest backups are left alone: pgBackRest's own retention decides when
    they go (prune_expired_records), and a pg_dump must not hide a restorable backup."""
    _check_keep(keep)
    backups = [b for b in list_backups(backup_dir) if not b.checks.get("pgbackrest")]
    removed = []
    # per kind: a run of pg_dump backups must not push out the last SQLite snapshot
    for kind in {b.kind for b in backups}:
        removed += [b.path for b in backups if b.kind == kind][:-keep]
    for path in removed:
        shutil.rmtree(path)
    return removed


def load_backup(path: Path, *, backup_dir: Path | None = None) -> BackupInfo:
    """Find a backup by path or by name under backup_dir; refuse unverified ones."""
    path = Path(path)
    if not path.exists() and backup_dir is not None:
        path = Path(backup_dir) / path.name
    if not (path / MANIFEST).exists():
        raise BackupError(
            f"{path} is not a propcore backup (no {MANIFEST}). List backups with "
            "'db_backup --list'."
        )
    info = BackupInfo.from_manifest(path)
    if not info.verified:
        raise BackupError(f"Backup {path} was never verified; it cannot be restored.")
    return info


# --- restore ------------------------------------------------------------------------------


def restore_sqlite_backup(
    *,
    backup: Path,
    sqlite_path: Path,
    backup_dir: Path,
    code_migrations: list[str],
    encrypt_key: str | None = None,
    lock_timeout: float = 20.0,
    dry_run: bool = False,
    progress: Progress = None,
) -> RestoreResult:
    """Verify a backup, back up the current database, then restore the snapshot into it."""
    start = time.perf_counter()
    info = load_backup(backup, backup_dir=backup_dir)
    if info.kind != "sqlite":
        raise BackupError(
            f"Backup {info.path} is a {info.kind} backup, not a SQLite one. Restore it with "
            f"pg_restore --clean --if-exists -d <database> {info.path / PG_DUMP}."
        )
    if info.encrypted and not encrypt_key:
        raise BackupError(f"Backup {info.path} is encrypted; set {KEY_ENV} to its key.")
    verify_files(info.path, info, key=encrypt_key)
    if progress:
        progress("checksums verified")
    missing = sorted(set(code_migrations) - set(info.migrations))
    extra = sorted(set(info.migrations) - set(code_migrations))
    if missing or extra:
        raise BackupError(
            f"Backup {info.name} does not match this code's migrations (code has but backup "
            f"lacks: {missing[:5]}; backup has but code lacks: {extra[:5]}). Restore it with "
            f"the code version that made it ({info.tool_version})."
        )
    sqlite_path, backup_dir = Path(sqlite_path), Path(backup_dir)
    if dry_run:
        return RestoreResult(info.path, sqlite_path, None, info.row_counts, 0.0, dry_run=True)
    safety, raw_copy = None, None
    if sqlite_path.exists():
        try:
            safety = create_sqlite_backup(
                sqlite_path=sqlite_path, backup_dir=backup_dir, label="pre-restore"
            )
        except (SourceError, BackupError) as exc:
            if "locked" in str(exc) or "Disk full" in str(exc):
                raise
            # a damaged database cannot be snapshotted: keep its files exactly as they are
            raw_copy = _raw_copy(sqlite_path, backup_dir)
        if progress:
            progress(f"current database kept as {safety.path if safety else raw_copy}")
    snapshot = info.path / SNAPSHOT
    tmp = None
    if info.encrypted:
        tmp = backup_dir / f".restore-{os.getpid()}.sqlite3"
        decrypt_file(info.path / (SNAPSHOT + ENC_SUFFIX), tmp, key=encrypt_key)
        snapshot = tmp
    try:
        if raw_copy is None:
            _restore_pages(snapshot, sqlite_path, lock_timeout=lock_timeout)
        else:
            _replace_file(snapshot, sqlite_path)
    finally:
        if tmp:
            tmp.unlink(missing_ok=True)
    try:
        verify_snapshot(sqlite_path, info.row_counts)
    except BackupError as exc:
        raise BackupError(f"Restored database did not verify: {exc}") from exc
    return RestoreResult(
        restored_from=info.path,
        target=sqlite_path,
        safety_backup=safety,
        row_counts=info.row_counts,
        seconds=round(time.perf_counter() - start, 3),
        raw_copy=raw_copy,
    )


def _restore_pages(snapshot: Path, sqlite_path: Path, *, lock_timeout: float) -> None:
    src = open_readonly(snapshot)
    dest = sqlite3.connect(sqlite_path, timeout=lock_timeout)
    try:
        # SQLite's own backup API writes the pages under its locks (WAL-safe), unlike a
        # file copy over a database another process may have open
        src.backup(dest)
    except sqlite3.Error as exc:
        raise translate_sqlite_error(sqlite_path, exc) from exc
    finally:
        dest.close()
        src.close()


def _sidecars(path: Path) -> list[Path]:
    return [path.with_name(path.name + s) for s in ("-wal", "-shm", "-journal")]


def _raw_copy(sqlite_path: Path, backup_dir: Path) -> Path:
    """Copy a damaged database and its -wal/-shm byte for byte (it cannot be snapshotted)."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    target = backup_dir / f"{stamp}-pre-restore-raw"
    target.mkdir(parents=True)
    for path in [sqlite_path, *_sidecars(sqlite_path)]:
        if path.exists():
            shutil.copy2(path, target / path.name)
    return target


def _replace_file(snapshot: Path, sqlite_path: Path) -> None:
    """Swap a damaged database for the snapshot atomically; its sidecars go with it."""
    tmp = sqlite_path.with_name(f".{sqlite_path.name}.restore-{os.getpid()}")
    shutil.copyfile(snapshot, tmp)
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    for sidecar in _sidecars(sqlite_path):
        sidecar.unlink(missing_ok=True)  # they belong to the damaged file (kept in raw copy)
    os.replace(tmp, sqlite_path)


# --- PostgreSQL: pg_dump -Fc ------------------------------------------------------------------


def _pg_env(conninfo: dict) -> dict:
    env = dict(os.environ)
    # pass the password through the environment, never on a command line
    if conninfo.get("password"):
        env["PGPASSWORD"] = str(conninfo["password"])
    return env


def _pg_args(conninfo: dict) -> list[str]:
    args = []
    for flag, key in (("-h", "host"), ("-p", "port"), ("-U", "user")):
        if conninfo.get(key):
            args += [flag, str(conninfo[key])]
    return args


def _pg_counts(conn) -> dict[str, int]:
    tables = conn.execute(
        "SELECT schemaname, tablename FROM pg_tables "
        "WHERE schemaname NOT IN ('pg_catalog', 'information_schema') ORDER BY 1, 2"
    ).fetchall()
    counts = {}
    for schema, table in tables:
        key = table if schema == "public" else f"{schema}.{table}"
        counts[key] = conn.execute(f'SELECT count(*) FROM "{schema}"."{table}"').fetchone()[0]
    return counts


def _run(cmd: list[str], *, env: dict, what: str) -> str:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        err = (proc.stderr or proc.stdout).strip().splitlines()
        tail = err[-1] if err else f"exit {proc.returncode}"
        if "No space left" in (proc.stderr or ""):
            raise OSError(errno.ENOSPC, tail)
        raise BackupError(f"{what} failed: {tail}")
    return proc.stdout


def create_pg_backup(
    *,
    conninfo: dict,
    backup_dir: Path,
    label: str = "",
    verify_restore: bool = False,
    encrypt_key: str | None = None,
    keep: int | None = None,
    progress: Progress = None,
) -> BackupInfo:
    """pg_dump -Fc the target inside one snapshot, check it with pg_restore --list."""
    import psycopg

    backup_dir = Path(backup_dir)
    start = time.perf_counter()
    _check_keep(keep)
    env, args = _pg_env(conninfo), _pg_args(conninfo)
    dbname = conninfo["dbname"]
    try:
        conn = psycopg.connect(**conninfo, connect_timeout=10, autocommit=False)
        # one REPEATABLE READ transaction: counts, migrations and the dump see one snapshot
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        conn.read_only = True
    except psycopg.Error as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TargetError(
            f"PostgreSQL is not reachable for a backup ({first}). Fix: check POSTGRES_URL and "
            "run db_test_postgresql."
        ) from None
    with conn, _partial_dir(backup_dir, label=label or "pg") as (partial, final):
        try:
            snapshot_id = conn.execute("SELECT pg_export_snapshot()").fetchone()[0]
            counts = _pg_counts(conn)
            migrations = sorted(
                f"{a}.{n}" for a, n in conn.execute("SELECT app, name FROM django_migrations")
            )
            size = conn.execute("SELECT pg_database_size(current_database())").fetchone()[0]
        except psycopg.Error as exc:
            raise BackupError(
                f"Could not read database {dbname} for a backup ({str(exc).splitlines()[0]}). "
                "Fix: run migration_prepare first, or check the role's privileges."
            ) from None
        dump = partial / PG_DUMP
        # the dump and the counts read the same exported snapshot: they must agree
        _run(
            ["pg_dump", "-Fc", f"--snapshot={snapshot_id}", "-f", str(dump), *args, dbname],
            env=env,
            what="pg_dump",
        )
        conn.commit()
        if progress:
            progress(f"pg_dump written: {dump.stat().st_size:,} bytes")
        listing = _run(["pg_restore", "--list", str(dump)], env=env, what="pg_restore --list")
        data_entries = sum(" TABLE DATA " in line for line in listing.splitlines())
        info = BackupInfo(
            path=final,
            kind="postgresql",
            created_at=datetime.now(UTC).isoformat(),
            row_counts=counts,
            migrations=migrations,
            source=f"postgresql database {dbname}",
            source_size=size,
            tool_version=tool_version(),
            label=label,
            files=[BackupFile(PG_DUMP, file_sha256(dump), dump.stat().st_size)],
            checks={"pg_restore_list": "ok", "table_data_entries": data_entries},
        )
        if verify_restore:
            info.checks["verify_restore"] = _verify_restore(conninfo, dump, counts, env, args)
        if encrypt_key:
            _encrypt_files(partial, info, encrypt_key)
        _finish(partial, final, info, start)
    if keep is not None:
        apply_retention(backup_dir, keep=keep)
    return info


# --- PostgreSQL with point-in-time recovery: pgBackRest ---------------------------------------


def create_pgbackrest_backup(
    *, backup_dir: Path, backup_type: str | None = None, progress: Progress = None
) -> BackupInfo:
    """Take a pgBackRest backup (verified with pgbackrest verify) and list it with the others.

    The backup itself lives in pgBackRest's repository; backup_dir gets its record (manifest
    only: label, type, the repository), so db_backup --list, the health check and status see
    it beside the SQLite snapshots and pg_dumps.  Records of backups pgBackRest has expired
    are removed here: the repository decides what exists.
    """
    from dbmigration import conf, pitr

    backup_dir = Path(backup_dir)
    start = time.perf_counter()
    stanza = pitr.info()
    # full the first time (pgBackRest would promote a diff anyway), then differentials
    backup_type = backup_type or ("diff" if stanza.last("full") else "full")
    if progress:
        progress(f"pgbackrest backup --type={backup_type}")
    with _partial_dir(backup_dir, label="pgbackrest") as (partial, final):
        taken = pitr.backup(backup_type=backup_type)
        counts = pitr.count_rows()
        options = conf.pitr()
        info = BackupInfo(
            path=final,
            kind="postgresql",
            created_at=taken.backup.stopped.isoformat(),
            row_counts=counts,  # read just after the backup ended, not in its snapshot
            migrations=pitr.applied_migrations(),
            source=f"pgbackrest stanza {options['STANZA']}",
            source_size=taken.backup.size,
            tool_version=tool_version(),
            label="pgbackrest",
            checks={
                "pgbackrest": {
                    "label": taken.backup.label,
                    "type": taken.backup.type,
                    "repository": str(options["REPO_PATH"]),
                    "repository_bytes": taken.backup.repo_size,
                },
                "pgbackrest_verify": "ok",
            },
        )
        _finish(partial, final, info, start)
    prune_expired_records(backup_dir, {b.label for b in pitr.info().backups})
    return info


def expire_pgbackrest(backup_dir: Path):
    """Let pgBackRest apply its retention now; drop the records of what it expired."""
    from dbmigration import pitr

    stanza = pitr.expire()
    prune_expired_records(backup_dir, {b.label for b in stanza.backups})
    return stanza


def prune_expired_records(backup_dir: Path, labels: set[str]) -> list[Path]:
    """Remove the records of pgBackRest backups its retention has expired (never their data)."""
    removed = []
    for info in list_backups(backup_dir):
        label = info.checks.get("pgbackrest", {}).get("label")
        if label and label not in labels:
            shutil.rmtree(info.path)
            removed.append(info.path)
    return removed


def _verify_restore(conninfo: dict, dump: Path, counts: dict, env: dict, args: list) -> dict:
    """Restore the dump into a scratch database and compare its row counts."""
    import psycopg
    from psycopg import sql

    scratch = f"{conninfo['dbname']}_verify_{os.getpid()}"[:63]
    admin = {**conninfo, "dbname": "postgres"}
    with psycopg.connect(**admin, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(scratch)))
        conn.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE template0 ENCODING 'UTF8'").format(
                sql.Identifier(scratch)
            )
        )
    try:
        _run(
            ["pg_restore", "--no-owner", "--exit-on-error", "-d", scratch, *args, str(dump)],
            env=env,
            what="pg_restore into a scratch database",
        )
        with psycopg.connect(**{**conninfo, "dbname": scratch}) as conn:
            restored = _pg_counts(conn)
    finally:
        with psycopg.connect(**admin, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(scratch))
            )
    if restored != counts:
        diff = {t: (counts.get(t), restored.get(t)) for t in counts if counts[t] != restored.get(t)}
        raise BackupError(f"Scratch restore row counts differ (dump, restored): {diff}")
    return {"scratch_database": scratch, "row_counts_equal": True}


__all__ = [
    "BackupError",
    "BackupFile",
    "BackupInfo",
    "BackupInterrupted",
    "RestoreResult",
    "SourceError",
    "apply_retention",
    "create_pg_backup",
    "create_pgbackrest_backup",
    "create_sqlite_backup",
    "last_verified_backup",
    "list_backups",
    "load_backup",
    "restore_sqlite_backup",
    "verify_files",
]
