"""Drop secondary indexes and constraints before the load and rebuild them after it.

The catalog is snapshotted first, so what is rebuilt is exactly what Django's
migrations made; a unique index that fails to build names the duplicate rows.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterable
from concurrent.futures import wait

from django.db import connections

from dbmigration.plan import Plan, qi
from dbmigration.rejections import RejectedRow, key_columns, split_keys
from dbmigration.rows import plain_key

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


def still_missing(pg, drop: list[SchemaObject]) -> list[SchemaObject]:
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
        keys = key_columns(table)
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
        for key, (duplicate, number) in split_keys(table, rows):
            # as SQLite stores the key, to find the row (and rows pointing at it) there
            raw = table.key_params([table.python_key(key, pg)], lite)
            raw = tuple(raw) if table.composite else raw[0]
            if number == 1:
                keeper = key
                continue
            found.append(
                RejectedRow.of(
                    table,
                    raw,
                    column=obj.name,
                    code="unique",
                    reason=(
                        f"duplicate of pk {plain_key(keeper)!r} under unique {obj.name} "
                        f"({exprs}{' WHERE ' + predicate if predicate else ''}) as "
                        "PostgreSQL compares it"
                    ),
                    shown=duplicate,
                )
            )
    return found
