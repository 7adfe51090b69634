"""The compliance trail: django-auditlog entries with the actor, masked secrets, in the admin."""

import pytest
from auditlog.models import LogEntry
from django.contrib.auth.hashers import PBKDF2PasswordHasher, identify_hasher

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
