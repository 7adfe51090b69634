"""verify.py: counts, range checksums and row names, on a real copy."""

import pytest
from django.db import connections

from accounts.models import LoginEvent, User
from dbmigration.copy import copy_data
from dbmigration.verify import Side, canonical, verify
from tests.sources import make_people, source_path

ALL = pytest.mark.django_db(databases="__all__", transaction=True)


def copied(tmp_path):
    make_people()
    copy_data(sqlite_path=source_path(), state_file=tmp_path / "state.json")
    return Side(sqlite_path=source_path()), Side(alias="postgresql")


@ALL
def test_verify_after_copy_is_clean(tmp_path):
    source, target = copied(tmp_path)
    result = verify(source=source, target=target)
    assert result.ok, result.problems(source, target)
    users = next(t for t in result.tables if t.table == "accounts_user")
    assert users.source_rows == users.target_rows == 3
    assert users.source_checksum == users.target_checksum


@ALL
def test_verify_names_count_mismatch_and_changed_rows(tmp_path):
    source, target = copied(tmp_path)
    user = User.objects.using("postgresql").order_by("email").first()
    User.objects.using("postgresql").filter(pk=user.pk).update(first_name="changed")
    LoginEvent.objects.using("postgresql").create(success=False)
    result = verify(source=source, target=target)
    assert not result.ok
    users = next(t for t in result.tables if t.table == "accounts_user")
    assert users.different == [user.pk.hex]
    assert users.mismatched_ranges == [f"id starting with {user.pk.hex[:3]!r}"]
    events = next(t for t in result.tables if t.table == "accounts_loginevent")
    assert (events.source_rows, events.target_rows) == (1, 2)
    text = "\n".join(result.problems(source, target))
    assert "accounts_loginevent: 1 rows in SQLite" in text and "2 in database 'postgresql'" in text


@ALL
def test_verify_reports_stale_sequence(tmp_path):
    source, target = copied(tmp_path)
    with connections["postgresql"].cursor() as cur:
        cur.execute("SELECT setval(pg_get_serial_sequence('accounts_loginevent', 'id'), 1, false)")
    result = verify(source=source, target=target)
    assert any("accounts_loginevent.id already reaches" in p for p in result.sequence_problems)


def test_canonical_is_engine_neutral():
    import datetime as dt
    import decimal
    import uuid

    aware = dt.datetime(2026, 1, 2, 4, 4, 5, tzinfo=dt.timezone(dt.timedelta(hours=1)))
    assert canonical(aware) == canonical(dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC))
    assert canonical({"b": 1, "a": [1.5]}, json_field=True) == '{"a":[1.5],"b":1}'
    assert canonical(decimal.Decimal("12.30")) == "12.30"
    assert canonical(uuid.UUID(int=1)) == "0" * 31 + "1"
    assert canonical(True) == "t" and canonical(None) is None


@ALL
def test_reader_shortcuts_equal_djangos_readers(tmp_path):
    from dbmigration.plan import build_plan
    from dbmigration.verify import column_readers, iter_rows

    source, target = copied(tmp_path)
    raw_sql_rows = 0
    for table in build_plan().tables:
        for side in (source, target):
            fast = column_readers(table, side.django_connection, fast=True)
            slow = column_readers(table, side.django_connection, fast=False)
            for batch in iter_rows(side, table):
                for raw in batch:
                    raw_sql_rows += 1
                    quick = [f(v) for f, v in zip(fast, raw, strict=True)]
                    assert quick == [s(v) for s, v in zip(slow, raw, strict=True)]
    assert raw_sql_rows > 50


@ALL
def test_range_sums_in_c_and_sql_agree_and_name_the_rows(tmp_path, monkeypatch):
    """Both sides summed at once (C on a thread, SQL on the server), in either direction;
    a differing range is still narrowed to its rows."""
    from dbmigration import range_sums

    source, target = copied(tmp_path)
    covered = []
    real = range_sums.sums

    def recorded(**kwargs):
        found = real(**kwargs)
        if found is not None:
            covered.append(kwargs["table"].db_table)
        return found

    monkeypatch.setattr(range_sums, "sums", recorded)
    monkeypatch.setattr(range_sums, "SPLIT_MIN_ROWS", 1)  # two C threads, even for 3 rows
    assert verify(source=source, target=target).ok
    assert {"accounts_user", "accounts_loginevent", "accounts_organisation"} <= set(covered)
    User.objects.using("postgresql").update(first_name="other")
    result = verify(source=source, target=target)
    users = next(t for t in result.tables if t.table == "accounts_user")
    assert len(users.different) == 3 and users.source_rows == users.target_rows == 3
    back = verify(source=target, target=source)  # SQLite as the target: the other branch
    assert len(next(t for t in back.tables if t.table == "accounts_user").different) == 3


@ALL
def test_sequences_of_a_mixed_case_reserved_word_table(tmp_path):
    """Issue 9.4: db_table = "Select" went unquoted into pg_get_serial_sequence."""
    from tests.corpus.relations.models import Select

    Select.objects.using("sqlite").create(order=1, group="g", spaced="s")
    source, target = copied(tmp_path)
    result = verify(source=source, target=target)
    assert result.ok, result.problems(source, target)
    with connections["postgresql"].cursor() as cur:
        cur.execute("""SELECT setval(pg_get_serial_sequence('"Select"', 'id'), 1, false)""")
    result = verify(source=source, target=target)
    assert any(
        '"Select".id already reaches' in p or "Select.id already reaches" in p
        for p in result.sequence_problems
    ), result.sequence_problems


@ALL
def test_composite_keys_name_their_rows(tmp_path):
    """Issue 9.3: a CompositePrimaryKey is a tuple of columns in ranges and row names."""
    from tests.corpus.relations.models import AutoKey, CompositeKey

    owner = AutoKey.objects.using("sqlite").create(name="o")
    CompositeKey.objects.using("sqlite").create(owner=owner, slot="a", note="same")
    CompositeKey.objects.using("sqlite").create(owner=owner, slot="b", note="same")
    source, target = copied(tmp_path)
    assert verify(source=source, target=target).ok
    CompositeKey.objects.using("postgresql").filter(pk=(owner.pk, "b")).update(note="changed")
    result = verify(source=source, target=target)
    check = next(t for t in result.tables if t.table == "corpus_relations_compositekey")
    assert check.different == [f"{owner.pk}\x1fb"]
    assert f"rows differing: ['{owner.pk}, b']" in check.describe(source, target)
    assert check.mismatched_ranges[0].startswith("(owner_id, slot) starting with")


@ALL
def test_a_fast_checksum_that_disagrees_with_equal_rows_is_settled_in_python(tmp_path, monkeypatch):
    """The C/SQL sums are a second implementation of the canonical values: if one ever
    hashes a value differently on the two sides (Wagtail's custom-key user table did),
    Python's reference path, which compares every row, decides; real differences still fail."""
    from dbmigration import range_sums

    source, target = copied(tmp_path)
    real = range_sums.sums

    def one_side_off(**kwargs):  # a fast-path bug on the PostgreSQL side of one table
        found = real(**kwargs)
        if found is None or kwargs["table"].db_table != "accounts_user":
            return found
        lite, pg = found
        bucket, (rows, total) = next(iter(pg.buckets.items()))
        pg.buckets[bucket] = [rows, (total + 1) % (1 << 64)]
        return lite, pg

    monkeypatch.setattr(range_sums, "sums", one_side_off)
    result = verify(source=source, target=target)
    assert result.ok, result.problems(source, target)
    users = next(t for t in result.tables if t.table == "accounts_user")
    assert users.settled_in_python and users.source_checksum == users.target_checksum
    changed = User.objects.using("postgresql").order_by("email").first()
    User.objects.using("postgresql").filter(pk=changed.pk).update(first_name="changed")
    result = verify(source=source, target=target)
    users = next(t for t in result.tables if t.table == "accounts_user")
    assert not result.ok and users.different == [changed.pk.hex]
    assert not users.settled_in_python
