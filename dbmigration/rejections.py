"""Rows PostgreSQL would refuse, found before COPY sees them, and the report of each.

Value by value through a RowConverter (casts.py), and by query on SQLite for what one
value cannot show: dangling foreign keys, duplicates under PostgreSQL's comparison,
CHECK constraints and generated columns; rows that depend on a refused row cascade.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import uuid
from collections.abc import Iterable, Iterator
from operator import call as _call
from pathlib import Path
from typing import Any

from django.db import connections

from dbmigration.casts import (
    Converter,
    Rejection,
    RepairLog,
    TargetColumn,
    build_converter,
    excerpt,
)
from dbmigration.plan import Plan, PlannedTable, qi
from dbmigration.rows import chunks, fetch_row, param, plain_key, row_dict

MAX_KEPT_REJECTIONS = 100_000  # beyond this only counted, so memory stays bounded


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

    @classmethod
    def of(
        cls,
        table: PlannedTable,
        raw_pk: Any,
        *,
        column: str,
        code: str,
        reason: str,
        shown: Any,
        values: dict | None = None,
    ) -> RejectedRow:
        """The refused row of table with key raw_pk (as SQLite stores it); ``shown`` is the
        value its excerpt shows."""
        return cls(
            table=table.db_table,
            pk=plain_key(raw_pk),
            raw_pk=raw_pk,
            column=column,
            code=code,
            reason=reason,
            excerpt=excerpt(shown),
            values=values,
        )

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in REPORTED}


REPORTED = ("table", "pk", "column", "code", "reason", "excerpt", "values")


@dataclasses.dataclass
class RepairedRow:
    table: str
    pk: Any
    column: str
    rule: str


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
        """Return the converted row, or raise RowRejected listing every bad column."""
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
                    RejectedRow.of(
                        self.table,
                        self.table.key_of(raw),
                        column=column.name,
                        code=exc.code,
                        reason=exc.reason,
                        shown=value,
                        values=row_dict(self.table, raw),
                    )
                )
        self.log.applied.clear()
        raise RowRejected(bad)


class RowRejected(Exception):
    def __init__(self, rows: list[RejectedRow]):
        super().__init__(rows[0].reason)
        self.rows = rows


def relational_rejections(
    conn, plan: Plan, *, source_tables: set[str], checks: bool = True
) -> list[RejectedRow]:
    """Find foreign keys to missing rows, duplicates of unique keys and (``checks``) CHECK
    violations by query on SQLite."""
    found: list[RejectedRow] = []
    for table in plan.tables:
        pk = key_columns(table, "c.")
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
                for key, (value,) in split_keys(table, rows)
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
            for pk_value, key in split_keys(table, rows):
                key = tuple(key)
                if key not in first:
                    first[key] = pk_value  # the oldest row keeps the key
                    continue
                found.append(
                    RejectedRow.of(
                        table,
                        pk_value,
                        column=",".join(columns),
                        code="unique",
                        reason=(
                            f"duplicate of pk {plain_key(first[key])!r} on unique "
                            f"({', '.join(columns)})"
                        ),
                        shown=(key if len(key) > 1 else key[0]),
                    )
                )
    return found


def key_columns(table: PlannedTable, prefix: str = "") -> str:
    """The key's columns for a SELECT list (a row's key comes first, see split_keys)."""
    return ", ".join(prefix + qi(c) for c in table.pk_columns)


def split_keys(table: PlannedTable, rows) -> Iterator[tuple[Any, tuple]]:
    """(key, the other values) of rows selected with key_columns first."""
    width = len(table.pk_columns)
    for row in rows:
        yield tuple(row[:width]) if width > 1 else row[0], tuple(row[width:])


def _holds_uuids(table: PlannedTable, column: str) -> bool:
    return any(c.name == column and c.internal_type == "UUIDField" for c in table.columns)


def uuid_as_postgresql(value: Any) -> Any:
    """A stored UUID as PostgreSQL's uuid compares it (letter case and hyphens make no
    difference there); anything that is not a UUID stays as it is."""
    try:
        return uuid.UUID(param(value)).hex
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
    return RejectedRow.of(
        table,
        raw_pk,
        column=fk.column,
        code="fk",
        reason=reason,
        shown=value,
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
            f"SELECT {key_columns(table)} FROM {qi(table.db_table)} WHERE NOT ({sql})", params
        ).fetchall()
        for pk_value, _ in split_keys(table, rows):
            found.append(
                RejectedRow.of(
                    table,
                    pk_value,
                    column=constraint.name,
                    code="check",
                    reason=f"breaks CHECK {constraint.name} ({sql} with {params!r})"[:300],
                    shown=plain_key(pk_value),
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
    rows = conn.execute(f"SELECT {key_columns(table)}, {cols} FROM {qi(table.db_table)}")
    for key, values in split_keys(table, rows):
        for column, convert, value in zip(table.generated, converters, values, strict=True):
            try:
                convert(value)
            except Rejection as exc:
                found.append(
                    RejectedRow.of(
                        table,
                        key,
                        column=column.name,
                        code=exc.code,
                        reason=(
                            f"generated {column.name} = {column.field.expression!r}: "
                            f"{exc.reason} (PostgreSQL computes it on COPY)"
                        ),
                        shown=value,
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
                for chunk in chunks([param(v) for v in values], 500):
                    marks = ", ".join("?" * len(chunk))
                    rows = conn.execute(
                        f"SELECT {key_columns(table)}, {qi(fk.column)} FROM "
                        f"{qi(table.db_table)} WHERE {column} IN ({marks})",
                        chunk,
                    ).fetchall()
                    for pk_value, (value,) in split_keys(table, rows):
                        if pk_value in mine:
                            continue
                        mine.add(pk_value)
                        changed = True
                        reason = f"points to a rejected {fk.to_table} row"
                        added.append(_fk_rejection(table, fk, pk_value, value, reason))
    return added


def _column_values(conn, table: PlannedTable, column: str, pks: set) -> set:
    if (column,) == table.pk_columns:
        return set(pks)
    values = set()
    for chunk in chunks([param(p) for p in pks], 500):
        values.update(
            v
            for (v,) in conn.execute(
                f"SELECT {qi(column)} FROM {qi(table.db_table)} WHERE {table.key_in(len(chunk))}",
                table.key_params(chunk),
            )
        )
    return values


class RejectionSink:
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


MAX_REFUSED_RETRIES = 100  # rows PostgreSQL refuses at COPY set aside, one reload each


def refused_row(table: PlannedTable, exc: Exception, keys: list | None, conn) -> RejectedRow | None:
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
    return RejectedRow.of(
        table,
        key,
        column=column.group(1) if column else ",".join(c.name for c in table.generated) or "?",
        code="postgresql",
        reason=f"PostgreSQL refused the row: {diag.message_primary}"
        + (f" (it computes {computed})" if computed and not column else ""),
        shown=plain_key(key),
        values=fetch_row(conn, table, key),
    )
