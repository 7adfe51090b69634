"""plan.py: every concrete managed model, m2m tables, FK order, from metadata only."""

import pytest
from django.apps import apps
from django.db import models

from dbmigration.plan import build_plan, copied_models


def test_every_concrete_managed_model_and_auto_m2m_is_planned():
    plan = build_plan()
    names = {t.db_table for t in plan.tables}
    assert {
        "accounts_user",
        "accounts_user_groups",  # auto-created m2m
        "accounts_user_user_permissions",
        "auth_group_permissions",
        "django_content_type",
        "auth_permission",
        "django_session",
        "django_admin_log",
        "auditlog_logentry",
        "accounts_membership",
    } <= names
    assert "auth_user" not in names  # swapped out by accounts.User
    for model in apps.get_models(include_auto_created=True):
        meta = model._meta
        if meta.proxy or not meta.managed or meta.swapped:
            assert meta.db_table not in names or any(
                m._meta.db_table == meta.db_table for m in copied_models()
            )


def test_foreign_key_order_and_deferred_self_reference():
    plan = build_plan()
    order = [t.db_table for t in plan.tables]
    deferred = {(t, fk) for t, fk in plan.deferred_fks}
    for table in plan.tables:
        for fk in table.foreign_keys:
            if (table.db_table, fk) not in deferred:
                assert order.index(fk.to_table) < order.index(table.db_table), (table, fk)
    assert ("accounts_user", "invited_by_id") in {(t, fk.column) for t, fk in plan.deferred_fks}
    # a cycle (corpus CycleA <-> CycleB): exactly one of its keys is deferred
    cycle = {"corpus_relations_cyclea", "corpus_relations_cycleb"}
    assert len([t for t, fk in plan.deferred_fks if {t, fk.to_table} == cycle]) == 1


def test_columns_carry_fields_and_value_types():
    users = build_plan().table("accounts_user")
    by_name = {c.name: c for c in users.columns}
    assert by_name["id"].internal_type == "UUIDField"
    assert by_name["invited_by_id"].internal_type == "UUIDField"  # a FK holds its target's type
    assert isinstance(by_name["preferences"].field, models.JSONField)
    assert users.pk_column == "id" and not users.pk_is_integer
    assert ("email",) in users.unique_sets
    assert ("user_id", "organisation_id") in build_plan().table("accounts_membership").unique_sets


def test_subset_and_unknown_tables():
    plan = build_plan(only=["accounts_user", "accounts.LoginEvent"])
    assert [t.db_table for t in plan.tables] == ["accounts_user", "accounts_loginevent"]
    from dbmigration.errors import MigrationError

    with pytest.raises(MigrationError, match="Unknown table.*nope"):
        build_plan(only=["nope"])


def test_cycles_are_planned_with_deferred_keys():
    """Two models pointing at each other: both planned, the backward key deferred."""
    from django.test.utils import isolate_apps

    with isolate_apps("dbmigration"):

        class Hen(models.Model):
            egg = models.ForeignKey("Egg", null=True, on_delete=models.SET_NULL)

            class Meta:
                app_label = "dbmigration"

            def __str__(self):
                return "hen"

        class Egg(models.Model):
            hen = models.ForeignKey(Hen, null=True, on_delete=models.SET_NULL)

            class Meta:
                app_label = "dbmigration"

            def __str__(self):
                return "egg"

        plan = build_plan(models=[Hen, Egg])
    assert sorted(t.db_table for t in plan.tables) == ["dbmigration_egg", "dbmigration_hen"]
    first = plan.tables[0].db_table
    assert [(t, fk.to_table) for t, fk in plan.deferred_fks] == [
        (first, ({"dbmigration_egg", "dbmigration_hen"} - {first}).pop())
    ]


def test_generated_columns_are_left_to_postgresql():
    from django.db.models.functions import Lower
    from django.test.utils import isolate_apps

    with isolate_apps("dbmigration"):

        class Person(models.Model):
            name = models.CharField(max_length=10)
            lower = models.GeneratedField(
                expression=Lower("name"),
                output_field=models.CharField(max_length=10),
                db_persist=True,
            )

            class Meta:
                app_label = "dbmigration"

            def __str__(self):
                return self.name

        plan = build_plan(models=[Person])
    assert plan.tables[0].column_names == ["id", "name"]


def test_composite_key_is_a_tuple_of_columns():
    """Issue 9.3: PlannedTable.pk_index crashed with 'None is not in list'."""
    table = build_plan().table("corpus_relations_compositekey")
    assert table.composite and table.pk_columns == ("owner_id", "slot")
    assert table.pk_indexes == (1, 2) or table.pk_indexes == tuple(
        table.column_names.index(c) for c in ("owner_id", "slot")
    )
    row = tuple(f"v{i}" for i in range(len(table.columns)))
    assert table.key_of(row) == tuple(row[i] for i in table.pk_indexes)
    assert table.key_sql() == '("owner_id", "slot")'
    assert table.key_in(2) == '("owner_id", "slot") IN (VALUES (?, ?), (?, ?))'
    assert table.key_params([(1, "a"), (2, "b")]) == [1, "a", 2, "b"]
    assert not table.pk_is_integer
    with pytest.raises(ValueError, match="composite key"):
        table.pk_column  # noqa: B018 a one-column name would be wrong for this table
    single = build_plan().table("corpus_relations_autokey")
    assert single.key_of((5, "x")) == 5 and single.key_in(2) == '"id" IN (?, ?)'


def test_unconstrained_foreign_keys_are_not_enforced():
    """Issue 9.15: a db_constraint=False key pointing nowhere is legal data."""
    loose = build_plan().table("corpus_relations_looselink")
    assert loose.foreign_keys == ()
    assert "place_id" in loose.column_names


def test_generated_columns_are_kept_apart_for_verification():
    computed = build_plan().table("corpus_relations_computed")
    assert "total" not in computed.column_names
    assert [(c.name, c.internal_type) for c in computed.generated] == [
        ("total", "IntegerField"),
        ("lowered", "CharField"),
        ("product", "BigIntegerField"),
    ]
