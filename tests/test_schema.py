"""The PROP.ie schema on both real engines: enums, CHECKs, soft delete, GIN, the analytics view."""

import pytest
from django.core.management import call_command
from django.db import IntegrityError, connections, transaction
from django.db.utils import DataError

from accounts.models import KycVerification, LoginEvent, Organisation, User

pytestmark = pytest.mark.django_db(databases="__all__", transaction=True)


def test_email_is_stored_lower_case_on_both_engines():
    for alias in ("sqlite", "postgresql"):
        User.objects.db_manager(alias).create_user(" Niamh.Byrne@Example.IE ", "pw")
        assert User.objects.using(alias).get().email == "niamh.byrne@example.ie"


def test_postgres_columns_use_real_enum_types(pg):
    with pg.cursor() as cursor:
        cursor.execute(
            "SELECT column_name, udt_name FROM information_schema.columns "
            "WHERE table_name = 'accounts_user' AND column_name IN ('status', 'kyc_status', 'role')"
        )
        types = dict(cursor.fetchall())
    assert types == {"status": "user_status", "kyc_status": "kyc_status", "role": "user_role"}


def test_postgres_enum_rejects_value_outside_the_set(pg):
    user = User.objects.db_manager("postgresql").create_user("a@example.ie", "pw")
    enum_error = pytest.raises(DataError, match="invalid input value for enum user_status")
    with enum_error, transaction.atomic(using="postgresql"):
        User.objects.using("postgresql").filter(pk=user.pk).update(status="banned")


def test_sqlite_check_constraint_rejects_value_outside_the_set():
    user = User.objects.db_manager("sqlite").create_user("a@example.ie", "pw")
    with pytest.raises(IntegrityError, match="user_role_valid"), transaction.atomic(using="sqlite"):
        User.objects.using("sqlite").filter(pk=user.pk).update(role="landlord")


@pytest.mark.parametrize("alias", ["sqlite", "postgresql"])
def test_soft_delete_hides_rows_from_default_manager_only(alias):
    manager = User.objects.db_manager(alias)
    keep, gone = manager.create_user("keep@example.ie"), manager.create_user("gone@example.ie")
    gone.delete()
    assert list(User.objects.using(alias).values_list("email", flat=True)) == [keep.email]
    assert User.all_objects.using(alias).count() == 2
    assert User.all_objects.using(alias).get(pk=gone.pk).deleted_at is not None
    gone.hard_delete(using=alias)
    assert User.all_objects.using(alias).count() == 1


@pytest.mark.parametrize("alias", ["sqlite", "postgresql"])
def test_queryset_delete_is_soft_too(alias):
    User.objects.db_manager(alias).create_user("x@example.ie")
    User.objects.using(alias).all().delete()
    assert User.objects.using(alias).count() == 0
    assert User.all_objects.using(alias).count() == 1


def test_json_containment_query_uses_the_gin_index(pg):
    manager = User.objects.db_manager("postgresql")
    for i in range(300):
        manager.create_user(
            f"u{i}@example.ie", preferences={"county": "Cork" if i % 3 else "Dublin"}
        )
    with pg.cursor() as cursor:
        cursor.execute("ANALYZE accounts_user")
        cursor.execute("SET enable_seqscan = off")  # small table: make the planner show its index
        queryset = User.objects.using("postgresql").filter(preferences__contains={"county": "Cork"})
        plan = queryset.order_by().explain()
        cursor.execute("RESET enable_seqscan")
    assert "user_preferences_gin" in plan
    assert queryset.count() == 200


def test_analytics_view_refreshes_concurrently(pg):
    user = User.objects.db_manager("postgresql").create_user("a@example.ie", status="active")
    LoginEvent.objects.using("postgresql").create(user=user, success=True)
    LoginEvent.objects.using("postgresql").create(user=user, success=False)
    call_command("refresh_analytics", database="postgresql", stdout=__import__("io").StringIO())
    with pg.cursor() as cursor:
        cursor.execute(
            "SELECT metric, status, total FROM accounts_daily_analytics ORDER BY metric, status"
        )
        rows = cursor.fetchall()
    assert rows == [("logins", "failure", 1), ("logins", "success", 1), ("users", "active", 1)]


def test_refresh_analytics_is_a_no_op_on_sqlite():
    from io import StringIO

    out = StringIO()
    call_command("refresh_analytics", database="sqlite", stdout=out)
    assert "no materialized view" in out.getvalue()


@pytest.mark.parametrize("alias", ["sqlite", "postgresql"])
def test_memberships_and_kyc_relations(alias):
    org = Organisation.objects.using(alias).create(
        name="Sherry FitzGerald Cork", kind="estate_agent"
    )
    agent = User.objects.db_manager(alias).create_user("agent@example.ie", role="agent")
    reviewer = User.objects.db_manager(alias).create_user("admin@example.ie", role="admin")
    agent.organisations.add(org, through_defaults={"role": "admin"})
    KycVerification.objects.using(alias).create(
        user=agent, document_type="passport", document_reference="PA1234567", reviewer=reviewer
    )
    assert list(org.members.all()) == [agent]
    assert reviewer.kyc_reviews.get().user == agent


@pytest.mark.parametrize("alias", ["sqlite", "postgresql"])
def test_membership_is_unique_per_user_and_organisation(alias):
    org = Organisation.objects.using(alias).create(name="Ballymore", kind="developer")
    user = User.objects.db_manager(alias).create_user("dev@example.ie", role="developer")
    user.organisations.add(org)
    with pytest.raises(IntegrityError), transaction.atomic(using=alias):
        connections[alias].cursor().execute(
            "INSERT INTO accounts_membership (user_id, organisation_id, role, title, created_at, "
            "updated_at) SELECT user_id, organisation_id, role, title, created_at, updated_at "
            "FROM accounts_membership"
        )
