"""PostgreSQL helpers for the benchmark: scratch databases, schema capture, raw COPY in and out."""

from __future__ import annotations

import dataclasses
import os
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import sql

DEFAULT_SERVER = "postgres://postgres@127.0.0.1:5432/postgres"
CHUNK = 1 << 20
MATVIEWS = ("accounts_daily_analytics",)  # derived data: refreshed, not copied


def database_url(name: str, *, server: str | None = None) -> str:
    """The URL of database `name` on the server of POSTGRES_URL (or the local default)."""
    base = server or os.environ.get("POSTGRES_URL") or DEFAULT_SERVER
    return urlunsplit(urlsplit(base)._replace(path=f"/{name}"))


def _maintenance(url: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path="/postgres"))


def _name(url: str) -> str:
    return urlsplit(url).path.lstrip("/")


def recreate_database(url: str) -> None:
    """Drop (forcing sessions out) and create the database named in url, empty."""
    with psycopg.connect(_maintenance(url), autocommit=True) as conn:
        name = sql.Identifier(_name(url))
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(name))
        conn.execute(sql.SQL("CREATE DATABASE {} ENCODING 'UTF8' TEMPLATE template0").format(name))


def drop_database(url: str) -> None:
    with psycopg.connect(_maintenance(url), autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(_name(url)))
        )


@dataclasses.dataclass
class Schema:
    """What a bulk load may drop and must rebuild: indexes, PK/UNIQUE, then foreign keys."""

    tables: list[str]
    indexes: list[tuple[str, str, str]]  # (table, name, CREATE INDEX ...)
    keys: list[tuple[str, str, str]]  # (table, name, PRIMARY KEY/UNIQUE definition)
    foreign_keys: list[tuple[str, str, str]]  # (table, name, FOREIGN KEY definition)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Schema:
        return cls(
            **{k: [tuple(x) if isinstance(x, list) else x for x in v] for k, v in data.items()}
        )


def capture_schema(url: str) -> Schema:
    """Read the tables, indexes and constraints of a migrated database from the catalogs."""
    with psycopg.connect(url) as conn:
        tables = [
            r[0]
            for r in conn.execute(
                "SELECT relname FROM pg_class WHERE relkind = 'r' "
                "AND relnamespace = 'public'::regnamespace ORDER BY relname"
            )
        ]
        indexes = conn.execute(
            """
            SELECT i.tablename, i.indexname, i.indexdef
              FROM pg_indexes i
              JOIN pg_class t ON t.relname = i.tablename AND t.relkind = 'r'
                             AND t.relnamespace = 'public'::regnamespace
             WHERE i.schemaname = 'public'
               AND NOT EXISTS (SELECT 1 FROM pg_constraint c
                                WHERE c.conindid = format('%I.%I', i.schemaname,
                                                          i.indexname)::regclass
                                  AND c.contype IN ('p', 'u', 'x'))
             ORDER BY i.tablename, i.indexname
            """
        ).fetchall()
        constraints = conn.execute(
            """
            SELECT c.relname, k.conname, k.contype, pg_get_constraintdef(k.oid)
              FROM pg_constraint k JOIN pg_class c ON c.oid = k.conrelid
             WHERE k.connamespace = 'public'::regnamespace AND k.contype IN ('p', 'u', 'f')
             ORDER BY 1, 2
            """
        ).fetchall()
    keys = [(t, n, d) for t, n, kind, d in constraints if kind in ("p", "u")]
    fks = [(t, n, d) for t, n, kind, d in constraints if kind == "f"]
    return Schema(tables=tables, indexes=list(indexes), keys=keys, foreign_keys=fks)


def _qi(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def truncate_all(url: str, tables: list[str]) -> None:
    """Empty every table (migrate fills content types, permissions, django_migrations)."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"TRUNCATE {', '.join(_qi(t) for t in tables)} CASCADE")


def strip_schema(url: str, schema: Schema) -> None:
    """Drop foreign keys, then primary keys/uniques, then the other indexes."""
    with psycopg.connect(url, autocommit=True) as conn:
        for table, name, _ in schema.foreign_keys + schema.keys:
            conn.execute(f"ALTER TABLE {_qi(table)} DROP CONSTRAINT {_qi(name)}")
        for _table, name, _ in schema.indexes:
            conn.execute(f"DROP INDEX {_qi(name)}")


def _run_all(url: str, statements: list[str], workers: int) -> None:
    def run(batch: list[str]) -> None:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("SET maintenance_work_mem = '256MB'")
            for statement in batch:
                conn.execute(statement)

    batches = [statements[i::workers] for i in range(workers)]
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(run, [b for b in batches if b]))


def rebuild_schema(url: str, schema: Schema, *, workers: int = 2) -> None:
    """Build keys and indexes (in parallel), then add and validate the foreign keys."""
    first = [f"ALTER TABLE {_qi(t)} ADD CONSTRAINT {_qi(n)} {d}" for t, n, d in schema.keys]
    first += [definition for _t, _n, definition in schema.indexes]
    _run_all(url, first, workers)
    fks = [f"ALTER TABLE {_qi(t)} ADD CONSTRAINT {_qi(n)} {d}" for t, n, d in schema.foreign_keys]
    _run_all(url, fks, workers)


def reset_sequences(url: str) -> None:
    """Move every owned sequence above the highest id, as a real migration must."""
    with psycopg.connect(url, autocommit=True) as conn:
        owned = conn.execute(
            """
            SELECT t.relname, a.attname, s.oid::regclass::text  -- quoted: "Select_id_seq"
              FROM pg_depend d
              JOIN pg_class s ON s.oid = d.objid AND s.relkind = 'S'
              JOIN pg_class t ON t.oid = d.refobjid
              JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = d.refobjsubid
             WHERE t.relnamespace = 'public'::regnamespace
            """
        ).fetchall()
        for table, column, sequence in owned:
            conn.execute(
                f"SELECT setval({psycopg.sql.Literal(sequence).as_string(conn)}, "
                f"coalesce(max({_qi(column)}), 1), max({_qi(column)}) IS NOT NULL) "
                f"FROM {_qi(table)}"
            )


def table_counts(url: str, tables: list[str]) -> dict[str, int]:
    with psycopg.connect(url) as conn:
        return {t: conn.execute(f"SELECT count(*) FROM {_qi(t)}").fetchone()[0] for t in tables}


def sqlite_counts(path: Path) -> dict[str, int]:
    """Rows per table in the SQLite file (read-only)."""
    conn = sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True)
    try:
        names = [
            r[0]
            for r in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' "
                "AND name NOT LIKE 'sqlite_%' ORDER BY name"
            )
        ]
        return {n: conn.execute(f"SELECT count(*) FROM {_qi(n)}").fetchone()[0] for n in names}
    finally:
        conn.close()


def dump_tables(url: str, directory: Path, tables: list[str]) -> dict[str, int]:
    """Write each table as a PostgreSQL binary COPY file; return bytes per table."""
    directory.mkdir(parents=True, exist_ok=True)
    sizes = {}
    with psycopg.connect(url) as conn, conn.cursor() as cur:
        for table in tables:
            path = directory / f"{table}.bin"
            statement = f"COPY {_qi(table)} TO STDOUT (FORMAT BINARY)"
            with open(path, "wb") as fh, cur.copy(statement) as copy:
                for chunk in copy:
                    fh.write(chunk)
            sizes[table] = path.stat().st_size
    return sizes


def load_tables(url: str, directory: Path, tables: list[str], *, workers: int = 2) -> None:
    """Stream the binary COPY files into the tables, biggest first, `workers` at a time."""

    def load(table: str) -> None:
        statement = f"COPY {_qi(table)} FROM STDIN (FORMAT BINARY)"
        with (
            psycopg.connect(url) as conn,
            conn.cursor() as cur,
            open(directory / f"{table}.bin", "rb") as fh,
            cur.copy(statement) as copy,
        ):
            while chunk := fh.read(CHUNK):
                copy.write(chunk)

    ordered = sorted(tables, key=lambda t: (directory / f"{t}.bin").stat().st_size, reverse=True)
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(load, ordered))


def column_types(url: str) -> dict[tuple[str, str], tuple[str, bool]]:
    """(table, column) -> (SQL type, NOT NULL) for every ordinary table."""
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            """
            SELECT c.relname, a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull
              FROM pg_attribute a
              JOIN pg_class c ON c.oid = a.attrelid AND c.relkind = 'r'
             WHERE c.relnamespace IN (SELECT oid FROM pg_namespace
                                       WHERE nspname NOT IN ('pg_catalog', 'information_schema')
                                         AND nspname NOT LIKE 'pg_toast%')
               AND a.attnum > 0 AND NOT a.attisdropped
            """
        ).fetchall()
    return {(t, c): (typ, notnull) for t, c, typ, notnull in rows}


@dataclasses.dataclass
class SchemaDiff:
    not_null_lost: list[str]
    type_changes: dict[str, list[str]]  # "uuid -> text" -> ["accounts_user.id", ...]
    missing_columns: list[str]

    def summary(self) -> list[str]:
        lines = []
        if self.not_null_lost:
            lines.append(
                f"NOT NULL lost on {len(self.not_null_lost)} columns "
                f"(e.g. {', '.join(self.not_null_lost[:3])})"
            )
        for change, columns in sorted(self.type_changes.items(), key=lambda kv: -len(kv[1])):
            lines.append(f"{change}: {len(columns)} columns (e.g. {', '.join(columns[:2])})")
        if self.missing_columns:
            lines.append(f"{len(self.missing_columns)} columns missing")
        return lines


def compare_columns(reference: dict, other: dict) -> SchemaDiff:
    """How `other` (e.g. pgloader's schema) differs from the Django-made `reference`."""
    lost, changes, missing = [], {}, []
    for (table, column), (typ, notnull) in sorted(reference.items()):
        if table in MATVIEWS:
            continue
        found = other.get((table, column))
        if found is None:
            missing.append(f"{table}.{column}")
            continue
        if notnull and not found[1]:
            lost.append(f"{table}.{column}")
        if _base(typ) != _base(found[0]):
            changes.setdefault(f"{_base(typ)} -> {_base(found[0])}", []).append(f"{table}.{column}")
    return SchemaDiff(not_null_lost=lost, type_changes=changes, missing_columns=missing)


def _base(sql_type: str) -> str:
    return sql_type.split("(")[0]
