"""Find and carry only what changed: inserted, updated and deleted rows, via range checksums.

Public API (direction-agnostic; a ``Side`` is a SQLite file or a Django alias):

    diff_table(*, source: Side, target: Side, table: PlannedTable,
               exclude: set[str] | None = None) -> TableDiff
        rows to insert/update/delete on target so that it equals source.  Primary keys are
        the Python values Django uses (UUID, int, str; a tuple of them for a
        CompositePrimaryKey): ``inserted_pks``/``updated_pks`` as
        read on the source, ``deleted_pks`` as read on the target.  Reads only.
    diff_tables(*, source, target, plan=None, tables=None, progress=None) -> list[TableDiff]
    sync_to_postgresql(*, sqlite_path, alias="postgresql", tables=None, state_file=None,
                       progress=None) -> SyncResult
        apply SQLite's changes to PostgreSQL in one transaction (``migrate_data --sync``).
    apply_changes(*, diff: TableDiff, writer: CopyWriter | OrmWriter,
                  result: ApplyResult | None = None) -> ApplyResult
        make one table's target rows equal the source's for the keys in ``diff``: the old
        versions out first, then the new ones in.  Used by ``--sync`` (here), the switch's
        catch-up (cutover.py) and the rollback's carry-back (rollback.py).

The two directions share the change-set (``TableDiff``), the chunking, the order (deletes,
then writes) and the result; the writing itself genuinely differs and stays in two small
writers.  ``CopyWriter`` (SQLite -> PostgreSQL) reads raw SQLite rows and converts them as
the copy does (``RowConverter``), then COPYs them: an updated row is deleted and written
again.  ``OrmWriter`` (PostgreSQL -> a SQLite copy) goes through Django's backends as Django
stores rows (raw inserts, queryset updates in place, no signals).  Transactions, retries
and how a refused row is named stay with the callers.  Neither side is written while
diffing.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import psycopg
from django.core.management.color import no_style
from django.db import DatabaseError, connections, transaction

from dbmigration import range_sums
from dbmigration.copy import CopyResult, RowsRejected
from dbmigration.done_marks import read_marks, write_marks
from dbmigration.errors import DataError, TargetError
from dbmigration.plan import Plan, PlannedTable, build_plan, qi
from dbmigration.rejections import (
    RejectedRow,
    RejectionSink,
    RowConverter,
    RowRejected,
    cascade_rejections,
    refused_row,
    relational_rejections,
)
from dbmigration.rows import Progress, fetch_row, param, read_rows
from dbmigration.schema_rebuild import postgresql_duplicates, schema_snapshot, unique_parts
from dbmigration.source_scan import plan_targets, source_tables
from dbmigration.sqlite_source import content_sha256, open_readonly
from dbmigration.verify import Side, both_sums, plan_ranges, row_digests

BATCH = 500  # keys per statement (SQLite's and PostgreSQL's parameter limits stay far off)


def chunks(items: list, size: int = BATCH) -> Iterator[list]:
    """Consecutive slices of items, size long (the last shorter)."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


@dataclasses.dataclass
class TableDiff:
    """Rows that differ between a source and a target table, by primary key."""

    table: str
    inserted_pks: list[Any] = dataclasses.field(default_factory=list)  # in the source only
    updated_pks: list[Any] = dataclasses.field(default_factory=list)  # in both, values differ
    deleted_pks: list[Any] = dataclasses.field(default_factory=list)  # in the target only
    mismatched_ranges: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    @property
    def changed(self) -> int:
        return len(self.inserted_pks) + len(self.updated_pks) + len(self.deleted_pks)

    total = changed  # the rollback's word for it


@dataclasses.dataclass
class SyncResult:
    diffs: list[TableDiff]
    source_sha256: str
    rows_written: int = 0
    rows_deleted: int = 0
    seconds: float = 0.0
    rejections: list[RejectedRow] = dataclasses.field(default_factory=list)  # set aside
    reject_file: Path | None = None

    @property
    def changed(self) -> int:
        return sum(d.changed for d in self.diffs)


def diff_table(
    *, source: Side, target: Side, table: PlannedTable, exclude: set[str] | None = None
) -> TableDiff:
    """Return what to insert, update and delete on target so that it equals source."""
    started = time.perf_counter()
    ranges = plan_ranges((source, target), table)
    ours, theirs = both_sums(source, target, table, ranges, exclude=exclude)
    diff = TableDiff(table=table.db_table)
    bad = {
        b
        for b in set(ours.buckets) | set(theirs.buckets)
        if ours.buckets.get(b) != theirs.buckets.get(b)
    }
    if bad:
        diff.mismatched_ranges = [ranges.describe(b, table.pk_label) for b in sorted(bad, key=str)]
        found = _fast_rows(source, target, table, ranges, bad) if not exclude else None
        if found is not None:  # row hashes in C and SQL: no Python per value
            diff.inserted_pks, diff.updated_pks, diff.deleted_pks = found
            diff.seconds = round(time.perf_counter() - started, 3)
            return diff
        left = row_digests(source, table, ranges, bad, exclude=exclude)
        right = row_digests(target, table, ranges, bad)
        diff.inserted_pks = [left[k][1] for k in sorted(set(left) - set(right))]
        diff.deleted_pks = [right[k][1] for k in sorted(set(right) - set(left))]
        diff.updated_pks = [
            left[k][1] for k in sorted(set(left) & set(right)) if left[k][0] != right[k][0]
        ]
    diff.seconds = round(time.perf_counter() - started, 3)
    return diff


def _fast_rows(source: Side, target: Side, table: PlannedTable, ranges, bad: set):
    """range_sums.row_diff between a SQLite file and a PostgreSQL alias, or None."""
    lite = source if source.sqlite_path is not None else target
    other = target if lite is source else source
    if lite.sqlite_path is None or other.alias is None:
        return None
    return range_sums.row_diff(
        sqlite_path=lite.sqlite_path,
        alias=other.alias,
        table=table,
        low=ranges.low,
        width=ranges.width,
        buckets=bad,
        sqlite_is_source=lite is source,
    )


def diff_tables(
    *,
    source: Side,
    target: Side,
    plan: Plan | None = None,
    tables: Iterable[str] | None = None,
    progress: Progress | None = None,
) -> list[TableDiff]:
    """Diff every planned table (FK order)."""
    plan = plan or build_plan(only=tables)
    diffs = []
    for number, table in enumerate(plan.tables, 1):
        diffs.append(diff_table(source=source, target=target, table=table))
        if progress:
            progress(table.db_table, number, len(plan.tables))
    return diffs


# --- the one apply: SQLite -> PostgreSQL (--sync, the switch) and PostgreSQL -> SQLite (rollback)


@dataclasses.dataclass
class ApplyResult:
    rows_written: int = 0
    rows_deleted: int = 0
    rejected: list[RejectedRow] = dataclasses.field(default_factory=list)  # not written


def apply_changes(
    *, diff: TableDiff, writer: CopyWriter | OrmWriter, result: ApplyResult | None = None
) -> ApplyResult:
    """Make the target's rows equal the source's for diff's keys: old versions out, new in.

    Run it inside the caller's transaction: Django's foreign keys are DEFERRABLE INITIALLY
    DEFERRED on both backends, so the order of tables and rows within it is free.
    """
    result = result if result is not None else ApplyResult()
    # COPY cannot update: PostgreSQL gets an updated row as a delete and a new line
    replaced = [] if writer.updates_in_place else diff.updated_pks
    for chunk in chunks(diff.deleted_pks + replaced):
        result.rows_deleted += writer.delete(chunk)
    writer.write(diff.inserted_pks + replaced, result)
    if writer.updates_in_place:
        for chunk in chunks(diff.updated_pks):
            result.rows_written += writer.update(chunk)
    return result


@dataclasses.dataclass
class CopyWriter:
    """SQLite -> PostgreSQL: raw rows read and converted as the copy does, then COPYed.

    Keys to delete are Django's Python values; keys to write are too, or SQLite rowids with
    ``by_rowid`` (the switch reads exactly the rows it found changed).  A row that cannot
    arrive is collected in the result and nothing more is written (``collect``), or its
    RowRejected propagates.  ``copied`` gets a key per COPY line, to name a row PostgreSQL
    refuses (rejections.refused_row).
    """

    cur: Any  # a PostgreSQL cursor inside the caller's transaction
    conn: Any  # the SQLite source, opened with raw_text
    table: PlannedTable
    converter: RowConverter
    skip: set = dataclasses.field(default_factory=set)  # raw keys (as param()) not to write
    by_rowid: bool = False
    collect: bool = True
    copied: list = dataclasses.field(default_factory=list)
    on_row: Callable[[], None] | None = None  # after each row written
    updates_in_place = False

    def delete(self, keys: list) -> int:
        table, pg = self.table, self.cur.db
        self.cur.execute(
            f"DELETE FROM {qi(table.db_table)} WHERE {table.key_in(len(keys), '%s')}",
            table.key_params(keys, pg),
        )
        return self.cur.rowcount

    def write(self, keys: list, result: ApplyResult) -> None:
        if not keys:
            return
        table, lite = self.table, connections["sqlite"]
        cols = ", ".join(qi(c) for c in table.column_names)
        with self.cur.cursor.copy(f"COPY {qi(table.db_table)} ({cols}) FROM STDIN") as cp:
            for chunk in chunks(keys):
                # as the copy reads them: a TEXT/BLOB of the wrong class is marked
                if self.by_rowid:
                    where, params = f"WHERE rowid IN ({', '.join('?' * len(chunk))})", chunk
                else:
                    where = f"WHERE {table.key_in(len(chunk))}"
                    params = table.key_params(chunk, lite)
                for batch in read_rows(self.conn, table, where=where, params=params):
                    for raw in batch:
                        self._write_row(cp, raw, result)

    def _write_row(self, cp, raw: tuple, result: ApplyResult) -> None:
        if self.skip and param(self.table.key_of(raw)) in self.skip:
            return
        try:
            row = self.converter.convert(raw)
        except RowRejected as exc:
            if not self.collect:
                raise
            result.rejected.extend(exc.rows)
            return
        if not result.rejected:
            cp.write_row(row)
            self.copied.append(self.table.key_of(raw))
            result.rows_written += 1
            if self.on_row:
                self.on_row()


@dataclasses.dataclass
class OrmWriter:
    """Alias -> alias through Django's backends, as Django would store the rows: raw
    inserts (no auto_now, no signals, so no audit entries), queryset updates in place,
    raw deletes (no cascade: cascaded rows have their own diffs)."""

    model: Any
    source: str
    target: str
    updates_in_place = True

    def __post_init__(self) -> None:
        self.manager = self.model._base_manager
        # generated columns are computed by SQLite itself and may not be written
        self.fields = [f for f in self.model._meta.local_concrete_fields if not f.generated]

    def delete(self, keys: list) -> int:
        return self.manager.using(self.target).filter(pk__in=keys)._raw_delete(self.target)

    def write(self, keys: list, result: ApplyResult) -> None:
        for chunk in chunks(keys):
            objs = list(self.manager.using(self.source).filter(pk__in=chunk))
            self.manager.using(self.target)._insert(
                objs, fields=self.fields, raw=True, using=self.target
            )
            result.rows_written += len(objs)

    def update(self, keys: list) -> int:
        others = [f for f in self.fields if not f.primary_key]
        done = 0
        for obj in self.manager.using(self.source).filter(pk__in=keys):
            values = {f.attname: getattr(obj, f.attname) for f in others}
            done += self.manager.using(self.target).filter(pk=obj.pk).update(**values)
        return done


def sync_to_postgresql(
    *,
    sqlite_path: Path,
    alias: str = "postgresql",
    tables: Iterable[str] | None = None,
    state_file: Path | None = None,
    progress: Progress | None = None,
    quarantine: bool = False,
    reject_file: Path | None = None,
) -> SyncResult:
    """Apply SQLite's inserts, updates and deletes since the last run, in one transaction.

    A row PostgreSQL would refuse stops the sync naming it (RowsRejected), or under
    ``quarantine`` is set aside with the rows pointing at it, as the copy does: it is not
    written (and removed from PostgreSQL if an older version was there) and listed in
    ``reject_file``; the transaction is then tried again without it.
    """
    started = time.perf_counter()
    plan = build_plan(only=tables)
    if state_file is not None:
        never = [
            t.db_table
            for t in plan.tables
            if t.db_table not in read_marks(state_file).get("done", {})
        ]
        if never:
            raise DataError(
                f"--sync carries changes after a full copy, but {', '.join(never[:5])} "
                "never finished copying; run migrate_data without --sync first."
            )
    sha = content_sha256(sqlite_path)
    source, target = Side(sqlite_path=sqlite_path), Side(alias=alias)
    diffs = diff_tables(source=source, target=target, plan=plan, progress=progress)
    result = SyncResult(diffs=diffs, source_sha256=sha)
    targets = plan_targets(plan, alias)
    conn = open_readonly(sqlite_path, raw_text=True)
    aside: dict[str, set] = {}  # raw keys set aside (quarantine)
    try:
        # broken keys and CHECKs by query first, as the full copy does
        found = relational_rejections(conn, plan, source_tables=source_tables(conn))
        for _ in range(MAX_REFUSED_RETRIES):
            if found:
                if not quarantine:
                    raise RowsRejected(_rejected(found, sha))
                _set_aside(conn, plan, found, aside, result)
            try:
                _apply(alias, conn, plan, diffs, targets, aside, result)
                break
            except _SyncRejected as exc:
                found = exc.rows
        else:
            raise TargetError(
                f"PostgreSQL refused more than {MAX_REFUSED_RETRIES} rows of the sync one by "
                "one; nothing of it was kept. Fix them in SQLite and run migrate_data --sync."
            )
    finally:
        conn.close()
    if result.rejections:
        sink = RejectionSink(reject_file)
        sink.extend(result.rejections)
        sink.close()
        result.reject_file = reject_file
    with connections[alias].cursor() as cur:
        refresh_materialized_views(cur)
    marks = read_marks(state_file)
    done = dict(marks.get("done", {}))
    for table, diff in zip(plan.tables, diffs, strict=True):
        done[table.db_table] = (
            done.get(table.db_table, 0) + len(diff.inserted_pks) - len(diff.deleted_pks)
        )
    write_marks(state_file, {**marks, "source_sha256": sha, "done": done})
    result.seconds = round(time.perf_counter() - started, 3)
    return result


MAX_REFUSED_RETRIES = 100  # rows PostgreSQL refuses at COPY under --quarantine, one retry each


def _rejected(rows: list[RejectedRow], sha: str) -> CopyResult:
    failed = CopyResult(tables=[], rejections=rows, repairs=[], source_sha256=sha)
    failed.rejected_total = len(rows)
    return failed


def _set_aside(conn, plan: Plan, rows: list[RejectedRow], aside: dict, result) -> None:
    """Add rows, and the rows pointing at them, to what the sync leaves out."""
    by_table: dict[str, set] = {}
    for row in rows:
        by_table.setdefault(row.table, set()).add(row.raw_pk)
    for row in rows + cascade_rejections(conn, plan, by_table):
        if row.raw_pk in aside.setdefault(row.table, set()):
            continue
        aside[row.table].add(row.raw_pk)
        if row.values is None:
            row.values = fetch_row(conn, plan.table(row.table), row.raw_pk)
        result.rejections.append(row)


def _apply(alias: str, conn, plan: Plan, diffs, targets, aside: dict, result) -> None:
    """Write every table's changes in one transaction; raise _SyncRejected naming the rows
    PostgreSQL refused (nothing kept)."""
    pg = connections[alias]
    result.rows_written = result.rows_deleted = 0
    copying: tuple[PlannedTable, list] | None = None  # the COPY in flight, a key per line
    try:
        with transaction.atomic(using=alias), pg.cursor() as cur:
            # Django's foreign keys are DEFERRABLE INITIALLY DEFERRED: order within is free
            for table, diff in zip(plan.tables, diffs, strict=True):
                skip = aside.get(table.db_table, set())
                if not diff.changed and not skip:
                    continue
                copying = (table, [])
                applied = _write_table(cur, conn, table, diff, targets, skip, copying[1])
                copying = None
                result.rows_written += applied.rows_written
                result.rows_deleted += applied.rows_deleted
                if applied.rejected:
                    raise _SyncRejected(applied.rejected)
            for statement in pg.ops.sequence_reset_sql(no_style(), plan.models):
                cur.execute(statement)
    except (psycopg.Error, DatabaseError) as exc:
        if copying is None:
            raise TargetError(
                f"PostgreSQL refused the sync: {exc}. Nothing of it was kept; fix the rows in "
                "SQLite and run migrate_data --sync again."
            ) from exc
        # a row PostgreSQL refused although every check passed: named by its COPY line
        table, keys = copying
        refused = refused_row(table, exc, keys, conn)
        if refused is None:
            raise TargetError(
                f"PostgreSQL refused the sync of {table.db_table}: {exc}. Nothing of it was "
                "kept; fix the rows in SQLite and run migrate_data --sync again."
            ) from exc
        named = _unique_collision(alias, conn, plan, table, diffs, targets, aside, exc)
        raise _SyncRejected(named or [refused]) from exc


def _write_table(cur, conn, table, diff, targets, skip: set, copied: list) -> ApplyResult:
    """Delete the table's old versions (and rows set aside), COPY the new ones; the result
    names the rows whose values cannot arrive.  ``copied`` gets a key per COPY line."""
    lite = connections["sqlite"]
    aside = [table.python_key(param(raw), lite) for raw in skip]
    writer = CopyWriter(
        cur=cur,
        conn=conn,
        table=table,
        converter=RowConverter(table, targets[table.db_table]),
        skip={param(key) for key in skip},  # raw keys as text: read as bytes, found as str
        copied=copied,
    )
    gone = dataclasses.replace(diff, deleted_pks=diff.deleted_pks + aside)
    return apply_changes(diff=gone, writer=writer)


def _unique_collision(alias, conn, plan, table, diffs, targets, aside, exc) -> list[RejectedRow]:
    """Rows the sync brings that collide under a unique index, named as the copy names them
    (table, pk, index, the pk of the row that keeps the key): the table's changes are
    written again in a transaction without that index, PostgreSQL is asked for the
    duplicate groups, and everything is rolled back.  Rows already there keep the key."""
    diag = getattr(exc, "diag", None) or getattr(exc.__cause__, "diag", None)
    if diag is None or diag.sqlstate != "23505" or not diag.constraint_name:
        return []
    pg = connections[alias]
    diff = diffs[plan.tables.index(table)]
    newcomers = {table.db_table: diff.inserted_pks + diff.updated_pks}
    try:
        with transaction.atomic(using=alias), pg.cursor() as cur:
            objects = [
                o
                for o in schema_snapshot(cur, [table.db_table])
                if o.name == diag.constraint_name and unique_parts(o) is not None
            ]
            # a constraint's own index goes with the constraint
            objects.sort(key=lambda o: o.kind == "index")
            if not objects:
                return []
            cur.execute(objects[0].drop_sql)
            _write_table(cur, conn, table, diff, targets, aside.get(table.db_table, set()), [])
            found = postgresql_duplicates(pg, plan, objects[:1], newcomers=newcomers)
            transaction.set_rollback(True, using=alias)
    except (psycopg.Error, DatabaseError):
        return []  # e.g. a primary key others point at cannot be dropped: the line names it
    for row in found:
        row.values = fetch_row(conn, table, row.raw_pk)
    return found


class _SyncRejected(Exception):
    def __init__(self, rows: list[RejectedRow]):
        super().__init__(rows[0].reason)
        self.rows = rows


def refresh_materialized_views(cur) -> list[str]:
    """Refresh every populated materialized view (derived from the rows just written)."""
    cur.execute("SELECT schemaname, matviewname FROM pg_matviews WHERE ispopulated")
    views = [f"{qi(schema)}.{qi(view)}" for schema, view in cur.fetchall()]
    for view in views:
        cur.execute(f"REFRESH MATERIALIZED VIEW {view}")
    return views
