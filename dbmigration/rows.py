"""Reading SQLite rows for the copy and turning them into the values PostgreSQL stores.

The lowest layer of the copy: batched reads in primary-key order, keys as plain values
and text, and a single row fetched back by key for a rejection report.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterator
from typing import Any

from dbmigration.casts import (
    mark_misfiled,
    misfiled_sql,
)
from dbmigration.plan import PlannedTable, qi

BATCH_ROWS = 5000


# progress(table, rows_done, rows_total); raising from it aborts the current table cleanly
Progress = Callable[[str, int, int], None]


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


def row_dict(table: PlannedTable, raw: tuple) -> dict:
    return {name: plain(v) for name, v in zip(table.column_names, raw, strict=True)}


def param(value: Any) -> Any:
    # text comes back as bytes (raw_text); bound as bytes it would be a BLOB and match nothing
    if type(value) is tuple:
        return tuple(map(param, value))
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return value
    return value


def fetch_row(conn, table: PlannedTable, raw_pk: Any) -> dict | None:
    """Return one source row's original values (JSON-safe) by primary key."""
    cols = ", ".join(qi(c) for c in table.column_names)
    raw = conn.execute(
        f"SELECT {cols} FROM {qi(table.db_table)} WHERE {table.key_in(1)}",
        table.key_params([param(raw_pk)]),
    ).fetchone()
    return row_dict(table, raw) if raw is not None else None


def chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
