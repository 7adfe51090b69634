"""The compliance trail: django-auditlog entries with the actor, masked secrets, in the admin."""

import csv
import datetime
import io
import json

import pytest
from auditlog.context import set_actor
from auditlog.models import LogEntry
from django.contrib.auth.hashers import PBKDF2PasswordHasher, identify_hasher
from django.contrib.contenttypes.models import ContentType

from accounts.admin import CSV_COLUMNS
from accounts.models import KycVerification, Organisation, User
from fixtures import demo

pytestmark = pytest.mark.django_db(databases="__all__", transaction=True)


@pytest.fixture
def staff(client):
    admin = User.objects.create_superuser("ops@prop.ie", "correct-horse-battery")
    client.force_login(admin)
    return admin


def test_admin_change_is_recorded_with_the_actor(client, staff):
    response = client.post(
        "/admin/accounts/organisation/add/",
        {
            "name": "Lisney Sotheby's",
            "kind": "estate_agent",
            "metadata": "{}",
            "memberships-TOTAL_FORMS": "0",
            "memberships-INITIAL_FORMS": "0",
        },
    )
    assert response.status_code == 302, response.content[:2000]
    org = Organisation.objects.get(name="Lisney Sotheby's")
    entry = LogEntry.objects.get_for_object(org).get()
    assert entry.action == LogEntry.Action.CREATE
    assert entry.actor == staff
    assert entry.changes_dict["name"] == ["None", "Lisney Sotheby's"]


@pytest.mark.parametrize("alias", ["sqlite", "postgresql"])
def test_update_and_delete_are_recorded_in_the_rows_own_database(alias):
    user = User.objects.db_manager(alias).create_user("buyer@example.ie", "pw")
    user.status = "active"
    user.save(using=alias)
    pk = str(user.pk)
    user.hard_delete(using=alias)  # Django clears user.pk here
    actions = list(
        LogEntry.objects.using(alias).filter(object_pk=pk).values_list("action", flat=True)
    )
    assert sorted(actions) == [
        LogEntry.Action.CREATE,
        LogEntry.Action.UPDATE,
        LogEntry.Action.DELETE,
    ]


def test_password_and_document_numbers_are_masked():
    user = User.objects.create_user("solicitor@example.ie", "s3cret-pass")
    kyc = KycVerification.objects.create(
        user=user, document_type="passport", document_reference="PX9876543"
    )
    user_change = LogEntry.objects.get_for_object(user).get().changes_dict
    kyc_change = LogEntry.objects.get_for_object(kyc).get().changes_dict
    assert user.password not in str(user_change)
    assert "PX9876543" not in str(kyc_change)
    assert "*" in kyc_change["document_reference"][1]


def test_admin_lists_and_filters_audit_entries(client, staff):
    Organisation.objects.create(name="Glenveagh Properties", kind="developer")
    response = client.get("/admin/auditlog/logentry/", {"action__exact": LogEntry.Action.CREATE})
    assert response.status_code == 200
    assert b"Glenveagh Properties" in response.content


# --- a login is not a password change ---------------------------------------------------


def _admin_login(client, email, password):
    response = client.post("/admin/login/?next=/admin/", {"username": email, "password": password})
    assert response.status_code == 302, response.content[:2000]
    assert response["Location"] == "/admin/"


def _updates(user) -> list[dict]:
    entries = LogEntry.objects.get_for_object(user).filter(action=LogEntry.Action.UPDATE)
    return [e.changes_dict for e in entries]


def test_demo_password_hash_is_not_rehashed_at_first_login(client):
    """The seeded hash already has the current hasher's iterations and salt length."""
    demo_hash = demo._password_hash()
    assert not identify_hasher(demo_hash).must_update(demo_hash)
    user = User.objects.create(
        email="admin1@prop.ie", password=demo_hash, is_staff=True, is_superuser=True
    )
    _admin_login(client, "admin1@prop.ie", demo.DEMO_PASSWORD)
    user.refresh_from_db()
    assert user.password == demo_hash  # not rewritten: nothing for the trail to record
    assert _updates(user) == []


def test_automatic_rehash_at_login_is_not_audited_as_a_password_change(client):
    old_hash = PBKDF2PasswordHasher().encode("old-but-same-pw", "shortsalt", iterations=1000)
    user = User.objects.create(email="ops@prop.ie", password=old_hash, is_staff=True)
    _admin_login(client, "ops@prop.ie", "old-but-same-pw")
    user.refresh_from_db()
    assert user.password != old_hash  # Django upgraded the hash
    assert _updates(user) == []


def test_real_password_changes_are_still_audited(client, staff):
    user = User.objects.create_user("buyer@example.ie", "first-pass-123")
    response = client.post(
        f"/admin/accounts/user/{user.pk}/password/",
        {"password1": "second-pass-456", "password2": "second-pass-456"},
    )
    assert response.status_code == 302, response.content[:2000]
    user.set_unusable_password()
    user.save(update_fields=["password"])  # Django's own "disable this login"
    changes = _updates(user)
    assert [list(c) for c in changes] == [["password"], ["password"]]
    assert LogEntry.objects.get_for_object(user).filter(actor=staff).count() == 1


# --- the audit log as a compliance officer uses it ----------------------------------------

LIST = "/admin/auditlog/logentry/"
EXPORT = "/admin/auditlog/logentry/export.csv"


@pytest.fixture
def trail(staff):
    """Entries by the staff user and by "system", on two object types, on three days."""
    with set_actor(staff):
        org = Organisation.objects.create(name="Lisney Sotheby's", kind="estate_agent")
        buyer = User.objects.create_user("buyer@example.ie", "pw-123456")
    Organisation.objects.create(name='=HYPERLINK("http://evil")', kind="developer")
    buyer.status = "active"
    buyer.save()  # by "system"
    days = {"2026-03-01": org, "2026-03-02": buyer}
    for day, obj in days.items():
        LogEntry.objects.get_for_object(obj).update(
            timestamp=datetime.datetime.fromisoformat(f"{day}T12:00:00+00:00")
        )
    return {"org": org, "buyer": buyer}


def _export(client, **filters) -> list[dict]:
    response = client.get(EXPORT, filters)
    assert response.status_code == 200, response
    assert response["Content-Type"] == "text/csv; charset=utf-8"
    assert response["Content-Disposition"].startswith('attachment; filename="audit_log_')
    text = b"".join(response.streaming_content).decode()
    return list(csv.DictReader(io.StringIO(text)))


def test_audit_log_filters_by_actor(client, staff, trail):
    mine = _export(client, actor=str(staff.pk))
    assert {(r["object"], r["action"]) for r in mine} == {
        ("Lisney Sotheby's", "create"),
        ("buyer@example.ie", "create"),
    }
    assert {r["actor"] for r in mine} == {"ops@prop.ie"}
    system = _export(client, actor="system")
    assert {r["actor"] for r in system} == {"system"}
    assert ("buyer@example.ie", "update") in {(r["object"], r["action"]) for r in system}
    page = client.get(LIST, {"actor": "system"}).content.decode()
    assert "system (no user)" in page and "ops@prop.ie" in page  # the choices


def test_audit_log_filters_by_object_type_and_object(client, trail):
    user_type = ContentType.objects.get_for_model(User).pk
    rows = _export(client, resource_type=user_type)
    assert {r["object_type"] for r in rows} == {"accounts.user"}
    rows = _export(client, object=str(trail["buyer"].pk))
    assert {r["object"] for r in rows} == {"buyer@example.ie"}
    assert [r["action"] for r in rows] == ["update", "create"]  # newest first
    assert {r["object"] for r in _export(client, object="Sotheby")} == {"Lisney Sotheby's"}


def test_audit_log_filters_by_date_range_both_days_included(client, trail):
    assert {r["object"] for r in _export(client, date_from="2026-03-01", date_to="2026-03-01")} == {
        "Lisney Sotheby's"
    }
    both = _export(client, date_from="2026-03-01", date_to="2026-03-02")
    assert {r["object"] for r in both} == {"Lisney Sotheby's", "buyer@example.ie"}
    assert all(r["timestamp"].startswith("2026-03-0") for r in both)
    response = client.get(LIST, {"date_from": "2026-03-02"})
    assert b"buyer@example.ie" in response.content
    assert b"Lisney Sotheby" not in response.content


def test_export_matches_the_page_filters_and_guards_against_formulas(client, trail):
    page = client.get(LIST, {"resource_type": ContentType.objects.get_for_model(Organisation).pk})
    assert b"Export CSV (2 entries)" in page.content
    rows = _export(client, resource_type=ContentType.objects.get_for_model(Organisation).pk)
    assert len(rows) == 2
    assert list(rows[0]) == list(CSV_COLUMNS)
    assert '\'=HYPERLINK("http://evil")' in {r["object"] for r in rows}
    assert json.loads(rows[-1]["changes"])["name"] == ["None", "Lisney Sotheby's"]


def test_bad_date_is_refused_not_ignored(client, trail):
    response = client.get(EXPORT, {"date_from": "yesterday"})
    assert response.status_code == 400
    assert b"date_from must be a date" in response.content
    assert client.get(LIST, {"date_from": "yesterday"})["Location"].endswith("?e=1")


def test_export_needs_permission_to_view_the_audit_log(client, trail):
    clerk = User.objects.create_user("clerk@prop.ie", "pw-123456", is_staff=True)
    client.force_login(clerk)
    assert client.get(EXPORT).status_code == 403


def test_user_history_page_shows_the_audit_entries(client, staff, trail):
    buyer = trail["buyer"]
    response = client.get(f"/admin/accounts/user/{buyer.pk}/history/")
    assert response.status_code == 200
    page = response.content.decode()
    assert "Audit log: buyer@example.ie" in page
    assert "Status" in page and "active" in page  # the system's update, with its change
    assert f"?actor={buyer.pk}" in page  # what this user did, in the filtered list


def test_a_cascading_delete_on_postgresql_logs_every_row_there():
    # regression: the first post_delete forgot the alias, so the cascaded rows' entries went
    # to 'default' (SQLite here), the store a switch leaves behind (and fences)
    pg = "postgresql"
    user = User.objects.db_manager(pg).create_user("cascade@example.ie", "pw")
    kyc = KycVerification.objects.using(pg).create(
        user=user, document_type="passport", document_reference="P9"
    )
    user.hard_delete(using=pg)  # deletes the KYC check too
    assert (
        LogEntry.objects.using(pg)
        .filter(object_pk=str(kyc.pk), action=LogEntry.Action.DELETE)
        .exists()
    )
    assert not LogEntry.objects.using("sqlite").exists()
