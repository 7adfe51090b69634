"""Every Django value field class, filled through the ORM with boundary and hostile values,
arrives exactly (ORM equality on both aliases) after migration_prepare + migrate_data; raw
values Django would not have written are a named refusal in the dry run, the default run
and --quarantine."""

from __future__ import annotations

import datetime as dt
import decimal
import json
import sqlite3
import uuid
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command
from django.db import connections, models
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dbmigration.source_scan import scan_source
from tests.corpus.fields.models import EveryField, Pair, Stream, UUIDKeyed
from tests.test_prepare import as_settings

ALL = pytest.mark.django_db(databases="__all__", transaction=True)
UTC = dt.UTC
COPY_ESCAPES = "back\\slash tab\t newline\n return\r bs\b ff\f vt\v \\N \\. 'quote' \"dq\""
ASTRAL = "😀 𝄞 \U0010fffd Ωé"


def value_fields() -> list[models.Field]:
    return [f for f in EveryField._meta.concrete_fields if not f.primary_key]


def exact(value):
    """A value as Django reads it, where 1e16 != 10**16, -0.0 != 0.0 and bytes compare."""
    if isinstance(value, memoryview):
        value = bytes(value)
    if isinstance(value, dict):
        return ("dict", {k: exact(v) for k, v in value.items()})
    if isinstance(value, list | tuple):
        return (type(value).__name__, [exact(v) for v in value])
    if isinstance(value, Stream):
        return ("Stream", exact(value.blocks))
    if isinstance(value, float):
        return ("float", repr(value))
    return (type(value).__name__, value)


def comparable(obj: models.Model) -> dict:
    return {f.attname: exact(getattr(obj, f.attname)) for f in obj._meta.concrete_fields}


def assert_same_everywhere(model=EveryField) -> int:
    lite = {o.pk: comparable(o) for o in model.objects.using("sqlite").all()}
    pg = {o.pk: comparable(o) for o in model.objects.using("postgresql").all()}
    assert lite.keys() == pg.keys()
    for pk, row in lite.items():
        assert row == pg[pk], pk
    return len(lite)


def source_copy(tmp_path: Path) -> Path:
    """The SQLite test database as a file of its own (what migration_prepare reads)."""
    path = tmp_path / "source.sqlite3"
    src = sqlite3.connect(connections["sqlite"].settings_dict["NAME"])
    dest = sqlite3.connect(path)
    src.backup(dest)
    dest.close()
    src.close()
    return path


def prepare(tmp_path: Path, source: Path) -> list[dict]:
    """Run migration_prepare; return the rows its dry run lists (from its report)."""
    out = StringIO()
    with as_settings(tmp_path, source):
        call_command("migration_prepare", stdout=out, stderr=StringIO())
    report = Path(out.getvalue().split("Report: ")[1].split()[0])
    (validation,) = [
        s for s in json.loads(report.read_text())["steps"] if s["name"] == "5_validation"
    ]
    return validation["details"].get("rejections", [])


def migrate(tmp_path: Path, source: Path, *args: str) -> str:
    out = StringIO()
    with as_settings(tmp_path, source):
        call_command("migrate_data", *args, stdout=out, stderr=StringIO())
    return out.getvalue()


JSON_NULL = models.Value(None, models.JSONField())

BOUNDARY_ROWS = [
    dict(
        big=2**63 - 1,
        integer=2**31 - 1,
        small=2**15 - 1,
        positive_big=2**63 - 1,
        positive=2**31 - 1,
        positive_small=2**15 - 1,
        floating=float("inf"),
        decimal=decimal.Decimal("12345.6789012345"),  # SQLite keeps 15 digits
        char=COPY_ESCAPES,
        text=COPY_ESCAPES + ASTRAL * 100,
        slug="a-slug_1",
        email="o'brien+tag@example.ie",
        url="https://example.ie/ä?q=1&r=\\x",
        file_path="/tmp/x y\\z",
        file="uploads/ünï code.pdf",
        image="images/a\tb.png",
        ip="2001:db8::1",
        flag=True,
        maybe=None,
        date=dt.date(1, 1, 1),
        datetime=dt.datetime(1, 1, 1, tzinfo=UTC),
        time=dt.time(0, 0),
        duration=dt.timedelta(microseconds=2**63 - 1),
        uuid=uuid.UUID(int=0),
        binary=bytes(range(256)),
        json={"a": [1, 2.5, "ü", ASTRAL, None], "big": 10**30, "f": 1e16, "g": 1.797e308},
        tagged={"s": frozenset({1, 2}), "d": decimal.Decimal("1.10")},
        stream=Stream([{"type": "heading", "value": COPY_ESCAPES}]),
        pair=Pair((-1, 2**40)),
    ),
    dict(
        big=-(2**63),
        integer=-(2**31),
        small=-(2**15),
        positive_big=0,
        positive=0,
        positive_small=0,
        floating=float("-inf"),
        decimal=decimal.Decimal("-0.0000000001"),
        char="",
        text="",
        ip="::ffff:10.0.0.1",
        flag=False,
        maybe=False,
        date=dt.date(9999, 12, 31),
        datetime=dt.datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        time=dt.time(23, 59, 59, 999999),
        duration=dt.timedelta(microseconds=-(2**63)),
        uuid=uuid.UUID(int=2**128 - 1),
        binary=b"",
        json=JSON_NULL,  # JSON null, not SQL NULL
        tagged=[],
        stream=Stream([]),
        pair=Pair((0, 0)),
    ),
    dict(
        floating=5e-324,
        decimal=decimal.Decimal("0"),
        ip="10.0.0.1",
        maybe=True,
        datetime=dt.datetime(2026, 3, 29, 1, 30, tzinfo=UTC),
        time=dt.time(12, 0, 0, 1),
        duration=dt.timedelta(0),
        binary=b"'\\\x00\t\n\r",
        json=[1e308, 1e-7, 0.1, 123456789012345678901234567890, "\\u0000 as text", {}],
        tagged="plain string",
    ),
    dict(),  # every nullable column NULL
]


def make_boundary_rows() -> list[int]:
    pks = [EveryField.objects.using("sqlite").create(**row).pk for row in BOUNDARY_ROWS]
    UUIDKeyed.objects.using("sqlite").create(id=uuid.UUID(int=1), label=ASTRAL)
    return pks


@ALL
def test_boundary_and_hostile_values_arrive_exactly(tmp_path):
    pks = make_boundary_rows()
    source = source_copy(tmp_path)
    assert prepare(tmp_path, source) == []
    assert scan_source(sqlite_path=source).rejections == []
    out = migrate(tmp_path, source)
    assert "migrate_data (copy) done." in out
    assert assert_same_everywhere() == len(BOUNDARY_ROWS)
    assert assert_same_everywhere(UUIDKeyed) == 1
    json_null = EveryField.objects.using("postgresql").get(pk=pks[1])
    assert (
        json_null.json is None
        and EveryField.objects.using("postgresql").filter(json=JSON_NULL).count() == 1
    )


# (column, SQL expression planted straight into SQLite, rejection code): each a value
# Django on SQLite would not have written, or one PostgreSQL would refuse or change
PLANTED = [
    ("big", "'abc'", "kind"),
    ("big", "1.5", "kind"),
    ("integer", "2147483648", "range"),
    ("small", "40000", "range"),
    ("positive_big", "-1", "range"),
    ("positive", "-1", "range"),
    ("positive_small", "-1", "range"),
    ("floating", "'1.5 apples'", "class"),
    ("floating", "x'00'", "class"),
    ("decimal", "'abc'", "decimal"),
    ("decimal", "x'31'", "class"),
    ("char", "x'41'", "class"),
    ("char", "'a' || char(0) || 'b'", "nul"),
    ("char", "CAST(x'61ff62' AS TEXT)", "utf8"),
    ("char", "printf('%.201c', 'x')", "length"),
    ("text", "x'41'", "class"),
    ("slug", "x'41'", "class"),
    ("email", "x'41'", "class"),
    ("url", "x'41'", "class"),
    ("file_path", "x'41'", "class"),
    ("file", "x'41'", "class"),
    ("ip", "'999.1.1.1'", "ip"),
    ("ip", "x'41'", "class"),
    ("flag", "2", "bool"),
    ("flag", "'true'", "bool"),
    ("maybe", "'t'", "bool"),
    ("date", "'2026-02-30'", "date"),
    ("date", "20260102", "class"),
    ("date", "x'41'", "class"),
    ("datetime", "'yesterday'", "datetime"),
    ("datetime", "'2026-01-02 03:04:05.1234567'", "datetime"),
    ("datetime", "x'41'", "class"),
    ("time", "'12:00:00.1234567'", "time"),
    ("time", "'25:00'", "time"),
    ("time", "1.5", "class"),
    ("duration", "1.5", "class"),
    ("duration", "'1 day'", "class"),
    ("uuid", "'not-a-uuid'", "uuid"),
    ("uuid", "x'41'", "class"),
    ("binary", "'text, not a blob'", "class"),
    ("binary", "5", "class"),
    ("json", "'{bad'", "json"),
    ("json", "'\"\\ud800\"'", "json"),  # a lone surrogate
    ("json", "'[-0.0]'", "json"),
    ("json", "'1e400'", "json"),
    ("json", '\'{"a": "\\u0000"}\'', "nul"),
    ("json", "x'7b7d'", "class"),
    ("tagged", "'{bad'", "json"),
    ("stream", "'{bad'", "json"),
    ("pair", "'no comma'", "malformed"),
]


def planted_source(tmp_path: Path) -> tuple[Path, set, set]:
    """The test database with one clean row and one row per planted value; returns the
    file, the expected (pk, column, code) refusals and the clean pks."""
    clean = {EveryField.objects.using("sqlite").create(**BOUNDARY_ROWS[0]).pk}
    planted = [EveryField.objects.using("sqlite").create().pk for _ in PLANTED]
    clean.add(EveryField.objects.using("sqlite").create().pk)
    path = source_copy(tmp_path)
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA ignore_check_constraints = ON")  # an old table may lack them
    for pk, (column, expression, _code) in zip(planted, PLANTED, strict=True):
        sql = f'UPDATE corpus_fields_everyfield SET "{column}" = {expression} WHERE id = ?'
        conn.execute(sql, [pk])
    conn.commit()
    conn.close()
    expected = {(pk, column, code) for pk, (column, _, code) in zip(planted, PLANTED, strict=True)}
    return path, expected, clean


def named(rows) -> set:
    return {(r["pk"], r["column"], r["code"]) for r in rows}


@ALL
def test_planted_values_are_named_refusals_in_the_dry_run_the_copy_and_quarantine(tmp_path):
    source, expected, clean = planted_source(tmp_path)
    listed = prepare(tmp_path, source)
    assert all(r["table"] == "corpus_fields_everyfield" and r["reason"] for r in listed)
    assert {(int(r["pk"]), r["column"]) for r in listed} == {(p, c) for p, c, _ in expected}
    scan = scan_source(sqlite_path=source).rejections  # the dry run's codes
    assert named(r.as_dict() for r in scan) == expected

    with pytest.raises(CommandError) as caught:
        migrate(tmp_path, source)
    assert caught.value.returncode == 5
    assert "corpus_fields_everyfield pk=" in str(caught.value)
    reject_file = Path(
        str(caught.value).split("Every row is listed in ")[1].split(".jsonl")[0] + ".jsonl"
    )
    assert named(map(json.loads, reject_file.read_text().splitlines())) == expected
    assert not EveryField.objects.using("postgresql").exists()  # nothing of the table kept

    out = migrate(tmp_path, source, "--quarantine")
    assert "quarantined" in out and "migrate_data (copy) done." in out
    assert set(EveryField.objects.using("postgresql").values_list("pk", flat=True)) == clean
    for pk in clean:
        lite = EveryField.objects.using("sqlite").get(pk=pk)
        assert comparable(lite) == comparable(EveryField.objects.using("postgresql").get(pk=pk))


# --- hypothesis: values Django accepts, per field type, arrive exactly ---------------------

# text Django can save on SQLite and PostgreSQL can hold (NUL is refused by design)
texts = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"))
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**80), 2**80)
    | st.floats(allow_nan=False, allow_infinity=False).filter(lambda f: repr(f) != "-0.0")
    | texts,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
    max_leaves=12,
)
FIELD_VALUES = {
    "big": st.integers(-(2**63), 2**63 - 1),
    "integer": st.integers(-(2**31), 2**31 - 1),
    "small": st.integers(-(2**15), 2**15 - 1),
    "positive_big": st.integers(0, 2**63 - 1),
    "positive": st.integers(0, 2**31 - 1),
    "positive_small": st.integers(0, 2**15 - 1),
    "floating": st.floats(allow_nan=False),  # SQLite stores NaN as NULL
    # SQLite keeps 15 significant digits of a decimal (a REAL): Django's own limit there
    "decimal": st.decimals(places=5, min_value=-(10**9), max_value=10**9, allow_nan=False),
    "char": texts.filter(lambda t: len(t) <= 200),
    "text": texts,
    "slug": st.from_regex(r"[-a-zA-Z0-9_]{0,50}", fullmatch=True),
    "email": texts.filter(lambda t: len(t) <= 254),
    "url": texts.filter(lambda t: len(t) <= 300),
    "file_path": texts.filter(lambda t: len(t) <= 200),
    "file": texts.filter(lambda t: len(t) <= 200),
    "image": texts.filter(lambda t: len(t) <= 200),
    "ip": st.ip_addresses().map(str),
    "flag": st.booleans(),
    "maybe": st.none() | st.booleans(),
    "date": st.dates(),
    "datetime": st.datetimes(timezones=st.just(UTC)),
    "time": st.times(),
    "duration": st.integers(-(2**63), 2**63 - 1).map(lambda us: dt.timedelta(microseconds=us)),
    "uuid": st.uuids(),
    "binary": st.binary(max_size=64),
    "json": json_values,
    "tagged": st.dictionaries(texts, st.frozensets(st.integers(-5, 5)) | json_values, max_size=3),
    "stream": st.lists(
        st.fixed_dictionaries({"type": texts, "value": json_values}), max_size=3
    ).map(Stream),
    "pair": st.tuples(st.integers(-(2**40), 2**40), st.integers(-(2**40), 2**40)).map(Pair),
}


def test_every_value_field_has_a_strategy():
    assert {f.name for f in value_fields()} == set(FIELD_VALUES)


@ALL
def test_hypothesis_values_arrive_exactly_through_the_copy_and_pass_verification():
    from dbmigration.copy import copy_data
    from dbmigration.plan import build_plan
    from dbmigration.verify import Side, verify

    source = Path(connections["sqlite"].settings_dict["NAME"])
    table = ["corpus_fields_everyfield"]

    @settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(st.fixed_dictionaries(FIELD_VALUES), min_size=1, max_size=12))
    def check(rows):
        EveryField.objects.using("sqlite").all().delete()
        for row in rows:
            EveryField.objects.using("sqlite").create(**row)
        copy_data(sqlite_path=source, tables=table)
        assert assert_same_everywhere() == len(rows)
        lite, pg = Side(sqlite_path=source), Side(alias="postgresql")
        result = verify(source=lite, target=pg, plan=build_plan(only=table))
        assert all(t.ok for t in result.tables), result.problems(lite, pg)

    check()


@ALL
def test_verification_tells_a_text_in_a_binary_column_from_the_bytes_copied():
    """What the copy refuses, verification does not pass either: a row carried some other
    way (an old copy, a hand-made fix) with TEXT where Django writes a BLOB differs."""
    from dbmigration.plan import build_plan
    from dbmigration.verify import Side, verify

    for alias in ("sqlite", "postgresql"):
        EveryField.objects.using(alias).create(id=7, binary=b"same bytes", char="same")
    source = Path(connections["sqlite"].settings_dict["NAME"])
    lite, pg = Side(sqlite_path=source), Side(alias="postgresql")
    plan = build_plan(only=["corpus_fields_everyfield"])
    assert verify(source=lite, target=pg, plan=plan).tables[0].ok
    conn = sqlite3.connect(source)
    conn.execute("UPDATE corpus_fields_everyfield SET binary = CAST(binary AS TEXT)")
    conn.commit()
    conn.close()
    (check,) = verify(source=lite, target=pg, plan=plan).tables
    assert not check.ok and check.different == ["7"]


@ALL
def test_sync_refuses_a_text_written_into_a_binary_column_after_the_copy(tmp_path):
    from dbmigration.copy import RowsRejected, copy_data
    from dbmigration.sync import sync_to_postgresql

    source = Path(connections["sqlite"].settings_dict["NAME"])
    row = EveryField.objects.using("sqlite").create(binary=b"bytes")
    copy_data(sqlite_path=source, state_file=tmp_path / "state.json")
    conn = sqlite3.connect(source)
    conn.execute("UPDATE corpus_fields_everyfield SET binary = 'text now'")
    conn.commit()
    conn.close()
    with pytest.raises(RowsRejected) as caught:
        sync_to_postgresql(sqlite_path=source, state_file=tmp_path / "state.json")
    ((rejected),) = caught.value.result.rejections
    assert (rejected.pk, rejected.column, rejected.code) == (row.pk, "binary", "class")
    assert bytes(EveryField.objects.using("postgresql").get().binary) == b"bytes"


@ALL
def test_sync_carries_changed_hostile_values_exactly(tmp_path):
    from dbmigration.copy import copy_data
    from dbmigration.sync import sync_to_postgresql

    pks = make_boundary_rows()
    source = Path(connections["sqlite"].settings_dict["NAME"])
    copy_data(sqlite_path=source, state_file=tmp_path / "state.json")
    lite = EveryField.objects.using("sqlite")
    # each boundary row takes the next one's values; a new row and a deleted one
    for pk, values in zip(pks, BOUNDARY_ROWS[1:], strict=False):
        blank = {f.name: None for f in value_fields() if f.null}
        lite.filter(pk=pk).update(**{**blank, "flag": False, **values})
    lite.filter(pk=pks[-1]).delete()
    lite.create(**BOUNDARY_ROWS[0])
    result = sync_to_postgresql(sqlite_path=source, state_file=tmp_path / "state.json")
    assert result.rows_written == 4 and result.rows_deleted >= 1
    assert assert_same_everywhere() == len(BOUNDARY_ROWS)
