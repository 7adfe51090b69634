"""The compliance trail: django-auditlog entries with the actor, masked secrets, in the admin."""

import pytest
from auditlog.models import LogEntry

from accounts.models import KycVerification, Organisation, User

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
