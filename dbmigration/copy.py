"""Stream every planned table from SQLite into PostgreSQL with COPY, exactly or not at all.

Each table is truncated and loaded in its own transaction, so a half table is never kept.
Secondary indexes, unique and foreign-key constraints are dropped before the load and
rebuilt after it (the biggest single win), and the final catalog is compared with the one
Django's migrations made.  Rows PostgreSQL would refuse are found before COPY sees them:
value by value through casts.py, foreign keys and duplicates by query on SQLite.
Done markers live in the state file's ``extra["migrate_data"]``, written only after a
table's transaction committed; an interrupted table is simply redone from clean.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import os
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import wait
from operator import call as _call
from pathlib import Path
from typing import Any

from django.core.management.color import no_style
from django.db import connections, transaction

from dbmigration import fence
from dbmigration import state as state_mod
from dbmigration.casts import (
    REPAIR_RULES,
    Converter,
    Rejection,
    RepairLog,
    TargetColumn,
    build_converter,
    excerpt,
    mark_misfiled,
    misfiled_sql,
    target_columns,
)
from dbmigration.copy_lines import BINARY_HEADER, BINARY_TRAILER, LinePlan, line_plan
from dbmigration.errors import DataError, SourceError, TargetError
from dbmigration.plan import Plan, PlannedTable, build_plan, qi
from dbmigration.preflight import identity_row
from dbmigration.sqlite_source import (
    content_sha256,
    open_readonly,
    schema_sha256,
    snapshot_to,
)

BATCH_ROWS = 5000
MAX_KEPT_REJECTIONS = 100_000  # beyond this only counted, so memory stays bounded
STATE_KEY = "migrate_data"

# progress(table, rows_done, rows_total); raising from it aborts the current table cleanly
Progress = Callable[[str, int, int], None]


@dataclasses.dataclass
class RejectedRow:
    table: str
    pk: Any
    column: str
    code: str
    reason: str
    excerpt: str
    values: dict | None = None  # the full original row (JSON-safe), for the reject file
    raw_pk: Any = dataclasses.field(default=None, repr=False, compare=False)

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in REPORTED}


REPORTED = ("table", "pk", "column", "code", "reason", "excerpt", "values")


@dataclasses.dataclass
class RepairedRow:
    table: str
    pk: Any
    column: str
    rule: str


@dataclasses.dataclass
class ScanResult:
    rows_scanned: dict[str, int]
    rejections: list[RejectedRow]
    rejected_total: int = 0
    seconds: float = 0.0


@dataclasses.dataclass
class TableResult:
    table: str
    label: str
    status: str = "pending"  # copied | already-done | failed | not-copied
    rows_read: int = 0
    rows_written: int = 0
    rows_rejected: int = 0
    rows_repaired: int = 0
    rows_in_python: int = 0  # converted value by value (the others: by the C formatter)
    seconds: float = 0.0

    @property
    def rows_per_second(self) -> float:
        return round(self.rows_read / self.seconds, 1) if self.seconds else 0.0


@dataclasses.dataclass
class CopyResult:
    tables: list[TableResult]
    rejections: list[RejectedRow]
    repairs: list[RepairedRow]
    source_sha256: str
    reject_file: Path | None = None
    rebuilt: list[str] = dataclasses.field(default_factory=list)  # indexes/constraints
    schema_problems: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    rejected_total: int = 0

    @property
    def rows_written(self) -> int:
        return sum(t.rows_written for t in self.tables)

    @property
    def rejected_pks(self) -> dict[str, set]:
        found: dict[str, set] = {}
        for r in self.rejections:
            found.setdefault(r.table, set()).add(r.pk)
        return found


# --- reading the source ------------------------------------------------------------------


def plain(value: Any) -> Any:
    """Return a raw SQLite value in a JSON-safe form that loses nothing."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return {"base64": base64.b64encode(value).decode()}
    if isinstance(value, float) and value != value:
        return {"float": "nan"}
    if isinstance(value, float) and value in (float("inf"), float("-inf")):
        return {"float": str(value)}
    return value


def plain_key(key: Any) -> Any:
    """A raw key in JSON-safe form: one value, or a tuple of them for a composite key."""
    return tuple(map(plain, key)) if type(key) is tuple else plain(key)


def key_text(pk: Any) -> str:
    """A reported key as text, the form verify.py gives a row's key (see verify.key_text)."""
    return "\x1f".join(map(str, pk)) if isinstance(pk, tuple | list) else str(pk)


def read_rows(conn, table: PlannedTable, *, where: str = "", params=()) -> Iterator[list[tuple]]:
    """Yield batches of raw rows (text as bytes, a value of the wrong one of TEXT and BLOB
    as casts.Misfiled) in bounded memory."""
    cols = ", ".join(qi(c) for c in table.column_names)
    misfiled = misfiled_sql(table.columns, qi)
    if misfiled is not None:
        cols += f", {misfiled}"
    cur = conn.execute(f"SELECT {cols} FROM {qi(table.db_table)} {where}", params)
    while batch := cur.fetchmany(BATCH_ROWS):
        yield batch if misfiled is None else list(map(mark_misfiled, batch))


def count_rows(conn, db_table: str) -> int:
    return conn.execute(f"SELECT count(*) FROM {qi(db_table)}").fetchone()[0]


def _row_dict(table: PlannedTable, raw: tuple) -> dict:
    return {name: plain(v) for name, v in zip(table.column_names, raw, strict=True)}


class RowConverter:
    """Convert one table's raw rows; collect rejections and repairs per row."""

    def __init__(
        self,
        table: PlannedTable,
        targets: dict[str, TargetColumn] | None,
        *,
        repairs: frozenset[str] = frozenset(),
        fast: bool = True,
    ):
        self.table = table
        self.log = RepairLog(rules=repairs)
        self.converters: list[Converter] = [
            build_converter(
                c, (targets or {}).get(c.name), fast=fast, repairs=self.log if repairs else None
            )
            for c in table.columns
        ]

    def convert(self, raw: tuple) -> list | list[RejectedRow]:
        """Return the converted row, or raise _RowRejected listing every bad column."""
        try:
            if self.log.applied:
                self.log.applied.clear()
            return list(map(_call, self.converters, raw))
        except Rejection:
            pass
        bad = []
        for column, conv, value in zip(self.table.columns, self.converters, raw, strict=True):
            try:
                conv(value)
            except Rejection as exc:
                bad.append(
                    RejectedRow(
                        table=self.table.db_table,
                        pk=plain_key(self.table.key_of(raw)),
                        raw_pk=self.table.key_of(raw),
                        column=column.name,
                        code=exc.code,
                        reason=exc.reason,
                        excerpt=excerpt(value),
                        values=_row_dict(self.table, raw),
                    )
                )
        self.log.applied.clear()
        raise _RowRejected(bad)


class _RowRejected(Exception):
    def __init__(self, rows: list[RejectedRow]):
        super().__init__(rows[0].reason)
        self.rows = rows


# --- relational checks on SQLite ---------------------------------------------------------


def relational_rejections(
    conn, plan: Plan, *, source_tables: set[str], checks: bool = True
) -> list[RejectedRow]:
    """Find foreign keys to missing rows, duplicates of unique keys and (``checks``) CHECK
    violations by query on SQLite."""
    found: list[RejectedRow] = []
    for table in plan.tables:
        pk = _key_columns(table, "c.")
        for fk in table.foreign_keys:
            if fk.to_table not in source_tables:
                continue
            rows = conn.execute(
                f"SELECT {pk}, c.{qi(fk.column)} FROM {qi(table.db_table)} c "
                f"WHERE c.{qi(fk.column)} IS NOT NULL AND NOT EXISTS (SELECT 1 FROM "
                f"{qi(fk.to_table)} p WHERE p.{qi(fk.to_column)} = c.{qi(fk.column)})"
            ).fetchall()
            if rows and _holds_uuids(table, fk.column):
                # PostgreSQL's uuid equates what SQLite's text keeps apart (letter case)
                there = {
                    uuid_as_postgresql(v)
                    for (v,) in conn.execute(f"SELECT {qi(fk.to_column)} FROM {qi(fk.to_table)}")
                }
                rows = [row for row in rows if uuid_as_postgresql(row[-1]) not in there]
            reason = f"points to a missing {fk.to_table}.{fk.to_column}"
            found.extend(
                _fk_rejection(table, fk, key, value, reason)
                for key, (value,) in _split_keys(table, rows)
            )
        if checks:
            found.extend(check_rejections(conn, table))
        for columns in _unique_sets_as_postgresql_compares(table):
            # as PostgreSQL compares them: a UUID's letter case makes no difference there
            cols = ", ".join(_compared(table, c, "c.") for c in columns)
            present = " AND ".join(f"{qi(c)} IS NOT NULL" for c in columns)
            groups = ", ".join(_compared(table, c) for c in columns)
            rows = conn.execute(
                f"SELECT {pk}, {cols} FROM {qi(table.db_table)} c WHERE ({cols}) IN "
                f"(SELECT {groups} FROM {qi(table.db_table)} WHERE {present} GROUP BY {groups} "
                f"HAVING count(*) > 1) ORDER BY {cols}, {pk}"
            ).fetchall()
            first: dict[tuple, Any] = {}
            for pk_value, key in _split_keys(table, rows):
                key = tuple(key)
                if key not in first:
                    first[key] = pk_value  # the oldest row keeps the key
                    continue
                found.append(
                    RejectedRow(
                        table=table.db_table,
                        pk=plain_key(pk_value),
                        raw_pk=pk_value,
                        column=",".join(columns),
                        code="unique",
                        reason=(
                            f"duplicate of pk {plain_key(first[key])!r} on unique "
                            f"({', '.join(columns)})"
                        ),
                        excerpt=excerpt(key if len(key) > 1 else key[0]),
                    )
                )
    return found


def _key_columns(table: PlannedTable, prefix: str = "") -> str:
    """The key's columns for a SELECT list (a row's key comes first, see _split_keys)."""
    return ", ".join(prefix + qi(c) for c in table.pk_columns)


def _split_keys(table: PlannedTable, rows) -> Iterator[tuple[Any, tuple]]:
    """(key, the other values) of rows selected with _key_columns first."""
    width = len(table.pk_columns)
    for row in rows:
        yield tuple(row[:width]) if width > 1 else row[0], tuple(row[width:])


def _holds_uuids(table: PlannedTable, column: str) -> bool:
    return any(c.name == column and c.internal_type == "UUIDField" for c in table.columns)


def uuid_as_postgresql(value: Any) -> Any:
    """A stored UUID as PostgreSQL's uuid compares it (letter case and hyphens make no
    difference there); anything that is not a UUID stays as it is."""
    try:
        return uuid.UUID(_param(value)).hex
    except (AttributeError, TypeError, ValueError):
        return value


def _compared(table: PlannedTable, column: str, prefix: str = "") -> str:
    """A column as PostgreSQL compares its values, in SQLite's SQL."""
    kinds = {c.name: c.internal_type for c in table.columns}
    if kinds.get(column) == "UUIDField":
        return f"lower({prefix}{qi(column)})"
    return prefix + qi(column)


def _unique_sets_as_postgresql_compares(table: PlannedTable) -> list[tuple[str, ...]]:
    """The unique column sets, plus the key when SQLite keeps apart what PostgreSQL
    equates (UUIDs differing only in letter case)."""
    kinds = {c.name: c.internal_type for c in table.columns}
    sets = list(table.unique_sets)
    if any(kinds.get(c) == "UUIDField" for c in table.pk_columns):
        sets.insert(0, table.pk_columns)
    return sets


def _fk_rejection(table: PlannedTable, fk, raw_pk: Any, value: Any, reason: str) -> RejectedRow:
    return RejectedRow(
        table=table.db_table,
        pk=plain_key(raw_pk),
        raw_pk=raw_pk,
        column=fk.column,
        code="fk",
        reason=reason,
        excerpt=excerpt(value),
    )


def check_rejections(conn, table: PlannedTable) -> list[RejectedRow]:
    """Rows PostgreSQL refuses by a rule of the table rather than a value: breaking a
    model's CheckConstraint (old SQLite tables may predate it), or with a generated value
    PostgreSQL's column cannot hold (SQLite computed ``a + b`` in 64 bits).

    Django compiles each condition for SQLite; a CHECK fails only when it is false, so
    rows where it is NULL pass, as in PostgreSQL.
    """
    import re

    from django.db.models import CheckConstraint
    from django.db.models.sql import Query

    lite = connections["sqlite"]
    found = generated_rejections(conn, table)
    for constraint in table.model._meta.constraints:
        if not isinstance(constraint, CheckConstraint):
            continue
        condition = getattr(constraint, "condition", None) or getattr(constraint, "check", None)
        query = Query(model=table.model, alias_cols=False)
        where = query.build_where(condition)
        sql, params = where.as_sql(query.get_compiler(connection=lite), lite)
        sql = re.sub(r"(?<!%)%s", "?", sql).replace("%%", "%")
        rows = conn.execute(
            f"SELECT {_key_columns(table)} FROM {qi(table.db_table)} WHERE NOT ({sql})", params
        ).fetchall()
        for pk_value, _ in _split_keys(table, rows):
            found.append(
                RejectedRow(
                    table=table.db_table,
                    pk=plain_key(pk_value),
                    raw_pk=pk_value,
                    column=constraint.name,
                    code="check",
                    reason=f"breaks CHECK {constraint.name} ({sql} with {params!r})"[:300],
                    excerpt=excerpt(plain_key(pk_value)),
                )
            )
    return found


def generated_rejections(conn, table: PlannedTable) -> list[RejectedRow]:
    """Rows whose stored generated value (as SQLite computed it) PostgreSQL's column cannot
    hold: PostgreSQL computes the same expression on COPY and would stop the whole table."""
    if not table.generated:
        return []
    converters = [build_converter(c) for c in table.generated]
    cols = ", ".join(qi(c.name) for c in table.generated)
    found = []
    rows = conn.execute(f"SELECT {_key_columns(table)}, {cols} FROM {qi(table.db_table)}")
    for key, values in _split_keys(table, rows):
        for column, convert, value in zip(table.generated, converters, values, strict=True):
            try:
                convert(value)
            except Rejection as exc:
                found.append(
                    RejectedRow(
                        table=table.db_table,
                        pk=plain_key(key),
                        raw_pk=key,
                        column=column.name,
                        code=exc.code,
                        reason=(
                            f"generated {column.name} = {column.field.expression!r}: "
                            f"{exc.reason} (PostgreSQL computes it on COPY)"
                        ),
                        excerpt=excerpt(value),
                    )
                )
    return found


def cascade_rejections(conn, plan: Plan, rejected: dict[str, set]) -> list[RejectedRow]:
    """Reject rows pointing at rejected rows, until nothing more falls (quarantine mode).

    ``rejected`` maps a table to the raw (as stored) primary keys already rejected.
    """
    added: list[RejectedRow] = []
    gone = {name: set(pks) for name, pks in rejected.items()}
    planned = {t.db_table for t in plan.tables}
    changed = True
    while changed:
        changed = False
        for table in plan.tables:
            for fk in table.foreign_keys:
                if not gone.get(fk.to_table) or fk.to_table not in planned:
                    continue
                target = plan.table(fk.to_table)
                values = _column_values(conn, target, fk.to_column, gone[fk.to_table])
                mine = gone.setdefault(table.db_table, set())
                column = qi(fk.column)
                if _holds_uuids(table, fk.column):
                    # every row pointing at that UUID as PostgreSQL reads it, whatever its
                    # letter case: on SQLite the ORM and a join could each mean another row
                    conn.create_function("dbm_uuid", 1, uuid_as_postgresql, deterministic=True)
                    values = {uuid_as_postgresql(v) for v in values}
                    column = f"dbm_uuid({column})"
                for chunk in _chunks([_param(v) for v in values], 500):
                    marks = ", ".join("?" * len(chunk))
                    rows = conn.execute(
                        f"SELECT {_key_columns(table)}, {qi(fk.column)} FROM "
                        f"{qi(table.db_table)} WHERE {column} IN ({marks})",
                        chunk,
                    ).fetchall()
                    for pk_value, (value,) in _split_keys(table, rows):
                        if pk_value in mine:
                            continue
                        mine.add(pk_value)
                        changed = True
                        reason = f"points to a rejected {fk.to_table} row"
                        added.append(_fk_rejection(table, fk, pk_value, value, reason))
    return added


def _param(value: Any) -> Any:
    # text comes back as bytes (raw_text); bound as bytes it would be a BLOB and match nothing
    if type(value) is tuple:
        return tuple(map(_param, value))
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return value
    return value


def _column_values(conn, table: PlannedTable, column: str, pks: set) -> set:
    if (column,) == table.pk_columns:
        return set(pks)
    values = set()
    for chunk in _chunks([_param(p) for p in pks], 500):
        values.update(
            v
            for (v,) in conn.execute(
                f"SELECT {qi(column)} FROM {qi(table.db_table)} WHERE {table.key_in(len(chunk))}",
                table.key_params(chunk),
            )
        )
    return values


def fetch_row(conn, table: PlannedTable, raw_pk: Any) -> dict | None:
    """Return one source row's original values (JSON-safe) by primary key."""
    cols = ", ".join(qi(c) for c in table.column_names)
    raw = conn.execute(
        f"SELECT {cols} FROM {qi(table.db_table)} WHERE {table.key_in(1)}",
        table.key_params([_param(raw_pk)]),
    ).fetchone()
    return _row_dict(table, raw) if raw is not None else None


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# --- the dry run ---------------------------------------------------------------------------


def _source_tables(conn) -> set[str]:
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
        present = _source_tables(conn)
        missing = [t.db_table for t in plan.tables if t.db_table not in present]
        if missing:
            raise SourceError(
                f"SQLite database {sqlite_path} has no table(s) {', '.join(missing)}; run "
                "'manage.py migrate --database sqlite' on it (or check SQLITE_PATH)."
            )
        rows: dict[str, int] = {}
        sink = _RejectionSink()
        for table in plan.tables:
            rows[table.db_table] = _scan_table(
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


class _RejectionSink:
    """Keep rejections (bounded) and optionally stream them to a JSON Lines file."""

    def __init__(self, path: Path | None = None):
        self.rows: list[RejectedRow] = []
        self.total = 0
        self.path = path
        self._fh = None
        self._lock = threading.Lock()  # tables load on two threads

    def extend(self, rows: Iterable[RejectedRow]) -> None:
        with self._lock:
            self._extend(rows)

    def _extend(self, rows: Iterable[RejectedRow]) -> None:
        for row in rows:
            self.total += 1
            if self.path is not None:
                if self._fh is None:  # opened on the first rejection: no empty files
                    self.path.parent.mkdir(parents=True, exist_ok=True)
                    self._fh = open(self.path, "w", encoding="utf-8")  # noqa: SIM115
                self._fh.write(json.dumps(row.as_dict(), default=str) + "\n")
            if len(self.rows) < MAX_KEPT_REJECTIONS:
                self.rows.append(row)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def _scan_table(conn, table, targets, repairs, sink, progress) -> int:
    rc = RowConverter(table, targets, repairs=repairs)
    total = count_rows(conn, table.db_table) if progress else 0
    done = 0
    for batch in read_rows(conn, table):
        for raw in batch:
            try:
                rc.convert(raw)
            except _RowRejected as exc:
                sink.extend(exc.rows)
        done += len(batch)
        if progress:
            progress(table.db_table, done, total)
    return done


# --- schema: what to drop before the load and rebuild after ------------------------------

INDEXES_SQL = """
SELECT c.relname, i.relname, pg_get_indexdef(ix.indexrelid),
       EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conindid = ix.indexrelid
                                              AND k.conrelid = c.oid)
  FROM pg_index ix
  JOIN pg_class i ON i.oid = ix.indexrelid
  JOIN pg_class c ON c.oid = ix.indrelid
 WHERE c.relname = ANY(%s) AND pg_table_is_visible(c.oid)
"""
# the tables' own constraints, and the foreign keys of any other table that point at them
# (a table the plan leaves out still holds a key that blocks dropping their primary key)
CONSTRAINTS_SQL = """
SELECT c.relname, k.conname, k.contype::text, pg_get_constraintdef(k.oid)
  FROM pg_constraint k JOIN pg_class c ON c.oid = k.conrelid
 WHERE pg_table_is_visible(c.oid)
   AND (c.relname = ANY(%s)
        OR k.confrelid IN (SELECT oid FROM pg_class p
                            WHERE p.relname = ANY(%s) AND pg_table_is_visible(p.oid)))
"""


@dataclasses.dataclass(frozen=True, eq=False)
class SchemaObject:
    """An index or constraint, as the catalog prints it (pg_get_indexdef/constraintdef).

    Two objects are the same when they have the same table, kind and name: PostgreSQL does
    not always print a re-created definition as it printed the original (``IN (...)`` in a
    partial index predicate comes back as ``ANY (ARRAY[...])`` with other casts), so a text
    comparison would call a rebuilt index missing and try to create it again.
    """

    table: str
    kind: str  # index | constraint-p | constraint-u | constraint-f | constraint-c ...
    name: str
    definition: str

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.table, self.kind, self.name)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SchemaObject) and self.key == other.key

    def __hash__(self) -> int:
        return hash(self.key)

    @property
    def create_sql(self) -> str:
        if self.kind == "index":
            return self.definition
        return f"ALTER TABLE {qi(self.table)} ADD CONSTRAINT {qi(self.name)} {self.definition}"

    @property
    def drop_sql(self) -> str:
        if self.kind == "index":
            return f"DROP INDEX IF EXISTS {qi(self.name)}"
        return f"ALTER TABLE {qi(self.table)} DROP CONSTRAINT IF EXISTS {qi(self.name)}"


def schema_snapshot(cursor, tables: Iterable[str]) -> set[SchemaObject]:
    """Return every index and constraint on the tables, as PostgreSQL's catalog prints them."""
    names = list(tables)
    found = set()
    cursor.execute(INDEXES_SQL, [names])
    for table, name, definition, _backs in cursor.fetchall():
        found.add(SchemaObject(table, "index", name, definition))
    cursor.execute(CONSTRAINTS_SQL, [names, names])
    for table, name, contype, definition in cursor.fetchall():
        found.add(SchemaObject(table, f"constraint-{contype}", name, definition))
    return found


def droppable(snapshot: set[SchemaObject], *, loaded: set[str]) -> list[SchemaObject]:
    """Pick what slows a bulk load: FKs everywhere; primary keys, unique constraints and
    plain indexes on loaded tables (a sorted build after the load is cheaper than keeping
    them up to date row by row).  CHECK constraints and NOT NULL stay."""
    backing = {
        o.name for o in snapshot if o.kind in ("constraint-p", "constraint-u", "constraint-x")
    }
    picked = [
        obj
        for obj in snapshot
        if obj.kind == "constraint-f"
        or (obj.table in loaded and obj.kind in ("constraint-p", "constraint-u"))
        or (obj.table in loaded and obj.kind == "index" and obj.name not in backing)
    ]
    return sorted(picked, key=lambda o: (o.kind, o.table, o.name))


def _rebuild_order(obj: SchemaObject) -> int:
    # keys first: a foreign key points at one
    return {"constraint-f": 1}.get(obj.kind, 0)


def rebuild(alias: str, objects: list[SchemaObject], *, workers: int = 2) -> None:
    """Create indexes and constraints again, two at a time (index builds are CPU-bound).

    Every object is tried; the first failure is raised at the end, so one bad key does
    not leave unrelated indexes missing.
    """
    builder = Rebuilder(alias, workers=workers)
    builder.submit(objects, stage=0)
    builder.submit(objects, stage=1)
    builder.finish()
    if builder.errors:
        raise builder.errors[0]


class Rebuilder:
    """Create indexes and constraints on background connections (one per worker).

    The copy feeds it each loaded table's own keys and indexes while the next tables load,
    then the foreign keys; what fails is kept in ``errors`` and stays missing, for
    _restore to try again and report.
    """

    def __init__(self, alias: str, *, workers: int = 2):
        from concurrent.futures import ThreadPoolExecutor

        self.params = connections[alias].get_connection_params()
        self.pool = ThreadPoolExecutor(max_workers=workers)
        self.local = threading.local()
        self.opened: list = []
        self.futures: list = []
        self.errors: list[Exception] = []
        self.stopped = False

    def submit(self, objects: list[SchemaObject], *, stage: int = 0) -> None:
        """Queue the objects of one rebuild stage; a later stage waits for what is queued
        before it (a foreign key needs the key it points at)."""
        earlier = list(self.futures) if stage else []
        for obj in objects:
            if _rebuild_order(obj) == stage:
                self.futures.append(self.pool.submit(self._build, obj, earlier))

    def _build(self, obj: SchemaObject, earlier: list) -> None:
        import psycopg

        wait(earlier)  # started already (the queue is first in, first out): no deadlock
        if self.stopped:
            return
        try:
            if getattr(self.local, "conn", None) is None:
                self.local.conn = psycopg.connect(**self.params, autocommit=True)
                self.opened.append(self.local.conn)
            self.local.conn.execute(obj.create_sql)
        except psycopg.Error as exc:
            self.errors.append(exc)

    def finish(self, *, abandon: bool = False) -> None:
        """Wait for the builds (abandon: only for the statements running now)."""
        self.stopped = abandon
        self.pool.shutdown(wait=True, cancel_futures=abandon)
        for conn in self.opened:
            conn.close()


# --- done markers in the state file -------------------------------------------------------


def target_identity(cursor) -> str:
    """The target database's identity: the cluster's system identifier and the database's
    oid.  A recreated database or another server gets another one."""
    system, oid = identity_row(cursor)
    return f"{system}/{oid}"


def _read_marks(state_file: Path | None, *, target: str | None = None) -> dict:
    """The copy's marks; with ``target``, only if they were made on that target database
    (done tables and saved index definitions mean nothing for another one)."""
    if state_file is None:
        return {}
    marks = dict(state_mod.read_state(state_file).extra.get(STATE_KEY, {}))
    if target is not None and marks.get("target") != target:
        return {}
    return marks


def _write_marks(state_file: Path | None, marks: dict) -> None:
    if state_file is None:
        return
    state = state_mod.read_state(state_file)
    state.extra[STATE_KEY] = marks
    state_mod.write_state(state_file, state)


def done_tables(
    state_file: Path | None, *, source_sha256: str, target: str | None = None
) -> dict[str, int]:
    """Return {table: rows} copied from this exact source file (other sources don't count),
    into the ``target`` database when given."""
    marks = _read_marks(state_file, target=target)
    if marks.get("source_sha256") != source_sha256:
        return {}
    return dict(marks.get("done", {}))


# --- the copy -------------------------------------------------------------------------------


def copy_data(
    *,
    sqlite_path: Path,
    alias: str = "postgresql",
    tables: Iterable[str] | None = None,
    quarantine: bool = False,
    repairs: Iterable[str] = (),
    reject_file: Path | None = None,
    state_file: Path | None = None,
    progress: Progress | None = None,
    source_sha256: str | None = None,
) -> CopyResult:
    """Copy the planned tables; raise DataError (nothing of a bad table kept) on rejections.

    ``source_sha256``: the file's hash when the caller has just computed it.
    """
    started = time.perf_counter()
    repairs = frozenset(repairs)
    unknown = repairs - set(REPAIR_RULES)
    if unknown:
        raise DataError(
            f"Unknown repair rule(s) {', '.join(sorted(unknown))}; known: "
            + ", ".join(f"{k} ({v})" for k, v in REPAIR_RULES.items())
        )
    plan = build_plan(only=tables)
    sha = source_sha256 or content_sha256(sqlite_path)
    with connections[alias].cursor() as cur:
        target = target_identity(cur)
    marks = _read_marks(state_file, target=target)
    done = done_tables(state_file, source_sha256=sha, target=target)
    marks = {
        "target": target,
        "source_sha256": sha,
        "done": done,
        "pending_ddl": marks.get("pending_ddl", []),
        "schema_before": marks.get("schema_before", []),
    }
    todo = [t for t in plan.tables if t.db_table not in done]
    results = {
        t.db_table: TableResult(
            table=t.db_table,
            label=t.label,
            status="already-done" if t.db_table in done else "pending",
            rows_written=done.get(t.db_table, 0),
        )
        for t in plan.tables
    }
    result = CopyResult(tables=list(results.values()), rejections=[], repairs=[], source_sha256=sha)
    targets = plan_targets(plan, alias)
    missing = [t.db_table for t in plan.tables if not targets[t.db_table]]
    if missing:
        raise TargetError(
            f"PostgreSQL has no table(s) {', '.join(missing)}; run 'manage.py migrate "
            f"--database {alias}' (migration_prepare does it) first."
        )
    # every offending row goes to the file too: the report keeps only the first thousand
    sink = _RejectionSink(reject_file)
    conn = open_readonly(sqlite_path, raw_text=True)
    try:
        present = _source_tables(conn)
        absent = [t.db_table for t in plan.tables if t.db_table not in present]
        if absent:
            raise SourceError(f"SQLite database {sqlite_path} has no table(s) {', '.join(absent)}.")
        run = _Run(conn, connections[alias], plan, targets, repairs, sink, results, result, marks)
        run.state_file, run.progress, run.sqlite_path = state_file, progress, sqlite_path
        run.quarantine = quarantine
        todo_plan = Plan(tables=todo, deferred_fks=[])
        find_broken: Callable[[], list[RejectedRow]] | None = None
        if todo and quarantine:
            found = relational_rejections(conn, todo_plan, source_tables=present)
            run.skip = _quarantine_scan(conn, todo_plan, targets, repairs, found, sink)
        elif todo:
            # CHECK constraints stay during the load (rebuilt from the catalog's text they
            # would not always print the same), so their rows must be known first
            if any(check_rejections(conn, table) for table in todo):
                sink.extend(relational_rejections(conn, todo_plan, source_tables=present))
                for table in todo:
                    _scan_table(conn, table, targets[table.db_table], repairs, sink, progress)
                    results[table.db_table].status = "not-copied"
                _fail(result, sink)

            # broken keys and duplicates make a foreign key or unique key fail to build
            # after the load; only then are their rows looked up on SQLite, to be listed
            def find_broken() -> list[RejectedRow]:
                return relational_rejections(conn, todo_plan, source_tables=present, checks=False)

        if todo or marks["pending_ddl"]:
            _load(run, todo, find_broken)
        _count_rejected(result, sink)
    finally:
        conn.close()
        sink.close()
    result.reject_file = reject_file if sink.total else None
    result.seconds = round(time.perf_counter() - started, 3)
    return result


@dataclasses.dataclass
class _Run:
    """What the steps of one copy_data run share."""

    conn: Any  # the SQLite source, read-only, text as bytes
    pg: Any  # the target's Django connection
    plan: Plan
    targets: dict[str, dict[str, TargetColumn]]
    repairs: frozenset[str]
    sink: _RejectionSink
    results: dict[str, TableResult]
    result: CopyResult
    marks: dict  # done markers and pending DDL, mirrored in the state file
    skip: dict[str, set] = dataclasses.field(default_factory=dict)  # quarantined raw pks
    quarantine: bool = False
    refused: list[RejectedRow] = dataclasses.field(default_factory=list)  # by COPY, set aside
    state_file: Path | None = None
    progress: Progress | None = None
    sqlite_path: Path | None = None
    sizes: dict[str, int] = dataclasses.field(default_factory=dict)  # rows per table to load
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)  # state file
    abort: threading.Event = dataclasses.field(default_factory=threading.Event)

    def save_marks(self) -> None:
        with self.lock:
            _write_marks(self.state_file, self.marks)


def _count_rejected(result: CopyResult, sink: _RejectionSink) -> None:
    result.rejections, result.rejected_total = sink.rows, sink.total
    per_table: dict[str, set] = {}
    for row in sink.rows:
        per_table.setdefault(row.table, set()).add(repr(row.pk))
    for table in result.tables:
        table.rows_rejected = len(per_table.get(table.table, ()))


def _fail(result: CopyResult, sink: _RejectionSink) -> None:
    _count_rejected(result, sink)
    result.reject_file = sink.path if sink.total else None
    raise RowsRejected(result)


class RowsRejected(DataError):
    """Rows PostgreSQL would refuse or change; result.rejections lists each one."""

    def __init__(self, result: CopyResult):
        self.result = result
        first = result.rejections[:5]
        lines = "\n".join(
            f"  {r.table} pk={r.pk!r} column {r.column}: {r.reason} ({r.excerpt})" for r in first
        )
        more = result.rejected_total - len(first)
        super().__init__(
            f"{result.rejected_total} source row(s) cannot be copied exactly; nothing of their "
            f"tables was kept and the phase did not advance:\n{lines}"
            + (f"\n  ... and {more} more" if more > 0 else "")
            + (f"\nEvery row is listed in {result.reject_file}." if result.reject_file else "")
            + "\nFix them in SQLite, or run again with --quarantine (set them aside in a "
            "reject file) or --repair RULE (e.g. strip-nul)."
        )


def _quarantine_scan(conn, plan, targets, repairs, relational, sink) -> dict[str, set]:
    """Find every row to set aside (bad values, broken keys, and rows pointing at them)."""
    rejected: list[RejectedRow] = []
    collector = _RejectionSink()
    for table in plan.tables:
        _scan_table(conn, table, targets[table.db_table], repairs, collector, None)
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


def _load(
    run: _Run, todo: list[PlannedTable], find_broken: Callable[[], list[RejectedRow]] | None
) -> None:
    """Drop what slows the load, copy each table in its own transaction, rebuild, check."""
    pg, marks = run.pg, run.marks
    pending = {SchemaObject(**o) for o in marks["pending_ddl"]}
    # objects an interrupted run dropped are rebuilt now, even on tables outside --tables
    # all copied tables, not just --tables: a foreign key from any of them blocks TRUNCATE
    names = sorted({t.db_table for t in build_plan().tables} | {p.table for p in pending})
    with pg.cursor() as cur:
        current = schema_snapshot(cur, names)
    # after an interruption the catalog lacks what we dropped: trust what we saved then
    saved = {SchemaObject(**o) for o in marks.get("schema_before", [])}
    before = saved if pending and saved else current
    drop = set(pending)
    if todo:
        drop |= set(droppable(before, loaded={t.db_table for t in todo}))
    drop = sorted(drop, key=lambda o: (o.kind, o.table, o.name))
    # remember before dropping: an interrupted run must still rebuild them
    marks["pending_ddl"] = [dataclasses.asdict(o) for o in drop]
    marks["schema_before"] = [dataclasses.asdict(o) for o in sorted(before, key=str)]
    run.save_marks()
    with pg.cursor() as cur:
        for obj in drop:
            if obj in current:
                cur.execute(obj.drop_sql)
    sizes = run.sizes = {t.db_table: count_rows(run.conn, t.db_table) for t in todo}
    if run.progress:  # announce every table first, so an overall bar knows its total
        for table in todo:
            run.progress(table.db_table, 0, sizes[table.db_table])
    early = Rebuilder(pg.alias)
    try:
        # biggest first, so the two lanes end close together
        failed = _load_in_lanes(run, sorted(todo, key=lambda t: -sizes[t.db_table]), early, drop)
        run.save_marks()
        if run.refused and not failed:
            _set_aside(run, run.refused)  # and the rows pointing at them: keys build next
        if not failed:  # every table is in: foreign keys can build too, and the data-only
            early.submit(drop, stage=1)  # steps run meanwhile
            _reset_and_refresh(pg, run.plan)
    except BaseException:
        run.save_marks()  # whatever finished counts, whatever stopped us
        early.finish(abandon=True)
        raise
    early.finish()
    broken: list[RejectedRow] = []
    if not failed:
        try:
            _restore(pg, marks, run.state_file, drop, run.plan, refreshed=True)
        except TargetError:
            # a key did not build: rows with broken keys or duplicates, listed from SQLite
            broken = find_broken() if find_broken is not None else []
            if not broken:
                # or duplicates only PostgreSQL sees (a functional unique index): ask it
                broken = postgresql_duplicates(pg, run.plan, _still_missing(pg, drop))
            if not broken:
                raise
            if run.quarantine:  # set them aside with the rows pointing at them, build again
                _set_aside(run, broken)
                broken = []
                _restore(pg, marks, run.state_file, drop, run.plan, refreshed=True)
    elif find_broken is not None:
        broken = find_broken()  # a run with bad values reports broken keys as well
    if broken:
        # nothing of a table with broken keys is kept, as with a bad value
        run.sink.extend(broken)
        failed = True
        tables = sorted({row.table for row in broken})
        with pg.cursor() as cur:
            cur.execute(f"TRUNCATE {', '.join(qi(t) for t in tables)}")
        for name in tables:
            run.results[name].status = "failed"
    if failed:
        # a run that found bad rows marks nothing done: the tables copied before the bad
        # one stay in PostgreSQL but are redone by the next run, like everything else
        for table in todo:
            marks["done"].pop(table.db_table, None)
            if run.results[table.db_table].status == "copied":
                run.results[table.db_table].status = "copied-not-kept"
        _restore(pg, marks, run.state_file, drop, run.plan, best_effort=True)
        _fail(run.result, run.sink)
    with pg.cursor() as cur:
        after = schema_snapshot(cur, names)
    run.result.rebuilt = [f"{o.table}.{o.name}" for o in drop]
    run.result.schema_problems = sorted(
        [f"missing after the load: {o.table} {o.kind} {o.name}" for o in before - after]
        + [f"not made by migrations: {o.table} {o.kind} {o.name}" for o in after - before]
    )
    if run.result.schema_problems:
        raise TargetError(
            "The schema after the load differs from the one Django's migrations made:\n  "
            + "\n  ".join(run.result.schema_problems)
        )


def _still_missing(pg, drop: list[SchemaObject]) -> list[SchemaObject]:
    with pg.cursor() as cur:
        present = schema_snapshot(cur, {o.table for o in drop})
    return [o for o in drop if o not in present]


def unique_parts(obj: SchemaObject) -> tuple[str, str | None, bool] | None:
    """(key expressions, predicate, NULLs distinct) of a unique index or key, read from
    PostgreSQL's own definition; None for anything else."""
    text = obj.definition
    if obj.kind == "index":
        if not text.startswith("CREATE UNIQUE INDEX"):
            return None
        start = text.index("(", text.index(" USING "))
    elif obj.kind in ("constraint-u", "constraint-p"):
        start = text.index("(")
    else:
        return None
    depth = 0
    for end in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[end], 0)
        if depth == 0:
            break
    rest = text[end + 1 :]
    predicate = rest.split(" WHERE ", 1)[1] if " WHERE " in rest else None
    distinct = "NULLS NOT DISTINCT" not in text
    return text[start + 1 : end], predicate, distinct


def postgresql_duplicates(
    pg, plan: Plan, failed: list[SchemaObject], *, relation: str | None = None, newcomers=None
) -> list[RejectedRow]:
    """Rows that keep a unique index or key from building, found by asking PostgreSQL for
    the duplicate groups under the index's own expressions and predicate (``Lower(kind)``
    makes 'Ä' and 'ä' equal there, not in SQLite).  The first row of a group keeps it.

    ``relation``: read the rows from this table (the dry run's probe) instead of the
    index's own.  ``newcomers``: {table: Django keys} of rows a sync brings; they lose
    to a row already there, whatever the order of their keys.
    """
    planned = {t.db_table: t for t in plan.tables}
    found = []
    for obj in failed:
        parts = unique_parts(obj)
        if parts is None or obj.table not in planned:
            continue
        exprs, predicate, distinct = parts
        table = planned[obj.table]
        keys = _key_columns(table)
        where = [f"({predicate})"] if predicate else []
        if distinct:
            where.append(f"ROW({exprs}) IS NOT NULL")
        order, params = keys, []
        new = list((newcomers or {}).get(obj.table, ()))
        if new:
            order = f"CASE WHEN {table.key_in(len(new), '%s')} THEN 1 ELSE 0 END, {keys}"
            params = table.key_params(new, pg)
        with pg.cursor() as cur:
            cur.execute(
                f"SELECT {keys}, duplicate, number FROM (SELECT {keys}, "
                f"ROW({exprs})::text AS duplicate, count(*) OVER same AS copies, "
                f"row_number() OVER (same ORDER BY {order}) AS number "
                f"FROM {qi(relation or table.db_table)} "
                f"{'WHERE ' + ' AND '.join(where) if where else ''} "
                f"WINDOW same AS (PARTITION BY {exprs})) grouped "
                f"WHERE copies > 1 ORDER BY duplicate, number",
                params,
            )
            rows = cur.fetchall()
        lite = connections["sqlite"]
        keeper = None
        for key, (duplicate, number) in _split_keys(table, rows):
            # as SQLite stores the key, to find the row (and rows pointing at it) there
            raw = table.key_params([table.python_key(key, pg)], lite)
            raw = tuple(raw) if table.composite else raw[0]
            if number == 1:
                keeper = key
                continue
            found.append(
                RejectedRow(
                    table=table.db_table,
                    pk=plain_key(raw),
                    raw_pk=raw,
                    column=obj.name,
                    code="unique",
                    reason=(
                        f"duplicate of pk {plain_key(keeper)!r} under unique {obj.name} "
                        f"({exprs}{' WHERE ' + predicate if predicate else ''}) as "
                        "PostgreSQL compares it"
                    ),
                    excerpt=excerpt(duplicate),
                )
            )
    return found


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
            except _RowRejected:
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
                refused = _refused_row(table, exc, keys, conn)
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


def _set_aside(run: _Run, rows: list[RejectedRow]) -> None:
    """Quarantine rows already loaded, with the rows pointing at them: delete them from
    PostgreSQL, list them in the reject file."""
    by_table: dict[str, set] = {}
    for row in rows:
        by_table.setdefault(row.table, set()).add(row.raw_pk)
    rows = rows + cascade_rejections(run.conn, run.plan, by_table)
    gone: dict[str, list] = {}
    for row in rows:
        gone.setdefault(row.table, []).append(row.raw_pk)
        if row.values is None:
            row.values = fetch_row(run.conn, run.plan.table(row.table), row.raw_pk)
    lite = connections["sqlite"]
    with transaction.atomic(using=run.pg.alias), run.pg.cursor() as cur:
        for name, raw_keys in gone.items():
            table = run.plan.table(name)
            for chunk in _chunks(raw_keys, 500):
                keys = [table.python_key(_param(raw), lite) for raw in chunk]
                cur.execute(
                    f"DELETE FROM {qi(name)} WHERE {table.key_in(len(keys), '%s')}",
                    table.key_params(keys, run.pg),
                )
                run.results[name].rows_written -= cur.rowcount
                if name in run.marks["done"]:
                    run.marks["done"][name] -= cur.rowcount
    run.sink.extend(rows)
    run.save_marks()


LANES = 2  # tables loading at once: PostgreSQL parses each COPY on one core


def _load_in_lanes(run: _Run, queue: list[PlannedTable], early, drop) -> bool:
    """Load the queued tables on LANES threads, each with its own PostgreSQL and SQLite
    connections; return whether a table had rejected rows.

    After a rejection the other tables are only scanned, so every bad row is reported.
    When one lane fails, the other finishes its table and stops.
    """
    from concurrent.futures import ThreadPoolExecutor

    lock, stop = threading.Lock(), threading.Event()
    rejected = threading.Event()

    def lane() -> None:
        conn = open_readonly(run.sqlite_path, raw_text=True)
        try:
            while not stop.is_set():
                with lock:
                    if not queue:
                        return
                    table = queue.pop(0)
                result = run.results[table.db_table]
                if rejected.is_set():  # keep reporting every bad row, but write nothing more
                    targets = run.targets[table.db_table]
                    _scan_table(conn, table, targets, run.repairs, run.sink, run.progress)
                    result.status = "not-copied"
                    continue
                try:
                    _copy_table(run, table, conn)
                except _TableRejected:
                    rejected.set()
                    result.status = "failed"
                    continue
                run.marks["done"][table.db_table] = result.rows_written
                if result.seconds >= 1:  # a small table's marker waits for the next save
                    run.save_marks()
                # its own keys and indexes build while the next tables load
                early.submit([o for o in drop if o.table == table.db_table])
        except BaseException:
            stop.set()
            raise
        finally:
            conn.close()
            connections[run.pg.alias].close()  # this thread's connection

    with ThreadPoolExecutor(max_workers=LANES) as pool:
        lanes = [pool.submit(lane) for _ in range(LANES)]
        try:
            for future in lanes:
                future.result()
        except BaseException as exc:
            stop.set()
            if not any(f.done() and f.exception() is exc for f in lanes):
                run.abort.set()  # Ctrl-C or SIGTERM here: the tables in flight stop too
            for future in lanes:  # the other lane ends cleanly first
                future.exception()
            raise
    return rejected.is_set()


def _restore(
    pg, marks, state_file, drop, plan, *, best_effort: bool = False, refreshed: bool = False
) -> None:
    """Rebuild dropped indexes/constraints, reset sequences, refresh materialized views.

    ``best_effort`` (a run already failing on bad rows): what cannot be rebuilt yet stays
    recorded as pending for the next run, instead of hiding the rows' report.
    ``refreshed``: the caller already reset the sequences and refreshed the views.
    """
    with pg.cursor() as cur:
        present = schema_snapshot(cur, {o.table for o in drop})
    missing = [o for o in drop if o not in present]
    try:
        rebuild(pg.alias, missing)
    except Exception as exc:
        if not best_effort:
            detail = getattr(getattr(exc, "diag", None), "message_detail", None)
            raise TargetError(
                f"Rebuilding indexes/constraints after the load failed: {exc}"
                + (f" ({detail})" if detail else "")
                + ". Fix that data in SQLite (or use --quarantine) and run again; the "
                "next run rebuilds what is still missing."
            ) from exc
    with pg.cursor() as cur:
        present = schema_snapshot(cur, {o.table for o in drop})
    still = [o for o in drop if o not in present]
    marks["pending_ddl"] = [dataclasses.asdict(o) for o in still]
    if not still:
        marks.pop("schema_before", None)
    _write_marks(state_file, marks)
    if not refreshed:
        _reset_and_refresh(pg, plan)


def _reset_and_refresh(pg, plan: Plan) -> None:
    """Sequences above max(pk); materialized views over the loaded data."""
    with pg.cursor() as cur:
        for statement in pg.ops.sequence_reset_sql(no_style(), plan.models):
            cur.execute(statement)
        # views built over empty tables by migrate would keep showing nothing
        cur.execute("SELECT schemaname, matviewname FROM pg_matviews WHERE ispopulated")
        for schema, view in cur.fetchall():
            cur.execute(f"REFRESH MATERIALIZED VIEW {qi(schema)}.{qi(view)}")


class _TableRejected(Exception):
    pass


@dataclasses.dataclass
class _Chunk:
    data: Any  # converted rows (Python path) or COPY text bytes (C formatter)
    read: int
    written: int
    rejected: list[RejectedRow]
    repaired: list[RepairedRow]
    in_python: int = 0  # rows converted value by value in Python
    text: bytes = b""  # COPY text of those rows when data is in the binary format
    keys: list | None = None  # raw keys of the rows in data, in order (Python path only)


def _convert_rows(rc: RowConverter, batch, skip, emit, keys: list | None = None) -> _Chunk:
    """Convert a batch; good rows go to emit(row) (their keys to keys), bad ones into
    the chunk."""
    rejected: list[RejectedRow] = []
    repaired: list[RepairedRow] = []
    written = 0
    key_of = rc.table.key_of
    for raw in batch:
        if skip is not None and key_of(raw) in skip:
            continue
        try:
            row = rc.convert(raw)
        except _RowRejected as exc:
            rejected.extend(exc.rows)
            continue
        if rc.log.applied:
            repaired.extend(
                RepairedRow(rc.table.db_table, plain_key(key_of(raw)), column, rule)
                for column, rule in rc.log.applied
            )
        emit(row)
        if keys is not None:
            keys.append(key_of(raw))
        written += 1
    return _Chunk(None, len(batch), written, rejected, repaired, in_python=len(batch))


def _python_chunks(conn, rc: RowConverter, skip) -> Iterator[_Chunk]:
    for batch in read_rows(conn, rc.table):
        rows: list = []
        keys: list = []
        chunk = _convert_rows(rc, batch, skip, rows.append, keys)
        chunk.data, chunk.keys = rows, keys
        yield chunk


def _formatted_chunks(
    sqlite_path: Path, rc: RowConverter, lines: LinePlan, skip
) -> Iterator[_Chunk]:
    """Batches read and printed in C; the rows it hands back take the Python path."""
    from psycopg._copy_base import TextFormatter  # the row formatter COPY itself uses
    from psycopg.adapt import Transformer

    formatter = TextFormatter(Transformer())
    uri = f"{Path(sqlite_path).resolve().as_uri()}?mode=ro"  # as open_readonly opens it
    for made in lines.read(uri, skip=skip, batch_rows=BATCH_ROWS):
        rows: list = []
        chunk = _convert_rows(rc, made.fallback, None, rows.append)
        text = b"".join([*(formatter.write_row(row) for row in rows), formatter.end()])
        chunk.data, chunk.text = (made.data, text) if lines.binary else (made.data + text, b"")
        formatted = made.read - len(made.fallback) - made.skipped
        chunk.read, chunk.written = made.read, formatted + chunk.written
        yield chunk


def _copy_table(run: _Run, table: PlannedTable, conn) -> None:
    """Load one table; if PostgreSQL refuses a value the C formatter let through, redo the
    table value by value in Python, which finds and names the row: refused (nothing of the
    table kept), or under --quarantine set aside and the table loaded again without it."""
    lines = line_plan(table, run.targets[table.db_table])
    if table.composite and run.skip.get(table.db_table):
        lines = None  # the C reader skips rows by a one-column key only
    rejected_before = run.sink.total
    refused = None
    try:
        _load_table(run, table, lines, conn)
        return
    except TargetError as exc:
        if lines is None or run.sink.total != rejected_before or not _value_refused(exc):
            raise
    except _CopyRefused as exc:
        refused = exc.row
    for _ in range(MAX_REFUSED_RETRIES):
        try:
            if refused is None:
                _load_table(run, table, None, conn)  # names the row if PostgreSQL refuses again
                return
            if not run.quarantine:
                run.sink.extend([refused])
                raise _TableRejected(table.db_table)
            # set aside, with the rows pointing at it (before the foreign keys build)
            run.refused.append(refused)
            run.skip.setdefault(table.db_table, set()).add(refused.raw_pk)
            refused = None
        except _CopyRefused as exc:
            refused = exc.row
    raise TargetError(
        f"PostgreSQL refused more than {MAX_REFUSED_RETRIES} rows of {table.db_table} that "
        "the checks before COPY let through; nothing of this table was kept."
    )


MAX_REFUSED_RETRIES = 100  # rows PostgreSQL refuses at COPY set aside, one reload each


def _refused_row(
    table: PlannedTable, exc: Exception, keys: list | None, conn
) -> RejectedRow | None:
    """The row a COPY refusal names by line ("COPY t, line 3"), when every line was one
    row we wrote in Python (a generated ``a + b`` that overflows int4 in PostgreSQL's own
    arithmetic, a value our casts let through)."""
    import re

    diag = getattr(exc, "diag", None) or getattr(exc.__cause__, "diag", None)
    found = re.search(r"\bline (\d+)", (diag and diag.context) or "")
    if keys is None or found is None or not 0 < int(found.group(1)) <= len(keys):
        return None
    key = keys[int(found.group(1)) - 1]
    column = re.search(r", column (.+?):", diag.context or "")
    computed = ", ".join(f"{c.name} = {c.field.expression!r}" for c in table.generated)
    return RejectedRow(
        table=table.db_table,
        pk=plain_key(key),
        raw_pk=key,
        column=column.group(1) if column else ",".join(c.name for c in table.generated) or "?",
        code="postgresql",
        reason=f"PostgreSQL refused the row: {diag.message_primary}"
        + (f" (it computes {computed})" if computed and not column else ""),
        excerpt=excerpt(plain_key(key)),
        values=fetch_row(conn, table, key),
    )


class _CopyRefused(Exception):
    """PostgreSQL refused one row of a COPY (named by its line); nothing of the table kept."""

    def __init__(self, row: RejectedRow):
        super().__init__(row.reason)
        self.row = row


def _value_refused(exc: BaseException) -> bool:
    """Did PostgreSQL refuse a value (SQLSTATE class 22), rather than fail otherwise?"""
    import psycopg

    causes = (exc.__cause__, getattr(exc.__cause__, "__cause__", None))
    return any(isinstance(c, psycopg.errors.DataError) for c in causes)


def _copy_sql(table: PlannedTable, *, binary: bool) -> str:
    # FREEZE: rows written frozen, so the index builds after skip visibility checks; safe as
    # the table was emptied in the same transaction and nothing else reads it meanwhile
    cols = ", ".join(qi(c) for c in table.column_names)
    options = "FORMAT BINARY, FREEZE" if binary else "FREEZE"
    return f"COPY {qi(table.db_table)} ({cols}) FROM STDIN ({options})"


def _load_table(run: _Run, table: PlannedTable, lines: LinePlan | None, conn) -> None:
    """Truncate and load one table in one transaction; roll it back on any rejection."""
    started = time.perf_counter()
    pg = connections[run.pg.alias]  # this thread's connection
    sink, progress = run.sink, run.progress
    out, skip = run.results[table.db_table], run.skip.get(table.db_table)
    rc = RowConverter(table, run.targets[table.db_table], repairs=run.repairs)
    total = run.sizes[table.db_table]
    if lines is not None:
        chunks = _formatted_chunks(run.sqlite_path, rc, lines, skip)
    else:
        chunks = _python_chunks(conn, rc, skip)
    rejected_here = False
    repaired: list[RepairedRow] = []
    read = written = in_python = 0
    binary = lines is not None and lines.binary
    copied_keys: list = []  # Python path: line N of the COPY is copied_keys[N - 1]
    try:
        with (
            transaction.atomic(using=pg.alias),
            pg.cursor() as cur,
            # rows the Python path converted, as text, for a second COPY after a binary one
            tempfile.SpooledTemporaryFile(max_size=16 << 20) as spool,
        ):
            cur.execute(f"TRUNCATE {qi(table.db_table)}")
            with cur.cursor.copy(_copy_sql(table, binary=binary)) as cp:
                if binary:
                    cp.write(BINARY_HEADER)
                for chunk in chunks:
                    if chunk.rejected:
                        sink.extend(chunk.rejected)
                        rejected_here = True
                    repaired.extend(chunk.repaired)
                    if not rejected_here:
                        if type(chunk.data) is bytes:
                            cp.write(chunk.data)
                        else:
                            for row in chunk.data:
                                cp.write_row(row)
                            if chunk.keys is not None:
                                copied_keys += chunk.keys
                        spool.write(chunk.text)
                        written += chunk.written
                    read += chunk.read
                    in_python += chunk.in_python
                    if progress:
                        progress(table.db_table, read, total)
                    if run.abort.is_set():
                        raise KeyboardInterrupt(f"stopped during {table.db_table}")
                if rejected_here:
                    raise _TableRejected(table.db_table)
                if binary:
                    cp.write(BINARY_TRAILER)
            if spool.tell():
                spool.seek(0)
                with cur.cursor.copy(_copy_sql(table, binary=False)) as cp:
                    while block := spool.read(1 << 20):
                        cp.write(block)
    except _TableRejected:
        out.rows_read, out.seconds = read, round(time.perf_counter() - started, 3)
        raise
    except Exception as exc:
        import psycopg
        from django.db import DatabaseError

        if isinstance(exc, psycopg.Error | DatabaseError):
            refused = _refused_row(table, exc, copied_keys if lines is None else None, conn)
            if refused is not None:
                out.rows_read, out.seconds = read, round(time.perf_counter() - started, 3)
                raise _CopyRefused(refused) from exc
            raise TargetError(
                f"PostgreSQL refused {table.db_table}: {exc}. Nothing of this table was kept."
            ) from exc
        raise
    finally:
        chunks.close()
    out.status = "copied"
    out.rows_read, out.rows_written = read, written
    out.rows_in_python = in_python
    out.rows_repaired = len({r.pk for r in repaired})
    out.seconds = round(time.perf_counter() - started, 3)
    run.result.repairs.extend(repaired)


# --- the whole phase 6, as the command runs it ------------------------------------------------


@dataclasses.dataclass
class MigrateDataResult:
    mode: str  # copy | sync | verify-only
    copy: CopyResult | None = None
    sync: Any = None  # sync.SyncResult
    verification: Any = None  # verify.VerifyResult
    report_path: Path | None = None
    log_path: Path | None = None
    fingerprint: dict = dataclasses.field(default_factory=dict)


def migrate_data(
    *,
    sqlite_path: Path,
    state_file: Path,
    report_dir: Path,
    log_dir: Path,
    alias: str = "postgresql",
    tables: Iterable[str] | None = None,
    quarantine: bool = False,
    repairs: Iterable[str] = (),
    sync: bool = False,
    verify_only: bool = False,
    verify: bool = True,
    progress: Callable[[str, str, int, int], None] | None = None,
) -> MigrateDataResult:
    """Phase 6: check the state, copy (or sync), verify, write the report, move the state.

    progress(stage, table, done, total) hears every stage: copy, sync and verify.
    """
    from dbmigration.errors import PhaseError, VerificationError, postgres_lost, target_lost
    from dbmigration.preflight import conninfo_from_settings, require_same_target
    from dbmigration.reports import RunReport
    from dbmigration.sqlite_source import source_fingerprint
    from dbmigration.verify import Side
    from dbmigration.verify import verify as run_verify

    state = state_mod.read_state(state_file)
    try:
        state_mod.require_phase(state, "data_migrated")
    except state_mod.StateError as exc:
        raise PhaseError(str(exc)) from exc
    # the target migration_prepare checked, reachable: exit 3 with the fix, not a traceback
    require_same_target(
        state.extra.get("target"), conninfo_from_settings(connections.settings["postgresql"])
    )
    fingerprint = source_fingerprint(sqlite_path)
    if state.source_fingerprint and not (sync or verify_only):
        # rows may change (the copy reads a snapshot; --sync carries the rest); a changed schema
        # or set of migrations needs the prepare again, however far the copy got
        reasons = state_mod.stale_reasons(state, fingerprint)
        if reasons:
            raise SourceError(
                f"The SQLite schema changed since migration_prepare ({'; '.join(reasons)}). "
                "Run migration_prepare again: it brings PostgreSQL's schema up to date."
            )
    mode = "verify-only" if verify_only else "sync" if sync else "copy"
    run = RunReport.open("migrate_data", report_dir=report_dir, log_dir=log_dir)
    result = MigrateDataResult(
        mode=mode, report_path=run.report_path, log_path=run.log_path, fingerprint=fingerprint
    )
    run.facts.update(
        {
            "mode": mode,
            "source": str(sqlite_path),
            "source_sha256": fingerprint["sha256"],
            "target_alias": alias,
            "quarantine": quarantine,
            "repairs": sorted(repairs),
        }
    )
    status = "failed"
    # the application may go on writing: every step reads one consistent snapshot of the
    # file; --sync and the switch's catch-up carry what is written after it
    live_path, temporary = sqlite_path, False
    try:
        sqlite_path, temporary = _consistent_source(state, live_path, mode)
        run.facts["read_from"] = str(sqlite_path)
        # the prepare's snapshot never changes: a resume survives the site's writes
        copied_sha256 = fingerprint["sha256"] if temporary else content_sha256(sqlite_path)
        if mode != "verify-only" and fence.lift_postgres_fence(alias):
            run.facts["lifted_postgres_fence"] = True  # the last rollback left it; we write now
        plan = build_plan(only=tables)
        exclude: dict[str, set[str]] = {}
        if mode == "copy":
            with run.step("copy") as step:
                reject_file = report_dir / f"rejects_{run.started_at[:19].replace(':', '')}.jsonl"
                try:
                    result.copy = copy_data(
                        sqlite_path=sqlite_path,
                        alias=alias,
                        tables=tables,
                        quarantine=quarantine,
                        repairs=repairs,
                        reject_file=reject_file,
                        state_file=state_file,
                        progress=_in_stage(progress, "copy"),
                        source_sha256=copied_sha256,
                    )
                except RowsRejected as exc:
                    _record_copy(run, step, exc.result)
                    raise
                _record_copy(run, step, result.copy)
                for r in result.copy.rejections:
                    exclude.setdefault(r.table, set()).add(key_text(r.pk))
        elif mode == "sync":
            from dbmigration.sync import sync_to_postgresql

            with run.step("sync") as step:
                reject_file = report_dir / f"rejects_{run.started_at[:19].replace(':', '')}.jsonl"
                result.sync = sync_to_postgresql(
                    sqlite_path=sqlite_path,
                    alias=alias,
                    tables=tables,
                    state_file=state_file,
                    progress=_in_stage(progress, "sync"),
                    quarantine=quarantine,
                    reject_file=reject_file,
                )
                quarantined = result.sync.rejections
                for r in quarantined:
                    exclude.setdefault(r.table, set()).add(key_text(r.pk))
                if quarantined:
                    run.facts["rejected_total"] = len(quarantined)
                    run.facts["rejections"] = [r.as_dict() for r in quarantined[:1000]]
                    run.facts["reject_file"] = str(result.sync.reject_file)
                    step.warnings.append(
                        f"{len(quarantined)} row(s) quarantined, listed in "
                        f"{result.sync.reject_file}"
                    )
                step.details.update(
                    {
                        "rows_written": result.sync.rows_written,
                        "rows_deleted": result.sync.rows_deleted,
                        "tables": {
                            d.table: {
                                "inserted": len(d.inserted_pks),
                                "updated": len(d.updated_pks),
                                "deleted": len(d.deleted_pks),
                                "seconds": d.seconds,
                            }
                            for d in result.sync.diffs
                            if d.changed
                        },
                    }
                )
        if verify or verify_only:
            with run.step("verify") as step:
                source, target = Side(sqlite_path=sqlite_path), Side(alias=alias)
                result.verification = run_verify(
                    source=source,
                    target=target,
                    plan=plan,
                    exclude=exclude,
                    progress=_in_stage(progress, "verify"),
                )
                checks = {c.table: c for c in result.verification.tables}
                step.details["tables"] = {
                    t: {
                        "source_rows": c.source_rows,
                        "target_rows": c.target_rows,
                        "quarantined": c.excluded,
                        "source_checksum": c.source_checksum,
                        "target_checksum": c.target_checksum,
                        "mismatched_ranges": c.mismatched_ranges[:20],
                        "seconds": c.seconds,
                    }
                    for t, c in checks.items()
                }
                if result.copy is not None:
                    for table in run.facts.get("tables", {}).values():
                        check = checks.get(table["table"])
                        if check:
                            table["source_checksum"] = check.source_checksum
                            table["target_checksum"] = check.target_checksum
                step.warnings.extend(result.verification.warnings)
                problems = result.verification.problems(source, target)
                if problems:
                    step.details["problems"] = problems
                    raise VerificationError(
                        "Verification failed; the phase did not advance:\n  "
                        + "\n  ".join(problems[:20])
                    )
        if mode != "verify-only" and tables is None:  # a subset is not the whole phase
            state_mod.transition(
                state_file,
                "data_migrated",
                note=f"migrate_data ({mode})",
                source_fingerprint=fingerprint,
                last_report=str(run.report_path),
            )
        quarantined = (result.copy and result.copy.rejected_total) or (
            result.sync and result.sync.rejections
        )
        status = "warning" if quarantined else "ok"
    except Exception as exc:
        lost = postgres_lost(exc)
        if lost is None:
            raise
        during = (
            f"migrate_data's {run.steps[-1].name} step"
            if run.steps
            else "the start of migrate_data"
        )
        raise target_lost(
            lost,
            during=during,
            then="Finished tables stay done and the phase did not move. Check the server "
            "(db_test_postgresql), then run migrate_data again.",
        ) from lost
    finally:
        if temporary:
            sqlite_path.unlink(missing_ok=True)
        run.finish(status)
    return result


def _in_stage(progress, stage: str) -> Progress | None:
    """Adapt a stage-aware progress callback to the (table, done, total) the stages call."""
    if progress is None:
        return None
    return lambda table, done, total: progress(stage, table, done, total)


def _consistent_source(state, live_path: Path, mode: str) -> tuple[Path, bool]:
    """The file to read and whether it is a temporary snapshot of the live one.

    A copy reads the prepare's verified backup when it is a plain SQLite file of the same
    schema (no extra copy: 1.4 s for 100k users' 351 MB); otherwise, and for --sync and
    --verify-only (they need the newest rows), a fresh snapshot with the online backup API.
    """
    from dbmigration.backup import SNAPSHOT, load_backup
    from dbmigration.errors import BackupError

    if mode == "copy" and state.last_backup:
        candidate = Path(state.last_backup) / SNAPSHOT
        with contextlib.suppress(BackupError):
            info = load_backup(Path(state.last_backup))
            if info.kind == "sqlite" and not info.encrypted and candidate.exists():
                conn = open_readonly(candidate)
                try:
                    schema = schema_sha256(conn)
                finally:
                    conn.close()
                if schema == state.source_fingerprint.get("schema_sha256"):
                    return candidate, False
    stamp = time.strftime("%Y%m%dT%H%M%S") + f"-{os.getpid()}"
    snapshot = live_path.with_name(f"{live_path.name}.migrate_data-{stamp}")
    return snapshot_to(live_path, snapshot), True


def _record_copy(run, step, copy: CopyResult) -> None:
    run.facts["tables"] = {
        t.table: {
            "table": t.table,
            "status": t.status,
            "rows_read": t.rows_read,
            "rows_written": t.rows_written,
            "rows_rejected": t.rows_rejected,
            "rows_repaired": t.rows_repaired,
            "rows_in_python": t.rows_in_python,
            "seconds": t.seconds,
            "rows_per_second": t.rows_per_second,
        }
        for t in copy.tables
    }
    run.facts["rejected_total"] = copy.rejected_total
    run.facts["rejections"] = [r.as_dict() for r in copy.rejections[:1000]]
    run.facts["reject_file"] = str(copy.reject_file) if copy.reject_file else None
    run.facts["repairs"] = [dataclasses.asdict(r) for r in copy.repairs[:10000]]
    step.details.update(
        {
            "rows_written": copy.rows_written,
            "rebuilt": len(copy.rebuilt),
            "schema_problems": copy.schema_problems,
        }
    )
    if copy.rejected_total and copy.reject_file:
        verb = "quarantined" if run.facts.get("quarantine") else "rejected (nothing kept)"
        step.warnings.append(f"{copy.rejected_total} row(s) {verb}, listed in {copy.reject_file}")
