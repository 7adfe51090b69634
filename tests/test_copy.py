"""copy.py: scan_source and copy_data against real SQLite files and the real PostgreSQL test DB."""

import datetime as dt
import decimal
import json
import sqlite3
import uuid
from pathlib import Path

import pytest
from django.contrib.auth.models import Group, Permission
from django.contrib.contenttypes.models import ContentType
from django.db import connections

from accounts.models import KycVerification, LoginEvent, Membership, Organisation, User
from dbmigration.copy import RowsRejected, copy_data, scan_source
from dbmigration.sqlite_source import file_sha256

ALL = pytest.mark.django_db(databases="__all__", transaction=True)


def source_path() -> Path:
    return Path(connections["sqlite"].settings_dict["NAME"])


def raw_sql(sql: str, params=()) -> None:
    """Write straight into the SQLite source, as a careless app or a manual fix would."""
    conn = sqlite3.connect(source_path())
    conn.execute(sql, params)
    conn.commit()
    conn.close()


def make_people(n: int = 3) -> list[User]:
    org = Organisation.objects.using("sqlite").create(
        name="Acme Homes", kind="developer", metadata={"tier": 2, "ok": True}
    )
    users = []
    boss = None
    for i in range(n):
        user = User.objects.db_manager("sqlite").create_user(
            f"u{i}@example.ie", "pw", first_name=f"Ú{i}", invited_by=boss, organisation=org
        )
        boss = boss or user
        users.append(user)
    Membership.objects.using("sqlite").create(user=users[0], organisation=org, role="owner")
    KycVerification.objects.using("sqlite").create(
        user=users[0],
        document_type="passport",
        document_reference="P123",
        expires_on=dt.date(2030, 1, 2),
        risk_score=decimal.Decimal("12.30"),
        reviewed_at=dt.datetime(2026, 1, 2, 3, 4, 5, 600, tzinfo=dt.UTC),
    )
    LoginEvent.objects.using("sqlite").create(
        user=users[0], email_attempted="u0@example.ie", ip_address="10.0.0.1", success=True
    )
    group = Group.objects.using("sqlite").create(name="agents")
    users[0].groups.add(group)
    return users


@ALL
def test_scan_clean_source_reports_rows_and_no_rejections():
    make_people()
    scan = scan_source(sqlite_path=source_path())
    assert scan.rejections == []
    assert scan.rows_scanned["accounts_user"] == 3
    assert scan.rows_scanned["accounts_user_groups"] == 1


@ALL
def test_copy_round_trip(tmp_path):
    users = make_people()
    before = file_sha256(source_path())
    result = copy_data(sqlite_path=source_path(), state_file=tmp_path / "state.json")
    assert file_sha256(source_path()) == before
    assert result.schema_problems == []
    got = User.objects.using("postgresql").get(pk=users[1].pk)
    assert got.invited_by_id == users[0].pk
    assert got.first_name == "Ú1"
    kyc = KycVerification.objects.using("postgresql").get()
    assert kyc.risk_score == decimal.Decimal("12.30")
    assert kyc.reviewed_at == dt.datetime(2026, 1, 2, 3, 4, 5, 600, tzinfo=dt.UTC)
    lite_ct = {(c.app_label, c.model): c.pk for c in ContentType.objects.using("sqlite")}
    pg_ct = {(c.app_label, c.model): c.pk for c in ContentType.objects.using("postgresql")}
    assert lite_ct == pg_ct
    assert Permission.objects.using("postgresql").count() == Permission.objects.using(
        "sqlite"
    ).count()
    # sequences above max(pk): a new row gets a fresh id
    event = LoginEvent.objects.using("postgresql").create(success=False)
    assert event.pk > LoginEvent.objects.using("sqlite").get().pk
