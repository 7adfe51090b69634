"""seed_demo: deterministic demo data, stored exactly as Django's SQLite backend stores it."""

import hashlib
import json
from decimal import Decimal
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command
from django.db import connections
from django.db.backends.sqlite3.base import DatabaseWrapper

from fixtures import demo

FIXTURE = Path(demo.__file__).resolve().parent / "small.json"
USERS = 400


def _seed(users=USERS, **kwargs) -> str:
    out = StringIO()
    call_command("seed_demo", users=users, stdout=out, **kwargs)
    return out.getvalue()


def _schema(alias="sqlite") -> list:
    with connections[alias].cursor() as cursor:
        cursor.execute("SELECT type, name, sql FROM sqlite_master ORDER BY type, name")
        return cursor.fetchall()


def _digest(alias="sqlite") -> str:
    digest = hashlib.sha256()
    with connections[alias].cursor() as cursor:
        for table in demo.TABLE_FIELDS:
            cursor.execute(f'SELECT * FROM "{table}" ORDER BY id')
            for row in cursor.fetchall():
                digest.update(repr(row).encode())
    return digest.hexdigest()


@pytest.mark.django_db(databases="__all__", transaction=True)
def test_orm_reads_back_exactly_what_the_generator_meant():
    schema_before = _schema()
    out = _seed()
    assert "users" in out and "Seeded" in out and f"{USERS:,} users" in out
    assert _schema() == schema_before  # the dropped indexes came back identical

    models = demo.table_models()
    expected: dict[str, dict] = {table: {} for table in demo.TABLE_FIELDS}
    for table, values in demo.meant_rows(USERS):
        expected[table][values["id"]] = values
    for table, model in models.items():
        manager = getattr(model, "all_objects", model._default_manager)
        stored = {obj.pk: obj for obj in manager.using("sqlite").all()}
        assert stored.keys() == expected[table].keys(), table
        for pk, values in expected[table].items():
            obj = stored[pk]
            for attname, meant in values.items():
                got = getattr(obj, attname)
                assert got == meant, (table, pk, attname, got, meant)
                if isinstance(meant, Decimal):
                    assert str(got) == str(meant)

    # realistic proportions and the cases downstream tests rely on
    users = list(expected["accounts_user"].values())
    assert 4.0 < len(expected["accounts_loginevent"]) / USERS < 6.5
    assert 1.0 < len(expected["accounts_kycverification"]) / USERS < 1.4
    assert any(u["deleted_at"] for u in users) and any(u["invited_by_id"] for u in users)
    assert any(not u["email"].isascii() or not u["last_name"].isascii() for u in users)
    admins = {u["id"] for u in users if u["role"] == "admin"}
    reviewers = {k["reviewer_id"] for k in expected["accounts_kycverification"].values()}
    assert reviewers - {None} <= admins
    assert {u["role"] for u in users} == {"admin", "buyer", "agent", "developer", "solicitor"}
    for u in users:
        assert u["email"] == u["email"].lower()
    from accounts.models import User

    assert User.objects.using("sqlite").count() < User.all_objects.using("sqlite").count()


@pytest.mark.django_db(databases="__all__", transaction=True)
def test_stored_values_equal_what_django_itself_would_store():
    """Each raw column (typeof and quote()) equals Django's get_db_prep_save + sqlite3 adapters."""
    _seed(users=150)
    connection = connections["sqlite"]
    models = demo.table_models()
    by_table: dict[str, list[dict]] = {}
    for table, values in demo.meant_rows(150):
        by_table.setdefault(table, []).append(values)
    seen_types: set[str] = set()
    with connection.cursor() as cursor:
        for table, rows in by_table.items():
            model = models[table]
            fields = [f for f in model._meta.concrete_fields]
            cols = ", ".join(f'"{f.column}"' for f in fields)
            probe = f"probe_{table}"
            cursor.execute(f'CREATE TEMP TABLE "{probe}" AS SELECT {cols} FROM "{table}" WHERE 0')
            sample = rows[:: max(1, len(rows) // 60)]
            for values in sample:
                params = [f.get_db_prep_save(values[f.attname], connection) for f in fields]
                marks = ", ".join(["%s"] * len(fields))
                cursor.execute(f'INSERT INTO "{probe}" ({cols}) VALUES ({marks})', params)
            typed = ", ".join(f'typeof("{f.column}"), quote("{f.column}")' for f in fields)
            pk = model._meta.pk.column
            cursor.execute(f'SELECT {typed} FROM "{probe}" ORDER BY "{pk}"')
            django_rows = cursor.fetchall()
            ours = []
            for values in sample:
                cursor.execute(
                    f'SELECT {typed} FROM "{table}" WHERE "{pk}" = %s',
                    [model._meta.pk.get_db_prep_save(values["id"], connection)],
                )
                ours.append(cursor.fetchone())
            assert sorted(ours, key=repr) == sorted(django_rows, key=repr), table
            seen_types |= {v for row in ours for v in row[::2]}
            cursor.execute(f'DROP TABLE "{probe}"')
    assert {"integer", "text", "null", "real"} <= seen_types  # bools, text, NULLs, decimals


@pytest.mark.django_db(databases="__all__", transaction=True)
def test_same_seed_same_data_other_seed_other_data_and_reset():
    _seed(users=120)
    first = _digest()
    with pytest.raises(CommandError, match="already holds 120 users.*--reset"):
        _seed(users=120)
    _seed(users=120, reset=True)
    assert _digest() == first
    _seed(users=120, reset=True, seed=7)
    assert _digest() != first


@pytest.mark.django_db(databases="__all__", transaction=True)
def test_refuses_postgresql_and_unmigrated_sqlite(tmp_path):
    with pytest.raises(CommandError, match="is postgresql.*--database sqlite"):
        _seed(users=5, database="postgresql")
    empty = DatabaseWrapper(
        {**connections.settings["sqlite"], "NAME": str(tmp_path / "empty.sqlite3")},
        alias="empty",
    )
    try:
        with pytest.raises(demo.SeedError, match="not migrated.*manage.py migrate --database"):
            demo.check_migrated(empty)
    finally:
        empty.close()


@pytest.mark.django_db(databases="__all__", transaction=True)
def test_small_fixture_loads_on_both_engines_and_is_up_to_date(tmp_path):
    fresh = tmp_path / "small.json"
    demo.write_small_fixture(fresh)
    assert json.loads(fresh.read_text()) == json.loads(FIXTURE.read_text()), (
        "fixtures/small.json is stale: run .venv/bin/python -m fixtures.demo fixtures/small.json"
    )
    objects = json.loads(FIXTURE.read_text())
    counts: dict[str, int] = {}
    for obj in objects:
        counts[obj["model"]] = counts.get(obj["model"], 0) + 1
    assert set(counts) == {
        "accounts.organisation",
        "accounts.user",
        "accounts.membership",
        "accounts.kycverification",
        "accounts.loginevent",
    }
    users = [o for o in objects if o["model"] == "accounts.user"]
    assert any(u["fields"]["invited_by"] for u in users)
    assert any(u["fields"]["deleted_at"] for u in users)
    models = demo.table_models()
    for alias in ("sqlite", "postgresql"):
        call_command("loaddata", str(FIXTURE), database=alias, stdout=StringIO())
        for model in models.values():
            label = model._meta.label_lower
            manager = getattr(model, "all_objects", model._default_manager)
            assert manager.using(alias).count() == counts[label], (alias, label)
