"""Which tables to copy, in which order, with which columns: from Django's model metadata only.

Every concrete, managed model of every installed app plus the auto-created many-to-many
tables.  Tables come in foreign-key order; self-references and cycles cannot be ordered,
so the copy loads without foreign-key constraints and adds them afterwards (``deferred_fks``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

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
    db_table: str
    label: str  # app_label.ModelName (auto-created m2m: app_label.Model_field)
    model: type[models.Model]
    pk_column: str
    columns: tuple[PlannedColumn, ...]
    foreign_keys: tuple[ForeignKeyRef, ...]
    unique_sets: tuple[tuple[str, ...], ...]  # unconditional unique column sets (pk excluded)

    @property
    def column_names(self) -> list[str]:
        return [c.name for c in self.columns]

    @property
    def pk_index(self) -> int:
        return self.column_names.index(self.pk_column)

    @property
    def pk_is_integer(self) -> bool:
        return self.columns[self.pk_index].internal_type in INTEGER_TYPES


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
    columns, fks = [], []
    for field in opts.local_concrete_fields:
        if getattr(field, "generated", False):
            continue  # a GeneratedField: PostgreSQL computes it, COPY may not write it
        held = value_field(field)
        columns.append(
            PlannedColumn(
                name=field.column,
                field=field,
                internal_type=held.get_internal_type(),
                null=field.null,
            )
        )
        if field.is_relation and (field.many_to_one or field.one_to_one):
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
        pk_column=opts.pk.column,
        columns=tuple(columns),
        foreign_keys=tuple(fks),
        unique_sets=tuple(dict.fromkeys(uniques)),
    )


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
