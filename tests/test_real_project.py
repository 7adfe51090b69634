"""A real project: Wagtail's own test app (wagtail.test, from its pinned wheel) and its fixtures.

The runbook runs with no workaround for a settings module a Wagtail user would write
(tests/real_project/settings.py): prepare, migrate_data, switch_to_postgresql and
rollback_to_sqlite, each in its own process as an operator runs them.  Every object of every
copied model is compared through the ORM on both aliases after the copy and after the
rollback, and the site's pages, page tree, search and admin are served from PostgreSQL.
"""

from __future__ import annotations

import json

import pytest

from dbmigration.sqlite_source import file_sha256
from tests.subprojects import must, on_target, subproject, unique_db_name

pytestmark = pytest.mark.slow

ADMIN = """
from django.contrib.auth import get_user_model
get_user_model().objects.create_superuser("operator", "operator@example.com", "pw")
"""

COMPARE = """
import json
from tests.real_project.orm_compare import compare
print(json.dumps(compare()))
"""

# requests through Django's test client: the URLs and the admin, served from `default`
SERVE = """
import json
from django.contrib.auth import get_user_model
from django.db import connection
from django.test import Client
from wagtail.models import Page
from wagtail.search.backends import get_search_backend

client = Client()
pages = {url: client.get(url) for url in ("/", "/events/", "/events/christmas/", "/about-us/")}
client.force_login(get_user_model().objects.get(username="operator"))
admin = {url: client.get(url) for url in ("/admin/", "/admin/pages/3/", "/admin/pages/4/edit/")}
found = get_search_backend("database").search("Christmas", Page)
print(json.dumps({
    "vendor": connection.vendor,
    "status": {url: r.status_code for url, r in {**pages, **admin}.items()},
    "christmas_page": "Christmas" in pages["/events/christmas/"].content.decode(),
    "events_children": sorted(Page.objects.get(url_path="/home/events/")
                              .get_children().values_list("title", flat=True)),
    "search": [p.title for p in found],
}))
"""

# an editor's work on PostgreSQL: a new page in the tree (treebeard paths) and an edit
EDIT = """
from wagtail.models import Page
from wagtail.test.testapp.models import SimplePage
events = Page.objects.get(url_path="/home/events/")
events.add_child(instance=SimplePage(title="Written on PostgreSQL", slug="on-pg", content="x"))
about = Page.objects.get(url_path="/home/about-us/").specific
about.title = "About us, edited on PostgreSQL"
about.save_revision().publish()
"""


@pytest.fixture
def project(tmp_path):
    """Wagtail's test site in a migrated SQLite file, and a unique PostgreSQL database name."""
    name = unique_db_name("real_project")
    env = {
        "REAL_PROJECT_DIR": str(tmp_path),
        "REAL_PROJECT_PG_NAME": name,
        "PYTHONWARNINGS": "ignore",
    }
    with subproject("tests.real_project.settings", pg_name=name, env=env) as run:
        # the project's own setup, through `default` (SQLite while it is active)
        must(run("migrate", "-v", "0"))
        must(run("createcachetable"))
        must(run("loaddata", "test.json"))
        must(run("update_index"))
        must(run("shell", "-c", ADMIN))
        run.source = tmp_path / "wagtail.sqlite3"
        yield run


def shell_json(run, code: str) -> dict:
    return json.loads(must(run("shell", "-c", code)).strip().splitlines()[-1])


def assert_every_object_equal(run) -> int:
    """Compare each copied model on both aliases; return how many objects were compared."""
    result = shell_json(run, COMPARE)
    unequal = {
        label: counts
        for label, counts in result.items()
        if counts["differing"] or counts["sqlite"] != counts["postgresql"]
    }
    assert unequal == {}
    # the search index is skipped by the configured policy, and nothing else is
    assert "wagtailsearch.IndexEntry" not in result and "wagtailcore.Page" in result
    return sum(counts["sqlite"] for counts in result.values())


def test_wagtail_test_site_goes_to_postgresql_and_back(project):
    run = project
    sha = file_sha256(run.source)

    out = must(run("migration_prepare", "--noinput"))
    assert "Prepared. Next: migrate_data" in out
    assert "wagtailsearch.IndexEntry is not copied" in out and "update_index" in out
    # Wagtail's data migrations wrote to PostgreSQL; the source stayed as it was
    assert file_sha256(run.source) == sha
    # the project's DatabaseCache table, which no migration creates
    assert on_target(run, "SELECT to_regclass('public.cache') IS NOT NULL") == [(True,)]

    must(run("migrate_data"))
    copied = assert_every_object_equal(run)
    assert copied > 300  # the fixture's pages, permissions, forms, images, documents ...

    out = must(run("switch_to_postgresql", "--noinput"))
    assert "wagtailsearch.IndexEntry was not copied to PostgreSQL" in out and "update_index" in out
    must(run("update_index"))  # the rebuild the prepare named for the skipped search index
    served = shell_json(run, SERVE)
    assert served["vendor"] == "postgresql"
    assert set(served["status"].values()) == {200}, served["status"]
    assert served["christmas_page"]
    assert "Christmas" in served["events_children"] and "Christmas" in served["search"]

    must(run("shell", "-c", EDIT))
    out = must(run("rollback_to_sqlite", "--noinput"))
    # SQLite's search index predates the switch: the operator is told to refill it
    assert "IndexEntry was not carried back: SQLite holds its rows from before" in out
    # the new page, its revisions, log entries and references came back with the rest
    assert assert_every_object_equal(run) > copied
    back = shell_json(run, SERVE)
    assert back["vendor"] == "sqlite"
    assert set(back["status"].values()) == {200}, back["status"]
    assert "Written on PostgreSQL" in back["events_children"]
    assert back["status"]["/about-us/"] == 200 and back["search"] == ["Christmas"]
