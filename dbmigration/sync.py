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

The reverse direction (PostgreSQL -> SQLite after cutover) uses ``diff_table`` with
``source=Side(alias="postgresql"), target=Side(sqlite_path=...)`` and applies the rows
itself (dbmigration/rollback.py).  Neither side is written while diffing.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import psycopg
from django.core.management.color import no_style
from django.db import DatabaseError, connections, transaction

from dbmigration.copy import (
    CopyResult,
    Progress,
    RejectedRow,
    RowConverter,
    RowsRejected,
    _read_marks,
    _refused_row,
    _source_tables,
    _write_marks,
    plan_targets,
    qi,
    read_rows,
    relational_rejections,
)
from dbmigration.errors import DataError, TargetError
from dbmigration.plan import Plan, PlannedTable, build_plan
from dbmigration.sqlite_source import content_sha256, open_readonly
from dbmigration.verify import Side, both_sums, plan_ranges, row_digests


@dataclasses.dataclass
class TableDiff:
    table: str
    inserted_pks: list[Any] = dataclasses.field(default_factory=list)
    updated_pks: list[Any] = dataclasses.field(default_factory=list)
    deleted_pks: list[Any] = dataclasses.field(default_factory=list)
    mismatched_ranges: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    @property
    def changed(self) -> int:
        return len(self.inserted_pks) + len(self.updated_pks) + len(self.deleted_pks)


@dataclasses.dataclass
class SyncResult:
    diffs: list[TableDiff]
    source_sha256: str
    rows_written: int = 0
    rows_deleted: int = 0
    seconds: float = 0.0

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
        left = row_digests(source, table, ranges, bad, exclude=exclude)
        right = row_digests(target, table, ranges, bad)
        diff.inserted_pks = [left[k][1] for k in sorted(set(left) - set(right))]
        diff.deleted_pks = [right[k][1] for k in sorted(set(right) - set(left))]
        diff.updated_pks = [
            left[k][1] for k in sorted(set(left) & set(right)) if left[k][0] != right[k][0]
        ]
    diff.seconds = round(time.perf_counter() - started, 3)
    return diff


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


def _chunks(items: list, size: int = 500):
    for start in range(0, len(items), size):
        yield items[start : start + size]


def sync_to_postgresql(
    *,
    sqlite_path: Path,
    alias: str = "postgresql",
    tables: Iterable[str] | None = None,
    state_file: Path | None = None,
    progress: Progress | None = None,
) -> SyncResult:
    """Apply SQLite's inserts, updates and deletes since the last run, in one transaction."""
    started = time.perf_counter()
    plan = build_plan(only=tables)
    if state_file is not None:
        never = [
            t.db_table
            for t in plan.tables
            if t.db_table not in _read_marks(state_file).get("done", {})
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
    pg, lite = connections[alias], connections["sqlite"]
    rejected: list[RejectedRow] = []
    copying: tuple[PlannedTable, list] | None = None  # the COPY in flight, a key per line
    conn = open_readonly(sqlite_path, raw_text=True)
    try:
        # broken keys and CHECKs by query first, as the full copy does
        rejected.extend(relational_rejections(conn, plan, source_tables=_source_tables(conn)))
        if rejected:
            raise _SyncRejected()
        with transaction.atomic(using=alias), pg.cursor() as cur:
            # Django's foreign keys are DEFERRABLE INITIALLY DEFERRED: order within is free
            for table, diff in zip(plan.tables, diffs, strict=True):
                if not diff.changed:
                    continue
                gone = diff.deleted_pks + diff.updated_pks
                for chunk in _chunks(gone):
                    cur.execute(
                        f"DELETE FROM {qi(table.db_table)} WHERE {table.key_in(len(chunk), '%s')}",
                        table.key_params(chunk, pg),
                    )
                    result.rows_deleted += cur.rowcount
                wanted = diff.inserted_pks + diff.updated_pks
                rc = RowConverter(table, targets[table.db_table])
                cols = ", ".join(qi(c) for c in table.column_names)
                copying = (table, [])
                with cur.cursor.copy(f"COPY {qi(table.db_table)} ({cols}) FROM STDIN") as cp:
                    for chunk in _chunks(wanted):
                        where = f"WHERE {table.key_in(len(chunk))}"
                        # as the copy reads them: a TEXT/BLOB of the wrong class is marked
                        params = table.key_params(chunk, lite)
                        rows = [
                            r for b in read_rows(conn, table, where=where, params=params) for r in b
                        ]
                        for raw in rows:
                            try:
                                cp.write_row(rc.convert(raw))
                                copying[1].append(table.key_of(raw))
                                result.rows_written += 1
                            except Exception as exc:  # _RowRejected carries the rows
                                rows_ = getattr(exc, "rows", None)
                                if rows_ is None:
                                    raise
                                rejected.extend(rows_)
                copying = None
                if rejected:
                    raise _SyncRejected()
            for statement in pg.ops.sequence_reset_sql(no_style(), plan.models):
                cur.execute(statement)
    except _SyncRejected:
        failed = CopyResult(tables=[], rejections=rejected, repairs=[], source_sha256=sha)
        failed.rejected_total = len(rejected)
        raise RowsRejected(failed) from None
    except (psycopg.Error, DatabaseError) as exc:
        # a row PostgreSQL refused although every check passed: named by its COPY line
        refused = _refused_row(copying[0], exc, copying[1], conn) if copying else None
        if refused is not None:
            failed = CopyResult(tables=[], rejections=[refused], repairs=[], source_sha256=sha)
            failed.rejected_total = 1
            raise RowsRejected(failed) from exc
        raise TargetError(
            f"PostgreSQL refused the sync: {exc}. Nothing of it was kept; fix the rows in "
            "SQLite and run migrate_data --sync again."
        ) from exc
    finally:
        conn.close()
    with pg.cursor() as cur:
        cur.execute("SELECT schemaname, matviewname FROM pg_matviews WHERE ispopulated")
        for schema, view in cur.fetchall():
            cur.execute(f"REFRESH MATERIALIZED VIEW {qi(schema)}.{qi(view)}")
    marks = _read_marks(state_file)
    done = dict(marks.get("done", {}))
    for table, diff in zip(plan.tables, diffs, strict=True):
        done[table.db_table] = (
            done.get(table.db_table, 0) + len(diff.inserted_pks) - len(diff.deleted_pks)
        )
    _write_marks(state_file, {**marks, "source_sha256": sha, "done": done})
    result.seconds = round(time.perf_counter() - started, 3)
    return result


class _SyncRejected(Exception):
    pass
