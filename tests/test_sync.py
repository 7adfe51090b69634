"""sync.py: diffs found by range checksums, and --sync carrying only the changes."""

import sqlite3

import pytest

from accounts.models import LoginEvent, Organisation, User
from dbmigration.copy import copy_data
from dbmigration.plan import build_plan
from dbmigration.sqlite_source import content_sha256
from dbmigration.sync import diff_table, sync_to_postgresql
from dbmigration.verify import Side, verify
from tests.sources import make_people, source_path

ALL = pytest.mark.django_db(databases="__all__", transaction=True)


@ALL
def test_diff_and_sync_pick_up_inserts_updates_deletes(tmp_path):
    users = make_people(4)
    state = tmp_path / "state.json"
    copy_data(sqlite_path=source_path(), state_file=state)
    # changes on the source after the copy
    User.objects.using("sqlite").filter(pk=users[2].pk).update(last_name="Ó Sé")
    LoginEvent.objects.using("sqlite").all().delete()
    new = User.objects.db_manager("sqlite").create_user("late@example.ie", "pw")
    org = Organisation.objects.using("sqlite").get()
    Organisation.objects.using("sqlite").filter(pk=org.pk).update(metadata={"tier": 3})
    source, target = Side(sqlite_path=source_path()), Side(alias="postgresql")
    plan = build_plan()
    diff = diff_table(source=source, target=target, table=plan.table("accounts_user"))
    assert diff.inserted_pks == [new.pk]
    assert diff.updated_pks == [users[2].pk]
    assert diff.deleted_pks == []
    events = diff_table(source=source, target=target, table=plan.table("accounts_loginevent"))
    assert len(events.deleted_pks) == 1 and not events.inserted_pks
    # the reverse direction works with the same call
    back = diff_table(source=target, target=source, table=plan.table("accounts_user"))
    assert back.deleted_pks == [new.pk] and back.updated_pks == [users[2].pk]

    before = content_sha256(source_path())
    result = sync_to_postgresql(sqlite_path=source_path(), state_file=state)
    assert content_sha256(source_path()) == before
    assert result.rows_deleted == 3  # one login event, two old versions of updated rows
    # new user, updated user, updated organisation, and the audit entry creating the user wrote
    assert result.rows_written == sum(
        len(d.inserted_pks) + len(d.updated_pks) for d in result.diffs
    )
    changed = {d.table for d in result.diffs if d.changed}
    assert changed == {
        "accounts_user",
        "accounts_organisation",
        "accounts_loginevent",
        "auditlog_logentry",
    }
    assert User.objects.using("postgresql").get(pk=users[2].pk).last_name == "Ó Sé"
    assert not LoginEvent.objects.using("postgresql").exists()
    check = verify(source=source, target=target)
    assert check.ok, check.problems(source, target)
    again = sync_to_postgresql(sqlite_path=source_path(), state_file=state)
    assert again.changed == 0


@ALL
def test_sync_refuses_before_a_full_copy(tmp_path):
    from dbmigration.errors import DataError

    make_people(1)
    with pytest.raises(DataError, match="run migrate_data without --sync first"):
        sync_to_postgresql(sqlite_path=source_path(), state_file=tmp_path / "s.json")


@ALL
def test_sync_rejects_bad_new_rows(tmp_path):
    from dbmigration.copy import RowsRejected

    make_people(1)
    state = tmp_path / "state.json"
    copy_data(sqlite_path=source_path(), state_file=state)
    conn = sqlite3.connect(source_path())
    conn.execute("UPDATE accounts_user SET first_name = 'a' || char(0) || 'b'")
    conn.commit()
    conn.close()
    with pytest.raises(RowsRejected, match="NUL byte"):
        sync_to_postgresql(sqlite_path=source_path(), state_file=state)
    assert User.objects.using("postgresql").get().first_name == "Ú0"


@ALL
def test_sync_rejects_new_rows_pointing_nowhere(tmp_path):
    from dbmigration.copy import RowsRejected

    make_people(1)
    state = tmp_path / "state.json"
    copy_data(sqlite_path=source_path(), state_file=state)
    conn = sqlite3.connect(source_path())
    conn.execute(
        "INSERT INTO accounts_loginevent (user_id, email_attempted, user_agent, success, "
        "failure_reason, created_at) VALUES ('ffffffffffffffffffffffffffffffff', '', '', 1, '', "
        "'2026-01-02 03:04:05')"
    )
    conn.commit()
    conn.close()
    with pytest.raises(RowsRejected, match="points to a missing accounts_user.id"):
        sync_to_postgresql(sqlite_path=source_path(), state_file=state)
    assert LoginEvent.objects.using("postgresql").count() == 1


@ALL
def test_sync_by_composite_key(tmp_path):
    """Issue 9.3: --sync finds and writes rows of a CompositePrimaryKey table by its tuple."""
    from tests.corpus.relations.models import AutoKey, CompositeKey

    owner = AutoKey.objects.using("sqlite").create(name="o")
    for slot in "abc":
        CompositeKey.objects.using("sqlite").create(owner=owner, slot=slot, note=slot)
    state = tmp_path / "state.json"
    copy_data(sqlite_path=source_path(), state_file=state)
    lite = CompositeKey.objects.using("sqlite")
    lite.filter(pk=(owner.pk, "a")).update(note="changed")
    lite.filter(pk=(owner.pk, "b")).delete()
    lite.create(owner=owner, slot="d", note="new")
    table = build_plan().table("corpus_relations_compositekey")
    diff = diff_table(
        source=Side(sqlite_path=source_path()), target=Side(alias="postgresql"), table=table
    )
    assert (diff.inserted_pks, diff.updated_pks, diff.deleted_pks) == (
        [(owner.pk, "d")],
        [(owner.pk, "a")],
        [(owner.pk, "b")],
    )
    sync_to_postgresql(sqlite_path=source_path(), state_file=state)
    pg = CompositeKey.objects.using("postgresql")
    assert sorted(pg.values_list("slot", "note")) == [("a", "changed"), ("c", "c"), ("d", "new")]


@ALL
def test_sync_names_a_row_postgresql_refuses_at_copy(tmp_path):
    """Issue 9.5/9.6: a new row whose generated a * b PostgreSQL computes in int4 stopped the
    sync with "integer out of range" and no row named."""
    from dbmigration.copy import RowsRejected
    from tests.corpus.relations.models import Computed

    state = tmp_path / "state.json"
    copy_data(sqlite_path=source_path(), state_file=state)
    Computed.objects.using("sqlite").create(a=1, b=2, name="fine")
    bad = Computed.objects.using("sqlite").create(a=65536, b=65536, name="product")
    with pytest.raises(RowsRejected) as caught:
        sync_to_postgresql(sqlite_path=source_path(), state_file=state)
    (row,) = caught.value.result.rejections
    assert (row.table, row.pk) == ("corpus_relations_computed", bad.pk)
    assert "integer out of range" in row.reason and "product = " in row.reason
    assert not Computed.objects.using("postgresql").exists()  # nothing of the sync kept
