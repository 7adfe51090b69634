"""Verify a copy: counts first, then checksums of canonical values in primary-key ranges.

The canonical form of a row is computed from the Python values Django itself would read
(each side's backend converters and ``from_db_value``), so it is the same for a SQLite file
and a PostgreSQL database, in either direction.  Range checksums are order-independent sums
of row hashes, so neither side needs to sort; a mismatch names the range, then the rows.
Also checked: foreign keys valid, sequences above max(pk), applied migrations equal.

A SQLite file against a PostgreSQL database is summed by range_sums.py where it covers the
table (PostgreSQL in SQL on the server, SQLite in C on threads, at once); elsewhere, and to
name the rows of a differing range, by the Python path here.  Nothing forks.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import hashlib
import json
import re
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from operator import call as _call
from pathlib import Path
from typing import Any

from django.db import connections

from dbmigration import range_sums
from dbmigration.casts import Misfiled, django_utc_text, mark_misfiled, misfiled_sql
from dbmigration.plan import INTEGER_TYPES, Plan, PlannedTable, build_plan
from dbmigration.sqlite_source import open_readonly

MOD = 1 << 128
FAST_MOD = 1 << 64  # range_sums' sums
BATCH_ROWS = 5000
INT_BUCKETS = 2000  # at most this many primary-key ranges per integer-keyed table
MAX_LISTED_ROWS = 50

Progress = Callable[[str, int, int], None]


@dataclasses.dataclass(frozen=True)
class Side:
    """A database to read: a SQLite file (opened read-only) or a Django alias."""

    sqlite_path: Path | None = None
    alias: str | None = None

    def __post_init__(self):
        if (self.sqlite_path is None) == (self.alias is None):
            raise ValueError("give exactly one of sqlite_path or alias")

    def __str__(self) -> str:
        return f"SQLite {self.sqlite_path}" if self.sqlite_path else f"database '{self.alias}'"

    @property
    def django_connection(self):
        """The Django connection whose converters read this side's raw values."""
        return connections["sqlite" if self.sqlite_path else self.alias]


# --- canonical values ---------------------------------------------------------------------


def canonical(value: Any, *, json_field: bool = False) -> str | None:
    """Return the canonical text of a Python value as Django reads it (None stays None)."""
    if value is None:
        return None
    if json_field:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "t" if value else "f"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, uuid.UUID):
        return value.hex
    if isinstance(value, dt.datetime):
        if value.tzinfo is not None:
            value = value.astimezone(dt.UTC).replace(tzinfo=None)
        return value.isoformat(sep=" ")
    if isinstance(value, dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return format(value, "f")
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, dt.timedelta):
        return str(value // dt.timedelta(microseconds=1))
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    return str(value)


_HEX32 = re.compile(r"[0-9a-f]{32}\Z")
_UTC = dt.timedelta(0)


def _shortcut(kind: str, vendor: str, general: Callable[[Any], str | None]):
    """A faster reader for the commonest stored forms; anything else goes to `general`.

    Each gives exactly what `general` gives (tests/test_verify.py compares them).
    """
    if vendor == "sqlite" and kind == "DateTimeField":

        def sqlite_datetime(value):
            # Django stores naive UTC as str(datetime): already the canonical text
            text = django_utc_text(value) if type(value) is bytes else None
            return text if text is not None else general(value)

        return sqlite_datetime
    if vendor == "sqlite" and kind == "UUIDField":
        match = _HEX32.match

        def sqlite_uuid(value):
            if type(value) is bytes and len(value) == 32:
                text = value.decode("latin-1")
                if match(text):
                    return text
            return general(value)

        return sqlite_uuid
    if vendor == "postgresql" and kind == "DateTimeField":

        def pg_datetime(value):
            if type(value) is dt.datetime and value.utcoffset() == _UTC:
                return str(value)[:-6]  # drop "+00:00"
            return general(value)

        return pg_datetime
    if vendor == "postgresql" and kind == "UUIDField":

        def pg_uuid(value):
            if type(value) is uuid.UUID:
                return value.hex
            return general(value)

        return pg_uuid
    if kind in INTEGER_TYPES:

        def integer(value):
            if type(value) is int:
                return str(value)
            return general(value)

        return integer
    if kind == "BooleanField":

        def boolean(value):
            # SQLite stores 0/1 (Django reads them as bools), PostgreSQL gives bools
            if value is True or (value == 1 and type(value) is int):
                return "t"
            if value is False or (value == 0 and type(value) is int):
                return "f"
            return general(value)

        return boolean
    if kind in _PLAIN_TEXT:

        def text(value):
            if type(value) is str:
                return value
            if type(value) is bytes:
                return value.decode("utf-8", "surrogateescape")
            return general(value)

        return text
    return None


_PLAIN_TEXT = frozenset({"CharField", "TextField", "EmailField", "SlugField", "URLField"})


def _json_document(value, expression, connection):
    return None if value is None else json.loads(value)


def column_readers(
    table: PlannedTable, connection, *, fast: bool = True
) -> list[Callable[[Any], str | None]]:
    """Per column: raw DB-API value -> Django's Python value -> canonical text."""
    readers = []
    for column in table.columns:
        expression = column.field.get_col(table.db_table)
        steps = connection.ops.get_db_converters(expression) + expression.get_db_converters(
            connection
        )
        is_json = column.internal_type == "JSONField"
        if is_json:
            # the stored document, read as plain JSON: a field's own decoder may give
            # values json cannot print (Wagtail's StreamValue); a document that reads the
            # same gives the same value through any decoder
            steps = [_json_document]
        is_text = connection.vendor == "sqlite" and column.internal_type != "BinaryField"
        # Django saves an IPv6 address in its compressed form (the copy does the same), so
        # "2001:0DB8::1" stored in SQLite is the value PostgreSQL holds as "2001:db8::1"
        saved_as = (
            column.field.get_prep_value if column.internal_type == "GenericIPAddressField" else None
        )

        def read(
            value,
            steps=steps,
            expression=expression,
            is_json=is_json,
            is_text=is_text,
            saved_as=saved_as,
        ):
            if is_text and type(value) is bytes:
                value = value.decode("utf-8", "surrogateescape")
            elif type(value) is Misfiled:  # no value of the other side can equal it
                return "\x00misfiled:" + value.hex()
            try:
                for step in steps:
                    value = step(value, expression, connection)
                if saved_as is not None and value is not None:
                    value = saved_as(value)
            except Exception:  # unreadable by Django: hash what is stored
                return "\x00raw:" + repr(value)
            out = canonical(value, json_field=is_json)
            return NULL if out is None else out

        shortcut = None
        # only when no from_db_value of the field's own must run (the shortcut skips Django)
        if (
            fast
            and not expression.get_db_converters(connection)
            and (column.internal_type not in _PLAIN_TEXT or not steps)
        ):
            shortcut = _shortcut(column.internal_type, connection.vendor, read)
        readers.append(shortcut or read)
    return readers


NULL = "\x00N"  # what readers give for SQL NULL: no canonical text can hold a NUL


def row_digest(values: list[str | None]) -> int:
    """Hash one canonical row to a 128-bit integer."""
    try:
        text = "\x1e".join(values)
    except TypeError:  # a None from canonical() directly
        text = "\x1e".join(NULL if v is None else v for v in values)
    data = text.encode("utf-8", "surrogateescape")
    return int.from_bytes(hashlib.blake2b(data, digest_size=16).digest(), "big")


# --- reading a side in bounded memory -------------------------------------------------------


def iter_rows(
    side: Side, table: PlannedTable, *, columns: list[str] | None = None
) -> Iterator[list[tuple]]:
    """Yield batches of raw rows of a table from either side (no order promised)."""
    cols = ", ".join(_qi(c) for c in (columns or table.column_names))
    sql = f"SELECT {cols} FROM {_qi(table.db_table)}"
    if side.sqlite_path is not None:
        # whole rows mark a TEXT/BLOB of the wrong class, as the copy reads them
        misfiled = None if columns else misfiled_sql(table.columns, _qi)
        if misfiled is not None:
            sql = f"SELECT {cols}, {misfiled} FROM {_qi(table.db_table)}"
        conn = open_readonly(side.sqlite_path, raw_text=True)
        try:
            cur = conn.execute(sql)
            while batch := cur.fetchmany(BATCH_ROWS):
                yield batch if misfiled is None else list(map(mark_misfiled, batch))
        finally:
            conn.close()
        return
    connection = connections[side.alias]
    with connection.chunked_cursor() as cur:
        if connection.vendor == "postgresql":
            _c_timestamptz_loader(cur.cursor)
        cur.execute(sql)
        while batch := cur.fetchmany(BATCH_ROWS):
            yield batch


def _c_timestamptz_loader(cursor) -> None:
    """Use psycopg's C timestamptz loader on this cursor instead of Django's Python one.

    Both give an aware datetime for the same instant (Django's only fixes its tzinfo), and
    canonical() turns either into UTC text; Django's loader costs about a third of the read.
    """
    import psycopg
    from psycopg import pq

    oid = psycopg.adapters.types["timestamptz"].oid
    loader = psycopg.adapters.get_loader(oid, pq.Format.TEXT)
    if loader is not None:
        cursor.adapters.register_loader(oid, loader)


def _qi(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def pk_bounds(side: Side, table: PlannedTable) -> tuple[int | None, int | None]:
    """Return (min, max) of an integer primary key on one side."""
    pk = _qi(table.pk_column)
    sql = f"SELECT min({pk}), max({pk}) FROM {_qi(table.db_table)}"
    if side.sqlite_path is not None:
        conn = open_readonly(side.sqlite_path)
        try:
            return conn.execute(sql).fetchone()
        finally:
            conn.close()
    with connections[side.alias].cursor() as cur:
        cur.execute(sql)
        return cur.fetchone()


@dataclasses.dataclass(frozen=True)
class Ranges:
    """How primary keys fall into ranges; the same object is used for both sides."""

    integer: bool
    low: int = 0
    width: int = 1

    def bucket(self, pk_text: str) -> int | str:
        if self.integer:
            return (int(pk_text) - self.low) // self.width
        return pk_text[:3]  # UUID hex / text keys: a 3-character prefix range

    def describe(self, bucket: int | str, pk_column: str) -> str:
        if self.integer:
            start = self.low + bucket * self.width
            return f"{pk_column} in [{start}, {start + self.width})"
        return f"{pk_column} starting with {bucket!r}"


def plan_ranges(sides: Iterable[Side], table: PlannedTable) -> Ranges:
    """Choose ranges covering both sides' keys, at most INT_BUCKETS of them."""
    if not table.pk_is_integer:
        return Ranges(integer=False)
    lows, highs = [], []
    for side in sides:
        low, high = pk_bounds(side, table)
        if low is not None:
            lows.append(int(low))
            highs.append(int(high))
    if not lows:
        return Ranges(integer=True)
    low, high = min(lows), max(highs)
    width = max(1000, -(-(high - low + 1) // INT_BUCKETS))
    return Ranges(integer=True, low=low, width=width)


@dataclasses.dataclass
class SideSums:
    rows: int = 0
    checksum: int = 0
    buckets: dict = dataclasses.field(default_factory=dict)  # bucket -> [count, sum]

    @property
    def hex(self) -> str:
        return f"{self.checksum:032x}"


def side_sums(
    side: Side,
    table: PlannedTable,
    ranges: Ranges,
    *,
    exclude: set[str] | None = None,
    progress: Progress | None = None,
) -> SideSums:
    """Count rows and sum row hashes per primary-key range on one side."""
    readers = column_readers(table, side.django_connection)
    key, stored = key_text(table), _stored_key(side, table, exclude)
    sums = SideSums()
    buckets = sums.buckets
    for batch in iter_rows(side, table):
        for raw in batch:
            if stored is not None and stored(raw) in exclude:
                continue
            values = list(map(_call, readers, raw))
            pk = key(values)
            if exclude and stored is None and pk in exclude:
                continue
            digest = row_digest(values)
            slot = buckets.get(ranges.bucket(pk))
            if slot is None:
                buckets[ranges.bucket(pk)] = [1, digest]
            else:
                slot[0] += 1
                slot[1] = (slot[1] + digest) % MOD
            sums.rows += 1
            sums.checksum = (sums.checksum + digest) % MOD
        if progress:
            progress(table.db_table, sums.rows, 0)
    return sums


def both_sums(
    source: Side,
    target: Side,
    table: PlannedTable,
    ranges: Ranges,
    *,
    exclude: set[str] | None = None,
    progress: Progress | None = None,
) -> tuple[SideSums, SideSums]:
    """Sum both sides: SQLite against PostgreSQL in C and SQL at once where range_sums
    covers the table, else in Python, one side after the other (no forked process)."""
    fast = _fast_sums(source, target, table, ranges, exclude=exclude)
    if fast is not None:
        if progress:
            progress(table.db_table, fast[0].rows, 0)
        return fast
    return (
        side_sums(source, table, ranges, exclude=exclude, progress=progress),
        side_sums(target, table, ranges, progress=progress),
    )


def _fast_sums(
    source: Side, target: Side, table: PlannedTable, ranges: Ranges, *, exclude: set[str] | None
) -> tuple[SideSums, SideSums] | None:
    lite = source if source.sqlite_path is not None else target
    other = target if lite is source else source
    if lite.sqlite_path is None or other.alias is None:
        return None
    if exclude and lite is not source:
        return None  # quarantined keys are matched as stored in SQLite only
    found = range_sums.sums(
        sqlite_path=lite.sqlite_path,
        alias=other.alias,
        table=table,
        low=ranges.low,
        width=ranges.width,
        integer_ranges=ranges.integer,
        buckets=INT_BUCKETS + 1,
        skip=_stored_skip(exclude) if exclude else None,
    )
    if found is None:
        return None
    mine, theirs = (
        SideSums(
            rows=s.rows,
            checksum=sum(total for _, total in s.buckets.values()) % FAST_MOD,
            buckets=s.buckets,
        )
        for s in found
    )
    return (mine, theirs) if lite is source else (theirs, mine)


def _stored_skip(exclude: set[str]) -> set:
    """Quarantined keys as the C reader sees stored keys (text as bytes, integers as int),
    matching what stored_key_text gives the Python path."""
    skip: set = {key.encode("utf-8", "surrogateescape") for key in exclude}
    for key in exclude:
        try:
            if str(int(key)) == key:
                skip.add(int(key))
        except ValueError:
            pass
    return skip


def row_digests(
    side: Side,
    table: PlannedTable,
    ranges: Ranges,
    buckets: set,
    *,
    exclude: set[str] | None = None,
) -> dict[str, tuple[int, Any]]:
    """Return {canonical pk: (row hash, Django's pk value)} for rows in the given ranges."""
    readers = column_readers(table, side.django_connection)
    key, stored = key_text(table), _stored_key(side, table, exclude)
    connection = side.django_connection
    python_key = key_reader(table, connection)
    found = {}
    for batch in iter_rows(side, table):
        for raw in batch:
            if stored is not None and stored(raw) in exclude:
                continue
            values = list(map(_call, readers, raw))
            pk = key(values)
            if (exclude and stored is None and pk in exclude) or ranges.bucket(pk) not in buckets:
                continue
            found[pk] = (row_digest(values), python_key(raw))
    return found


KEY_SEPARATOR = "\x1f"  # between a composite key's canonical parts (copy.key_text agrees)


def key_text(table: PlannedTable) -> Callable[[list], str]:
    """Canonical row values -> the row's key as one text (parts joined for a composite key)."""
    if not table.composite:
        at = table.pk_index
        return lambda values: values[at]
    indexes = table.pk_indexes
    return lambda values: KEY_SEPARATOR.join([values[i] for i in indexes])


def stored_key_text(table: PlannedTable) -> Callable[[tuple], str]:
    """Raw row -> its key as stored, as text: what copy.key_text gives a rejected row, so
    a quarantined row is left out, not another whose key PostgreSQL would read the same
    (UUIDs differing in letter case)."""

    def text(value) -> str:
        return value.decode("utf-8", "surrogateescape") if type(value) is bytes else str(value)

    if not table.composite:
        at = table.pk_index
        return lambda raw: text(raw[at])
    indexes = table.pk_indexes
    return lambda raw: KEY_SEPARATOR.join([text(raw[i]) for i in indexes])


def _stored_key(side: Side, table: PlannedTable, exclude) -> Callable[[tuple], str] | None:
    """How a SQLite side matches quarantined keys: by the key as stored (None: elsewhere,
    or nothing to exclude, the canonical key is matched)."""
    return stored_key_text(table) if exclude and side.sqlite_path is not None else None


def key_reader(table: PlannedTable, connection) -> Callable[[tuple], Any]:
    """Raw row -> its key as Django's Python value (a tuple for a composite key), as
    ``Model.objects.filter(pk=...)`` takes it."""
    return lambda raw: table.python_key(table.key_of(raw), connection)


# --- the verification -----------------------------------------------------------------------


@dataclasses.dataclass
class TableCheck:
    table: str
    source_rows: int
    target_rows: int
    excluded: int = 0
    source_checksum: str = ""
    target_checksum: str = ""
    mismatched_ranges: list[str] = dataclasses.field(default_factory=list)
    missing_on_target: list = dataclasses.field(default_factory=list)
    extra_on_target: list = dataclasses.field(default_factory=list)
    different: list = dataclasses.field(default_factory=list)
    # set when the C/SQL checksums disagreed but every row compared equal (see compare_table)
    settled_in_python: bool = False
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return (
            self.source_rows == self.target_rows
            and self.source_checksum == self.target_checksum
            and not self.mismatched_ranges
        )

    def describe(self, source: Side, target: Side) -> str:
        if self.source_rows != self.target_rows:
            return (
                f"{self.table}: {self.source_rows} rows in {source}"
                + (f" (after {self.excluded} quarantined)" if self.excluded else "")
                + f", {self.target_rows} in {target}"
            )
        return (
            f"{self.table}: same row count ({self.source_rows}) but checksums differ in "
            f"{', '.join(self.mismatched_ranges[:5])}; rows differing: "
            f"{[str(p).replace(KEY_SEPARATOR, ', ') for p in self.different[:10]]}"
        )


@dataclasses.dataclass
class VerifyResult:
    tables: list[TableCheck]
    fk_problems: list[str] = dataclasses.field(default_factory=list)
    sequence_problems: list[str] = dataclasses.field(default_factory=list)
    migration_problems: list[str] = dataclasses.field(default_factory=list)
    # generated columns the engines compute differently (the copied columns are equal)
    warnings: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return (
            all(t.ok for t in self.tables)
            and not self.fk_problems
            and not self.sequence_problems
            and not self.migration_problems
        )

    def problems(self, source: Side, target: Side) -> list[str]:
        return (
            [t.describe(source, target) for t in self.tables if not t.ok]
            + self.fk_problems
            + self.sequence_problems
            + self.migration_problems
        )


def compare_table(
    source: Side,
    target: Side,
    table: PlannedTable,
    *,
    exclude: set[str] | None = None,
    progress: Progress | None = None,
) -> TableCheck:
    """Counts and range checksums of one table on both sides; name differing ranges and rows."""
    started = time.perf_counter()
    ranges = plan_ranges((source, target), table)
    ours, theirs = both_sums(source, target, table, ranges, exclude=exclude, progress=progress)
    check = _check(table, ours, theirs, exclude)
    bad = _differing_buckets(ours, theirs)
    if bad and ours.rows == theirs.rows and _fast_sums_apply(source, target, exclude):
        # the fast checksums are a second implementation of the canonical values; when they
        # disagree, Python's reference path (the one that names rows) has the last word
        left = row_digests(source, table, ranges, bad, exclude=exclude)
        if left == row_digests(target, table, ranges, bad):
            ours = side_sums(source, table, ranges, exclude=exclude)
            theirs = side_sums(target, table, ranges)
            check = _check(table, ours, theirs, exclude)
            bad = _differing_buckets(ours, theirs)
            check.settled_in_python = not bad
    if bad:
        check.mismatched_ranges = [ranges.describe(b, table.pk_label) for b in sorted(bad, key=str)]
        left = row_digests(source, table, ranges, bad, exclude=exclude)
        right = row_digests(target, table, ranges, bad)
        check.missing_on_target = sorted(set(left) - set(right))[:MAX_LISTED_ROWS]
        check.extra_on_target = sorted(set(right) - set(left))[:MAX_LISTED_ROWS]
        check.different = sorted(k for k in set(left) & set(right) if left[k][0] != right[k][0])[
            :MAX_LISTED_ROWS
        ]
    check.seconds = round(time.perf_counter() - started, 3)
    return check


def _check(table: PlannedTable, ours: SideSums, theirs: SideSums, exclude) -> TableCheck:
    return TableCheck(
        table=table.db_table,
        source_rows=ours.rows,
        target_rows=theirs.rows,
        excluded=len(exclude or ()),
        source_checksum=ours.hex,
        target_checksum=theirs.hex,
    )


def _differing_buckets(ours: SideSums, theirs: SideSums) -> set:
    return {
        b
        for b in set(ours.buckets) | set(theirs.buckets)
        if ours.buckets.get(b) != theirs.buckets.get(b)
    }


def _fast_sums_apply(source: Side, target: Side, exclude) -> bool:
    """Whether both_sums may have taken the C/SQL path (the same test _fast_sums starts with)."""
    lite = source if source.sqlite_path is not None else target
    other = target if lite is source else source
    return bool(
        lite.sqlite_path is not None
        and other.alias is not None
        and not (exclude and lite is not source)
    )


def compare_generated(
    source: Side, target: Side, table: PlannedTable, *, exclude: set[str] | None = None
) -> list[str]:
    """One warning per generated column whose values differ between the two sides.

    Neither side's value is copied: each engine computes its own from the copied columns,
    so a difference means the expression itself differs between the engines (SQLite's
    lower() folds ASCII only, PostgreSQL's every letter).
    """
    if not table.generated:
        return []
    keys = tuple(table.columns[at] for at in table.pk_indexes)
    view = dataclasses.replace(table, columns=keys + table.generated, generated=())
    key = key_text(view)
    sides = []
    for side in (source, target):
        readers = column_readers(view, side.django_connection)
        stored = _stored_key(side, view, exclude) if side is source else None
        values = {}
        for batch in iter_rows(side, view):
            for raw in batch:
                if stored is not None and stored(raw) in exclude:
                    continue
                row = list(map(_call, readers, raw))
                if side is source and exclude and stored is None and key(row) in exclude:
                    continue
                values[key(row)] = row[len(keys) :]
        sides.append(values)
    ours, theirs = sides
    warnings = []
    for at, column in enumerate(table.generated):
        differ = sorted(pk for pk in ours.keys() & theirs.keys() if ours[pk][at] != theirs[pk][at])
        if differ:
            first = differ[0]
            warnings.append(
                f"{table.db_table}.{column.name}: {column.field.expression!r} gives a different "
                f"value on {target} than on {source} in {len(differ)} row(s), e.g. pk "
                f"{first.replace(KEY_SEPARATOR, ', ')}: {_shown(ours[first][at])!r} -> "
                f"{_shown(theirs[first][at])!r}; the copied columns are equal, the "
                "generated column holds what each engine computes"
            )
    return warnings


def _shown(canonical_text: str) -> str | None:
    return None if canonical_text == NULL else canonical_text


def applied_migrations(side: Side) -> set[tuple[str, str]]:
    sql = "SELECT app, name FROM django_migrations"
    if side.sqlite_path is not None:
        conn = open_readonly(side.sqlite_path)
        try:
            return set(conn.execute(sql).fetchall())
        except sqlite3.OperationalError:
            return set()
        finally:
            conn.close()
    with connections[side.alias].cursor() as cur:
        cur.execute(sql)
        return set(cur.fetchall())


def check_foreign_keys(alias: str, plan: Plan) -> list[str]:
    """Ask the backend to check every foreign key of the planned tables."""
    from django.db import IntegrityError, transaction

    connection = connections[alias]
    try:
        with transaction.atomic(using=alias):
            connection.check_constraints(table_names=[t.db_table for t in plan.tables])
    except IntegrityError as exc:
        return [f"foreign keys: {exc}"]
    if connection.vendor == "postgresql":
        with connection.cursor() as cur:
            cur.execute(
                "SELECT conrelid::regclass::text, conname FROM pg_constraint "
                "WHERE contype = 'f' AND NOT convalidated"
            )
            return [f"foreign key {t}.{n} is not validated" for t, n in cur.fetchall()]
    return []


def check_sequences(alias: str, plan: Plan) -> list[str]:
    """Every identity/serial sequence must hand out a value above the table's max(pk)."""
    connection = connections[alias]
    if connection.vendor != "postgresql":
        return []
    problems = []
    with connection.cursor() as cur:
        for table in plan.tables:
            if not table.pk_is_integer:
                continue
            # the table name is parsed as SQL (quote it: "Select"), the column taken literally
            cur.execute(
                "SELECT pg_get_serial_sequence(%s, %s)", [_qi(table.db_table), table.pk_column]
            )
            (sequence,) = cur.fetchone()
            if sequence is None:
                continue
            cur.execute(f"SELECT last_value, is_called FROM {sequence}")
            last, called = cur.fetchone()
            cur.execute(f"SELECT max({_qi(table.pk_column)}) FROM {_qi(table.db_table)}")
            (high,) = cur.fetchone()
            next_value = last + 1 if called else last
            if high is not None and next_value <= high:
                problems.append(
                    f"sequence {sequence} would hand out {next_value}, but "
                    f"{table.db_table}.{table.pk_column} already reaches {high}"
                )
    return problems


def verify(
    *,
    source: Side,
    target: Side,
    plan: Plan | None = None,
    tables: Iterable[str] | None = None,
    exclude: dict[str, set[str]] | None = None,
    progress: Progress | None = None,
) -> VerifyResult:
    """Compare every planned table, then foreign keys, sequences and applied migrations."""
    started = time.perf_counter()
    plan = plan or build_plan(only=tables)
    exclude = exclude or {}
    checks = [
        compare_table(source, target, t, exclude=exclude.get(t.db_table), progress=progress)
        for t in plan.tables
    ]
    result = VerifyResult(tables=checks)
    for table in plan.tables:
        result.warnings += compare_generated(
            source, target, table, exclude=exclude.get(table.db_table)
        )
    if target.alias is not None:
        result.fk_problems = check_foreign_keys(target.alias, plan)
        result.sequence_problems = check_sequences(target.alias, plan)
    ours, theirs = applied_migrations(source), applied_migrations(target)
    if ours != theirs:
        result.migration_problems = [
            f"applied migrations differ: only in {source}: {sorted(ours - theirs)[:10]}; "
            f"only in {target}: {sorted(theirs - ours)[:10]}"
        ]
    result.seconds = round(time.perf_counter() - started, 3)
    return result
