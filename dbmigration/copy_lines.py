"""COPY text lines for a table's SQLite rows: C for clean values, Python for the rest.

A Python call per value costs about 20 µs a row, and a Python object per value most of
the rest.  So each table is read by ``_copytext.Reader`` (dbmigration/_copytext.c) on
its own read-only connection: it checks and prints the clean values of the common types
itself (``casts.NATIVE_PATHS``) and calls the column's Python converter only for the
others (IPv6 not in Django's form, custom fields).  A row with any value outside those
clean forms comes back raw, to be converted whole in Python by the caller: exact value,
repair, or rejection with its reason, as before.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

from dbmigration.casts import (
    BOOL,
    DATE,
    DATETIME,
    DECIMAL,
    INT,
    IP,
    JSON,
    PYTHON,
    TEXT,
    UUID,
    Misfiled,
    TargetColumn,
    build_converter,
    native_cast,
    storage_class,
)
from dbmigration.plan import PlannedTable

try:
    from dbmigration import _copytext
except ImportError:  # not compiled: every row takes the Python path (correct, slower)
    _copytext = None


def _qi(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


@dataclasses.dataclass
class Lines:
    data: bytes  # COPY text of the rows C could print
    fallback: list[tuple]  # raw rows for the whole-row Python path
    skipped: int  # rows left out because their primary key is in `skip`
    read: int


@dataclasses.dataclass(frozen=True)
class LinePlan:
    table: PlannedTable
    select: str
    spec: tuple  # per column: (kind, nullable, a, b, obj, width, storage) as _copytext.c reads it
    binary: bool = False  # COPY's binary format: every column has a binary form in C

    # the key column a skip set is matched on: copy.py gives a composite key's table
    # no skip set (its rows are skipped in Python), so the first column is as good as any

    def format(self, batch: list[tuple], *, skip: set | None = None) -> Lines:
        """Print what C can; hand back the other rows, raw."""
        data, fallback, skipped = _copytext.format_rows(
            batch, self.spec, skip, self.table.pk_indexes[0], self.binary
        )
        return Lines(data, [batch[i] for i in fallback], skipped, len(batch))

    def read(self, uri: str, *, skip: set | None = None, batch_rows: int) -> Iterator[Lines]:
        """Read the table straight from the SQLite file (a read-only URI) in C, in batches:
        Python objects only for the values and rows that need Python."""
        reader = _copytext.Reader(
            uri, self.select, self.spec, skip, self.table.pk_indexes[0], self.binary, Misfiled
        )
        try:
            while True:
                data, fallback, skipped, read = reader.batch(batch_rows)
                if not read:
                    return
                yield Lines(data, fallback, skipped, read)
        finally:
            reader.close()


# binary COPY: what each kind needs the target column to be
_BINARY_TARGETS = {
    BOOL: {"bool"},
    UUID: {"uuid"},
    DATETIME: {"timestamptz"},
    DATE: {"date"},
    JSON: {"jsonb"},
    IP: {"inet"},
    DECIMAL: {"numeric"},
    TEXT: {"varchar", "text", "bpchar"},
}
_INT_WIDTHS = {"int2": 2, "int4": 4, "int8": 8}


def line_plan(
    table: PlannedTable,
    targets: dict[str, TargetColumn] | None,
    *,
    enabled: bool = True,
    binary: bool = True,
) -> LinePlan | None:
    """Plan a table's SELECT and C spec, or None when there is no C formatter to use.

    The plan is for COPY's binary format (which PostgreSQL parses with less work) when
    every column has a binary form in C and the target's catalog confirms its type;
    otherwise for the text format.
    """
    if _copytext is None or not enabled:
        return None
    targets = targets or {}
    spec = []
    for column in table.columns:
        target = targets.get(column.name)
        cast = native_cast(column, target)
        nullable = (not target.not_null) if target is not None else column.null
        width = _INT_WIDTHS.get(target.type_name, 0) if target is not None else 0
        binary = binary and target is not None and _binary_form(cast, target)
        storage = storage_class(column)
        if cast.kind in (PYTHON, IP, DECIMAL):
            # in the text format, values C does not print itself go through this
            # converter; built without repairs, so a value a repair rule would change takes
            # the whole-row path, which records the repair
            convert: Callable[[Any], Any] = build_converter(column, target)
            spec.append((cast.kind, nullable, cast.low, cast.high, convert, width, storage))
        elif cast.kind == TEXT:
            spec.append((TEXT, nullable, cast.low, 0, cast.labels, width, storage))
        else:
            spec.append((cast.kind, nullable, cast.low, cast.high, None, width, storage))
    columns = ", ".join(_qi(c.name) for c in table.columns)
    select = f"SELECT {columns} FROM {_qi(table.db_table)}"
    return LinePlan(table=table, select=select, spec=tuple(spec), binary=binary)


def _binary_form(cast, target: TargetColumn) -> bool:
    if cast.kind == INT:
        return target.type_name in _INT_WIDTHS
    if cast.kind == TEXT and target.enum_labels is not None:
        return True  # an enum's binary input is its label
    return target.type_name in _BINARY_TARGETS.get(cast.kind, ())


BINARY_HEADER = b"PGCOPY\n\xff\r\n\x00" + bytes(8)  # signature, flags, no extension
BINARY_TRAILER = b"\xff\xff"
