"""Which tables to copy, in which order, with which columns: from Django's model metadata only.

Every concrete, managed model of every installed app plus the auto-created many-to-many
tables.  Tables come in foreign-key order; self-references and cycles cannot be ordered,
so the copy loads without foreign-key constraints and adds them afterwards (``deferred_fks``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

from django.apps import apps
from django.db import models

from dbmigration.errors import MigrationError


@dataclasses.dataclass(frozen=True)
class PlannedColumn:
    name: str  # database column
    field: models.Field
    internal_type: str  # of the field that holds the value (a FK resolves to its target)
    null: bool


@dataclasses.dataclass(frozen=True)
class ForeignKeyRef:
    column: str
    to_table: str
    to_column: str


@dataclasses.dataclass(frozen=True)
class PlannedTable:
    """One table to copy.  Its key is a tuple of columns: one, or several for a
    ``CompositePrimaryKey``; ``key_of`` and ``key_in`` treat both alike."""

    db_table: str
    label: str  # app_label.ModelName (auto-created m2m: app_label.Model_field)
    model: type[models.Model]
    pk_columns: tuple[str, ...]
    columns: tuple[PlannedColumn, ...]  # what the copy writes (generated columns excluded)
    foreign_keys: tuple[ForeignKeyRef, ...]  # enforced by the database (db_constraint)
    unique_sets: tuple[tuple[str, ...], ...]  # unconditional unique column sets (pk excluded)
    generated: tuple[PlannedColumn, ...] = ()  # stored generated columns: PostgreSQL computes

    @property
    def column_names(self) -> list[str]:
        return [c.name for c in self.columns]

    @property
    def composite(self) -> bool:
        return len(self.pk_columns) > 1

    @property
    def pk_column(self) -> str:
        """The key column of a single-column key (a composite key has no one column)."""
        if self.composite:
            raise ValueError(f"{self.db_table} has a composite key {self.pk_label}")
        return self.pk_columns[0]

    @property
    def pk_label(self) -> str:
        """The key's column(s), for messages."""
        return (
            ", ".join(self.pk_columns) if not self.composite else f"({', '.join(self.pk_columns)})"
        )

    @property
    def pk_indexes(self) -> tuple[int, ...]:
        names = self.column_names
        return tuple(names.index(c) for c in self.pk_columns)

    @property
    def pk_index(self) -> int:
        """Where a single-column key sits in a row (``key_of`` reads any key)."""
        return self.column_names.index(self.pk_column)

    @property
    def pk_is_integer(self) -> bool:
        return not self.composite and self.columns[self.pk_index].internal_type in INTEGER_TYPES

    def key_of(self, row) -> Any:
        """The key of a row in column order: its one value, or a tuple for a composite key."""
        if not self.composite:
            return row[self.pk_index]
        return tuple(row[i] for i in self.pk_indexes)

    def key_sql(self, prefix: str = "") -> str:
        """The key as an SQL expression (a row value for a composite key)."""
        cols = [prefix + qi(c) for c in self.pk_columns]
        return cols[0] if not self.composite else f"({', '.join(cols)})"

    def key_in(self, count: int, mark: str = "?") -> str:
        """``key IN (...)`` for count keys, placeholders flat (see ``key_params``); the same
        text works on SQLite and PostgreSQL."""
        if not self.composite:
            return f"{self.key_sql()} IN ({', '.join([mark] * count)})"
        one = f"({', '.join([mark] * len(self.pk_columns))})"
        return f"{self.key_sql()} IN (VALUES {', '.join([one] * count)})"

    def key_equals(self, left: str, right: str) -> str:
        """Join condition: the key of table alias left equals the key of alias right."""
        return " AND ".join(f"{left}.{qi(c)} = {right}.{qi(c)}" for c in self.pk_columns)

    def key_params(self, keys, connection=None) -> list:
        """Flatten keys (values or tuples) into parameters for ``key_in``; with a
        connection, keys are Django's Python values, each part prepared by its field."""
        keys = [key if self.composite else (key,) for key in keys]
        if connection is None:
            return [part for key in keys for part in key]
        fields = [self.columns[at].field for at in self.pk_indexes]
        return [
            field.get_db_prep_value(part, connection)
            for key in keys
            for field, part in zip(fields, key, strict=True)
        ]

    def python_key(self, raw_key, connection) -> Any:
        """A key as connection's database gave it -> Django's Python value (the
        backend's converters, as the ORM reads it)."""
        parts = []
        for at, value in zip(
            self.pk_indexes, raw_key if self.composite else (raw_key,), strict=True
        ):
            expression = self.columns[at].field.get_col(self.db_table)
            if type(value) is bytes:  # text read as stored (raw_text)
                value = value.decode("utf-8", "surrogateescape")
            steps = connection.ops.get_db_converters(expression)
            for step in steps + expression.get_db_converters(connection):
                value = step(value, expression, connection)
            parts.append(value)
        return tuple(parts) if self.composite else parts[0]


@dataclasses.dataclass
class Plan:
    tables: list[PlannedTable]
    deferred_fks: list[tuple[str, ForeignKeyRef]]  # (table, fk) pointing to itself or later

    def table(self, db_table: str) -> PlannedTable:
        for table in self.tables:
            if table.db_table == db_table:
                return table
        raise KeyError(db_table)

    @property
    def models(self) -> list[type[models.Model]]:
        return [t.model for t in self.tables]


INTEGER_TYPES = frozenset(
    {
        "AutoField",
        "BigAutoField",
        "SmallAutoField",
        "IntegerField",
        "BigIntegerField",
        "SmallIntegerField",
        "PositiveIntegerField",
        "PositiveBigIntegerField",
        "PositiveSmallIntegerField",
    }
)


def qi(name: str) -> str:
    """Quote an identifier (same rule for SQLite and PostgreSQL): mixed case, reserved words
    and spaces all stay as Django named them."""
    return '"' + name.replace('"', '""') + '"'


def value_field(field: models.Field) -> models.Field:
    """Return the field whose type the column holds (a ForeignKey holds its target's)."""
    while field.is_relation and getattr(field, "target_field", None) is not None:
        field = field.target_field
    return field


def copied_models() -> list[type[models.Model]]:
    """Return every concrete, managed, non-proxy model, auto-created m2m tables included,
    except those whose policy is to skip them (dbmigration.policies)."""
    from dbmigration.conf import SKIP
    from dbmigration.policies import policy_for

    found = []
    for model in apps.get_models(include_auto_created=True):
        opts = model._meta
        if opts.proxy or not opts.managed or opts.swapped or opts.abstract:
            continue
        if policy_for(model).policy == SKIP:
            continue  # the project rebuilds it on the new engine (e.g. a search index)
        found.append(model)
    return found


def _plan_table(model: type[models.Model]) -> PlannedTable:
    opts = model._meta
    columns, generated, fks = [], [], []
    for field in opts.local_concrete_fields:
        held = value_field(field)
        column = PlannedColumn(
            name=field.column,
            field=field,
            internal_type=held.get_internal_type(),
            null=field.null,
        )
        if getattr(field, "generated", False):
            # PostgreSQL computes it (COPY may not write it); read only to verify
            generated.append(column)
            continue
        columns.append(column)
        # without a database constraint a value pointing nowhere is legal data
        if field.is_relation and (field.many_to_one or field.one_to_one) and field.db_constraint:
            target = field.target_field
            fks.append(
                ForeignKeyRef(
                    column=field.column,
                    to_table=target.model._meta.db_table,
                    to_column=target.column,
                )
            )
    uniques: list[tuple[str, ...]] = []
    by_name = {f.name: f for f in opts.local_concrete_fields}
    for field in opts.local_concrete_fields:
        if field.unique and not field.primary_key:
            uniques.append((field.column,))
    for together in opts.unique_together:
        uniques.append(tuple(by_name[n].column for n in together))
    for constraint in opts.constraints:
        if (
            isinstance(constraint, models.UniqueConstraint)
            and constraint.fields
            and constraint.condition is None
            and not constraint.expressions
        ):
            uniques.append(tuple(by_name[n].column for n in constraint.fields))
    return PlannedTable(
        db_table=opts.db_table,
        label=opts.label,
        model=model,
        pk_columns=tuple(f.column for f in _key_fields(opts)),
        columns=tuple(columns),
        foreign_keys=tuple(fks),
        unique_sets=tuple(dict.fromkeys(uniques)),
        generated=tuple(generated),
    )


def _key_fields(opts) -> list[models.Field]:
    """The primary key's fields: one, or the parts of a CompositePrimaryKey."""
    if isinstance(opts.pk, models.CompositePrimaryKey):
        return list(opts.pk.fields)
    return [opts.pk]


def build_plan(
    *, only: Iterable[str] | None = None, models: Iterable[type[models.Model]] | None = None
) -> Plan:
    """Plan every copied model in FK order; `only` keeps a subset (db tables or labels)."""
    found = copied_models() if models is None else list(models)
    tables = {t.db_table: t for t in map(_plan_table, found)}
    if only is not None:
        wanted = set(only)
        unknown = wanted - set(tables) - {t.label for t in tables.values()}
        if unknown:
            raise MigrationError(
                f"Unknown table(s): {', '.join(sorted(unknown))}. Name a db_table or an "
                f"app_label.Model, e.g. {next(iter(sorted(tables)), 'accounts_user')}."
            )
        tables = {k: t for k, t in tables.items() if k in wanted or t.label in wanted}
    ordered: list[PlannedTable] = []
    deferred: list[tuple[str, ForeignKeyRef]] = []
    placed: set[str] = set()
    pending = sorted(tables)
    while pending:
        ready = [
            name
            for name in pending
            if all(
                fk.to_table in placed or fk.to_table == name or fk.to_table not in tables
                for fk in tables[name].foreign_keys
            )
        ]
        if not ready:  # a cycle: take the first and defer what it points forward to
            ready = [pending[0]]
        for name in ready:
            table = tables[name]
            for fk in table.foreign_keys:
                if fk.to_table == name or (fk.to_table in tables and fk.to_table not in placed):
                    deferred.append((name, fk))
            ordered.append(table)
            placed.add(name)
        pending = [n for n in pending if n not in placed]
    return Plan(tables=ordered, deferred_fks=deferred)


# --- what migrate_data --plan shows (issue 10) --------------------------------------------


@dataclasses.dataclass
class PlannedCopy:
    db_table: str
    label: str
    source_rows: int | None  # None: the table is missing from the SQLite file


@dataclasses.dataclass
class CopyPreview:
    """What a copy would do, read from the models and a read-only look at SQLite."""

    tables: list[PlannedCopy]  # in copy order
    skipped: list[tuple[str, str]]  # (model label, why it is not copied)
    deferred_fks: int  # foreign keys added after the load (self-references, cycles)

    @property
    def rows(self) -> int:
        return sum(t.source_rows or 0 for t in self.tables)


def preview_copy(*, sqlite_path, only: Iterable[str] | None = None) -> CopyPreview:
    """Plan the copy and count each table's rows in SQLite; writes nothing anywhere."""
    from dbmigration.policies import skipped_models
    from dbmigration.sqlite_source import open_readonly

    plan = build_plan(only=only)
    skipped = [(p.label, p.reason or "policy: skip") for p in skipped_models(apps.get_models())]
    skipped += sorted(
        (m._meta.label, "unmanaged: the project's migrations build it on PostgreSQL")
        for m in apps.get_models()
        if not m._meta.managed and not m._meta.proxy
    )
    conn = open_readonly(sqlite_path)
    try:
        present = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        tables = [
            PlannedCopy(
                db_table=t.db_table,
                label=t.label,
                source_rows=conn.execute(f"SELECT COUNT(*) FROM {qi(t.db_table)}").fetchone()[0]
                if t.db_table in present
                else None,
            )
            for t in plan.tables
        ]
    finally:
        conn.close()
    return CopyPreview(tables=tables, skipped=skipped, deferred_fks=len(plan.deferred_fks))
