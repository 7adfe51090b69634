"""copy.py: scan_source and copy_data against real SQLite files and the real PostgreSQL test DB."""

import datetime as dt
import decimal
import json
import sqlite3

import pytest
from django.contrib.auth.models import Group, Permission
from django.contrib.contenttypes.models import ContentType
from django.db import connections

from accounts.models import KycVerification, LoginEvent, User
from dbmigration.copy import RowsRejected, copy_data
from dbmigration.source_scan import scan_source
from dbmigration.sqlite_source import content_sha256, file_sha256
from tests.sources import bad_copy, make_people, source_path

ALL = pytest.mark.django_db(databases="__all__", transaction=True)


def raw_sql(sql: str, params=()) -> None:
    """Write straight into the SQLite source, as a careless app or a manual fix would."""
    conn = sqlite3.connect(source_path())
    conn.execute(sql, params)
    conn.commit()
    conn.close()


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
    before = content_sha256(source_path())  # WAL: the rows, wherever SQLite keeps them
    result = copy_data(sqlite_path=source_path(), state_file=tmp_path / "state.json")
    assert content_sha256(source_path()) == before
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
    assert (
        Permission.objects.using("postgresql").count() == Permission.objects.using("sqlite").count()
    )
    # sequences above max(pk): a new row gets a fresh id
    event = LoginEvent.objects.using("postgresql").create(success=False)
    assert event.pk > LoginEvent.objects.using("sqlite").get().pk


def admin_entry(user: User) -> None:
    from django.contrib.admin.models import ADDITION, LogEntry

    LogEntry.objects.using("sqlite").create(
        user=user, action_flag=ADDITION, object_repr="x", change_message="[]"
    )


U1 = "WHERE email = 'u1@example.ie'"

# (what is wrong, SQL that makes it, table, column, reason code)
BAD_ROWS = [
    (
        "nul",
        "UPDATE accounts_user SET first_name = 'a' || char(0) || 'b' WHERE email = 'u1@example.ie'",
        "accounts_user",
        "first_name",
        "nul",
    ),
    (
        "utf8",
        "UPDATE accounts_user SET last_name = CAST(x'61ff62' AS TEXT) " + U1,
        "accounts_user",
        "last_name",
        "utf8",
    ),
    (
        "text-in-int",
        "UPDATE django_admin_log SET action_flag = 'three'",
        "django_admin_log",
        "action_flag",
        "kind",
    ),
    (
        "int-range",
        "UPDATE django_admin_log SET action_flag = 40000",
        "django_admin_log",
        "action_flag",
        "range",
    ),
    (
        "bool",
        "UPDATE accounts_loginevent SET success = 2",
        "accounts_loginevent",
        "success",
        "bool",
    ),
    (
        "date",
        "UPDATE accounts_kycverification SET expires_on = '2026-13-45'",
        "accounts_kycverification",
        "expires_on",
        "date",
    ),
    (
        "datetime",
        "UPDATE accounts_user SET created_at = 'yesterday' WHERE email = 'u1@example.ie'",
        "accounts_user",
        "created_at",
        "datetime",
    ),
    (
        "json",
        "UPDATE accounts_user SET preferences = '{bad' WHERE email = 'u1@example.ie'",
        "accounts_user",
        "preferences",
        "json",
    ),
    (
        "json-nul",
        'UPDATE accounts_user SET preferences = \'{"a": "\\u0000"}\' ' + U1,
        "accounts_user",
        "preferences",
        "nul",
    ),
    (
        "uuid",
        "UPDATE accounts_kycverification SET id = 'not-a-uuid'",
        "accounts_kycverification",
        "id",
        "uuid",
    ),
    (
        "decimal",
        "UPDATE accounts_kycverification SET risk_score = 'abc'",
        "accounts_kycverification",
        "risk_score",
        "decimal",
    ),
    (
        "max-digits",
        "UPDATE accounts_kycverification SET risk_score = 123456.0",
        "accounts_kycverification",
        "risk_score",
        "decimal",
    ),
    (
        "max-length",
        "UPDATE accounts_user SET first_name = printf('%.151c', 'x') WHERE email = 'u1@example.ie'",
        "accounts_user",
        "first_name",
        "length",
    ),
    (
        "enum",
        "UPDATE accounts_user SET status = 'bogus' WHERE email = 'u1@example.ie'",
        "accounts_user",
        "status",
        "enum",
    ),
    (
        "fk",
        "UPDATE accounts_membership SET user_id = 'ffffffffffffffffffffffffffffffff'",
        "accounts_membership",
        "user_id",
        "fk",
    ),
    (
        "check",
        "UPDATE accounts_organisation SET kind = 'castle'",
        "accounts_organisation",
        "organisation_kind_valid",
        "check",
    ),
    (
        "unique",
        "CREATE TABLE m2 AS SELECT * FROM accounts_membership",
        "accounts_membership",
        "user_id,organisation_id",
        "unique",
    ),
]


@ALL
@pytest.mark.parametrize(
    ("kind", "sql", "table", "column", "code"), BAD_ROWS, ids=[b[0] for b in BAD_ROWS]
)
def test_each_bad_row_kind_stops_the_copy(tmp_path, kind, sql, table, column, code):
    users = make_people()
    admin_entry(users[0])
    extra = []
    if kind == "unique":
        extra = [  # an old database whose table lost its UNIQUE constraint
            "DROP TABLE accounts_membership",
            "ALTER TABLE m2 RENAME TO accounts_membership",
            "INSERT INTO accounts_membership (id, created_at, updated_at, user_id, "
            "organisation_id, role, title) SELECT id + 100, created_at, updated_at, user_id, "
            "organisation_id, role, 'dup' "
            "FROM accounts_membership",
        ]
    path = bad_copy(tmp_path, sql, *extra)
    before = file_sha256(path)
    scan = scan_source(sqlite_path=path)  # as migration_prepare calls it
    with pytest.raises(RowsRejected) as caught:
        copy_data(sqlite_path=path, state_file=tmp_path / "state.json")
    assert file_sha256(path) == before
    found = [(r.table, r.column, r.code) for r in caught.value.result.rejections]
    assert (table, column, code) in found
    assert table in str(caught.value) and "--quarantine" in str(caught.value)
    # the dry run predicts the same list
    assert sorted(found) == sorted((r.table, r.column, r.code) for r in scan.rejections)
    # nothing is marked done
    state = tmp_path / "state.json"  # absent when SQL checks stopped it before any write
    assert (
        not state.exists() or json.loads(state.read_text())["extra"]["migrate_data"]["done"] == {}
    )
    # nothing of the offending table was kept, and the schema is whole again
    with connections["postgresql"].cursor() as cur:
        cur.execute(f'SELECT count(*) FROM "{table}"')
        assert cur.fetchone()[0] == 0
        cur.execute("SELECT count(*) FROM pg_indexes WHERE indexname = 'user_status_role_idx'")
        assert cur.fetchone()[0] == 1
        cur.execute("SELECT count(*) FROM pg_constraint WHERE contype = 'f'")
        assert cur.fetchone()[0] >= 15


@ALL
def test_quarantine_sets_rows_aside_and_copies_the_rest(tmp_path):
    from dbmigration.verify import Side, verify

    users = make_people(4)
    bad = users[1].pk.hex
    path = bad_copy(
        tmp_path,
        f"UPDATE accounts_user SET first_name = 'a' || char(0) WHERE id = '{bad}'",
        "UPDATE accounts_loginevent SET success = 7",
    )
    reject_file = tmp_path / "rejects.jsonl"
    result = copy_data(
        sqlite_path=path,
        quarantine=True,
        reject_file=reject_file,
        state_file=tmp_path / "state.json",
    )
    lines = [json.loads(line) for line in reject_file.read_text().splitlines()]
    by_table = {}
    for line in lines:
        by_table.setdefault(line["table"], set()).add(str(line["pk"]))
    # the bad user, the users it invited (self FK), and the login event
    assert bad in by_table["accounts_user"]
    assert len(by_table["accounts_user"]) == 1
    assert by_table["accounts_loginevent"]
    nul = next(x for x in lines if x["code"] == "nul")
    assert nul["values"]["first_name"] == "a\x00" and nul["values"]["email"] == "u1@example.ie"
    assert not User.objects.using("postgresql").filter(pk=users[1].pk).exists()
    assert User.objects.using("postgresql").count() == 3
    table = next(t for t in result.tables if t.table == "accounts_user")
    assert (table.rows_read, table.rows_written, table.rows_rejected) == (4, 3, 1)
    exclude = {}
    for r in result.rejections:
        exclude.setdefault(r.table, set()).add(str(r.pk))
    check = verify(source=Side(sqlite_path=path), target=Side(alias="postgresql"), exclude=exclude)
    assert check.ok, check.problems(Side(sqlite_path=path), Side(alias="postgresql"))


@ALL
def test_quarantine_cascades_to_rows_pointing_at_rejected_rows(tmp_path):
    users = make_people(3)
    boss = users[0].pk.hex
    path = bad_copy(tmp_path, f"UPDATE accounts_user SET created_at = 'junk' WHERE id = '{boss}'")
    result = copy_data(
        sqlite_path=path,
        quarantine=True,
        reject_file=tmp_path / "r.jsonl",
        state_file=tmp_path / "state.json",
    )
    rejected = {(r.table, str(r.pk)) for r in result.rejections}
    # the users it invited (self FK), its membership, KYC check, login event, group link
    assert ("accounts_user", users[1].pk.hex) in rejected
    assert ("accounts_user", users[2].pk.hex) in rejected
    assert {t for t, _ in rejected} >= {
        "accounts_membership",
        "accounts_kycverification",
        "accounts_loginevent",
        "accounts_user_groups",
    }
    assert User.objects.using("postgresql").count() == 0


@ALL
def test_repair_strip_nul_is_explicit_and_recorded(tmp_path):
    users = make_people(2)
    path = bad_copy(
        tmp_path,
        "UPDATE accounts_user SET first_name = 'Se' || char(0) || 'an' "
        f"WHERE id = '{users[1].pk.hex}'",
    )
    result = copy_data(sqlite_path=path, repairs=["strip-nul"], state_file=tmp_path / "s.json")
    assert User.objects.using("postgresql").get(pk=users[1].pk).first_name == "Sean"
    assert [(r.table, r.pk, r.column, r.rule) for r in result.repairs] == [
        ("accounts_user", users[1].pk.hex, "first_name", "strip-nul")
    ]
    from dbmigration.errors import DataError

    with pytest.raises(DataError, match="Unknown repair rule"):
        copy_data(sqlite_path=path, repairs=["guess"], state_file=tmp_path / "s.json")


def rich_rows() -> None:
    """One of everything: every field type of accounts, auth, auditlog, admin, sessions."""
    from django.contrib.admin.models import CHANGE, LogEntry
    from django.contrib.sessions.models import Session

    users = make_people(3)
    odd = User.objects.db_manager("sqlite").create_user(
        "odd@example.ie",
        "pw",
        first_name="tab\there\nnew line \\ back 'quote\" 🏠",
        last_name="",
        preferences={"ü": [1, 2.5, None, True, {"deep": "\u00e9\n"}], "big": 2**60},
        metadata={},
        is_staff=True,
        status="active",
        role="agent",
    )
    odd.groups.add(Group.objects.using("sqlite").get())
    odd.user_permissions.add(Permission.objects.using("sqlite").order_by("pk")[3])
    Group.objects.using("sqlite").get().permissions.add(
        *Permission.objects.using("sqlite").order_by("pk")[:5]
    )
    KycVerification.objects.using("sqlite").create(
        user=odd,
        reviewer=users[0],
        document_type="bank_statement",
        document_reference="X" * 100,
        expires_on=None,
        reviewed_at=dt.datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=dt.UTC),
        notes="",
        risk_score=decimal.Decimal("-999.99"),
    )
    LoginEvent.objects.using("sqlite").create(
        user=None, email_attempted="", ip_address="2001:db8::1", user_agent="", success=False
    )
    LogEntry.objects.using("sqlite").create(
        user=users[0],
        content_type=ContentType.objects.db_manager("sqlite").get_for_model(User),
        object_id=str(odd.pk),
        object_repr="odd",
        action_flag=CHANGE,
        change_message='[{"changed": {"fields": ["Email"]}}]',
    )
    Session.objects.using("sqlite").create(
        session_key="k" * 40,
        session_data="e30:abc",
        expire_date=dt.datetime(2030, 1, 1, tzinfo=dt.UTC),
    )


def every_row(alias: str) -> dict[str, list]:
    from dbmigration.plan import build_plan

    rows = {}
    for table in build_plan().tables:
        fields = [c.field.attname for c in table.columns]
        manager = table.model._base_manager.using(alias)
        rows[table.db_table] = list(manager.order_by("pk").values_list(*fields))
    return rows


@ALL
def test_every_field_of_every_model_round_trips_exactly(tmp_path):
    from auditlog.models import LogEntry as AuditEntry
    from django.db.models.signals import post_save, pre_save

    rich_rows()
    assert AuditEntry.objects.using("sqlite").exists()  # audit entries are data too
    calls = []

    def spy(sender, **kwargs):
        calls.append(sender)

    pre_save.connect(spy)
    post_save.connect(spy)
    try:
        result = copy_data(sqlite_path=source_path(), state_file=tmp_path / "s.json")
    finally:
        pre_save.disconnect(spy)
        post_save.disconnect(spy)
    assert calls == []  # the bulk copy fires no signals ...
    lite, pg = every_row("sqlite"), every_row("postgresql")
    assert (
        AuditEntry.objects.using("postgresql").count() == AuditEntry.objects.using("sqlite").count()
    )  # ... and writes no audit entries of its own
    for table in lite:
        assert lite[table] == pg[table], table
    assert sum(t.rows_written for t in result.tables) == sum(len(v) for v in lite.values())


@ALL
def test_bad_rows_are_reported_even_when_stale_target_rows_block_a_rebuild(tmp_path):
    make_people(2)
    path = bad_copy(tmp_path, "UPDATE accounts_loginevent SET success = 5")
    stranger = User.objects.db_manager("postgresql").create_user("pg-only@example.ie", "pw")
    LoginEvent.objects.using("postgresql").create(user=stranger, success=True)
    state = tmp_path / "state.json"
    with pytest.raises(RowsRejected, match="accounts_loginevent"):
        copy_data(sqlite_path=path, state_file=state)
    pending = json.loads(state.read_text())["extra"]["migrate_data"]["pending_ddl"]
    assert [p["table"] for p in pending] == ["accounts_loginevent"]  # its user FK, for later
    result = copy_data(
        sqlite_path=path, state_file=state, quarantine=True, reject_file=tmp_path / "r.jsonl"
    )
    assert result.schema_problems == []
    assert json.loads(state.read_text())["extra"]["migrate_data"]["pending_ddl"] == []
    assert not User.objects.using("postgresql").filter(email="pg-only@example.ie").exists()


@ALL
def test_a_foreign_key_that_cannot_be_rebuilt_is_named_and_kept_pending(tmp_path):
    from dbmigration.errors import TargetError

    make_people(1)
    stranger = User.objects.db_manager("postgresql").create_user("pg-only@example.ie", "pw")
    LoginEvent.objects.using("postgresql").create(user=stranger, success=True)
    state = tmp_path / "state.json"
    with pytest.raises(TargetError, match="is not present in table"):
        copy_data(sqlite_path=source_path(), state_file=state, tables=["accounts_user"])
    pending = json.loads(state.read_text())["extra"]["migrate_data"]["pending_ddl"]
    assert any(p["table"] == "accounts_loginevent" and p["kind"] == "constraint-f" for p in pending)
    result = copy_data(sqlite_path=source_path(), state_file=state)  # the full copy heals it
    assert result.schema_problems == []


@ALL
def test_rows_the_c_side_hands_back_arrive_through_a_second_copy(tmp_path):
    """Binary COPY for clean rows; the rows converted in Python follow as text."""
    from dbmigration.verify import Side, verify

    users = make_people(2)
    raw_sql(
        "INSERT INTO accounts_loginevent (email_attempted, ip_address, user_agent, success, "
        "failure_reason, created_at) VALUES ('x', '2001:0DB8:0::1', 'ua', 1, '', "
        "'2026-01-02T03:04:05')"
    )
    raw_sql(
        "UPDATE accounts_user SET preferences = '{\"ratio\": 1.50}' WHERE id = ?",
        [users[1].pk.hex],
    )
    result = copy_data(sqlite_path=source_path(), state_file=tmp_path / "s.json")
    events = next(t for t in result.tables if t.table == "accounts_loginevent")
    assert events.rows_in_python == 1 and events.rows_written == 2
    event = LoginEvent.objects.using("postgresql").get(email_attempted="x")
    assert event.ip_address == "2001:db8::1"
    assert event.created_at == dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    assert User.objects.using("postgresql").get(pk=users[1].pk).preferences == {"ratio": 1.5}
    check = verify(source=Side(sqlite_path=source_path()), target=Side(alias="postgresql"))
    assert check.ok, check.problems(Side(sqlite_path=source_path()), Side(alias="postgresql"))


@ALL
def test_bad_values_and_broken_keys_are_reported_together(tmp_path):
    make_people()
    path = bad_copy(
        tmp_path,
        "UPDATE accounts_user SET first_name = 'a' || char(0) WHERE email = 'u1@example.ie'",
        "UPDATE accounts_membership SET organisation_id = '00000000000000000000000000000000'",
    )
    with pytest.raises(RowsRejected) as caught:
        copy_data(sqlite_path=path, state_file=tmp_path / "s.json")
    codes = {(r.table, r.code) for r in caught.value.result.rejections}
    assert ("accounts_user", "nul") in codes and ("accounts_membership", "fk") in codes
    with connections["postgresql"].cursor() as cur:
        cur.execute("SELECT count(*) FROM accounts_membership")
        assert cur.fetchone()[0] == 0  # nothing of a table with broken keys is kept


@ALL
def test_a_value_postgresql_refuses_after_c_let_it_through_is_named_by_python(
    tmp_path, monkeypatch
):
    """The safety net under the C checks: if one ever lets a bad value through, PostgreSQL
    refuses the COPY, and the table is redone value by value, which names the row."""
    import dataclasses

    from dbmigration import copy as copy_mod
    from dbmigration.casts import TEXT

    users = make_people(2)
    path = bad_copy(
        tmp_path,
        f"UPDATE accounts_user SET first_name = '{'x' * 200}' WHERE id = '{users[1].pk.hex}'",
    )
    real = copy_mod.line_plan

    def no_length_check(table, targets, **kwargs):  # a C check with a bug, on purpose
        plan = real(table, targets, **kwargs)
        spec = tuple((k, n, -1 if k == TEXT else a, *rest) for k, n, a, *rest in plan.spec)
        return dataclasses.replace(plan, spec=spec)

    monkeypatch.setattr(copy_mod, "line_plan", no_length_check)
    with pytest.raises(RowsRejected) as caught:
        copy_data(sqlite_path=path, state_file=tmp_path / "s.json")
    found = [(r.table, r.pk, r.column, r.code) for r in caught.value.result.rejections]
    assert found == [("accounts_user", users[1].pk.hex, "first_name", "length")]
