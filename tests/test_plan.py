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
    for table in plan.tables:
        for fk in table.foreign_keys:
            if fk.to_table != table.db_table:
                assert order.index(fk.to_table) < order.index(table.db_table), (table, fk)
    assert ("accounts_user", "invited_by_id") in {(t, fk.column) for t, fk in plan.deferred_fks}


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
