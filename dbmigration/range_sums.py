"""Range checksums of a SQLite table and its PostgreSQL copy at copy speed, without Python
per row.

PostgreSQL hashes its own rows in SQL, in one scan on the server (``row_hash_sql``), while
C (``_copytext.range_sums``) hashes the SQLite rows on a thread that releases the GIL:
each value is hashed as PostgreSQL hashes the value the copy stores from it (its
``hash*extended`` functions, reimplemented in C; decimals and JSON by their output text,
``numeric`` with its scale and ``jsonb`` normalized, since their binary hashes ignore the
sign).  Column i is hashed with seed i + 1 (a NULL counts as the seed), a row is the XOR
of its columns, a range the sum of its rows mod 2**64, with the row count beside it.

Nothing here forks: when the parent dies, nothing is left behind.  A table this path does
not cover (``hash_plan`` is None: composite or text keys, a column kind C does not hash,
a type the catalog does not confirm, quarantined keys on the PostgreSQL side) or a value
C cannot vouch for (``sums`` returns None) takes verify.py's Python path, whose row
digests also name the rows of any range that differs here.
"""

from __future__ import annotations

import dataclasses
import sqlite3
import threading
from pathlib import Path

from django.db import connections

from dbmigration.casts import (
    BOOL,
    DATE,
    DATETIME,
    DECIMAL,
    INT,
    IP,
    JSON,
    TEXT,
    UUID,
    TargetColumn,
    native_cast,
    storage_class,
    target_columns,
)
from dbmigration.copy_lines import _copytext
from dbmigration.plan import PlannedColumn, PlannedTable
from dbmigration.sqlite_source import open_readonly

# per kind: PostgreSQL's hash of the stored value ({c} the column, {s} the seed), and the
# column types whose stored value that hash reads as C assumes
ROW_HASH_SQL = {
    INT: ("hashint8extended({c}::int8, {s})", {"int2", "int4", "int8"}),
    BOOL: ("hashint8extended({c}::int4, {s})", {"bool"}),
    TEXT: ("hashtextextended({c}::text, {s})", {"varchar", "text"}),
    UUID: ("uuid_hash_extended({c}, {s})", {"uuid"}),
    # microseconds since 2000 UTC, whatever the session's time zone
    DATETIME: ("timestamp_hash_extended({c} AT TIME ZONE 'UTC', {s})", {"timestamptz"}),
    DATE: ("hashint8extended({c} - DATE '2000-01-01', {s})", {"date"}),
    JSON: ("hashtextextended({c}::text, {s})", {"jsonb"}),
    IP: ("hashinetextended({c}, {s})", {"inet"}),
    DECIMAL: ("hashtextextended({c}::text, {s})", {"numeric"}),
}
INTEGER_KEYS, UUID_KEYS = 0, 1  # _copytext.range_sums' modes
UUID_BUCKETS = 16**3  # verify.Ranges: a UUID key's range is its first three hex digits
MAX_INT_SPAN = 1 << 62  # pk - low must not overflow bigint on PostgreSQL


def _qi(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def value_hash_sql(kind: int, column_sql: str, seed: int) -> str:
    """PostgreSQL's hash of one stored value, as C computes it (NULL: the seed)."""
    return f"coalesce({ROW_HASH_SQL[kind][0].format(c=column_sql, s=seed)}, {seed})"


def column_spec(column: PlannedColumn, target: TargetColumn | None) -> tuple | None:
    """(kind, places, max_digits, storage) of a column C hashes, or None."""
    if target is None:
        return None
    cast = native_cast(column, target)
    if cast.kind not in ROW_HASH_SQL:
        return None
    types = ROW_HASH_SQL[cast.kind][1]
    if target.type_name not in types and not (cast.kind == TEXT and target.enum_labels):
        return None  # bpchar pads, a timestamp without time zone hashes another instant
    places, digits = (cast.low, cast.high) if cast.kind == DECIMAL else (0, 0)
    return (cast.kind, places, digits, storage_class(column))


@dataclasses.dataclass(frozen=True)
class HashPlan:
    table: PlannedTable
    spec: tuple  # per column: (kind, places, max_digits, storage) as range_sums reads it
    select: str  # on SQLite
    row_sql: str  # on PostgreSQL: the row's hash
    key_mode: int


def hash_plan(table: PlannedTable, targets: dict[str, TargetColumn]) -> HashPlan | None:
    """How C and PostgreSQL hash this table, or None when this path does not cover it."""
    if _copytext is None or table.composite:
        return None
    spec, hashes = [], []
    for seed, column in enumerate(table.columns, 1):
        one = column_spec(column, targets.get(column.name))
        if one is None:
            return None
        spec.append(one)
        hashes.append(value_hash_sql(one[0], _qi(column.name), seed))
    if not _stores_its_python_value(table.columns[table.pk_index].field):
        return None  # ranges come from the key's Python value: a custom key field may differ
    key_kind = spec[table.pk_index][0]
    if table.pk_is_integer and key_kind == INT:
        mode = INTEGER_KEYS
    elif key_kind == UUID:
        mode = UUID_KEYS
    else:
        return None  # text keys: their ranges are three characters, left to Python
    columns = ", ".join(_qi(c.name) for c in table.columns)
    return HashPlan(
        table=table,
        spec=tuple(spec),
        select=f"SELECT {columns} FROM {_qi(table.db_table)}",
        row_sql=" # ".join(hashes),
        key_mode=mode,
    )


def _stores_its_python_value(field) -> bool:
    """Whether a key's stored value is its Python value (Django's own fields), so C and SQL
    put each row in the same range as the Python path that names rows (Wagtail's test user
    has an IntegerField subclass whose Python value is the stored one plus a constant)."""
    while field.is_relation:
        field = field.target_field
    return type(field).__module__.startswith("django.")


@dataclasses.dataclass
class Sums:
    rows: int
    buckets: dict  # range -> [count, sum mod 2**64], as verify.SideSums holds them


def sums(
    *,
    sqlite_path: Path,
    alias: str,
    table: PlannedTable,
    low: int,
    width: int,
    integer_ranges: bool,
    buckets: int,
    skip: set | None = None,
) -> tuple[Sums, Sums] | None:
    """Range sums of the SQLite file's table and of the alias's, computed at once (C on a
    thread, the SQL on the server); None when the Python path must decide."""
    connection = connections[alias]
    if connection.vendor != "postgresql":
        return None
    with connection.cursor() as cur:
        plan = hash_plan(table, target_columns(cur, table.db_table))
    if plan is None or integer_ranges != (plan.key_mode == INTEGER_KEYS):
        return None
    pk = _qi(table.pk_column)
    if plan.key_mode == INTEGER_KEYS:
        if abs(low) >= MAX_INT_SPAN or width * buckets >= MAX_INT_SPAN:
            return None
        bucket_sql = f"({pk} - {int(low)}) / {int(width)}"
    else:
        buckets, bucket_sql = UUID_BUCKETS, f"left({pk}::text, 3)"
    uri = f"{Path(sqlite_path).resolve().as_uri()}?mode=ro"  # as open_readonly opens it
    parts = [{"select": plan.select + where} for where in _rowid_halves(sqlite_path, table)]

    def hash_sqlite(part: dict) -> None:
        try:
            part["result"] = _copytext.range_sums(
                uri,
                part["select"],
                plan.spec,
                table.pk_index,
                plan.key_mode,
                low,
                width,
                buckets,
                skip,
            )
        except BaseException as exc:  # noqa: BLE001 re-raised by the caller's thread
            part["error"] = exc

    # daemon threads: a process told to stop does not wait for them (they hold no lock
    # and write nothing; their SQLite handles close with the process)
    workers = [
        threading.Thread(
            target=hash_sqlite, args=(part,), name=f"range-sums {table.db_table}", daemon=True
        )
        for part in parts
    ]
    for worker in workers:
        worker.start()
    # an error or an interrupt here does not wait for the thread (it finishes on its own)
    with connection.cursor() as cur:
        cur.execute(
            f"SELECT {bucket_sql}, count(*), sum({plan.row_sql}) "
            f"FROM {_qi(table.db_table)} GROUP BY 1"
        )
        theirs = Sums(rows=0, buckets={})
        for bucket, count, total in cur.fetchall():
            theirs.buckets[bucket] = [count, int(total) % (1 << 64)]
            theirs.rows += count
    for worker in workers:
        worker.join()
    ours = Sums(rows=0, buckets={})
    for part in parts:
        if "error" in part:
            raise part["error"]
        if part["result"] is None:
            return None
        rows, ranges = part["result"]
        ours.rows += rows
        for bucket, count, total in ranges:
            slot = ours.buckets.setdefault(bucket, [0, 0])
            slot[0] += count
            slot[1] = (slot[1] + total) % (1 << 64)
    return ours, theirs


SPLIT_MIN_ROWS = 20_000  # below this one thread hashes the whole table


def _rowid_halves(sqlite_path: Path, table: PlannedTable) -> list[str]:
    """WHERE clauses splitting a big table in two by rowid, for two C threads (the SQL
    side is usually done first: C on both cores meanwhile); [""] for one thread."""
    conn = open_readonly(sqlite_path)
    try:
        sql = f"SELECT min(rowid), max(rowid) FROM {_qi(table.db_table)}"
        low, high = conn.execute(sql).fetchone()
    except sqlite3.OperationalError:  # WITHOUT ROWID
        return [""]
    finally:
        conn.close()
    if low is None or high - low < SPLIT_MIN_ROWS:
        return [""]
    middle = (low + high) // 2
    return [f" WHERE rowid <= {middle}", f" WHERE rowid > {middle}"]


ROW_CHUNK_BUCKETS = 16  # integer ranges hashed row by row at once (bounded memory)
ROW_CHUNK_PREFIXES = 64  # UUID prefixes at once: 1/64 of the table


def row_diff(
    *,
    sqlite_path: Path,
    alias: str,
    table: PlannedTable,
    low: int,
    width: int,
    buckets: set,
    sqlite_is_source: bool,
) -> tuple[list, list, list] | None:
    """(inserted, updated, deleted) Django keys in the given ranges, found by the row hashes
    ``sums`` adds up (C on the SQLite rows, SQL on the server: no Python per value), a chunk
    of ranges at a time (bounded memory).  None when this path does not cover the table or
    meets a value C cannot vouch for: the caller takes the Python path."""
    connection = connections[alias]
    if connection.vendor != "postgresql" or _copytext is None or table.composite:
        return None
    with connection.cursor() as cur:
        plan = hash_plan(table, target_columns(cur, table.db_table))
    if plan is None:
        return None
    pk = _qi(table.pk_column)
    lite_connection = connections["sqlite"]
    if plan.key_mode == INTEGER_KEYS:
        spans = _spans(sorted(b for b in buckets if isinstance(b, int)))
        chunks = [
            [(low + first * width, low + (last + 1) * width) for first, last in group]
            for group in _grouped(spans, ROW_CHUNK_BUCKETS)
        ]

        def where(chunk, cast=""):
            return " OR ".join(f"({pk} >= {int(a)} AND {pk} < {int(b)})" for a, b in chunk)

        pg_where = lite_where = where
    else:
        prefixes = sorted(f"{b:03x}" if isinstance(b, int) else str(b) for b in buckets)
        step = ROW_CHUNK_PREFIXES
        chunks = [prefixes[i : i + step] for i in range(0, len(prefixes), step)]

        def pg_where(chunk):
            return f"left({pk}::text, 3) IN ({', '.join(map(repr, chunk))})"

        def lite_where(chunk):
            return f"substr({pk}, 1, 3) IN ({', '.join(map(repr, chunk))})"

    inserted, updated, deleted = [], [], []
    conn = open_readonly(sqlite_path, raw_text=True)
    try:
        for chunk in chunks:
            rows = conn.execute(f"{plan.select} WHERE {lite_where(chunk)}").fetchall()
            hashes = _copytext.hash_rows(rows, plan.spec)
            if any(h is None for h in hashes):
                return None
            lite = {
                table.python_key(row[table.pk_index], lite_connection): h
                for row, h in zip(rows, hashes, strict=True)
            }
            del rows, hashes
            with connection.cursor() as cur:
                cur.execute(
                    f"SELECT {pk}, {plan.row_sql} FROM {_qi(table.db_table)} "
                    f"WHERE {pg_where(chunk)}"
                )
                other = {
                    table.python_key(key, connection): h % (1 << 64) for key, h in cur.fetchall()
                }
            source, target = (lite, other) if sqlite_is_source else (other, lite)
            inserted += [k for k in source if k not in target]
            deleted += [k for k in target if k not in source]
            updated += [k for k, h in source.items() if k in target and target[k] != h]
    finally:
        conn.close()
    return (sorted(inserted, key=str), sorted(updated, key=str), sorted(deleted, key=str))


def _spans(buckets: list[int]) -> list[tuple[int, int]]:
    """Consecutive buckets joined: [(first, last), ...]."""
    spans: list[tuple[int, int]] = []
    for b in buckets:
        if spans and spans[-1][1] == b - 1:
            spans[-1] = (spans[-1][0], b)
        else:
            spans.append((b, b))
    return spans


def _grouped(spans: list[tuple[int, int]], most: int):
    """Spans in groups of at most `most` buckets (a long span is cut)."""
    group, size = [], 0
    for first, last in spans:
        while first <= last:
            take = min(last, first + most - size - 1)
            group.append((first, take))
            size += take - first + 1
            first = take + 1
            if size >= most:
                yield group
                group, size = [], 0
    if group:
        yield group
