"""The write fence: the store being left refuses every write at the database itself.

The freeze (freeze.py) is honoured by the application's middleware at the start of a request;
a request already past that point, a cron job, a worker or a shell never looks at it.  The
fence closes that gap where no process can step around it:

- SQLite, during the switch: the runbook takes SQLite's write lock (``BEGIN IMMEDIATE``).
  Getting it *is* the drain: every transaction that started writing has committed by then,
  and no other connection can commit until it is released.  The last changes are read and
  carried under the lock, and before releasing it the runbook creates, in the same
  transaction, a one-row table ``propcore_fence`` and ``BEFORE INSERT/UPDATE/DELETE``
  triggers on every copied table that ``RAISE(ABORT, 'propcore write fence: ...')``.  Any
  later write on the file fails.  The data is never touched: the fence is schema objects the
  runbook owns, and the rollback removes them when it makes SQLite live again.
- PostgreSQL, during the rollback: the drain is observed in ``pg_stat_activity``: wait until
  no session of the database still runs a transaction that began before the freeze; past
  the bound, end those sessions (``pg_terminate_backend``).  Then statement-level triggers on
  every copied table raise ``propcore write fence: ...`` (who fenced and when: the comment
  of their function).  Triggers, unlike revokes or ``default_transaction_read_only``, bind
  every session at once, pooled ones included, and bind a superuser too (the application and
  the runbook connect as the same role in dev).  Creating a trigger waits for the
  transactions that already wrote to that table, so once every table is fenced no
  uncommitted write is left anywhere.  Until the rollback has flipped the state, the fence
  holds only while the runbook's session lives (a lease: a killed rollback leaves PostgreSQL
  writable); then it stays on the inactive PostgreSQL until the runbook writes to it again
  (migrate_data, the next switch).

A write refused by either fence raises a database error whose text holds ``FENCE_MARK``;
the middleware answers it 503 (retry), like the freeze, never 500.

The SQLite fence names its owner (the switch's process).  A switch killed after fencing and
before flipping the state leaves SQLite fenced while the state still names it active: every
write would be refused for ever.  Such a fence is *orphaned* (its owner is dead, so it can
never flip the state; the state never flipped, so no application process wrote to
PostgreSQL): SQLite holds every acknowledged write, and ``lift_orphaned_sqlite_fence`` lifts
it.  The next switch, rollback, migration_status, health check or refused request does.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import time
from collections.abc import Iterable
from pathlib import Path

from dbmigration import freeze as fz
from dbmigration.errors import MigrationError
from dbmigration.state import StateError, read_active_backend

FENCE_MARK = "propcore write fence"
FENCE_TABLE = "propcore_fence"
TRIGGER_PREFIX = "propcore_fence__"  # SQLite: one trigger per table and operation
PG_FUNCTION = "propcore_fence_refuse"
PG_TRIGGER = "propcore_fence"
ADMIN_SHUTDOWN = "57P01"  # the SQLSTATE a session ended by pg_terminate_backend sees
LOCK_NOT_AVAILABLE = "55P03"


class DrainTimeout(MigrationError):
    """A transaction that began before the freeze was still open at the drain's bound."""

    returncode = 8


def is_fence_refusal(exc: BaseException) -> bool:
    """Whether a database error is a fence refusing a write or ending a straggler's session."""
    seen, visited = exc, set()
    while seen is not None and id(seen) not in visited:  # a chain may loop back on itself
        if FENCE_MARK in str(seen) or getattr(seen, "sqlstate", None) == ADMIN_SHUTDOWN:
            return True
        visited.add(id(seen))
        seen = seen.__cause__
    return False


def _message(reason: str) -> str:
    return f"{FENCE_MARK}: {reason}; retry the request (it goes to the active database)"


def _qi(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


# --- SQLite -------------------------------------------------------------------------------------


@dataclasses.dataclass
class SqliteWriteLock:
    """SQLite's write lock, held by the runbook in an open ``BEGIN IMMEDIATE`` transaction."""

    path: Path
    conn: sqlite3.Connection
    waited_seconds: float
    fenced: bool = False

    def fence(self, tables: Iterable[str], *, reason: str) -> None:
        """Create the fence in the held transaction and commit: the lock ends, the fence holds."""
        _create_sqlite_fence(self.conn, tables, reason=reason)
        self.conn.execute("COMMIT")
        self.fenced = True

    def unfence(self) -> bool:
        """Lift our fence (not one a later run put up meanwhile); say whether we did."""
        return lift_sqlite_fence(self.path, owner=fz.this_process())

    def release(self) -> None:
        """Let writers in again; without a committed fence nothing of ours remains."""
        if self.conn.in_transaction:
            self.conn.execute("ROLLBACK")
        self.conn.close()


def hold_sqlite_write_lock(path: Path, *, timeout: float) -> SqliteWriteLock:
    """Wait (at most timeout s) for SQLite's write lock and keep it: the SQLite drain."""
    conn = sqlite3.connect(Path(path), timeout=timeout, isolation_level=None)
    started = time.monotonic()
    try:
        conn.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as exc:
        conn.close()
        if "locked" not in str(exc) and "busy" not in str(exc):
            raise
        raise DrainTimeout(
            f"Another connection held SQLite's write lock for more than {timeout:g} s after "
            f"the write freeze began (a long transaction in {path}); nothing was switched and "
            "the application keeps writing to SQLite. Find that transaction or raise "
            "--drain-seconds, then run the command again."
        ) from None
    return SqliteWriteLock(Path(path), conn, round(time.monotonic() - started, 3))


def _create_sqlite_fence(conn: sqlite3.Connection, tables: Iterable[str], *, reason: str) -> None:
    _drop_sqlite_fence(conn)  # a leftover of a killed run, replaced by ours
    conn.execute(
        f"CREATE TABLE {FENCE_TABLE} (reason TEXT NOT NULL, since REAL NOT NULL, owner TEXT)"
    )
    owner = json.dumps(fz.this_process())  # who may flip the state while it holds
    conn.execute(f"INSERT INTO {FENCE_TABLE} VALUES (?, ?, ?)", [reason, time.time(), owner])
    refuse = f"SELECT RAISE(ABORT, {_literal(_message(reason))})"
    for table in tables:
        for operation in ("INSERT", "UPDATE", "DELETE"):
            name = f"{TRIGGER_PREFIX}{table}__{operation.lower()}"
            conn.execute(
                f"CREATE TRIGGER {_qi(name)} BEFORE {operation} ON {_qi(table)} BEGIN {refuse}; END"
            )


def _drop_sqlite_fence(conn: sqlite3.Connection) -> bool:
    _drop_sqlite_change_log(conn)  # the switch's log ends where the fence begins (or lifts)
    triggers = [
        row[0]
        for row in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'trigger' AND substr(name, 1, ?) = ?",
            [len(TRIGGER_PREFIX), TRIGGER_PREFIX],
        )
    ]
    table = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", [FENCE_TABLE]
    ).fetchone()
    for name in triggers:
        conn.execute(f"DROP TRIGGER IF EXISTS {_qi(name)}")
    conn.execute(f"DROP TABLE IF EXISTS {FENCE_TABLE}")
    return bool(triggers or table)


# The switch's change log on SQLite: triggers note the key of every row written from before
# the snapshot on, so the frozen catch-up reads only those rows, not every table.  Named
# under the fence's prefix: the schema checks ignore it, as they ignore the fence.
SQLITE_LOG_TABLE = "propcore_fence_log"
SQLITE_LOG_PREFIX = "propcore_fence_log__"


def start_sqlite_change_log(
    path: Path, tables: Iterable[tuple[str, str]], *, timeout: float
) -> None:
    """Log the key of every row written to each (table, key column) of the file from now on."""
    conn = sqlite3.connect(Path(path), timeout=timeout, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        _drop_sqlite_change_log(conn)  # a killed switch's: its keys mean nothing now
        conn.execute(f"CREATE TABLE {SQLITE_LOG_TABLE} (tbl TEXT NOT NULL, k)")
        for table, key in tables:
            for operation, rows in (("INSERT", "NEW"), ("UPDATE", "OLD"), ("DELETE", "OLD")):
                name = f"{SQLITE_LOG_PREFIX}{table}__{operation.lower()}"
                insert = f"INSERT INTO {SQLITE_LOG_TABLE} VALUES ({_literal(table)}, "
                log = f"{insert}{rows}.{_qi(key)})"
                if operation == "UPDATE":  # a key may change: both
                    log += f"; {insert}NEW.{_qi(key)})"
                create = f"CREATE TRIGGER {_qi(name)} AFTER {operation} ON {_qi(table)}"
                conn.execute(f"{create} BEGIN {log}; END")
        conn.execute("COMMIT")
    finally:
        conn.close()


def read_sqlite_change_log(conn: sqlite3.Connection, *, after: int = 0) -> dict[str, list]:
    """The keys (as stored) logged so far, per table; with after, only those logged later.

    The log is only ever appended to by one writer at a time, so its rowids follow the
    order of the commits: an entry past ``sqlite_log_watermark()`` of a snapshot was written
    after that snapshot."""
    found: dict[str, list] = {}
    query = f"SELECT DISTINCT tbl, k FROM {SQLITE_LOG_TABLE} WHERE rowid > ?"
    for table, key in conn.execute(query, [after]):
        found.setdefault(table, []).append(key)
    return found


def sqlite_log_watermark(conn: sqlite3.Connection) -> int:
    """The last entry of the change log as this connection sees it (0: none)."""
    return conn.execute(f"SELECT coalesce(max(rowid), 0) FROM {SQLITE_LOG_TABLE}").fetchone()[0]


def stop_sqlite_change_log(path: Path, *, timeout: float = 20.0) -> bool:
    """Remove the change log from the file; say if it had one."""
    conn = sqlite3.connect(Path(path), timeout=timeout, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        had = _drop_sqlite_change_log(conn)
        conn.execute("COMMIT" if had else "ROLLBACK")
        return had
    finally:
        conn.close()


def _drop_sqlite_change_log(conn: sqlite3.Connection) -> bool:
    triggers = [
        row[0]
        for row in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'trigger' AND substr(name, 1, ?) = ?",
            [len(SQLITE_LOG_PREFIX), SQLITE_LOG_PREFIX],
        )
    ]
    table = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", [SQLITE_LOG_TABLE]
    ).fetchone()
    for name in triggers:
        conn.execute(f"DROP TRIGGER IF EXISTS {_qi(name)}")
    conn.execute(f"DROP TABLE IF EXISTS {SQLITE_LOG_TABLE}")
    return bool(triggers or table)


def lift_sqlite_fence(path: Path, *, timeout: float = 20.0, owner: dict | None = None) -> bool:
    """Remove the fence from a SQLite file; return whether it had one.

    owner: lift it only if that process put it up (``fz.this_process()``).
    """
    if not Path(path).exists() or not _has_sqlite_fence(path):
        return False  # checked first without the write lock, which may be busy
    conn = sqlite3.connect(Path(path), timeout=timeout, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        if owner is not None and not _same_process(_read_sqlite_fence(conn), owner):
            conn.execute("ROLLBACK")
            return False
        had = _drop_sqlite_fence(conn)
        conn.execute("COMMIT" if had else "ROLLBACK")
        return had
    finally:
        conn.close()


def _same_process(found: dict | None, owner: dict) -> bool:
    theirs = (found or {}).get("owner") or {}
    keys = ("host", "pid", "pid_started", "pid_namespace")
    return all(theirs.get(k) == owner.get(k) for k in keys)


def owner_gone(found: dict) -> bool:
    """Whether the process that put this SQLite fence up is dead (known only on its host)."""
    owner = found.get("owner") or {}
    if not owner.get("pid"):
        return False  # a fence from before owners were recorded: nobody can tell
    keys = ("host", "pid", "pid_started", "pid_namespace")
    return fz.process_alive(**{k: owner.get(k, "") for k in keys}) is False


def describe_sqlite_fence(found: dict) -> str:
    """One line for people: whose fence, why, since when."""
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(found["since"]))
    who = (found.get("owner") or {}).get("owner", "an unknown process")
    return f"write fence on SQLite by {who} ({found['reason']}) since {since}"


def lift_orphaned_sqlite_fence(
    path: Path, *, state_file: Path, timeout: float = 5.0
) -> dict | None:
    """Lift the fence a killed switch left on the active SQLite; return it, or None.

    Only when its owner is dead and the state still names SQLite active, both checked under
    SQLite's write lock: a switch that is alive may still flip, and a new switch replaces
    the fence under that lock before it flips.
    """
    found = sqlite_fence(path)
    if found is None or not owner_gone(found):
        return None  # the common case, read-only and without the write lock
    conn = sqlite3.connect(Path(path), timeout=timeout, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        found = _read_sqlite_fence(conn)
        try:
            active = read_active_backend(Path(state_file))
        except StateError:
            active = None  # unknown: where writes belong is not ours to decide
        if found is None or not owner_gone(found) or active != "sqlite":
            conn.execute("ROLLBACK")
            return None
        _drop_sqlite_fence(conn)
        conn.execute("COMMIT")
        return found
    except sqlite3.OperationalError as exc:
        if "locked" in str(exc) or "busy" in str(exc):
            return None  # a writer holds the lock: the next caller tries again
        raise
    finally:
        conn.close()


def _has_sqlite_fence(path: Path) -> bool:
    conn = sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True)
    try:
        return bool(
            conn.execute(
                "SELECT 1 FROM sqlite_master WHERE name = ? OR substr(name, 1, ?) = ?",
                [FENCE_TABLE, len(TRIGGER_PREFIX), TRIGGER_PREFIX],
            ).fetchone()
        )
    finally:
        conn.close()


def sqlite_fence(path: Path) -> dict | None:
    """The fence on a SQLite file ({reason, since, owner}), or None; read-only."""
    if not Path(path).exists():
        return None
    conn = sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True)
    try:
        return _read_sqlite_fence(conn)
    finally:
        conn.close()


def _read_sqlite_fence(conn: sqlite3.Connection) -> dict | None:
    try:
        cur = conn.execute(f"SELECT * FROM {FENCE_TABLE}")
    except sqlite3.OperationalError:  # no such table: no fence
        return None
    row = cur.fetchone()
    if row is None:
        return None
    found = dict(zip([c[0] for c in cur.description], row, strict=True))
    found["owner"] = json.loads(found.get("owner") or "null")  # None: an older fence
    return found


# --- PostgreSQL ---------------------------------------------------------------------------------


def _sqlstate(exc: BaseException) -> str | None:
    return getattr(exc.__cause__, "sqlstate", None) or getattr(exc, "sqlstate", None)


def _old_transactions(cur, since) -> list[tuple[int, float]]:
    """Other sessions of this database inside a transaction that began before `since`."""
    cur.execute(
        "SELECT pid, extract(epoch FROM now() - xact_start)::float8 FROM pg_stat_activity "
        "WHERE datname = current_database() AND pid <> pg_backend_pid() "
        "AND backend_type = 'client backend' AND xact_start < %s",
        [since],
    )
    return cur.fetchall()


def drain_postgres(alias: str, *, timeout: float, poll: float = 0.1) -> dict:
    """Call right after the freeze: wait until no transaction that began before is still
    open; end the sessions of those left after timeout seconds."""
    from django.db import connections

    started = time.monotonic()
    with connections[alias].cursor() as cur:
        cur.execute("SELECT clock_timestamp()")  # the server's clock: no skew with ours
        (since,) = cur.fetchone()
        while (old := _old_transactions(cur, since)) and time.monotonic() - started < timeout:
            time.sleep(poll)
        ended = []
        for pid, _age in old:
            cur.execute("SELECT pg_terminate_backend(%s)", [pid])
            if cur.fetchone()[0]:
                ended.append(pid)
    return {
        "waited_seconds": round(time.monotonic() - started, 3),
        "bound_seconds": timeout,
        "sessions_ended": len(ended),
    }


def _refuse_function(reason: str, *, holder: tuple[int, object] | None) -> str:
    """The trigger function: refuse always, or only while the holder's session lives."""
    refuse = (
        f"RAISE EXCEPTION USING MESSAGE = {_literal(_message(reason))}, "
        "ERRCODE = 'read_only_sql_transaction';"
    )
    if holder is not None:
        pid, started = holder
        refuse = (
            "IF EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = "
            f"{int(pid)} AND backend_start = {_literal(str(started))}::timestamptz) "
            f"THEN {refuse} END IF; RETURN NULL;"
        )
    # SECURITY DEFINER: the application's role may not see the runbook's session otherwise
    return (
        f"CREATE OR REPLACE FUNCTION {PG_FUNCTION}() RETURNS trigger LANGUAGE plpgsql "
        f"SECURITY DEFINER SET search_path = pg_catalog AS $$BEGIN {refuse} END$$"
    )


def fence_postgres(alias: str, tables: Iterable[str], *, reason: str, lock_timeout: float) -> dict:
    """Make every write to tables fail, in every session; wait for writers already in them.

    The fence is a lease: it holds while this session lives, so a rollback killed under it
    does not leave PostgreSQL refusing writes.  ``keep_postgres_fence`` makes it permanent.
    """
    from django.db import connections

    tables = list(tables)
    ended = 0
    with connections[alias].cursor() as cur:
        cur.execute("SELECT pid, backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid()")
        cur.execute(_refuse_function(reason, holder=cur.fetchone()))
        _describe(cur, reason)
        cur.execute(f"SET lock_timeout = {int(lock_timeout * 1000)}")
        try:
            # one table per statement (autocommit): we never hold one table's lock while
            # waiting for another's, so the application's transactions cannot deadlock with us
            for table in tables:
                ended += _fence_table(cur, table)
        finally:
            cur.execute("RESET lock_timeout")
    return {"tables_fenced": len(tables), "sessions_ended": ended}


def keep_postgres_fence(alias: str, *, reason: str) -> None:
    """Make the fence outlive this session: PostgreSQL is now the store left behind."""
    from django.db import connections

    with connections[alias].cursor() as cur:
        cur.execute(_refuse_function(reason, holder=None))
        _describe(cur, reason)


def _describe(cur, reason: str) -> None:
    # who fenced and when: the function's comment (a table would look like foreign data to
    # migration_prepare's check of the target)
    about = json.dumps({"reason": reason, "since": time.time()})
    cur.execute(f"COMMENT ON FUNCTION {PG_FUNCTION}() IS {_literal(about)}")


def _fence_table(cur, table: str) -> int:
    """Create the trigger on table; if a writer holds it past lock_timeout, end it and retry."""
    from django.db import OperationalError

    create = (
        f"CREATE OR REPLACE TRIGGER {PG_TRIGGER} BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE "
        f"ON {_qi(table)} FOR EACH STATEMENT EXECUTE FUNCTION {PG_FUNCTION}()"
    )
    try:
        cur.execute(create)
        return 0
    except OperationalError as exc:
        if _sqlstate(exc) != LOCK_NOT_AVAILABLE:
            raise
    # a transaction that started after the freeze (a request already past the middleware)
    # still writes this table: end it, as the drain ends the old ones
    cur.execute(
        "SELECT pg_terminate_backend(l.pid) FROM pg_locks l JOIN pg_stat_activity a USING (pid) "
        "WHERE l.relation = %s::regclass AND l.pid <> pg_backend_pid() "
        "AND a.datname = current_database()",
        [_qi(table)],
    )
    ended = sum(1 for (done,) in cur.fetchall() if done)
    cur.execute(create)
    return ended


def lift_postgres_fence(alias: str) -> bool:
    """Remove the fence from PostgreSQL (the function, its triggers, the table); say if any.

    A change log a killed rollback left goes too: whoever writes to PostgreSQL again
    (migrate_data, the switch, migration_prepare) calls this first."""
    from django.db import connections

    with connections[alias].cursor() as cur:
        cur.execute("SELECT to_regproc(%s) IS NOT NULL", [PG_FUNCTION])
        had = cur.fetchone()[0]
        # dropping the function drops every trigger that calls it
        cur.execute(f"DROP FUNCTION IF EXISTS {PG_FUNCTION}() CASCADE")
    drop_change_log(alias)
    return bool(had)


# --- the rollback's change log on PostgreSQL ---------------------------------------------------
# Row triggers note the key of every row written (old and new key) from the moment the log
# starts.  Creating a trigger waits for the transactions that already wrote its table, so a
# write the log misses committed before the log began on that table: a snapshot taken after
# start_change_log returns sees it.  Its own schema: never mistaken for the application's data.

# In the application's schema beside the fence, under its own prefix: the runbook's role
# owns the tables and may create in their schema, but not a schema of its own (CREATE on the
# database is not granted: db_roles).
LOG_TABLE = "propcore_rollback_changes"
LOG_FUNCTION = "propcore_rollback_log_change"
LOG_TRIGGER = "propcore_rollback_log"


def start_change_log(alias: str, tables: Iterable[tuple[str, str]], *, lock_timeout: float) -> dict:
    """Log the key of every row written to each (table, key column) from now on.

    A table a transaction holds past lock_timeout is not logged (returned in ``not_logged``):
    the rollback then compares it in full under its freeze, rather than end that session."""
    from django.db import OperationalError, connections, transaction

    tables = list(tables)
    not_logged = []
    started = time.perf_counter()
    drop_change_log(alias)  # a killed rollback's log: its keys mean nothing now
    with connections[alias].cursor() as cur:
        cur.execute("SELECT current_schema()")
        log_table = f"{_qi(cur.fetchone()[0])}.{LOG_TABLE}"  # the function's search_path is empty
        # pk NULL: the table was truncated (a statement trigger), so it is compared in full
        cur.execute(f"CREATE TABLE {LOG_TABLE} (tbl text NOT NULL, pk text)")
        cur.execute(f"CREATE INDEX ON {LOG_TABLE} (tbl, pk)")
        # SECURITY DEFINER: the application's role writes the log without a grant on it
        cur.execute(
            f"CREATE FUNCTION {LOG_FUNCTION}() RETURNS trigger LANGUAGE plpgsql "
            "SECURITY DEFINER SET search_path = pg_catalog AS $$BEGIN "
            f"IF TG_OP <> 'INSERT' THEN INSERT INTO {log_table} "
            "VALUES (TG_TABLE_NAME, to_jsonb(OLD) ->> TG_ARGV[0]); END IF; "
            f"IF TG_OP <> 'DELETE' THEN INSERT INTO {log_table} "
            "VALUES (TG_TABLE_NAME, to_jsonb(NEW) ->> TG_ARGV[0]); END IF; "
            "RETURN NULL; END$$"
        )
        cur.execute(f"SET lock_timeout = {int(lock_timeout * 1000)}")
        try:
            # one table per statement (autocommit): no lock held while waiting for another
            for table, key in tables:
                try:
                    with transaction.atomic(using=alias):  # both triggers or neither
                        cur.execute(
                            f"CREATE TRIGGER {LOG_TRIGGER} AFTER INSERT OR UPDATE OR DELETE ON "
                            f"{_qi(table)} FOR EACH ROW EXECUTE FUNCTION "
                            f"{LOG_FUNCTION}({_literal(key)})"
                        )
                        cur.execute(
                            f"CREATE TRIGGER {LOG_TRIGGER}_truncate AFTER TRUNCATE ON "
                            f"{_qi(table)} FOR EACH STATEMENT EXECUTE FUNCTION "
                            f"{LOG_FUNCTION}({_literal(key)})"
                        )
                except OperationalError as exc:
                    if _sqlstate(exc) != LOCK_NOT_AVAILABLE:
                        raise
                    not_logged.append(table)
        finally:
            cur.execute("RESET lock_timeout")
    return {
        "tables_logged": len(tables) - len(not_logged),
        "not_logged": not_logged,
        "seconds": round(time.perf_counter() - started, 3),
    }


def truncated_tables(cur) -> set[str]:
    """The tables TRUNCATEd since the log began (no row keys: compare them in full)."""
    cur.execute(f"SELECT DISTINCT tbl FROM {LOG_TABLE} WHERE pk IS NULL")
    return {row[0] for row in cur.fetchall()}


def read_change_log(cur) -> dict[str, set[str]]:
    """The keys logged so far (as this cursor's snapshot sees them), per table."""
    cur.execute(f"SELECT DISTINCT tbl, pk FROM {LOG_TABLE} WHERE pk IS NOT NULL")
    found: dict[str, set[str]] = {}
    for table, key in cur.fetchall():
        found.setdefault(table, set()).add(key)
    return found


def drop_change_log(alias: str) -> bool:
    """Remove the change log (table, function and every trigger calling it)."""
    from django.db import connections

    with connections[alias].cursor() as cur:
        cur.execute(
            "SELECT to_regproc(%s) IS NOT NULL OR to_regclass(%s) IS NOT NULL",
            [LOG_FUNCTION, LOG_TABLE],
        )
        had = cur.fetchone()[0]
        if had:
            cur.execute(f"DROP FUNCTION IF EXISTS {LOG_FUNCTION}() CASCADE")  # and its triggers
            cur.execute(f"DROP TABLE IF EXISTS {LOG_TABLE}")
    return bool(had)


def postgres_fence(alias: str) -> dict | None:
    """The fence on PostgreSQL ({reason, since}), or None."""
    from django.db import connections

    with connections[alias].cursor() as cur:
        cur.execute("SELECT obj_description(to_regproc(%s), 'pg_proc')", [PG_FUNCTION])
        about = cur.fetchone()[0]
    return json.loads(about) if about else None
