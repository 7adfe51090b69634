"""copy_lines.py and _copytext.c: the C formatter prints exactly what Django's reference
path gives, and hands every other value back to the Python path (hypothesis)."""

import json
import sqlite3

import pytest
from django.db import connections
from hypothesis import given
from hypothesis import strategies as st
from psycopg._copy_base import TextFormatter
from psycopg.adapt import Transformer

from dbmigration import copy_lines
from dbmigration.casts import (
    JSON,
    PYTHON,
    Rejection,
    TargetColumn,
    build_converter,
    native_cast,
    target_columns,
)
from dbmigration.copy_lines import BINARY_HEADER, BINARY_TRAILER, line_plan
from tests.test_casts import CASES, PLAN, SETTINGS, column, datetimes

PG = pytest.mark.django_db(databases=["postgresql"])


def test_the_c_formatter_is_built():
    # without it every row takes the Python path: correct, but three times slower
    assert copy_lines._copytext is not None


def reference_line(col, raw) -> bytes | None:
    """The COPY text the Python reference path writes for one value (None: rejected)."""
    try:
        value = build_converter(col, fast=False)(raw)
    except Rejection:
        return None
    formatter = TextFormatter(Transformer())
    return bytes(formatter.write_row([value])) + bytes(formatter.end())


def one_column_spec(table: str, name: str, targets: dict) -> tuple:
    """The C spec of one column, as a one-column table's spec."""
    plan = line_plan(PLAN.table(table), targets)
    return (plan.spec[[c.name for c in plan.table.columns].index(name)],)


def c_line(col, raw) -> bytes | None:
    """The COPY text the C formatter writes for one value (None: handed back to Python)."""
    spec = one_column_spec(col.field.model._meta.db_table, col.name, {})
    data, fallback, _ = copy_lines._copytext.format_rows([(raw,)], spec, None, 0)
    return None if fallback else data


def jsonb_text(line: bytes) -> str:
    """What PostgreSQL stores for a one-column COPY line, printed back as jsonb text."""
    with connections["postgresql"].cursor() as cur:
        cur.execute("CREATE TEMP TABLE IF NOT EXISTS one_json (v jsonb)")
        cur.execute("TRUNCATE one_json")
        with cur.cursor.copy("COPY one_json (v) FROM STDIN") as copy:
            copy.write(line)
        cur.execute("SELECT v::text FROM one_json")
        return cur.fetchone()[0]


@PG
@pytest.mark.parametrize("internal_type", sorted(CASES))
def test_c_output_equals_the_reference_path(internal_type):
    (table, name), values = CASES[internal_type]
    col = column(table, name)

    @SETTINGS
    @given(values)
    def check(raw):
        mine = c_line(col, raw)
        if mine is None:
            return  # the Python path decides
        expected = reference_line(col, raw)
        assert expected is not None, f"C accepted {raw!r}, which the reference path refuses"
        if internal_type == "JSONField":
            assert jsonb_text(mine) == jsonb_text(expected), raw
        else:
            assert mine == expected, raw

    check()


CANONICAL = {
    ("accounts_user", "created_at"): datetimes.map(lambda d: str(d).encode()),
    ("accounts_user", "id"): st.uuids().map(lambda u: u.hex.encode()),
    ("accounts_kycverification", "expires_on"): st.dates().map(lambda d: d.isoformat().encode()),
    ("accounts_user", "is_staff"): st.sampled_from([0, 1]),
    ("accounts_loginevent", "id"): st.integers(-(2**63), 2**63 - 1),
    ("accounts_loginevent", "ip_address"): st.ip_addresses().map(lambda ip: str(ip).encode()),
    ("accounts_kycverification", "notes"): st.text()
    .filter(lambda t: "\x00" not in t)
    .map(lambda t: t.encode("utf-8", "surrogatepass")),
    # FileField and FilePathField hold their text as is: C prints them too
    ("corpus_fields_everyfield", "file"): st.text(max_size=100)
    .filter(lambda t: "\x00" not in t)
    .map(lambda t: t.encode("utf-8", "surrogatepass")),
    ("corpus_fields_everyfield", "file_path"): st.text(max_size=100)
    .filter(lambda t: "\x00" not in t)
    .map(lambda t: t.encode("utf-8", "surrogatepass")),
    ("accounts_user", "preferences"): st.dictionaries(
        st.text(max_size=5), st.integers() | st.booleans() | st.none() | st.text(max_size=5)
    ).map(lambda d: __import__("json").dumps(d).encode()),
}


@pytest.mark.parametrize(("table", "name"), sorted(CANONICAL))
def test_c_prints_the_clean_values_itself(table, name):
    """The fast path is not vacuous: the values Django writes never need Python."""
    col = column(table, name)

    @SETTINGS
    @given(CANONICAL[(table, name)])
    def check(raw):
        if reference_line(col, raw) is None:
            return  # e.g. a surrogate the reference path refuses too
        assert c_line(col, raw) is not None, raw

    check()


@pytest.mark.parametrize(
    ("table", "name", "raw"),
    [
        ("accounts_user", "created_at", b"2026-02-30 00:00:00"),
        ("accounts_user", "created_at", b"2026-01-02 24:00:00"),
        ("accounts_user", "created_at", b"2026-01-02 03:04:05.000000"),
        ("accounts_user", "created_at", b"0000-01-02 03:04:05"),
        ("accounts_user", "created_at", b"2026-01-02T03:04:05"),
        ("accounts_kycverification", "expires_on", b"2025-02-29"),
        ("accounts_user", "id", b"0123456789ABCDEF0123456789abcdef"),
        ("accounts_user", "is_staff", 2),
        ("accounts_user", "first_name", b"x" * 151),
        ("accounts_user", "first_name", b"a\x00b"),
        ("accounts_user", "first_name", b"a\xffb"),
        ("accounts_user", "first_name", b"\xed\xa0\x80"),  # an encoded surrogate
        ("accounts_user", "preferences", b'{"a": 1.5}'),
        ("accounts_user", "preferences", b'{"a": 1e2}'),
        ("accounts_user", "preferences", b'["\\u0000"]'),
        ("accounts_user", "preferences", b'["\\ud800"]'),
        ("accounts_user", "preferences", b"{bad"),
        ("accounts_user", "preferences", b'["\\udc00"]'),  # a low surrogate alone
        ("accounts_user", "preferences", b'["\\ud800\\u0041"]'),
        ("accounts_user", "preferences", b"[1,]"),
        ("accounts_user", "preferences", b"01"),
        ("accounts_user", "preferences", b'"a\tb"'),  # a raw tab inside a string
        ("accounts_user", "preferences", b"\xef\xbb\xbf{}"),  # a byte order mark
        ("accounts_user", "preferences", b"NaN"),
        ("accounts_user", "preferences", b"[" * 300 + b"]" * 300),
        ("accounts_loginevent", "id", 2**63),
        ("accounts_loginevent", "id", b"12"),
    ],
)
def test_c_hands_unusual_values_back(table, name, raw):
    assert c_line(column(table, name), raw) is None


def target_of(table: str, name: str):
    """The column as the test database's catalog describes it: TargetColumn and SQL type."""
    with connections["postgresql"].cursor() as cur:
        target = target_columns(cur, table)[name]
        cur.execute(
            "SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
            "WHERE attrelid = %s::regclass AND attname = %s",
            [table, name],
        )
        return target, cur.fetchone()[0]


def stored(sql_type: str, data: bytes, *, binary: bool) -> str | None:
    """Load one COPY row into a column of that type; return what PostgreSQL prints back."""
    with connections["postgresql"].cursor() as cur:
        cur.execute("DROP TABLE IF EXISTS one_value")
        cur.execute(f"CREATE TEMP TABLE one_value (v {sql_type})")
        options = "(FORMAT BINARY)" if binary else ""
        with cur.cursor.copy(f"COPY one_value (v) FROM STDIN {options}") as copy:
            copy.write(BINARY_HEADER + data + BINARY_TRAILER if binary else data)
        cur.execute("SELECT v::text FROM one_value")
        return cur.fetchone()[0]


@PG
@pytest.mark.parametrize("internal_type", sorted(CASES))
def test_binary_output_stores_what_the_reference_path_stores(internal_type):
    """In COPY's binary format the C side encodes values itself (timestamps as
    microseconds, UUIDs as 16 bytes, numerics in base 10000...): PostgreSQL must end up
    holding exactly what the reference path's text gives it."""
    (table, name), values = CASES[internal_type]
    col = column(table, name)
    target, sql_type = target_of(table, name)
    spec = one_column_spec(table, name, {name: target})
    printed = 0

    @SETTINGS
    @given(values)
    def check(raw):
        nonlocal printed
        data, fallback, _ = copy_lines._copytext.format_rows([(raw,)], spec, None, 0, True)
        if fallback:
            return  # the Python path decides, in text
        expected = reference_line(col, raw)
        assert expected is not None, f"C accepted {raw!r}, which the reference path refuses"
        assert stored(sql_type, data, binary=True) == stored(sql_type, expected, binary=False)
        printed += 1

    check()
    assert printed > 0  # clean values did take the binary path


@PG
@pytest.mark.parametrize(
    ("table", "name", "raw"),
    [
        ("accounts_kycverification", "risk_score", 0.0),
        ("accounts_kycverification", "risk_score", -0.001),
        ("accounts_kycverification", "risk_score", 999.99),
        ("accounts_kycverification", "risk_score", -12345.678),
        ("accounts_kycverification", "risk_score", 0.05),
        ("accounts_kycverification", "risk_score", 10000),
        ("accounts_user", "created_at", b"0001-01-01 00:00:00"),
        ("accounts_user", "created_at", b"9999-12-31 23:59:59.999999"),
        ("accounts_user", "created_at", b"1999-12-31 23:59:59.000001"),
        ("accounts_kycverification", "expires_on", b"1900-02-28"),
        ("accounts_loginevent", "ip_address", b"::"),
        ("accounts_loginevent", "ip_address", b"255.255.255.255"),
        ("accounts_loginevent", "ip_address", b"fe80::1:2"),
        ("accounts_user", "status", b"active"),
        ("accounts_loginevent", "id", -(2**63)),
    ],
)
def test_binary_edges(table, name, raw):
    col = column(table, name)
    target, sql_type = target_of(table, name)
    spec = one_column_spec(table, name, {name: target})
    data, fallback, _ = copy_lines._copytext.format_rows([(raw,)], spec, None, 0, True)
    expected = reference_line(col, raw)
    if fallback:
        assert expected is None  # only what Django refuses (e.g. too many digits)
        return
    assert stored(sql_type, data, binary=True) == stored(sql_type, expected, binary=False)


@PG
def test_tables_take_the_binary_format_only_with_a_catalog_for_every_column():
    table = PLAN.table("accounts_loginevent")
    assert line_plan(table, {}).binary is False  # guessed types: text
    with connections["postgresql"].cursor() as cur:
        targets = target_columns(cur, "accounts_loginevent")
    assert line_plan(table, targets).binary is True
    assert line_plan(table, targets, binary=False).binary is False


def test_other_ip_forms_go_through_django_s_python_converter():
    col = column("accounts_loginevent", "ip_address")
    assert c_line(col, b"2001:DB8:0::1") == b"2001:db8::1\n"
    for raw in (b"::ffff:1.2.3.4", b"::ffff:102:304", b"1::2:0:0:3", b"1:0:0:2::3"):
        assert c_line(col, raw) == reference_line(col, raw)


def test_enum_labels_come_from_the_target_catalog():
    table = PLAN.table("accounts_user")
    target = TargetColumn("status", "user_status", True, None, frozenset({"active", "invited"}))
    spec = one_column_spec(table.db_table, "status", {"status": target})
    assert copy_lines._copytext.format_rows([(b"active",)], spec, None, 0)[0] == b"active\n"
    assert copy_lines._copytext.format_rows([(b"sleeping",)], spec, None, 0)[1] == [0]


@PG
@pytest.mark.parametrize(
    "raw",
    [b'{"a": [1, -2, true, null, "x\\u00e9\\n"]}', b'"\\ud83c\\udfe0"', b" 12 ", b"-0", b"[]"],
)
def test_c_prints_clean_json_itself(raw):
    col = column("accounts_user", "preferences")
    assert c_line(col, raw) is not None
    assert jsonb_text(c_line(col, raw)) == jsonb_text(reference_line(col, raw))


def test_custom_json_goes_through_python():
    from django.core.serializers.json import DjangoJSONEncoder
    from django.db import models

    from dbmigration.plan import PlannedColumn

    field = models.JSONField(encoder=DjangoJSONEncoder)
    custom = PlannedColumn(name="data", field=field, internal_type="JSONField", null=True)
    assert native_cast(custom).kind == PYTHON
    assert native_cast(column("accounts_user", "preferences")).kind == JSON


def test_rows_come_back_whole_and_skipped_rows_are_counted():
    table = PLAN.table("accounts_loginevent")
    plan = line_plan(table, {})
    names = [c.name for c in table.columns]

    def row(**values):
        base = {
            "id": 1,
            "user_id": b"0123456789abcdef0123456789abcdef",
            "email_attempted": b"a@b.ie",
            "ip_address": b"10.0.0.1",
            "user_agent": b"tab\there\\",
            "success": 1,
            "failure_reason": b"",
            "created_at": b"2026-01-02 03:04:05",
        }
        base.update(values)
        return tuple(base[n] for n in names)

    batch = [row(), row(id=2, success=7), row(id=3), row(id=4, ip_address=b"::ffff:1.2.3.4")]
    lines = plan.format(batch, skip={3})
    assert lines.skipped == 1
    assert lines.fallback == [batch[1]]
    text = lines.data.decode()
    assert text.count("\n") == 2  # rows 1 and 4 (its IPv6 form went through Python)
    assert "tab\\there\\\\" in text
    assert "2026-01-02 03:04:05+00:00" in text


# --- Reader: the same lines straight from the SQLite file ----------------------------------


def odd_table(tmp_path) -> tuple[str, list[tuple]]:
    """A SQLite copy of accounts_loginevent's shape holding every storage class and oddity."""
    table = PLAN.table("accounts_loginevent")
    path = tmp_path / "odd.sqlite3"
    conn = sqlite3.connect(path)
    names = [c.name for c in table.columns]
    conn.execute(f"CREATE TABLE accounts_loginevent ({', '.join(names)})")
    good = {
        "id": 1,
        "user_id": "0123456789abcdef0123456789abcdef",
        "email_attempted": "a@b.ie",
        "ip_address": "10.0.0.1",
        "user_agent": "tab\there\\ and é",
        "success": 1,
        "failure_reason": "",
        "created_at": "2026-01-02 03:04:05.123456",
    }
    odd = [
        {},
        {"id": 2, "ip_address": "2001:DB8::1"},  # Python prints it
        {"id": 3, "success": 7},  # back to Python whole
        {"id": 4, "user_agent": b"blob \x00 bytes"},
        {"id": 5, "email_attempted": 12.5},
        {"id": 6, "user_id": None, "ip_address": None},
        {"id": 7, "created_at": "2026-02-30 00:00:00"},
        {"id": 8, "user_agent": b"\xff not utf-8"},
        {"id": 2**62},
        {"id": 10, "failure_reason": "x" * 500},
    ]
    for values in odd:
        row = {**good, **values}
        conn.execute(
            f"INSERT INTO accounts_loginevent VALUES ({', '.join('?' * len(names))})",
            [row[n] for n in names],
        )
    conn.commit()
    conn.text_factory = bytes
    rows = conn.execute(f"SELECT {', '.join(names)} FROM accounts_loginevent").fetchall()
    conn.close()
    return f"{path.as_uri()}?mode=ro", rows


def test_reader_gives_what_format_gives_for_the_same_rows(tmp_path):
    uri, rows = odd_table(tmp_path)
    plan = line_plan(PLAN.table("accounts_loginevent"), {})
    expected = plan.format(rows)
    batches = list(plan.read(uri, batch_rows=3))
    assert [b.read for b in batches] == [3, 3, 3, 1]
    assert b"".join(b.data for b in batches) == expected.data
    assert [r for b in batches for r in b.fallback] == expected.fallback
    # success 7, a NUL, a float as text, Feb 30, invalid UTF-8, 500 characters
    assert [r[0] for r in expected.fallback] == [3, 4, 5, 7, 8, 10]
    assert expected.data.count(b"\n") == len(rows) - 6


def test_reader_leaves_out_skipped_rows(tmp_path):
    uri, rows = odd_table(tmp_path)
    plan = line_plan(PLAN.table("accounts_loginevent"), {})
    batches = list(plan.read(uri, skip={1, 3, 2**62}, batch_rows=100))
    assert sum(b.skipped for b in batches) == 3
    assert [r[0] for b in batches for r in b.fallback] == [4, 5, 7, 8, 10]


def test_reader_errors_are_sqlite_errors(tmp_path):
    plan = line_plan(PLAN.table("accounts_loginevent"), {})
    missing = f"{(tmp_path / 'none.sqlite3').as_uri()}?mode=ro"
    with pytest.raises(sqlite3.OperationalError, match="cannot open"):
        list(plan.read(missing, batch_rows=10))
    uri, _ = odd_table(tmp_path)
    with pytest.raises(ValueError, match="columns"):
        copy_lines._copytext.Reader(uri, "SELECT id FROM accounts_loginevent", plan.spec, None, 0)


def test_reader_binary_gives_what_format_gives(tmp_path):
    uri, rows = odd_table(tmp_path)
    table = PLAN.table("accounts_loginevent")
    text_plan = line_plan(table, {})
    plan = type(text_plan)(table, text_plan.select, text_plan.spec, binary=True)
    expected = plan.format(rows)
    batches = list(plan.read(uri, batch_rows=4))
    assert b"".join(b.data for b in batches) == expected.data
    assert [r for b in batches for r in b.fallback] == expected.fallback
    # in binary, an IP address C cannot encode sends its row to Python too
    assert [r[0] for r in expected.fallback] == [2, 3, 4, 5, 7, 8, 10]


# --- storage classes: a TEXT where Django writes a BLOB, or the other way round ------------


def test_values_of_the_other_storage_class_are_marked_by_both_readers(tmp_path):
    """TEXT and BLOB both arrive as bytes; C and copy.read_rows mark the wrong one, so the
    Python path refuses it (regression: TEXT in a BinaryField column arrived as bytea)."""
    from dbmigration.casts import Misfiled
    from dbmigration.rejections import RowConverter, RowRejected
    from dbmigration.rows import read_rows

    table = PLAN.table("corpus_fields_everyfield")
    names = [c.name for c in table.columns]
    path = tmp_path / "classes.sqlite3"
    conn = sqlite3.connect(path)
    conn.execute(f"CREATE TABLE corpus_fields_everyfield ({', '.join(names)})")
    insert = "INSERT INTO corpus_fields_everyfield (id, flag, binary, char) VALUES (?, 0, ?, ?)"
    conn.execute(insert, [1, b"\x00'", "text"])  # as Django writes them
    conn.execute(insert, [2, "text in a blob column", "x"])
    conn.execute(insert, [3, b"", b"a blob in a text column"])
    conn.commit()
    conn.close()
    binary, char = names.index("binary"), names.index("char")

    lines = line_plan(table, {})
    (batch,) = lines.read(f"{path.as_uri()}?mode=ro", batch_rows=10)
    reader = sqlite3.connect(path)
    reader.text_factory = bytes
    (rows,) = read_rows(reader, table)
    reader.close()
    assert [r[0] for r in batch.fallback] == [2, 3] and batch.data.count(b"\n") == 1
    for fallback in (batch.fallback, [r for r in rows if r[0] != 1]):
        assert [type(r[binary]) for r in fallback] == [Misfiled, bytes]
        assert [type(r[char]) for r in fallback] == [bytes, Misfiled]
    assert type(rows[0][binary]) is bytes and type(rows[0][char]) is bytes

    converter = RowConverter(table, None)
    for row, name in zip(rows[1:], ["binary", "char"], strict=True):
        with pytest.raises(RowRejected) as caught:
            converter.convert(row)
        ((rejected),) = caught.value.rows
        assert (rejected.column, rejected.code) == (name, "class")
        assert "Django on SQLite reads" in rejected.reason


@PG
@given(st.binary(max_size=300))
@SETTINGS
def test_bytea_arrives_byte_for_byte(raw):
    """Regression: bytes were escaped for an SQL literal (every ' doubled) by a
    connection-less Transformer, the one the copy's text formatter uses."""
    value = build_converter(column("corpus_fields_everyfield", "binary"))(raw)
    formatter = TextFormatter(Transformer())
    line = bytes(formatter.write_row([value])) + bytes(formatter.end())
    assert bytes.fromhex(stored("bytea", line, binary=False)[2:]) == raw
    assert c_line(column("corpus_fields_everyfield", "binary"), raw) == line


@PG
@given(st.floats(allow_nan=False, allow_infinity=False) | st.integers(-(2**70), 2**70))
@SETTINGS
def test_json_numbers_come_back_as_the_same_python_number(number):
    """jsonb keeps numbers as numeric and prints them without an exponent: 1e16 would come
    back as an integer and -0.0 as 0.0.  Written exactly, or refused."""
    col = column("accounts_user", "preferences")
    raw = json.dumps([number]).encode()
    try:
        value = build_converter(col)(raw)
    except Rejection as exc:
        assert number == 0 and str(number).startswith("-"), exc.reason  # only -0.0
        return
    formatter = TextFormatter(Transformer())
    line = bytes(formatter.write_row([value])) + bytes(formatter.end())
    (back,) = json.loads(jsonb_text(line))
    assert (type(back), repr(back)) == (type(number), repr(number))


@pytest.mark.parametrize("name", ["stream", "tagged"])
def test_fields_built_on_json_take_the_reference_path(name):
    """Regression: a StreamField-like field (no `decoder` attribute) crashed the fast path."""
    col = column("corpus_fields_everyfield", name)
    assert native_cast(col).kind == PYTHON
    convert = build_converter(col)
    assert (
        convert(b'[{"type": "h", "value": 1e+16}]')
        == '[{"type": "h", "value": 10000000000000000.0}]'
    )


def test_a_malformed_spec_is_a_type_error_not_a_crash(tmp_path):
    """Regression: the Reader freed its columns twice when a spec tuple did not parse (an
    old six-item spec, say), which aborted the process."""
    import os
    import subprocess
    import sys

    uri, _ = odd_table(tmp_path)
    old_spec = ((1, 0, 0, 0, None, 0),)
    code = (
        "import gc\n"
        "from dbmigration import _copytext\n"
        "try:\n"
        f"    _copytext.Reader({uri!r}, 'SELECT id FROM t', {old_spec!r}, None, 0)\n"
        "except TypeError as exc:\n"
        "    print('refused:', exc)\n"
        "gc.collect()\n"
    )
    env = {**os.environ, "PYTHONMALLOC": "debug"}  # a double free is fatal there
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    assert done.stdout.startswith(b"refused:")
