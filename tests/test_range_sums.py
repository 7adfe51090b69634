"""range_sums.py and _copytext.range_sums: C hashes each SQLite value exactly as
PostgreSQL hashes the value the copy stores from it (hypothesis, over every field kind the
path covers), and the kinds it does not cover take verify.py's Python path."""

import json
import sqlite3

import pytest
from django.db import connections
from hypothesis import given

from dbmigration import range_sums
from dbmigration.casts import native_cast, target_columns
from dbmigration.copy_lines import _copytext
from dbmigration.range_sums import ROW_HASH_SQL, column_spec, hash_plan, value_hash_sql
from tests.test_casts import CASES, PLAN, SETTINGS, column
from tests.test_copy_lines import CANONICAL, reference_line, target_of

PG = pytest.mark.django_db(databases=["postgresql"])
MOD = 1 << 64


def spec_of(table: str, name: str) -> tuple:
    target, _ = target_of(table, name)
    spec = column_spec(column(table, name), target)
    assert spec is not None, (table, name)
    return spec


def c_hash(spec: tuple, raw) -> int | None:
    """C's hash of one value as the only column (seed 1); None: the Python path decides."""
    return _copytext.hash_rows([(raw,)], (spec,))[0]


def pg_hash(sql_type: str, kind: int, line: bytes) -> int:
    """Load one COPY text line into a column of that type; PostgreSQL's hash of it."""
    with connections["postgresql"].cursor() as cur:
        cur.execute("DROP TABLE IF EXISTS one_value")
        cur.execute(f"CREATE TEMP TABLE one_value (v {sql_type})")
        with cur.cursor.copy("COPY one_value (v) FROM STDIN") as copy:
            copy.write(line)
        cur.execute(f"SELECT {value_hash_sql(kind, 'v', 1)} FROM one_value")
        return cur.fetchone()[0] % MOD


COVERED = sorted(
    t
    for t, ((table, name), _) in CASES.items()
    if native_cast(column(table, name)).kind in ROW_HASH_SQL
)


def test_every_value_kind_the_copy_prints_in_c_is_covered():
    assert set(COVERED) >= {
        "BigAutoField", "BooleanField", "CharField", "DateField", "DateTimeField",
        "DecimalField", "GenericIPAddressField", "JSONField", "TextField", "UUIDField",
    }  # fmt: skip


@PG
@pytest.mark.parametrize("internal_type", COVERED)
def test_c_hash_equals_postgresqls_hash_of_the_stored_value(internal_type):
    (table, name), values = CASES[internal_type]
    col = column(table, name)
    spec = spec_of(table, name)
    _, sql_type = target_of(table, name)
    hashed = 0

    @SETTINGS
    @given(values)
    def check(raw):
        nonlocal hashed
        mine = c_hash(spec, raw)
        if mine is None:
            return  # the Python path decides
        line = reference_line(col, raw)
        if line is None:
            return  # refused by the copy: the row is not on PostgreSQL, counts differ
        assert mine == pg_hash(sql_type, spec[0], line), raw
        hashed += 1

    check()
    assert hashed > 0  # not vacuous


@PG
@pytest.mark.parametrize(("table", "name"), sorted(CANONICAL))
def test_c_hashes_the_values_django_writes_itself(table, name):
    spec = spec_of(table, name)

    @SETTINGS
    @given(CANONICAL[(table, name)])
    def check(raw):
        if reference_line(column(table, name), raw) is None:
            return
        assert c_hash(spec, raw) is not None, raw

    check()


@PG
@pytest.mark.parametrize(
    "document",
    [
        '{"b": 1, "a": 2, "a": 3}',  # the last of duplicate keys, keys sorted
        '{"bb": 1, "a": {"dd": [], "c": {}}}',  # shorter keys first
        '{"\\t": 1, "\\n": 2, " ": 3, "\\u00e9": 4, "\\ud83d\\ude00": 5}',  # decoded bytes
        '"\\u001f\\u007f\\/\\"\\\\\\b\\f"',  # escape_json's escapes
        "-0",
        "[ -0 , 12345678901234567890123 , true,false , null ]",
        '  {"a" :\\t1}  '.replace("\\t", "\t"),
    ],
)
def test_c_normalizes_json_as_jsonb_prints_it(document):
    spec = spec_of("accounts_user", "preferences")
    line = reference_line(column("accounts_user", "preferences"), document.encode())
    assert line is not None
    assert c_hash(spec, document.encode()) == pg_hash("jsonb", spec[0], line)


@PG
def test_kinds_c_does_not_hash_take_the_python_path():
    """FloatField, DurationField, TimeField, BinaryField and custom fields are hashed in
    Python (the corpus table has every kind): the table is not planned here."""
    with connections["postgresql"].cursor() as cur:
        table = PLAN.table("corpus_fields_everyfield")
        assert hash_plan(table, target_columns(cur, table.db_table)) is None


def test_a_value_c_cannot_vouch_for_sends_the_table_to_python(tmp_path):
    path = tmp_path / "t.sqlite3"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE t (id integer primary key, at text)")
    conn.executemany("INSERT INTO t VALUES (?, ?)", [(1, "2026-01-02 03:04:05"), (2, "junk")])
    conn.commit()
    conn.close()
    uri = f"{path.as_uri()}?mode=ro"
    spec = ((1, 0, 0, 0), (5, 0, 0, 1))  # an integer key, a DATETIME
    args = (uri, "SELECT id, at FROM t", spec, 0, range_sums.INTEGER_KEYS, 1, 1000, 2)
    assert _copytext.range_sums(*args, None) is None
    rows, ranges = _copytext.range_sums(*args, {2})  # the bad row quarantined: left out
    assert rows == 1 and ranges[0][:2] == (0, 1)


def test_json_strategy_documents_are_mostly_clean():
    spec = (7, 0, 0, 1)
    docs = [json.dumps({"k": i, "s": "é" * i}).encode() for i in range(20)]
    assert all(h is not None for h in _copytext.hash_rows([(d,) for d in docs], (spec,)))


@PG
def test_a_key_field_of_the_projects_own_takes_the_python_path():
    """C and SQL range a row by its stored key, the Python path (which names rows and finds
    the rows --sync and the rollback carry) by the key's Python value; they agree only for
    Django's own fields.  Wagtail's test user has an IntegerField subclass whose Python value
    is the stored one plus a constant: its table must not take the C path."""
    import dataclasses

    from django.contrib.auth.models import Permission
    from django.db import models

    from dbmigration.plan import build_plan

    class ShiftedKey(models.IntegerField):
        pass

    plan = {t.db_table: t for t in build_plan().tables}
    events = plan["accounts_loginevent"]
    key = events.columns[events.pk_index].field
    assert range_sums._stores_its_python_value(key)
    assert range_sums._stores_its_python_value(Permission._meta.get_field("content_type"))
    assert not range_sums._stores_its_python_value(ShiftedKey(primary_key=True))
    with connections["postgresql"].cursor() as cur:
        targets = target_columns(cur, events.db_table)
    assert hash_plan(events, targets) is not None
    columns = list(events.columns)
    columns[events.pk_index] = dataclasses.replace(columns[events.pk_index], field=ShiftedKey())
    assert hash_plan(dataclasses.replace(events, columns=tuple(columns)), targets) is None
