"""The engine in a second Django project whose settings are not propcore's (tests/minimal_project).

Every step runs in its own process with DJANGO_SETTINGS_MODULE=tests.minimal_project.settings,
its own directory and its own PostgreSQL database, as an operator would run them.
"""

from __future__ import annotations

import json

import pytest

from dbmigration.sqlite_source import file_sha256
from tests.subprojects import must, on_target, subproject, unique_db_name

pytestmark = pytest.mark.slow

SEED = """
import datetime, decimal
from tests.minimal_project.shop.models import Category, PriceCache, Product, SearchEntry, Tag
general = Category.objects.get(name="General")
tag = Tag.objects.create(label="new")
for i in range(5):
    p = Product.objects.create(category=general, name=f"p{i}", price=decimal.Decimal("1.50") * i,
                               opens_at=datetime.time(9, 30, 15, 123456))
    p.tags.add(tag)
    if i == 1:
        p.status = "featured"
        p.save()
    # text SQLite keeps, but not a tsvector PostgreSQL would take
    SearchEntry.objects.create(product=p, body="'unterminated a:b:c")
    PriceCache.objects.create(product=p, blob="stale")
"""

# what an application sees through `default`, and proof that nothing of propcore is loaded
SNAPSHOT = """
import json, sys
from django.db import connection
from tests.minimal_project.shop.models import Category, PriceCache, Product, SearchEntry
print(json.dumps({
    "vendor": connection.vendor,
    "categories": sorted(Category.objects.values_list("name", flat=True)),
    "products": sorted(
        (p.name, str(p.price), p.opens_at.isoformat(), [t.label for t in p.tags.all()])
        for p in Product.objects.all()
    ),
    "search_entries": SearchEntry.objects.count(),
    "price_caches": PriceCache.objects.count(),
    "foreign_modules": sorted({m.split(".")[0] for m in sys.modules} & {"propcore", "accounts"}),
}))
"""


@pytest.fixture
def project(tmp_path):
    """A migrated, filled SQLite source and a unique (not yet created) PostgreSQL database."""
    name = unique_db_name("minimal")
    env = {"MINIMAL_DIR": str(tmp_path), "MINIMAL_PG_NAME": name}
    with subproject("tests.minimal_project.settings", pg_name=name, env=env) as run:
        # migrate through `default` (SQLite while it is active): the data migration writes
        # through default too, so one connection does both (README: aliases with data migrations)
        must(run("migrate", "-v", "0"))
        must(run("shell", "-c", SEED))
        run.source = tmp_path / "shop.sqlite3"
        yield run


def snapshot(run) -> dict:
    return json.loads(must(run("shell", "-c", SNAPSHOT)).strip().splitlines()[-1])


def test_runbook_runs_for_a_project_that_is_not_propcore(project):
    run = project
    before = snapshot(run)
    assert before["vendor"] == "sqlite" and before["foreign_modules"] == []
    assert len(before["products"]) == 5 and before["search_entries"] == 5
    sha = file_sha256(run.source)

    out = must(run("migration_prepare", "--noinput"))
    assert "Prepared. Next: migrate_data" in out
    # discovered from the field type, and configured in DBMIGRATION: neither is copied
    assert "shop.SearchEntry is not copied (body is a tsvector search index" in out
    assert "shop.PriceCache is not copied" in out and "refill_price_cache" in out
    # the data migration wrote through `default` to PostgreSQL, and the source stayed as it was
    assert on_target(run, "SELECT name FROM shop_category") == [("General",)]
    assert file_sha256(run.source) == sha
    # the target now records the names the squashed migration replaces; a rerun still
    # recognises them as the project's own
    rows = on_target(run, "SELECT name FROM django_migrations WHERE app = 'shop'")
    applied = {name for (name,) in rows}
    assert {"0001_initial", "0002_seed", "0001_squashed_0002_seed"} <= applied
    must(run("migration_prepare", "--noinput"))

    must(run("migrate_data"))
    assert on_target(run, "SELECT count(*) FROM shop_product") == [(5,)]
    assert on_target(run, "SELECT count(*) FROM shop_searchentry") == [(0,)]
    assert on_target(run, "SELECT count(*) FROM shop_pricecache") == [(0,)]

    must(run("switch_to_postgresql", "--noinput"))
    after_switch = snapshot(run)
    assert after_switch["vendor"] == "postgresql" and after_switch["foreign_modules"] == []
    assert after_switch["products"] == before["products"]
    assert after_switch["categories"] == before["categories"]
    must(
        run(
            "shell",
            "-c",
            "import datetime; from tests.minimal_project.shop.models import Category, Product; "
            "Product.objects.create(category=Category.objects.get(), name='written on pg', "
            "price=7, opens_at=datetime.time(23, 59, 59, 999999))",
        )
    )

    # --drop-postgres unapplies every migration on PostgreSQL; the reversed data migration
    # writes through `default` too, which must be PostgreSQL then, not the SQLite now active
    must(run("rollback_to_sqlite", "--noinput", "--drop-postgres"))
    assert on_target(run, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'") == [
        ("django_migrations",)
    ]
    back = snapshot(run)
    assert back["categories"] == before["categories"] == ["General"]
    assert back["vendor"] == "sqlite"
    assert ["written on pg", "7.00", "23:59:59.999999", []] in back["products"]
    # the skipped tables kept their SQLite rows: nothing was carried back into them
    assert back["search_entries"] == 5 and back["price_caches"] == 5


def test_prepare_keeps_the_source_read_only_against_a_migration_that_writes_to_it(project):
    run = project
    sha = file_sha256(run.source)
    proc = run("migration_prepare", "--noinput", extra_env={"MINIMAL_WRITE_SOURCE": "1"})
    assert proc.returncode == 3, proc.stdout + proc.stderr
    message = proc.stderr.strip()
    assert "A migration tried to write to the SQLite source" in message
    assert "readonly database" in message and "Traceback" not in message
    assert file_sha256(run.source) == sha
    rows = on_target(run, "SELECT name FROM shop_category")
    assert ("written during prepare",) not in rows


def test_dropping_the_postgres_copy_runs_reversed_data_migrations_on_postgresql(project):
    """Before the switch `default` is SQLite: unapplying in-process would write there."""
    run = project
    must(run("migration_prepare", "--noinput"))
    must(run("migrate_data"))
    sha = file_sha256(run.source)
    must(run("rollback_to_sqlite", "--noinput", "--drop-postgres"))
    assert on_target(run, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'") == [
        ("django_migrations",)
    ]
    assert snapshot(run)["categories"] == ["General"]
    assert file_sha256(run.source) == sha
