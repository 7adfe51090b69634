"""The source scan: every row of every planned table through the converter, without writing.

Used by the prepare dry run (what would be refused, by row) and by the copy's
quarantine, which sets refused rows aside before the load.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable
from pathlib import Path

from django.db import connections, transaction

from dbmigration.casts import (
    TargetColumn,
    target_columns,
)
from dbmigration.errors import SourceError, TargetError
from dbmigration.plan import Plan, PlannedTable, build_plan, qi
from dbmigration.rejections import (
    MAX_REFUSED_RETRIES,
    RejectedRow,
    RejectionSink,
    RowConverter,
    RowRejected,
    cascade_rejections,
    refused_row,
    relational_rejections,
)
from dbmigration.rows import Progress, count_rows, fetch_row, read_rows
from dbmigration.schema_rebuild import (
    SchemaObject,
    postgresql_duplicates,
    schema_snapshot,
    unique_parts,
)
from dbmigration.sqlite_source import open_readonly


@dataclasses.dataclass
class ScanResult:
    rows_scanned: dict[str, int]
    rejections: list[RejectedRow]
    rejected_total: int = 0
    seconds: float = 0.0


def source_tables(conn) -> set[str]:
    rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
    return {r[0].decode() if isinstance(r[0], bytes) else r[0] for r in rows}


def plan_targets(plan: Plan, alias: str | None) -> dict[str, dict[str, TargetColumn]]:
    if alias is None:
        return {}
    with connections[alias].cursor() as cur:
        return {t.db_table: target_columns(cur, t.db_table) for t in plan.tables}


def scan_source(
    *,
    sqlite_path: Path,
    progress: Progress | None = None,
    plan: Plan | None = None,
    target_alias: str | None = "postgresql",
    repairs: Iterable[str] = (),
) -> ScanResult:
    """Convert every source row as the copy would, write nothing, and list every rejection.

    Column limits come from the target's PostgreSQL catalog, as during the copy (enum
    labels included); without a reachable target schema, from Django's fields.
    """
    started = time.perf_counter()
    plan = plan or build_plan()
    try:
        targets = plan_targets(plan, target_alias)
    except Exception:  # noqa: BLE001 no server or no schema yet: Django's fields decide
        targets = {}
    targets = {name: cols for name, cols in targets.items() if cols}
    conn = open_readonly(sqlite_path, raw_text=True)
    try:
        present = source_tables(conn)
        missing = [t.db_table for t in plan.tables if t.db_table not in present]
        if missing:
            raise SourceError(
                f"SQLite database {sqlite_path} has no table(s) {', '.join(missing)}; run "
                "'manage.py migrate --database sqlite' on it (or check SQLITE_PATH)."
            )
        rows: dict[str, int] = {}
        sink = RejectionSink()
        for table in plan.tables:
            rows[table.db_table] = scan_table(
                conn, table, targets.get(table.db_table), frozenset(repairs), sink, progress
            )
        sink.extend(relational_rejections(conn, plan, source_tables=present))
        if target_alias is not None and targets:
            sink.extend(postgresql_judged(conn, plan, target_alias, targets, sink.rows))
    finally:
        conn.close()
    return ScanResult(
        rows_scanned=rows,
        rejections=sink.rows,
        rejected_total=sink.total,
        seconds=round(time.perf_counter() - started, 3),
    )


def scan_table(conn, table, targets, repairs, sink, progress) -> int:
    rc = RowConverter(table, targets, repairs=repairs)
    total = count_rows(conn, table.db_table) if progress else 0
    done = 0
    for batch in read_rows(conn, table):
        for raw in batch:
            try:
                rc.convert(raw)
            except RowRejected as exc:
                sink.extend(exc.rows)
        done += len(batch)
        if progress:
            progress(table.db_table, done, total)
    return done


def quarantine_scan(conn, plan, targets, repairs, relational, sink) -> dict[str, set]:
    """Find every row to set aside (bad values, broken keys, and rows pointing at them)."""
    rejected: list[RejectedRow] = []
    collector = RejectionSink()
    for table in plan.tables:
        scan_table(conn, table, targets[table.db_table], repairs, collector, None)
    rejected = collector.rows + relational
    by_table: dict[str, set] = {}
    for row in rejected:
        by_table.setdefault(row.table, set()).add(row.raw_pk)
    rejected += cascade_rejections(conn, plan, by_table)
    skip: dict[str, set] = {}
    for row in rejected:
        skip.setdefault(row.table, set()).add(row.raw_pk)
        if row.values is None:
            row.values = fetch_row(conn, plan.table(row.table), row.raw_pk)
    sink.extend(rejected)
    return skip


PROBE = "dbmigration_probe"  # a temporary table: the dry run's rows, as PostgreSQL stores them


def postgresql_judged(
    conn, plan: Plan, alias: str, targets: dict, rejected: list[RejectedRow]
) -> list[RejectedRow]:
    """What only PostgreSQL can judge, asked of PostgreSQL without keeping anything: each
    table with generated columns or a functional or partial unique index is loaded into a
    temporary copy of itself (generated expressions included, no index), which names the
    rows whose generated value PostgreSQL cannot compute (``a * b`` in int4) by their COPY
    line, then asked for the duplicate groups under each such index.  Rows already
    rejected are left out."""
    pg = connections[alias]
    found: list[RejectedRow] = []
    with pg.cursor() as cur:
        indexes = _judged_indexes(cur, [t.db_table for t in plan.tables if targets.get(t.db_table)])
    for table in plan.tables:
        judged = indexes.get(table.db_table, [])
        if not targets.get(table.db_table) or not (table.generated or judged):
            continue
        skip = {r.raw_pk for r in rejected if r.table == table.db_table}
        with transaction.atomic(using=alias), pg.cursor() as cur:
            cur.execute(
                f"CREATE TEMPORARY TABLE {qi(PROBE)} (LIKE {qi(table.db_table)} "
                "INCLUDING DEFAULTS INCLUDING GENERATED) ON COMMIT DROP"
            )
            found += _probe_load(cur, conn, table, targets[table.db_table], skip, alias)
            found += postgresql_duplicates(pg, plan, judged, relation=PROBE)
            transaction.set_rollback(True, using=alias)
    return found


def _judged_indexes(cur, tables: list[str]) -> dict[str, list[SchemaObject]]:
    """Unique indexes whose keys SQLite may compare otherwise: on expressions, or partial."""
    found: dict[str, list[SchemaObject]] = {}
    for obj in schema_snapshot(cur, tables):
        parts = unique_parts(obj)
        if parts is not None and obj.kind == "index" and ("(" in parts[0] or parts[1]):
            found.setdefault(obj.table, []).append(obj)
    return found


def _probe_load(cur, conn, table: PlannedTable, targets, skip: set, alias) -> list[RejectedRow]:
    """COPY the table's convertible rows into the probe, batch by batch; a row PostgreSQL
    refuses is named by its line and the batch sent again without it."""
    import psycopg
    from django.db import DatabaseError

    rc = RowConverter(table, targets)
    cols = ", ".join(qi(c) for c in table.column_names)
    found = []
    for batch in read_rows(conn, table):
        rows, keys = [], []
        for raw in batch:
            key = table.key_of(raw)
            if key in skip:
                continue
            try:
                rows.append(rc.convert(raw))
            except RowRejected:
                continue  # already listed by the scan
            keys.append(key)
        for _ in range(MAX_REFUSED_RETRIES):
            try:
                with (
                    transaction.atomic(using=alias),
                    cur.cursor.copy(f"COPY {qi(PROBE)} ({cols}) FROM STDIN") as cp,
                ):
                    for row in rows:
                        cp.write_row(row)
                break
            except (psycopg.Error, DatabaseError) as exc:
                refused = refused_row(table, exc, keys, conn)
                if refused is None:
                    raise TargetError(
                        f"PostgreSQL refused {table.db_table} in the dry run without naming "
                        f"a row: {exc}. Nothing was written."
                    ) from exc
                found.append(refused)
                at = keys.index(refused.raw_pk)
                del rows[at], keys[at]
        else:
            raise TargetError(
                f"PostgreSQL refused more than {MAX_REFUSED_RETRIES} rows of one batch of "
                f"{table.db_table} in the dry run; fix those first."
            )
    return found
