"""Roll the application back to SQLite, at any phase, without losing a write.

Before the switch only the state file moves (and, when asked, the PostgreSQL copy is
dropped).  After the switch, rows written on PostgreSQL since the cutover are carried
back, written through Django's SQLite backend exactly as Django stores them (raw inserts
and queryset updates: no signals, no audit entries of our own).

Why the freeze holds only what changed during the rollback (issue 16):

1. A verified pre-rollback backup of the live file is taken; the live file is fenced (the
   switch left triggers refusing every write) and no process writes it.
2. A change log starts on PostgreSQL (fence.start_change_log): row triggers note the key of
   every row written, old and new.  Creating a table's trigger waits for the transactions
   that already wrote it, so a write the log misses committed before the log began there.
   A table a transaction holds past 2 s is not logged; it is compared in full, frozen.
3. While PostgreSQL takes writes: a fresh copy of the live file (online backup API) is
   diffed against PostgreSQL by range checksums and row hashes (sync.diff_table, begun
   after 2, so it sees every unlogged write) and the differences are written into it;
   PRAGMA integrity_check and foreign_key_check run on it.
4. Still unfrozen, in one REPEATABLE READ snapshot S of PostgreSQL: L_S = the logged keys,
   and range sums of every table on PostgreSQL and on the copy, both leaving out L_S
   (verify_unlogged).  Equal sums: the copy holds PostgreSQL's value of every row not in
   L_S.  A table whose sums differ (or that the C/SQL sums do not cover) is compared in
   full under the freeze instead: it is carried again and must compare equal, or the
   rollback is refused.
5. Frozen, drained and fenced (fence.py): nothing writes PostgreSQL any more.  L_F, the
   keys logged by now, holds L_S.  A row not in L_F was not written since 2, so its value
   now is its value in S, and the copy has not been written there since 4: equal.  Every
   row in L_F is read from PostgreSQL, carried into the copy and compared row by row
   through the ORM.  So the copy equals PostgreSQL, deletes included (a deleted row's key
   is logged, and a key PostgreSQL no longer has is deleted from the copy).
6. The swap: the rows carried in 3 and 5 are written from the copy into the live file in
   one SQLite transaction that also drops the fence, and compared with the copy's inside
   it before it commits.  The live file equals the copy's origin (the fence kept every
   other writer out), so after it the live file equals the copy.  A kill -9 before the
   commit leaves the live file as it was (SQLite rolls the transaction back), fenced; the
   state still names PostgreSQL, whose fence dies with the killed session.  Never a
   rename: in WAL mode other processes' connections keep the old inode and its -wal.
   (Composite keys: the whole copy's pages are written instead, backup API.)
7. Only then does the state flip back to SQLite; the change log is dropped; PostgreSQL
   keeps its fence unless the rollback failed.

A TRUNCATE logs no row: a statement trigger logs the table instead (a NULL key), and the
frozen stage compares that table in full.

Not covered: a process writing the rollback's private working copy between 4 and 6.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from django.db import connections, transaction
from django.db.utils import load_backend

from dbmigration import conf, fence
from dbmigration import freeze as fz
from dbmigration.errors import (
    MigrationError,
    PhaseError,
    TargetError,
    VerificationError,
    postgres_lost,
    target_lost,
)
from dbmigration.policies import refill_reminders
from dbmigration.reports import RunReport, error_text
from dbmigration.sqlite_source import (
    remove_copy,
    remove_leftover_copies,
    snapshot_to,
    temp_copy_path,
)
from dbmigration.state import MigrationState, read_state, transition
from dbmigration.sync import OrmWriter, TableDiff, apply_changes, chunks, diff_table
from dbmigration.verify import Side, applied_migrations, compare_table

Progress = Callable[[str], None] | None
COPY_ALIAS = "rollback_copy"
PG_ALIAS = "postgresql"
PG = Side(alias="postgresql")
SAMPLE = 50  # primary keys listed per table and kind in the report
ROLLBACK_FREEZE_ESTIMATE = 5.0  # seconds after the drain, sent as Retry-After
LOG_LOCK_TIMEOUT = 2.0  # a table held longer is compared in full under the freeze


@dataclasses.dataclass
class TableCarry:
    table: str
    label: str
    inserted: int = 0
    updated: int = 0
    deleted: int = 0
    sample_pks: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class RollbackResult:
    was_switched: bool
    carried: list[TableCarry]  # what was carried back (empty before the switch)
    discarded: list[TableCarry]  # what --discard-postgres-writes threw away
    pre_rollback_backup: Path | None
    dropped_postgres: bool
    freeze_seconds: float
    state: MigrationState
    report_path: Path | None
    seconds: float
    warnings: list[str] = dataclasses.field(default_factory=list)
    took_over: str = ""  # the void freeze (owner gone) this run cleared or replaced
    lifted_fence: str = ""  # the fence a switch killed before its flip left on SQLite
    leftovers_removed: list[str] = dataclasses.field(default_factory=list)

    @property
    def rows_carried(self) -> int:
        return sum(t.inserted + t.updated + t.deleted for t in self.carried)


class DiscardNotConfirmed(MigrationError):
    """--discard-postgres-writes was asked for without the explicit confirmation."""

    returncode = 9


# --- finding the differences ----------------------------------------------------------------


def _plain(value: Any) -> Any:
    return bytes(value) if isinstance(value, memoryview) else value


def orm_rows(model, alias: str) -> dict:
    """Every row of model on alias as Python values (Django's converters), keyed by pk."""
    names = [f.attname for f in model._meta.concrete_fields]
    # "pk" first: one value, or a tuple for a CompositePrimaryKey (not a concrete field)
    rows = model._base_manager.using(alias).values_list("pk", *names).iterator(chunk_size=2000)
    return {row[0]: tuple(map(_plain, row[1:])) for row in rows}


def orm_diff(model, *, source: str, target: str) -> TableDiff:
    """Compare a table on two aliases object by object through the ORM."""
    src, dst = orm_rows(model, source), orm_rows(model, target)
    return TableDiff(
        model._meta.db_table,
        inserted_pks=sorted((pk for pk in src if pk not in dst), key=str),
        updated_pks=sorted((pk for pk in src if pk in dst and src[pk] != dst[pk]), key=str),
        deleted_pks=sorted((pk for pk in dst if pk not in src), key=str),
    )


def find_changes(table, *, source: Side, target: Side) -> TableDiff:
    """Rows that differ, found by range checksums the way ``migrate_data --sync`` does."""
    return diff_table(source=source, target=target, table=table)


# --- writing into the copy ------------------------------------------------------------------


@contextlib.contextmanager
def copy_alias(path: Path) -> Iterator[str]:
    """A temporary alias (this thread only) that points Django's SQLite backend at path."""
    config = {**connections.settings["sqlite"], "NAME": str(path)}
    # not added to DATABASES: nothing else (routers, health checks, tests) ever sees it
    connections[COPY_ALIAS] = load_backend(config["ENGINE"]).DatabaseWrapper(config, COPY_ALIAS)
    try:
        yield COPY_ALIAS
    finally:
        connections[COPY_ALIAS].close()
        del connections[COPY_ALIAS]


def check_copy(path: Path) -> dict:
    """PRAGMA integrity_check and foreign_key_check on the copy; raise on a problem."""
    conn = sqlite3.connect(path)
    try:
        integrity = conn.execute("PRAGMA integrity_check").fetchone()[0]
        bad_fks = conn.execute("PRAGMA foreign_key_check").fetchall()
    finally:
        conn.close()
    if integrity != "ok" or bad_fks:
        raise VerificationError(
            f"The rolled-back SQLite copy {path} failed its checks: integrity {integrity!r}, "
            f"{len(bad_fks)} foreign key violations (first: {bad_fks[:3]}). The live file "
            "was not replaced."
        )
    return {"integrity_check": integrity, "foreign_key_violations": 0}


def swap_in(copy: Path, sqlite_path: Path, *, timeout: float = 20.0) -> None:
    """Write the copy's pages into the live file (backup API), in one transaction."""
    for alias in ("default", "sqlite"):
        if alias in connections.settings:
            connections[alias].close()
    # Never rename over the live file: in WAL mode other processes' connections keep the
    # old inode and its -wal, and a stale -wal could be replayed onto the new file.  The
    # backup API writes through the live file's own locks and journal, so every connection,
    # open or new, sees the new content.  The copy's last commits (written through Django,
    # so in WAL mode) must be in its main file first: the backup reads pages, not its -wal.
    src = sqlite3.connect(copy, timeout=timeout, isolation_level=None)
    try:
        src.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        src.execute("PRAGMA journal_mode=DELETE").fetchone()
        live = sqlite3.connect(sqlite_path, timeout=timeout, isolation_level=None)
        try:
            src.backup(live)
        finally:
            live.close()
    finally:
        src.close()


def require_postgres_tables(tables, state: MigrationState, alias: str = "postgresql") -> None:
    """Raise TargetError, before anything changes, unless PostgreSQL is the switched-to database
    and still has the tables we carry back (another database would make every row look deleted).
    """
    from dbmigration.preflight import connect, conninfo_from_settings, require_same_target

    conninfo = conninfo_from_settings(connections.settings[alias])
    require_same_target(state.extra.get("target"), conninfo)  # unreachable: cause and fix now
    with connect(conninfo) as conn:
        present = {
            row[0]
            for row in conn.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
            )
        }
    missing = sorted(t.db_table for t in tables if t.db_table not in present)
    if missing:
        raise TargetError(
            f"PostgreSQL lacks {len(missing)} of the application's tables ({', '.join(missing[:3])}"
            f"{', ...' if len(missing) > 3 else ''}): was its database dropped? Nothing was "
            "changed. Restore it from its last backup with pg_restore (db_backup --list), or run "
            "rollback_to_sqlite --discard-postgres-writes to go back to SQLite as of the switch."
        )


def drop_postgres_copy(alias: str = "postgresql") -> list[str]:
    """Unapply every migration on alias (tables, enum types, views); return what was undone.

    As migration_prepare applies them: in a child process whose ``default`` is the alias and
    whose SQLite is read-only, so a reversed data migration never writes to SQLite.
    """
    from dbmigration.schema_child import migrate_target

    source = connections.settings[conf.SOURCE_ALIAS]["NAME"]
    outcome = migrate_target(target_alias=alias, source_path=Path(source), unapply=True)
    return outcome["migrations_unapplied"]


# --- the rollback -----------------------------------------------------------------------------


def _apply_all(tables, diffs: dict, *, target: str) -> None:
    for table in tables:
        if diffs[table.db_table].total:
            writer = OrmWriter(table.model, source="postgresql", target=target)
            apply_changes(diff=diffs[table.db_table], writer=writer)


def _summarise(tables, diffs: dict) -> list[TableCarry]:
    return [
        TableCarry(
            table=table.db_table,
            label=table.label,
            inserted=len(diff.inserted_pks),
            updated=len(diff.updated_pks),
            deleted=len(diff.deleted_pks),
            sample_pks={
                "inserted": [str(p) for p in diff.inserted_pks[:SAMPLE]],
                "updated": [str(p) for p in diff.updated_pks[:SAMPLE]],
                "deleted": [str(p) for p in diff.deleted_pks[:SAMPLE]],
            },
        )
        for table in tables
        if (diff := diffs[table.db_table]).total
    ]


def _net(first: TableDiff, then: TableDiff) -> TableDiff:
    """What two successive carries changed, relative to the file before the first."""
    ins1, upd1, del1 = map(set, (first.inserted_pks, first.updated_pks, first.deleted_pks))
    ins2, upd2, del2 = map(set, (then.inserted_pks, then.updated_pks, then.deleted_pks))
    inserted = (ins1 - del2) | (ins2 - del1)
    updated = ((upd1 | upd2) - ins1 - del2) | (ins2 & del1)
    deleted = (del1 - ins2) | (del2 - ins1)
    return TableDiff(first.table, *(sorted(s, key=str) for s in (inserted, updated, deleted)))


def _differing(model, pks: list, *, source: str, target: str) -> list:
    """The pks among pks whose values differ between source and target (through the ORM)."""
    names = [f.attname for f in model._meta.concrete_fields]
    differ = []
    for chunk in chunks(pks):
        sides = [
            {
                row[0]: tuple(map(_plain, row[1:]))
                for row in model._base_manager.using(alias)
                .filter(pk__in=chunk)
                .values_list("pk", *names)
            }
            for alias in (source, target)
        ]
        differ += [pk for pk in chunk if sides[0].get(pk) != sides[1].get(pk)]
    return differ


def _log_keys(table, keys: set[str]) -> list:
    """Logged key texts (PostgreSQL's) as Django's Python values."""
    field = table.model._meta.pk
    return sorted({field.to_python(key) for key in keys}, key=str)


def logged_changes(table, keys: set[str], *, target: str) -> TableDiff:
    """How target differs from PostgreSQL on the logged keys only (through the ORM)."""
    pks = _log_keys(table, keys)
    manager = table.model._base_manager
    on_pg, in_target = set(), set()
    for chunk in chunks(pks):
        on_pg |= set(manager.using(PG_ALIAS).filter(pk__in=chunk).values_list("pk", flat=True))
        in_target |= set(manager.using(target).filter(pk__in=chunk).values_list("pk", flat=True))
    both = sorted(on_pg & in_target, key=str)
    return TableDiff(
        table.db_table,
        inserted_pks=sorted(on_pg - in_target, key=str),
        updated_pks=_differing(table.model, both, source=PG_ALIAS, target=target),
        deleted_pks=sorted(in_target - on_pg, key=str),
    )


def verify_unlogged(copy: Path, plan, *, logged_tables: set[str]) -> dict:
    """Range sums of every table on the copy and on PostgreSQL, leaving out on both sides the
    keys the change log holds, in one PostgreSQL snapshot (before the freeze, while
    PostgreSQL takes writes: a row it does not log stays as it is until the freeze).

    Returns the tables this does not cover or where the sums differ: the frozen stage
    compares those in full (and refuses a copy that differs there)."""
    import threading
    import uuid

    from dbmigration.casts import target_columns
    from dbmigration.range_sums import INTEGER_KEYS, MAX_INT_SPAN, UUID_BUCKETS, hash_plan
    from dbmigration.verify import INT_BUCKETS, plan_ranges

    pg = connections[PG_ALIAS]
    full, covered, left_out = [], 0, 0
    uri = f"{Path(copy).resolve().as_uri()}?mode=ro"
    with transaction.atomic(using=PG_ALIAS), pg.cursor() as cur:
        # one snapshot for the log and every table's sums
        cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        logged = fence.read_change_log(cur)
        for table in plan.tables:
            hashed = (
                None if table.composite else hash_plan(table, target_columns(cur, table.db_table))
            )
            if hashed is None or table.db_table not in logged_tables:
                full.append(table.db_table)
                continue
            ranges = plan_ranges((Side(sqlite_path=copy), PG), table)
            keys = logged.get(table.db_table, set())
            pk = f'"{table.pk_column}"'
            if hashed.key_mode == INTEGER_KEYS:
                low, width, buckets = ranges.low, ranges.width, INT_BUCKETS + 1
                if abs(low) >= MAX_INT_SPAN or width * buckets >= MAX_INT_SPAN:
                    full.append(table.db_table)
                    continue
                bucket_sql = f"(t.{pk} - {int(low)}) / {int(width)}"
                skip = {int(k) for k in keys}
            else:
                low, width, buckets = 0, 1, UUID_BUCKETS
                bucket_sql = f"left(t.{pk}::text, 3)"
                skip = {uuid.UUID(k).hex.encode() for k in keys}  # as Django stores it in SQLite
            part: dict = {}
            args = (uri, hashed.select, hashed.spec, table.pk_index, hashed.key_mode)
            args += (low, width, buckets, skip or None)
            worker = threading.Thread(target=_hash_copy, args=(part, args), daemon=True)
            worker.start()
            cur.execute(
                f"SELECT {bucket_sql}, count(*), sum({hashed.row_sql}) "
                f"FROM {_qi(table.db_table)} AS t WHERE NOT EXISTS (SELECT 1 FROM "
                f"{fence.LOG_TABLE} l WHERE l.tbl = %s AND l.pk = t.{pk}::text) GROUP BY 1",
                [table.db_table],
            )
            theirs = {b: [n, int(total) % (1 << 64)] for b, n, total in cur.fetchall()}
            worker.join()
            if "error" in part:
                raise part["error"]
            if part["result"] is None:
                full.append(table.db_table)  # a value C cannot vouch for
                continue
            ours: dict = {}
            for bucket, count, total in part["result"][1]:
                slot = ours.setdefault(bucket, [0, 0])
                slot[0] += count
                slot[1] = (slot[1] + total) % (1 << 64)
            if ours != theirs:
                full.append(table.db_table)  # settled row by row under the freeze
                continue
            covered += 1
            left_out += len(keys)
    return {"tables_summed": covered, "keys_left_out": left_out, "full_check_frozen": full}


def _hash_copy(part: dict, args: tuple) -> None:
    """C's range sums of the copy, on a thread that releases the GIL."""
    from dbmigration.copy_lines import _copytext

    try:
        part["result"] = _copytext.range_sums(*args)
    except BaseException as exc:  # noqa: BLE001 re-raised by the caller
        part["error"] = exc


def write_into_live(
    copy: Path, sqlite_path: Path, plan, net: dict[str, TableDiff], *, keep_fence: bool
) -> dict:
    """Write the rows of net's keys from copy into the live file, in one SQLite transaction;
    check inside it that those rows now equal the copy's, else roll it back.  keep_fence:
    the file stays fenced (its triggers are put back as they were before the commit);
    otherwise the fence goes in the same transaction: SQLite is live again."""
    for alias in ("default", "sqlite"):
        if alias in connections.settings:
            connections[alias].close()
    lite = connections["sqlite"]
    conn = sqlite3.connect(sqlite_path, timeout=20.0, isolation_level=None)
    written = 0
    try:
        conn.execute("ATTACH DATABASE ? AS copy", [f"{Path(copy).resolve().as_uri()}?mode=ro"])
        conn.execute("BEGIN IMMEDIATE")
        try:
            fenced = conn.execute(
                "SELECT name, sql FROM sqlite_master WHERE type = 'trigger' "
                "AND substr(name, 1, ?) = ?",
                [len(fence.TRIGGER_PREFIX), fence.TRIGGER_PREFIX],
            ).fetchall()
            if keep_fence:  # our writes pass; no other connection sees the file unfenced
                for name, _sql in fenced:
                    conn.execute(f"DROP TRIGGER {_qi(name)}")
            else:
                fence._drop_sqlite_fence(conn)  # the copy has none: SQLite is live again
            for table in plan.tables:
                diff = net.get(table.db_table)
                if diff is None or not diff.total:
                    continue
                field = table.model._meta.pk
                keys = [
                    field.get_db_prep_value(pk, connection=lite)
                    for pk in diff.inserted_pks + diff.updated_pks + diff.deleted_pks
                ]
                t, pk = _qi(table.db_table), _qi(table.pk_column)
                cols = ", ".join(_qi(c) for c in table.column_names)
                for chunk in chunks(keys):
                    marks = ", ".join("?" * len(chunk))
                    conn.execute(f"DELETE FROM main.{t} WHERE {pk} IN ({marks})", chunk)
                    conn.execute(
                        f"INSERT INTO main.{t} ({cols}) SELECT {cols} FROM copy.{t} "
                        f"WHERE {pk} IN ({marks})",
                        chunk,
                    )
                    side = f"SELECT {cols} FROM {{}}.{t} WHERE {pk} IN ({marks})"
                    one, other = side.format("main"), side.format("copy")
                    differ = conn.execute(
                        f"SELECT count(*) FROM ({one} EXCEPT {other}) UNION ALL "
                        f"SELECT count(*) FROM ({other} EXCEPT {one})",
                        chunk * 4,
                    ).fetchall()
                    if any(n for (n,) in differ):
                        raise VerificationError(
                            f"{table.db_table}: the live SQLite file does not match {copy.name} "
                            "after writing the carried rows; that write was rolled back."
                        )
                written += len(keys)
            if keep_fence:
                for _name, sql in fenced:
                    conn.execute(sql)
            # a kill -9 here: SQLite rolls the whole transaction back
            fz.pause_point("rollback_prewrite_live" if keep_fence else "rollback_write_live")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    finally:
        conn.close()
    return {"rows_written": written}


def _qi(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def nothing_to_roll_back(state: MigrationState, *, drop_postgres: bool = False) -> str | None:
    """Why a rollback would do nothing now (with the command to run instead), or None."""
    if state.active_backend == "postgresql":
        return None
    if state.phase == "nothing":
        return (
            "Nothing to roll back: the migration has not started (phase 'nothing') and the "
            "application runs on SQLite. Run migration_prepare to start it."
        )
    if state.phase == "rolled_back" and not drop_postgres:
        return (
            "Nothing to roll back: already rolled back, the application runs on SQLite. Run "
            "migration_prepare when ready to try again (rollback_to_sqlite --drop-postgres "
            "drops the PostgreSQL copy)."
        )
    return None


def rollback_to_sqlite(
    *,
    state_file: Path | None = None,
    sqlite_path: Path | None = None,
    report_dir: Path | None = None,
    log_dir: Path | None = None,
    backup_dir: Path | None = None,
    drop_postgres: bool = False,
    discard_postgres_writes: bool = False,
    discard_confirmed: bool = False,
    drain_seconds: float = 2.0,
    freeze_max_seconds: float = fz.DEFAULT_MAX_SECONDS,
    progress: Progress = None,
) -> RollbackResult:
    """Return the application to SQLite; after the switch, carry PostgreSQL's writes back."""
    from dbmigration.plan import build_plan

    state_file = Path(state_file or conf.state_file())
    sqlite_path = Path(sqlite_path or connections.settings["sqlite"]["NAME"])
    backup_dir = Path(backup_dir or conf.backup_dir())
    note = progress or (lambda message: None)
    flag = fz.freeze_path_for(state_file)
    # a killed switch or rollback leaves its freeze (void once its owner is gone) and copies
    cleared = fz.clear_void(flag)
    took_over = cleared.describe() if cleared is not None else ""
    leftovers = remove_leftover_copies(sqlite_path)
    state = read_state(state_file)
    refusal = nothing_to_roll_back(state, drop_postgres=drop_postgres)
    if refusal:
        raise PhaseError(refusal + (f" (Cleared a leftover {took_over}.)" if took_over else ""))
    held = fz.read_freeze(flag)
    if held is not None:
        raise fz.FreezeError(
            f"Cannot roll back now: {held.describe()}. Wait for it to finish; if that process "
            f"is stopped or killed, its freeze lifts within {held.lease_seconds:g} s."
        )
    if discard_postgres_writes and not discard_confirmed:
        raise DiscardNotConfirmed(
            "--discard-postgres-writes throws away every write made on PostgreSQL since the "
            "switch; it needs the explicit confirmation (type it when asked, or pass "
            "--confirm-discard with --noinput)."
        )
    run = RunReport.open(
        "rollback_to_sqlite",
        report_dir=Path(report_dir or conf.report_dir()),
        log_dir=Path(log_dir or conf.log_dir()),
    )
    start = time.perf_counter()
    was_switched = state.active_backend == "postgresql"
    carried: list[TableCarry] = []
    discarded: list[TableCarry] = []
    backup_path: Path | None = None
    backup_file: Path | None = None
    freeze = None
    pg_fenced = False
    frozen_for = 0.0
    clean_up_after_freeze: Path | None = None
    run.facts.update(phase_before=state.phase, active_before=state.active_backend)
    run.facts.update(took_over_freeze=took_over, leftovers_removed=leftovers)
    try:
        if not was_switched:
            leftover = fence.sqlite_fence(sqlite_path)
            # a switch fenced SQLite and died before its flip: no write reached PostgreSQL
            if fence.lift_sqlite_fence(sqlite_path) and leftover is not None:
                run.facts["lifted_sqlite_fence"] = True
                run.facts["lifted_fence"] = fence.describe_sqlite_fence(leftover)
                note(f"lifted the {run.facts['lifted_fence']}")
            new_state = transition(
                state_file, "rolled_back", active_backend="sqlite", note="rollback_to_sqlite"
            )
        else:
            if not discard_postgres_writes:  # discarding leaves the SQLite file as it is
                require_postgres_tables(build_plan().tables, state)
                with run.step("pre_rollback_backup") as step:
                    from dbmigration.backup import create_sqlite_backup

                    # SQLite is not written after the switch, so this runs before the freeze
                    info = create_sqlite_backup(
                        sqlite_path=sqlite_path, backup_dir=backup_dir, label="pre-rollback"
                    )
                    backup_path = info.path
                    backup_file = _backup_database(info)
                    step.details = {"backup": str(info.path), "rows": sum(info.row_counts.values())}
                    note(f"pre-rollback backup: {info.path}")
            copy = temp_copy_path(sqlite_path, "rollback")

            def hold_freeze(*, best_effort: bool = False) -> fz.Freeze:
                """Freeze, drain and fence PostgreSQL (best_effort: PostgreSQL may be gone)."""
                nonlocal freeze, pg_fenced
                with run.step("write_freeze_on") as step:
                    freeze = fz.freeze_on(
                        flag,
                        reason="rollback_to_sqlite",
                        max_seconds=freeze_max_seconds,
                        # the catch-up, a full verification and the swap: seconds, not minutes
                        expected_seconds=drain_seconds + ROLLBACK_FREEZE_ESTIMATE,
                    )
                    step.details = {"flag": str(flag), "owner": freeze.owner}
                    if freeze.replaced:
                        step.details["took_over"] = freeze.replaced
                    note("write freeze on")
                with run.step("drain_and_fence_postgresql") as step:
                    try:
                        step.details["drain"] = fence.drain_postgres(
                            PG_ALIAS, timeout=drain_seconds
                        )
                        pg_fenced = True  # from here on, a failure lifts even a partial fence
                        step.details["fence"] = fence.fence_postgres(
                            PG_ALIAS,
                            [t.db_table for t in build_plan().tables],
                            reason="rolled back to SQLite",
                            lock_timeout=max(1.0, drain_seconds),
                        )
                    except Exception as exc:
                        if not best_effort:
                            raise
                        step.warnings.append(f"could not fence PostgreSQL: {exc}")
                note("PostgreSQL drained and fenced: any later write to it fails")
                return freeze

            try:
                new_state, carried, discarded = _carry_back(
                    run, state_file, sqlite_path, copy, build_plan(),
                    discard_postgres_writes, hold_freeze, note, backup_file,
                )  # fmt: skip
            except BaseException:
                # PostgreSQL takes writes again: the log's triggers go before the freeze lifts
                _remove_working_files(copy, run)
                raise
            # done: SQLite is live and PostgreSQL fenced, so they go after the freeze lifts
            # (at 1M users unlinking the copy and dropping the log's triggers took ~5 s)
            clean_up_after_freeze = copy
            if pg_fenced:  # SQLite is live: the fence on PostgreSQL outlives this command
                with run.step("keep_postgresql_fence") as step:
                    try:
                        fence.keep_postgres_fence(PG_ALIAS, reason="rolled back to SQLite")
                    except Exception as exc:  # PostgreSQL gone: nothing can write to it
                        step.warnings.append(f"could not keep the PostgreSQL fence: {exc}")
        if drop_postgres:
            with run.step("drop_postgres") as step:
                fence.lift_postgres_fence(PG_ALIAS)  # its tables go; its function would stay
                step.details = {"unapplied": drop_postgres_copy("postgresql")}
                note("PostgreSQL copy dropped")
    except BaseException as exc:
        lost = postgres_lost(exc)
        if lost is not None:
            during = (
                f"the rollback's {run.steps[-1].name} step"
                if run.steps
                else "the start of the rollback"
            )
            exc = target_lost(
                lost,
                during=during,
                then="Nothing was replaced. Check the server (db_test_postgresql), then run "
                "rollback_to_sqlite again.",
            )
        run.facts["error"] = error_text(exc)
        if pg_fenced and read_state(state_file).active_backend == "postgresql":
            try:  # PostgreSQL stays the active store: it must take writes again
                fence.lift_postgres_fence(PG_ALIAS)
            except Exception as lift_error:
                run.facts["postgres_fence_left"] = str(lift_error)
        if lost is not None:
            raise exc from lost
        raise
    finally:
        if freeze is not None:
            frozen_for = fz.freeze_off(flag, freeze) or 0.0
            note(f"write freeze off after {frozen_for:.2f} s")
        run.facts["write_freeze_seconds"] = frozen_for
        run.facts["carried_back"] = [dataclasses.asdict(t) for t in carried]
        run.facts["discarded"] = [dataclasses.asdict(t) for t in discarded]
        run.facts["seconds"] = round(time.perf_counter() - start, 3)
        if "error" in run.facts:
            run.finish("failed")
    if clean_up_after_freeze is not None:
        _remove_working_files(clean_up_after_freeze, run)
    refills = []
    if was_switched:  # SQLite's copies of the skipped models predate the switch
        refills = refill_reminders(state="was not carried back: SQLite holds its rows from before")
    run.facts["refills"] = refills
    report_path = run.finish("ok")
    return RollbackResult(
        was_switched=was_switched,
        carried=carried,
        discarded=discarded,
        pre_rollback_backup=backup_path,
        dropped_postgres=drop_postgres,
        freeze_seconds=frozen_for,
        state=new_state,
        report_path=report_path,
        seconds=run.facts["seconds"],
        warnings=[w for step in run.steps for w in step.warnings] + refills,
        took_over=took_over or (freeze.replaced if freeze is not None else ""),
        lifted_fence=run.facts.get("lifted_fence", ""),
        leftovers_removed=leftovers,
    )


def _carry_back(run, state_file, sqlite_path, copy, plan, discard, hold_freeze, note, backup):
    """Carry PostgreSQL's writes into a fresh copy and the live file (most before the freeze),
    verify, then under the freeze the last rows; flip."""
    tables = plan.tables
    if discard:
        hold_freeze(best_effort=True)
        with run.step("find_discarded") as step:
            live = Side(sqlite_path=sqlite_path)
            try:
                diffs = {t.db_table: find_changes(t, source=PG, target=live) for t in tables}
            except Exception as exc:  # PostgreSQL lost: the operator confirmed losing its writes
                discarded = []
                step.warnings.append(f"could not list the discarded rows: {exc}")
                run.facts["discarded_unknown"] = str(exc)
            else:
                discarded = _summarise(tables, diffs)
                step.details = {t.table: [t.inserted, t.updated, t.deleted] for t in discarded}
        note(f"discarding {sum(t.inserted + t.updated + t.deleted for t in discarded)} rows")
        fence.lift_sqlite_fence(sqlite_path)  # the switch fenced it; it is live again
        new_state = transition(
            state_file,
            "rolled_back",
            active_backend="sqlite",
            note="rollback_to_sqlite --discard-postgres-writes",
            last_report=str(run.report_path),
        )
        return new_state, [], discarded
    # stage 1, PostgreSQL still taking writes.  The change log first: every row written
    # from here on is logged, everything written before is seen by the diff that follows.
    with run.step("change_log") as step:
        step.details = fence.start_change_log(
            PG_ALIAS,
            [(t.db_table, t.pk_column) for t in tables if not t.composite],
            lock_timeout=LOG_LOCK_TIMEOUT,
        )
    logged_tables = {t.db_table for t in tables if not t.composite}
    logged_tables -= set(step.details["not_logged"])
    with run.step("fresh_copy") as step:
        snapshot_to(sqlite_path, copy)
        fence.lift_sqlite_fence(copy)  # the switch fenced the file; the copy becomes live
        step.details = {"copy": str(copy)}
    with run.step("find_changes") as step:
        fresh = Side(sqlite_path=copy)
        first = {t.db_table: find_changes(t, source=PG, target=fresh) for t in tables}
        step.details = {"tables_changed": sum(1 for d in first.values() if d.total)}
    with run.step("carry_back") as step, copy_alias(copy) as target:
        with transaction.atomic(using=target):
            _apply_all(tables, first, target=target)
        step.details = {k: [len(d.inserted_pks), len(d.updated_pks), len(d.deleted_pks)]
                        for k, d in first.items() if d.total}  # fmt: skip
        note(f"stage 1: carried back {sum(d.total for d in first.values())} rows")
    with run.step("check_copy") as step:
        step.details = check_copy(copy)  # integrity and foreign keys: a full scan, unfrozen
    with run.step("verify_unlogged") as step:
        # every row PostgreSQL has not logged is checked here, by range sums; the frozen
        # stage only looks at the logged rows (and at tables this does not cover)
        checked = verify_unlogged(copy, plan, logged_tables=logged_tables)
        step.details = checked
    full = set(checked["full_check_frozen"])
    # the bulk of the rows go into the live file now, unfrozen; it stays fenced (and
    # inactive) until the frozen stage writes the last rows and drops the fence
    prewritten = not any(t.composite and first[t.db_table].total for t in tables)
    if prewritten:
        with run.step("write_live_before_freeze") as step:
            try:
                step.details = write_into_live(copy, sqlite_path, plan, first, keep_fence=True)
            except BaseException:
                prewritten = False
                raise
    try:
        return _frozen_stage(
            run, state_file, sqlite_path, copy, plan, hold_freeze, note, first, full,
            prewritten,
        )  # fmt: skip
    except BaseException:
        if prewritten and backup is not None:  # put the live file back as the switch left it
            try:
                write_into_live(backup, sqlite_path, plan, first, keep_fence=True)
                run.facts["live_file_restored"] = True
            except Exception as exc:  # noqa: BLE001 said in the report; a rerun still works
                run.facts["live_file_restore_failed"] = str(exc)
        raise


def _remove_working_files(copy: Path, run) -> None:
    """Delete the rollback's working copy and its change log on PostgreSQL."""
    remove_copy(copy)
    try:  # the log's triggers cost every write on PostgreSQL
        fence.drop_change_log(PG_ALIAS)
    except Exception as exc:  # PostgreSQL lost: the next runbook step drops it
        run.facts["change_log_left"] = str(exc)


def _backup_database(info) -> Path | None:
    """The SQLite file inside a backup (its manifest names it)."""
    import json

    try:
        manifest = json.loads((Path(info.path) / "manifest.json").read_text())
        return Path(info.path) / manifest["files"][0]["name"]
    except (OSError, ValueError, KeyError, IndexError):
        return None


def _frozen_stage(
    run, state_file, sqlite_path, copy, plan, hold_freeze, note, first, full, prewritten
):
    """Freeze, carry what the log noted since stage 1 began, verify, write it live, flip."""
    tables = plan.tables
    flag = fz.freeze_path_for(state_file)
    # stage 2, frozen: only the rows logged since stage 1 began, and the uncovered tables
    freeze = hold_freeze()
    with run.step("catch_up") as step, copy_alias(copy) as target:
        fz.pause_point("rollback_catch_up")
        with connections[PG_ALIAS].cursor() as cur:
            logged = fence.read_change_log(cur)  # fenced and drained: nothing more comes
            full = full | fence.truncated_tables(cur)  # their rows went without a key logged
        then = {
            t.db_table: (
                find_changes(t, source=PG, target=Side(sqlite_path=copy))
                if t.db_table in full
                else logged_changes(t, logged.get(t.db_table, set()), target=target)
            )
            for t in tables
        }
        with transaction.atomic(using=target):
            _apply_all(tables, then, target=target)
        step.details = {k: [len(d.inserted_pks), len(d.updated_pks), len(d.deleted_pks)]
                        for k, d in then.items() if d.total}  # fmt: skip
        step.details["keys_logged"] = sum(len(v) for v in logged.values())
        note(f"stage 2: carried back {sum(d.total for d in then.values())} more rows")
    carried = _summarise(tables, {k: _net(first[k], then[k]) for k in first})
    with run.step("verify") as step, copy_alias(copy) as target:
        problems = []
        for table in tables:
            if table.db_table in full:  # counts and range sums of the whole table
                whole = compare_table(PG, Side(sqlite_path=copy), table)
                if not whole.ok:
                    problems.append(whole.describe(PG, Side(sqlite_path=copy)))
                continue
            pks = _log_keys(table, logged.get(table.db_table, set()))
            differ = _differing(table.model, pks, source=PG_ALIAS, target=target)
            if differ:
                problems.append(f"{table.db_table}: rows differ: {[str(p) for p in differ[:10]]}")
        if applied_migrations(PG) != applied_migrations(Side(sqlite_path=copy)):
            problems.append("applied migrations differ between PostgreSQL and the copy")
        if problems:
            raise VerificationError(
                f"After the carry-back the SQLite copy still differs from PostgreSQL: "
                f"{'; '.join(problems[:5])}. The live SQLite file was not replaced; the state "
                "is unchanged."
            )
        step.details = {
            "rows_compared": sum(len(v) for k, v in logged.items() if k not in full),
            "tables_compared_in_full": sorted(full),
        }
    with run.step("swap_and_flip") as step:
        if not fz.still_held(flag, freeze):
            raise fz.FreezeError(
                "The write freeze expired or was lifted during the rollback, so PostgreSQL "
                "may hold writes the copy lacks. Nothing was replaced; run rollback_to_sqlite "
                "again (raise --freeze-timeout if it was too short)."
            )
        if not prewritten:
            swap_in(copy, sqlite_path)  # composite keys: the whole copy's pages instead
            step.details = {"swapped_pages": True}
        else:  # only the rows carried under the freeze: the rest is in the file already
            step.details = write_into_live(copy, sqlite_path, plan, then, keep_fence=False)
        new_state = transition(
            state_file,
            "rolled_back",
            active_backend="sqlite",
            note="rollback_to_sqlite",
            last_report=str(run.report_path),
        )
        step.details["sqlite"] = str(sqlite_path)
    return new_state, carried, []


# --- what rollback_to_sqlite --dry-run shows (issue 10) -------------------------------------


@dataclasses.dataclass
class RollbackPreview:
    phase: str
    active_backend: str
    was_switched: bool
    carried: list[TableCarry]  # what a rollback would carry back now
    discarded: list[TableCarry]  # what --discard-postgres-writes would throw away now
    drop_postgres: bool
    last_freeze_seconds: float | None  # the last measured rollback or switch freeze


def preview_rollback(
    *,
    state_file: Path | None = None,
    sqlite_path: Path | None = None,
    report_dir: Path | None = None,
    discard_postgres_writes: bool = False,
    drop_postgres: bool = False,
) -> RollbackPreview:
    """Find what a rollback would carry back (or discard) now; writes nothing, freezes nothing."""
    from dbmigration.plan import build_plan

    state_file = Path(state_file or conf.state_file())
    sqlite_path = Path(sqlite_path or connections.settings["sqlite"]["NAME"])
    state = read_state(state_file)
    was_switched = state.active_backend == "postgresql"
    changed: list[TableCarry] = []
    if was_switched:
        tables = build_plan().tables
        require_postgres_tables(tables, state)
        live = Side(sqlite_path=sqlite_path)
        changed = _summarise(
            tables, {t.db_table: find_changes(t, source=PG, target=live) for t in tables}
        )
    return RollbackPreview(
        phase=state.phase,
        active_backend=state.active_backend,
        was_switched=was_switched,
        carried=[] if discard_postgres_writes else changed,
        discarded=changed if discard_postgres_writes else [],
        drop_postgres=drop_postgres,
        last_freeze_seconds=_last_freeze_seconds(Path(report_dir or conf.report_dir())),
    )


def _last_freeze_seconds(report_dir: Path) -> float | None:
    """How long writes were frozen in the newest switch or rollback report that measured it."""
    import json

    for path in sorted(report_dir.glob("migration_report_*.json"), reverse=True):
        try:
            facts = json.loads(path.read_text()).get("facts", {})
        except (OSError, ValueError):
            continue
        if facts.get("write_freeze_seconds"):
            return float(facts["write_freeze_seconds"])
    return None
