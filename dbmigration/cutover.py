"""Phase 7: switch the application to PostgreSQL under a write freeze of a few seconds.

Stage 1, while the application still writes: start a change log on SQLite (triggers note
the key of every row written from then on: fence.start_sqlite_change_log), snapshot SQLite
(online backup API), run ``migrate_data --sync`` from the snapshot and verify every table by
range checksums.  This is the slow part (a full scan of both sides), so it happens before
the freeze.  Every row that differs between the live file and the snapshot was written
after the snapshot, so after the log began: its key is logged.
Stage 1b, writes still going on: a second snapshot; the rows its log names are compared
with the first snapshot, written to PostgreSQL and verified, exactly as stage 2 does.  The
log's rowids follow the commits (one writer at a time, append only), so the second
snapshot's last entry (the watermark) divides the writes it holds from the later ones.
Stage 2, frozen: take SQLite's write lock (the drain: see fence.py), compare the rows logged
after the watermark in the live file with the second snapshot's inside SQLite (exact stored
values, C speed), write only those that changed to PostgreSQL with the copy's own
conversion, verify (every table's count, every changed row's digest, deletions, foreign
keys, sequences, migrations), fence SQLite in the same transaction as the lock (which drops
the log), flip the active backend, lift the freeze.  So the freeze holds what was written
since the second snapshot, not what stage 1 took to sync.  Materialized views are refreshed
after the freeze (derived data: they lag the last rows for that moment).
Without a log (SQLite's write lock stayed busy for 2 s when it was to begin) there is no
stage 1b and the frozen catch-up compares every row, as before.
The lock and the freeze are released in a ``finally``: whatever fails, the application goes
on writing to SQLite with the state file untouched (it is written only as the last step,
atomically) and no fence left behind.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from django.db import connections

from dbmigration import conf, fence
from dbmigration import freeze as fz
from dbmigration.errors import PhaseError, VerificationError, postgres_lost, target_lost
from dbmigration.policies import refill_reminders
from dbmigration.reports import RunReport, error_text
from dbmigration.state import NEXT_COMMAND, MigrationState, read_state, transition

Progress = Callable[[str], None] | None
RowsProgress = Callable[[str, int, int], None] | None  # (item, done, total), numbers only
LOG_LOCK_TIMEOUT = 2.0  # the change log needs SQLite's write lock for a moment
SWITCH_FREEZE_ESTIMATE = 5.0  # seconds after the drain, sent as Retry-After (measured 3-8 s)
SWITCH_STEPS = (
    "check that migrate_data finished and verified",
    "log the keys of the rows SQLite writes from now on (triggers); snapshot SQLite; "
    "migrate_data --sync from the snapshot; verify all tables (writes go on)",
    "a second snapshot; carry and verify the rows logged since the first (writes go on)",
    "write freeze on (writes answer 503, reads go on)",
    "drain: take SQLite's write lock (transactions in flight commit first; nothing commits after)",
    "final catch-up, under the lock: the logged rows that changed since the snapshot",
    "verify: every changed row, deletions, FKs, sequences, migrations (counts of unlogged tables)",
    "fence SQLite (triggers refuse every later write, from any process) and release the lock",
    "flip the active backend to postgresql in the state file",
    "write freeze off (application processes reload on their next request)",
)


@dataclasses.dataclass
class SwitchPlan:
    phase: str
    active_backend: str
    steps: tuple[str, ...]
    problems: list[str]

    @property
    def ready(self) -> bool:
        return not self.problems


@dataclasses.dataclass
class SwitchResult:
    freeze_seconds: float
    catch_up: dict
    verification: dict
    state: MigrationState
    report_path: Path | None
    seconds: float
    took_over: str = ""  # the void freeze of a killed run that this switch replaced
    lifted_fence: str = ""  # the fence a switch killed before its flip left on SQLite
    refills: list[str] = dataclasses.field(default_factory=list)  # skipped models to refill


def migration_verified(state: MigrationState) -> tuple[bool, str]:
    """Whether migrate_data copied every table and its recorded run verified them."""
    from dbmigration.plan import build_plan

    marks = state.extra.get("migrate_data") or {}
    done = set(marks.get("done", {}))
    missing = [t.db_table for t in build_plan().tables if t.db_table not in done]
    if missing:
        return False, (
            f"migrate_data has not copied {len(missing)} table(s) ({', '.join(missing[:5])})"
        )
    try:
        report = json.loads(Path(state.last_report or "").read_text())
    except (OSError, ValueError):
        return False, f"the report of the last migrate_data run ({state.last_report}) is missing"
    steps = {step.get("name"): step for step in report.get("steps", [])}
    if report.get("command") != "migrate_data" or report.get("status") not in ("ok", "warning"):
        return False, f"the last recorded run ({state.last_report}) is not a finished migrate_data"
    # a warning names generated columns the engines compute differently; the data is equal
    if steps.get("verify", {}).get("status") not in ("ok", "warning"):
        return False, "the last migrate_data run did not verify (was it run with --no-verify?)"
    return True, "migrate_data copied and verified every table"


def plan_switch(*, state_file: Path) -> SwitchPlan:
    """Check the preconditions and list the steps, changing nothing."""
    state = read_state(state_file)
    problems = []
    if state.phase == "switched" and state.active_backend == "postgresql":
        problems.append(
            "Already switched: PostgreSQL is the active backend. Nothing more is needed; "
            "migration_status says what to watch."
        )
    elif state.phase != "data_migrated":
        problems.append(
            f"The migration is in phase '{state.phase}'; switch_to_postgresql needs "
            f"'data_migrated'. Run {NEXT_COMMAND[state.phase] or 'rollback_to_sqlite'} next."
        )
    else:
        ok, why = migration_verified(state)
        if not ok:
            problems.append(f"{why}. Run migrate_data (it verifies) before switching.")
    freeze = fz.read_freeze(fz.freeze_path_for(state_file))  # a void one is taken over
    if freeze is not None:
        problems.append(
            f"A write freeze is already on ({freeze.reason}, by {freeze.owner}, "
            f"{freeze.age():g} s old); wait for that command to finish."
        )
    return SwitchPlan(state.phase, state.active_backend, SWITCH_STEPS, problems)


# --- stage 1, while the application still writes: catch PostgreSQL up to a snapshot ------------


def presync(*, sqlite_path: Path, snapshot: Path, state_file: Path, progress: Progress) -> Any:
    """Snapshot SQLite, ``migrate_data --sync`` PostgreSQL to it, verify every table."""
    from dbmigration.copy import RowsRejected
    from dbmigration.sqlite_source import snapshot_to
    from dbmigration.sync import sync_to_postgresql
    from dbmigration.verify import Side, verify

    def per_table(table: str, number: int, total: int) -> None:
        if progress:
            progress(f"pre-sync: {table} ({number}/{total})")

    snapshot_to(sqlite_path, snapshot)
    try:
        synced = sync_to_postgresql(
            sqlite_path=snapshot, alias="postgresql", state_file=state_file, progress=per_table
        )
    except RowsRejected as exc:
        # the switch takes no --quarantine: one line naming the rows and the fix
        from dbmigration.errors import DataError

        rows = exc.result.rejections
        named = "; ".join(f"{r.table} pk={r.pk!r} {r.column}: {r.reason}" for r in rows[:5])
        more = f" and {len(rows) - 5} more" if len(rows) > 5 else ""
        raise DataError(
            f"{len(rows)} row(s) in SQLite cannot arrive exactly: {named}{more}. Nothing "
            "was switched; fix them in SQLite, then switch again."
        ) from None
    source, target = Side(sqlite_path=snapshot), Side(alias="postgresql")
    checked = verify(source=source, target=target)
    if not checked.ok:
        problems = "; ".join(checked.problems(source, target)[:5])
        raise VerificationError(f"PostgreSQL differs from the SQLite snapshot: {problems}")
    return synced, checked


# --- stage 2, under the freeze: only what changed since the snapshot ---------------------------


@dataclasses.dataclass
class SourceChanges:
    """Rows of one table that changed in SQLite since the snapshot, by rowid and raw pk."""

    table: str
    upserts: list[tuple[int, Any, bool]] = dataclasses.field(default_factory=list)  # rowid, pk, new
    deleted: list[Any] = dataclasses.field(default_factory=list)  # raw pks gone from SQLite

    @property
    def counts(self) -> list[int]:
        new = sum(1 for _, _, is_new in self.upserts if is_new)
        return [new, len(self.upserts) - new, len(self.deleted)]


def source_changes(
    *,
    sqlite_path: Path,
    snapshot: Path,
    plan,
    logged: dict[str, list] | None = None,
    covered: set[str] = frozenset(),
) -> list[SourceChanges]:
    """Compare the live file with the snapshot in SQLite itself (exact stored values, fast).

    logged: keys the change log noted per table since before the snapshot; in the tables
    it covers only those rows are compared (the others are compared whole)."""
    from dbmigration.sqlite_source import open_readonly
    from dbmigration.sync import chunks

    conn = open_readonly(sqlite_path)
    try:
        conn.execute("ATTACH DATABASE ? AS snap", [f"{snapshot.resolve().as_uri()}?mode=ro"])
        found = []
        for table in plan.tables:
            t, first = _qi(table.db_table), _qi(table.pk_columns[0])
            differs = " OR ".join(
                f"m.{_qi(c)} IS NOT o.{_qi(c)}"
                for c in table.column_names
                if c not in table.pk_columns
            )
            changes = SourceChanges(table.db_table)
            whole = table.db_table not in covered
            mine = sorted(set((logged or {}).get(table.db_table, ())), key=str)
            keys = [None] if whole else list(chunks(mine))
            for chunk in keys:
                only = "" if chunk is None else f"{{a}}.{first} IN ({', '.join('?' * len(chunk))})"
                params = [] if chunk is None else chunk
                changed = f"(o.{first} IS NULL" + (f" OR {differs})" if differs else ")")
                # a key is a tuple of columns: one, or the parts of a composite key
                changes.upserts += [
                    (row[0], tuple(row[1:-1]) if table.composite else row[1], row[-1])
                    for row in conn.execute(
                        f"SELECT m.rowid, {_keys(table, 'm')}, o.{first} IS NULL FROM main.{t} m "
                        f"LEFT JOIN snap.{t} o ON {table.key_equals('o', 'm')} WHERE {changed}"
                        + (f" AND {only.format(a='m')}" if only else ""),
                        params,
                    )
                ]
                changes.deleted += [
                    tuple(row) if table.composite else row[0]
                    for row in conn.execute(
                        f"SELECT {_keys(table, 'o')} FROM snap.{t} o WHERE NOT EXISTS "
                        f"(SELECT 1 FROM main.{t} m WHERE {table.key_equals('m', 'o')})"
                        + (f" AND {only.format(a='o')}" if only else ""),
                        params,
                    )
                ]
            found.append(changes)
        return found
    finally:
        conn.close()


def _qi(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _read_log(sqlite_path: Path, *, after: int = 0) -> tuple[dict[str, list], int]:
    """The keys logged in this file after entry ``after``, and its last entry."""
    from dbmigration.sqlite_source import open_readonly

    conn = open_readonly(sqlite_path)
    try:
        conn.execute("BEGIN")  # one read: the keys and the watermark agree
        logged = fence.read_sqlite_change_log(conn, after=after)
        return logged, fence.sqlite_log_watermark(conn)
    finally:
        conn.close()


def _keys(table, alias: str) -> str:
    """The key's columns of table alias, for a SELECT list."""
    return ", ".join(f"{alias}.{_qi(c)}" for c in table.pk_columns)


def _pk_values(table, raw_pks: list) -> list:
    """Raw SQLite keys -> Django's Python values -> PostgreSQL parameters for ``key_in``."""
    lite = connections["sqlite"]
    keys = [table.python_key(raw, lite) for raw in raw_pks]
    return table.key_params(keys, connections["postgresql"])


def apply_source_changes(
    *,
    sqlite_path: Path,
    changes: list[SourceChanges],
    plan,
    progress: Progress,
    rows_progress: RowsProgress = None,
    refresh_views: bool = True,
) -> dict:
    """Write the changed rows to PostgreSQL in one transaction, converted as migrate_data does.

    refresh_views=False leaves the materialized views to the caller (the switch refreshes
    them after its freeze: they are derived data, not writes)."""
    import psycopg
    from django.core.management.color import no_style
    from django.db import DatabaseError, transaction

    from dbmigration.rejections import RowConverter, RowRejected, refused_row
    from dbmigration.source_scan import plan_targets
    from dbmigration.sqlite_source import open_readonly
    from dbmigration.sync import (
        ApplyResult,
        CopyWriter,
        TableDiff,
        apply_changes,
        refresh_materialized_views,
    )

    pg, lite = connections["postgresql"], connections["sqlite"]
    by_table = {c.table: c for c in changes}
    targets = plan_targets(plan, "postgresql")
    conn = open_readonly(sqlite_path, raw_text=True)
    applied = ApplyResult()
    # rows carried: each upsert written and each pure deletion, against all of them
    total = sum(len(c.upserts) + len(c.deleted) for c in changes)
    carried = 0

    def report(every: int = 1) -> None:
        if rows_progress and carried % every == 0:
            rows_progress("rows", carried, total)

    def row_written() -> None:
        nonlocal carried
        carried += 1
        report(every=500)

    report()
    try:
        with transaction.atomic(using="postgresql"), pg.cursor() as cur:
            for table in plan.tables:
                change = by_table[table.db_table]
                if progress:
                    progress(f"catch-up: {table.db_table}")
                # every old version out by key, every changed row in by rowid (exact)
                gone = change.deleted + [pk for _, pk, is_new in change.upserts if not is_new]
                writer = CopyWriter(
                    cur=cur,
                    conn=conn,
                    table=table,
                    converter=RowConverter(table, targets[table.db_table]),
                    by_rowid=True,
                    collect=False,
                    on_row=row_written,
                )
                diff = TableDiff(
                    table.db_table,
                    inserted_pks=[rowid for rowid, _, _ in change.upserts],
                    deleted_pks=[table.python_key(raw, lite) for raw in gone],
                )
                carried += len(change.deleted)
                report()
                try:
                    apply_changes(diff=diff, writer=writer, result=applied)
                except RowRejected as exc:
                    raise _cannot_arrive(exc.rows) from None
                except psycopg.Error as exc:
                    refused = refused_row(table, exc, writer.copied, conn)
                    if refused is None:
                        raise
                    raise _cannot_arrive([refused]) from exc
                if change.upserts:
                    report()
            for statement in pg.ops.sequence_reset_sql(no_style(), plan.models):
                cur.execute(statement)
        if refresh_views:
            with pg.cursor() as cur:
                refresh_materialized_views(cur)
    except (psycopg.Error, DatabaseError) as exc:
        if postgres_lost(exc) is not None:
            raise
        raise _refused_unnamed(exc, conn, plan, changes) from exc
    finally:
        conn.close()
    return {
        "rows_written": applied.rows_written,
        "rows_deleted": applied.rows_deleted,
        "tables": {c.table: c.counts for c in changes if any(c.counts)},
    }


def _refused_unnamed(exc: Exception, conn, plan, changes: list[SourceChanges]) -> Exception:
    """A refusal no COPY line names (a foreign key PostgreSQL checks at commit): the changed
    rows it would refuse, found on SQLite as the copy finds them; else PostgreSQL's words.
    Either way one line and the fix, never a traceback."""
    from dbmigration.errors import DataError
    from dbmigration.plan import Plan
    from dbmigration.rejections import relational_rejections
    from dbmigration.rows import param
    from dbmigration.source_scan import source_tables

    changed = {(c.table, param(pk)) for c in changes for _, pk, _ in c.upserts}
    tables = [t for t in plan.tables if t.db_table in {table for table, _ in changed}]
    rows = relational_rejections(
        conn, Plan(tables=tables, deferred_fks=[]), source_tables=source_tables(conn)
    )
    rows = [r for r in rows if (r.table, param(r.raw_pk)) in changed]
    if rows:
        return _cannot_arrive(rows)
    diag = getattr(exc, "diag", None) or getattr(exc.__cause__, "diag", None)
    words = " ".join(
        filter(None, [diag and diag.message_primary, diag and diag.message_detail])
    ) or str(exc).replace("\n", " ")
    return DataError(
        f"PostgreSQL refused a row written since migrate_data: {words}. Nothing of the "
        "catch-up was kept; fix it in SQLite, then switch again."
    )


def _cannot_arrive(rows) -> Exception:
    from dbmigration.errors import DataError

    lines = "; ".join(f"{r.table} pk={r.pk!r} {r.column}: {r.reason}" for r in rows)
    return DataError(
        f"A row written since migrate_data cannot arrive exactly: {lines}. Fix it in "
        "SQLite, then switch again."
    )


def verify_source_changes(
    *, sqlite_path: Path, changes: list[SourceChanges], plan, covered: set[str] = frozenset()
) -> dict:
    """Digests of every changed row, deletions, FKs, sequences; counts of the tables the
    change log did not cover (a logged table's count follows: stage 1 verified every row
    against the snapshot, and a row neither logged since nor written by the catch-up is
    the same on both sides)."""
    from dbmigration.casts import target_columns
    from dbmigration.range_sums import hash_plan
    from dbmigration.sqlite_source import open_readonly
    from dbmigration.sync import chunks
    from dbmigration.verify import (
        Side,
        applied_migrations,
        check_foreign_keys,
        check_sequences,
        column_readers,
        key_text,
        row_digest,
    )

    pg, lite = connections["postgresql"], connections["sqlite"]
    by_table = {c.table: c for c in changes}
    problems: list[str] = []
    conn = open_readonly(sqlite_path, raw_text=True)
    try:
        with pg.cursor() as cur:
            counted = 0
            for table in plan.tables:
                t = _qi(table.db_table)
                if table.db_table not in covered:
                    counted += 1
                    ours = conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
                    cur.execute(f"SELECT count(*) FROM {t}")
                    theirs = cur.fetchone()[0]
                    if ours != theirs:
                        problems.append(f"{table.db_table}: {ours} rows in SQLite, {theirs} in PG")
                change = by_table[table.db_table]
                if change.deleted:
                    still = 0
                    for chunk in chunks(change.deleted):
                        cur.execute(
                            f"SELECT count(*) FROM {t} WHERE {table.key_in(len(chunk), '%s')}",
                            _pk_values(table, chunk),
                        )
                        still += cur.fetchone()[0]
                    if still:
                        problems.append(f"{table.db_table}: deleted rows still in PostgreSQL")
                if not change.upserts:
                    continue
                cols = ", ".join(_qi(c) for c in table.column_names)
                left, right = column_readers(table, lite), column_readers(table, pg)
                key = key_text(table)
                hashed = (
                    None
                    if table.composite
                    else hash_plan(table, target_columns(cur, table.db_table))
                )
                for chunk in chunks(change.upserts):
                    if hashed is not None and _same_hashes(conn, cur, table, hashed, chunk):
                        continue  # C and SQL agree; otherwise Python's digests decide
                    marks = ", ".join("?" * len(chunk))
                    rows = conn.execute(
                        f"SELECT {cols} FROM {t} WHERE rowid IN ({marks})", [r for r, _, _ in chunk]
                    ).fetchall()
                    mine = {}
                    for raw in rows:
                        values = [read(v) for read, v in zip(left, raw, strict=True)]
                        mine[key(values)] = row_digest(values)
                    cur.execute(
                        f"SELECT {cols} FROM {t} WHERE {table.key_in(len(chunk), '%s')}",
                        _pk_values(table, [p for _, p, _ in chunk]),
                    )
                    yours = {}
                    for raw in cur.fetchall():
                        values = [read(v) for read, v in zip(right, raw, strict=True)]
                        yours[key(values)] = row_digest(values)
                    if mine != yours:
                        bad = sorted(
                            k for k in set(mine) | set(yours) if mine.get(k) != yours.get(k)
                        )
                        problems.append(f"{table.db_table}: rows differ: {bad[:10]}")
    finally:
        conn.close()
    problems += check_foreign_keys("postgresql", plan) + check_sequences("postgresql", plan)
    if applied_migrations(Side(sqlite_path=sqlite_path)) != applied_migrations(
        Side(alias="postgresql")
    ):
        problems.append("applied migrations differ between SQLite and PostgreSQL")
    if problems:
        raise VerificationError(
            "PostgreSQL differs from SQLite after the catch-up: " + "; ".join(problems[:5])
        )
    rows = sum(len(c.upserts) for c in changes)
    return {"ok": True, "tables_counted": counted, "changed_rows_compared": rows}


def _same_hashes(conn, cur, table, hashed, chunk) -> bool:
    """Whether the changed rows hash alike on both sides (range_sums' row hashes: C on the
    SQLite rows, SQL on the server), without reading them through Python converters."""
    from dbmigration.copy_lines import _copytext

    marks = ", ".join("?" * len(chunk))
    rows = conn.execute(
        f"{hashed.select} WHERE rowid IN ({marks})", [r for r, _, _ in chunk]
    ).fetchall()
    hashes = _copytext.hash_rows(rows, hashed.spec)
    if any(h is None for h in hashes):
        return False
    lite, pg = connections["sqlite"], connections["postgresql"]
    mine = {
        table.python_key(row[table.pk_index], lite): h for row, h in zip(rows, hashes, strict=True)
    }
    cur.execute(
        f"SELECT {_qi(table.pk_column)}, {hashed.row_sql} FROM {_qi(table.db_table)} "
        f"WHERE {table.key_in(len(chunk), '%s')}",
        _pk_values(table, [p for _, p, _ in chunk]),
    )
    yours = {table.python_key(k, pg): h % (1 << 64) for k, h in cur.fetchall()}
    return len(mine) == len(chunk) and mine == yours


def switch_to_postgresql(
    *,
    state_file: Path | None = None,
    report_dir: Path | None = None,
    log_dir: Path | None = None,
    drain_seconds: float = 10.0,
    freeze_max_seconds: float = fz.DEFAULT_MAX_SECONDS,
    sqlite_path: Path | None = None,
    progress: Progress = None,
    rows_progress: RowsProgress = None,
) -> SwitchResult:
    """Cut over to PostgreSQL; on any failure the application stays on SQLite, unfrozen.

    ``drain_seconds``: the longest wait for SQLite's write lock after the freeze begins.
    ``progress`` gets step messages; ``rows_progress`` the catch-up's rows carried / total.
    """
    state_file = Path(state_file or conf.state_file())
    sqlite_path = Path(sqlite_path or connections.settings["sqlite"]["NAME"])
    plan = plan_switch(state_file=state_file)
    if not plan.ready:
        raise PhaseError(" ".join(plan.problems))
    from dbmigration.plan import build_plan
    from dbmigration.preflight import conninfo_from_settings, require_same_target

    # the target migrate_data filled, reachable: exit 3 with the fix, not a traceback
    require_same_target(
        read_state(state_file).extra.get("target"),
        conninfo_from_settings(connections.settings["postgresql"]),
    )
    from dbmigration.sqlite_source import (
        remove_copy,
        remove_leftover_copies,
        snapshot_to,
        temp_copy_path,
    )
    from dbmigration.sync import refresh_materialized_views

    tables = build_plan()
    note = progress or (lambda message: None)
    run = RunReport.open(
        "switch_to_postgresql",
        report_dir=Path(report_dir or conf.report_dir()),
        log_dir=Path(log_dir or conf.log_dir()),
    )
    start = time.perf_counter()
    flag = fz.freeze_path_for(state_file)
    run.facts["leftovers_removed"] = remove_leftover_copies(sqlite_path)  # of killed runs
    snapshot = temp_copy_path(sqlite_path, "cutover")
    copies = [snapshot]  # removed at the end, whatever happens
    watermark = 0  # the change log's last entry the snapshot holds
    freeze = None
    lock: fence.SqliteWriteLock | None = None
    frozen_for = 0.0
    logging = False
    try:
        with run.step("lift_old_fences") as step:
            # PostgreSQL is written from here on (the last rollback fenced it); SQLite is
            # still the active store and no live freeze is on (plan_switch), so a fence on
            # it is the leftover of a switch killed before its flip: SQLite holds every write
            leftover = fence.sqlite_fence(sqlite_path)
            step.details = {
                "postgresql": fence.lift_postgres_fence("postgresql"),
                "sqlite": fence.lift_sqlite_fence(sqlite_path),
            }
            if leftover is not None and step.details["sqlite"]:
                lifted = fence.describe_sqlite_fence(leftover)
                step.details["lifted"] = run.facts["lifted_fence"] = lifted
                note(f"lifted the {lifted}, left by a switch killed before its flip")
        with run.step("change_log") as step:
            # before the snapshot: every row written after it is logged, so the frozen
            # catch-up compares only those rows, not every table
            try:
                fence.start_sqlite_change_log(
                    sqlite_path,
                    [(t.db_table, t.pk_column) for t in tables.tables if not t.composite],
                    timeout=LOG_LOCK_TIMEOUT,
                )
                logging = True
            except sqlite3.OperationalError as exc:  # the write lock stays busy
                step.warnings.append(f"no change log ({exc}): the catch-up compares every row")
            step.details = {"logging": logging}
        with run.step("presync") as step:
            note("stage 1 (writes go on): snapshot SQLite, sync PostgreSQL to it, verify")
            synced, checked = presync(
                sqlite_path=sqlite_path, snapshot=snapshot, state_file=state_file, progress=note
            )
            step.details = {
                "changed": synced.changed,
                "rows_written": synced.rows_written,
                "rows_deleted": synced.rows_deleted,
                "verified_tables": len(checked.tables),
                "verified_rows": sum(t.target_rows for t in checked.tables),
            }
        covered = {t.db_table for t in tables.tables if not t.composite} if logging else set()
        if logging:
            with run.step("catch_up_unfrozen") as step:
                # writes go on: carry what changed during stage 1 from a second snapshot, so
                # the freeze holds only what is written from that snapshot on
                note("stage 1b (writes go on): carry the rows changed since the snapshot")
                second = temp_copy_path(sqlite_path, "cutover")
                copies.append(second)
                snapshot_to(sqlite_path, second)
                logged, second_watermark = _read_log(second)
                changes = source_changes(
                    sqlite_path=second, snapshot=snapshot, plan=tables, logged=logged,
                    covered=covered,
                )  # fmt: skip
                carried = apply_source_changes(
                    sqlite_path=second, changes=changes, plan=tables, progress=note,
                    rows_progress=rows_progress,
                )  # fmt: skip
                checked_rows = verify_source_changes(
                    sqlite_path=second, changes=changes, plan=tables, covered=covered
                )
                snapshot, watermark = second, second_watermark
                step.details = {
                    **carried,
                    "keys_logged": sum(map(len, logged.values())),
                    "verified": checked_rows,
                }
                note(f"stage 1b: carried {carried['rows_written']} rows")
        with run.step("write_freeze_on") as step:
            freeze = fz.freeze_on(
                flag,
                reason="switch_to_postgresql",
                max_seconds=freeze_max_seconds,
                expected_seconds=drain_seconds + SWITCH_FREEZE_ESTIMATE,
            )
            step.details = {"flag": str(flag), "max_seconds": freeze_max_seconds}
            if freeze.replaced:  # a killed run's freeze, void since its owner died
                step.details["took_over"] = run.facts["took_over_freeze"] = freeze.replaced
                note(f"took over a leftover {freeze.replaced}")
            note("write freeze on")
        with run.step("drain") as step:
            note("drain: waiting for SQLite's write lock")
            lock = fence.hold_sqlite_write_lock(sqlite_path, timeout=drain_seconds)
            step.details = {"waited_seconds": lock.waited_seconds, "bound_seconds": drain_seconds}
        with run.step("catch_up") as step:
            fz.pause_point("switch_catch_up")
            note("stage 2 (frozen): final catch-up of what changed since the snapshot")
            found = time.perf_counter()
            # the lock is held: nothing more is written; what the snapshot holds is on
            # PostgreSQL, so only the keys logged after it are compared
            logged = _read_log(sqlite_path, after=watermark)[0] if logging else None
            changes = source_changes(
                sqlite_path=sqlite_path,
                snapshot=snapshot,
                plan=tables,
                logged=logged,
                covered=covered,
            )
            found = round(time.perf_counter() - found, 3)
            caught_up = apply_source_changes(
                sqlite_path=sqlite_path,
                changes=changes,
                plan=tables,
                progress=note,
                rows_progress=rows_progress,
                refresh_views=False,  # after the freeze
            )
            step.details = {**caught_up, "find_seconds": found}
            step.details["keys_logged"] = sum(map(len, (logged or {}).values()))
            note(f"catch-up wrote {caught_up['rows_written']} rows")
        with run.step("verify") as step:
            note("verifying PostgreSQL against the frozen SQLite")
            verified = verify_source_changes(
                sqlite_path=sqlite_path, changes=changes, plan=tables, covered=covered
            )
            step.details = verified
        with run.step("fence_sqlite") as step:
            lock.fence([t.db_table for t in tables.tables], reason="switched to PostgreSQL")
            step.details = {"tables": len(tables.tables)}
            note("SQLite fenced: any later write to it fails")
        fz.pause_point("switch_fenced")  # a kill -9 here leaves the fence orphaned
        with run.step("flip_active_backend") as step:
            if not fz.still_held(flag, freeze):
                # the freeze expired or was removed: writes may have reached SQLite since
                raise fz.FreezeError(
                    "The write freeze expired or was lifted during the switch, so SQLite may "
                    "hold writes PostgreSQL lacks. Nothing was switched; run "
                    "switch_to_postgresql again (raise --freeze-timeout if it was too short)."
                )
            new_state = transition(
                state_file,
                "switched",
                active_backend="postgresql",
                note="switch_to_postgresql",
                last_report=str(run.report_path),
            )
            step.details = {"active_backend": "postgresql"}
            note("active backend is now postgresql")
    except BaseException as exc:
        lost = postgres_lost(exc)
        if lost is not None:
            during = (
                f"the switch's {run.steps[-1].name} step"
                if run.steps
                else "the start of the switch"
            )
            exc = target_lost(
                lost,
                during=during,
                then="Nothing was switched. Check the server (db_test_postgresql), then run "
                "switch_to_postgresql again.",
            )
        run.facts["error"] = error_text(exc)
        run.facts["active_backend"] = read_state(state_file).active_backend
        if lock is not None and lock.fenced:  # SQLite stays the active store: unfence it
            lock.unfence()
        if lost is not None:
            raise exc from lost
        raise
    finally:
        if lock is not None:
            lock.release()
        if logging and "error" in run.facts:  # (the fence's transaction dropped it otherwise)
            try:
                fence.stop_sqlite_change_log(sqlite_path)
            except Exception as exc:  # the next switch or the fence drops it
                run.facts["change_log_left"] = str(exc)
        for copy in copies:
            remove_copy(copy)
        if freeze is not None:
            frozen_for = fz.freeze_off(flag, freeze) or 0.0
            note(f"write freeze off after {frozen_for:.2f} s")
        run.facts["write_freeze_seconds"] = frozen_for
        run.facts["seconds"] = round(time.perf_counter() - start, 3)
        if run.status == "running" and "error" in run.facts:
            run.finish("failed")
    run.facts["active_backend"] = "postgresql"
    try:  # derived data, refreshed after the freeze: the views lag its last rows for a moment
        with connections["postgresql"].cursor() as cur:
            run.facts["views_refreshed"] = refresh_materialized_views(cur)
    except Exception as exc:  # noqa: BLE001 the switch stands; refresh_analytics redoes it
        run.facts["views_not_refreshed"] = error_text(exc)
        note(f"materialized views not refreshed ({error_text(exc)}): run refresh_analytics")
    run.facts["refills"] = refill_reminders(state="was not copied to PostgreSQL")
    report_path = run.finish("ok")
    return SwitchResult(
        freeze_seconds=frozen_for,
        catch_up=caught_up,
        verification=verified,
        state=new_state,
        report_path=report_path,
        seconds=run.facts["seconds"],
        took_over=run.facts.get("took_over_freeze", ""),
        lifted_fence=run.facts.get("lifted_fence", ""),
        refills=run.facts["refills"],
    )
