"""casts.py: every fast path gives exactly what Django's reference path gives (hypothesis)."""

import datetime as dt
import json
import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dbmigration.casts import (
    FAST_PATHS,
    Misfiled,
    Rejection,
    RepairLog,
    TargetColumn,
    build_converter,
)
from dbmigration.plan import build_plan

PLAN = build_plan()


def column(table: str, name: str):
    return next(c for c in PLAN.table(table).columns if c.name == name)


def outcome(convert, raw):
    try:
        return ("ok", convert(raw))
    except Rejection as exc:
        return ("rejected", exc.code)


def assert_same(col, raw, target=None):
    fast = build_converter(col, target, fast=True)
    reference = build_converter(col, target, fast=False)
    assert outcome(fast, raw) == outcome(reference, raw), raw


junk = st.one_of(
    st.none(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40).map(lambda s: s.encode("utf-8", "surrogatepass")),
    st.binary(max_size=20),
)
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

datetimes = st.datetimes(min_value=dt.datetime(1, 1, 1), max_value=dt.datetime(9999, 12, 31))
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**64), max_value=2**64)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=10,
)

CASES = {
    "DateTimeField": (
        ("accounts_user", "created_at"),
        st.one_of(
            datetimes.map(lambda d: str(d).encode()),
            datetimes.map(lambda d: d.isoformat().encode()),
            datetimes.map(lambda d: (str(d) + "+01:00").encode()),
            st.text(alphabet="0123456789-: .T", max_size=26).map(str.encode),
            junk,
        ),
    ),
    "DateField": (
        ("accounts_kycverification", "expires_on"),
        st.one_of(
            st.dates().map(lambda d: d.isoformat().encode()),
            datetimes.map(lambda d: str(d).encode()),
            st.text(alphabet="0123456789-", max_size=12).map(str.encode),
            junk,
        ),
    ),
    "UUIDField": (
        ("accounts_user", "id"),
        st.one_of(
            st.uuids().map(lambda u: u.hex.encode()),
            st.uuids().map(lambda u: u.hex.upper().encode()),
            st.uuids().map(lambda u: str(u).encode()),
            st.text(alphabet=string.hexdigits, min_size=30, max_size=34).map(str.encode),
            junk,
        ),
    ),
    "JSONField": (
        ("accounts_user", "preferences"),
        st.one_of(
            json_values.map(lambda v: json.dumps(v).encode()),
            json_values.map(lambda v: json.dumps(v, separators=(",", ":")).encode()),
            st.text(alphabet='{}[]":,1aetrunl\\u0 ', max_size=20).map(str.encode),
            junk,
        ),
    ),
    "BooleanField": (("accounts_user", "is_staff"), st.one_of(st.integers(-2, 3), junk)),
    "DecimalField": (
        ("accounts_kycverification", "risk_score"),
        st.one_of(
            st.floats(min_value=-1000, max_value=1000),
            st.integers(min_value=-2000, max_value=2000),
            st.decimals(places=2, min_value=-999, max_value=999).map(float),
            junk,
        ),
    ),
    "GenericIPAddressField": (
        ("accounts_loginevent", "ip_address"),
        st.one_of(
            st.ip_addresses().map(lambda ip: str(ip).encode()),
            st.ip_addresses(v=6).map(lambda ip: ip.exploded.encode()),
            st.text(alphabet="0123456789.:af", max_size=16).map(str.encode),
            junk,
        ),
    ),
    "CharField": (("accounts_user", "first_name"), junk),
    "TextField": (
        ("accounts_kycverification", "notes"),
        st.one_of(st.text().map(lambda t: t.encode("utf-8", "surrogatepass")), junk),
    ),
    "BigAutoField": (("accounts_loginevent", "id"), junk),
    "PositiveSmallIntegerField": (("django_admin_log", "action_flag"), junk),
    "PositiveIntegerField": (("auditlog_logentry", "remote_port"), junk),
    "BigIntegerField": (("auditlog_logentry", "object_id"), junk),
    # the fields corpus (tests/corpus/fields): kinds the accounts schema does not have
    "FloatField": (
        ("corpus_fields_everyfield", "floating"),
        st.one_of(st.floats(allow_nan=False), junk),
    ),
    "DurationField": (
        ("corpus_fields_everyfield", "duration"),
        st.one_of(st.integers(-(2**63), 2**63 - 1), junk),
    ),
    "TimeField": (
        ("corpus_fields_everyfield", "time"),
        st.one_of(
            st.times().map(lambda t: str(t).encode()),
            st.text(alphabet="0123456789:.", max_size=18).map(str.encode),
            junk,
        ),
    ),
    "BinaryField": (("corpus_fields_everyfield", "binary"), st.one_of(st.binary(), junk)),
    "FilePathField": (("corpus_fields_everyfield", "file_path"), junk),
    "FileField": (("corpus_fields_everyfield", "file"), junk),
    "SlugField": (("corpus_fields_everyfield", "slug"), junk),
}


@pytest.mark.parametrize("internal_type", sorted(CASES))
def test_fast_path_equals_reference(internal_type):
    (table, name), values = CASES[internal_type]
    col = column(table, name)
    assert col.internal_type == internal_type

    @SETTINGS
    @given(values)
    def check(raw):
        assert_same(col, raw)

    check()


def test_every_fast_path_is_covered_or_shares_a_builder():
    covered = {FAST_PATHS[t] for t in CASES if t in FAST_PATHS}
    assert all(builder in covered for builder in FAST_PATHS.values())


@pytest.mark.parametrize(
    ("table", "name", "raw", "expected"),
    [
        ("accounts_user", "created_at", b"2026-01-02 03:04:05", "2026-01-02 03:04:05+00:00"),
        (
            "accounts_user",
            "created_at",
            b"2026-01-02 03:04:05.000100",
            "2026-01-02 03:04:05.000100+00:00",
        ),
        (
            "accounts_user",
            "id",
            b"0123456789abcdef0123456789abcdef",
            "0123456789abcdef0123456789abcdef",
        ),
        (
            "accounts_user",
            "preferences",
            b'{"b": 1, "a": [true, null]}',
            '{"b": 1, "a": [true, null]}',
        ),
        ("accounts_user", "preferences", b'"\\\\u0000"', '"\\\\u0000"'),  # not a NUL
        ("accounts_user", "is_staff", 1, "t"),
        ("accounts_kycverification", "risk_score", 12.3, "12.30"),
        ("accounts_kycverification", "expires_on", b"2030-01-02", "2030-01-02"),
        ("accounts_loginevent", "ip_address", b"10.0.0.1", "10.0.0.1"),
        ("accounts_loginevent", "ip_address", b"2001:db8::1", "2001:db8::1"),
        # not compressed: Django's clean_ipv6_address rewrites it, so the fast path must not
        ("accounts_loginevent", "ip_address", b"2001:0DB8:0:0::0001", "2001:db8::1"),
        ("accounts_user", "first_name", "Seán".encode(), "Seán"),
        # bytea's hex input: COPY text escapes its backslash (regression: every ' doubled)
        ("corpus_fields_everyfield", "binary", b"'\\\x00", "\\x275c00"),
        ("corpus_fields_everyfield", "duration", -(2**63), "-106751992 days 19:59:05.224192"),
        ("corpus_fields_everyfield", "time", b"23:59:59.999999", "23:59:59.999999"),
        ("corpus_fields_everyfield", "floating", float("-inf"), "-inf"),
        # floats jsonb would print as integers: the same double, with digits after the point
        ("accounts_user", "preferences", b"[1e+16]", "[10000000000000000.0]"),
        ("accounts_user", "preferences", b"[1.5e1, 2E+2]", "[15.0, 200.0]"),
        ("accounts_user", "preferences", b"[1e-07, -0.5]", "[1e-07, -0.5]"),
        ("accounts_user", "preferences", b'{"1e+16": "-0.0"}', '{"1e+16": "-0.0"}'),
        ("accounts_user", "preferences", b'["\\\\ud800"]', '["\\\\ud800"]'),  # no escape
        ("accounts_user", "preferences", b'"\\ud83d\\ude00"', '"\\ud83d\\ude00"'),
    ],
)
def test_exact_values(table, name, raw, expected):
    assert build_converter(column(table, name))(raw) == expected


@pytest.mark.parametrize(
    ("table", "name", "raw", "code"),
    [
        ("accounts_user", "first_name", b"a\x00b", "nul"),
        ("accounts_user", "first_name", b"a\xffb", "utf8"),
        ("accounts_user", "first_name", b"x" * 151, "length"),
        ("accounts_loginevent", "id", b"abc", "kind"),
        ("accounts_loginevent", "id", 1.5, "kind"),
        ("accounts_user", "is_staff", 2, "bool"),
        ("accounts_user", "is_staff", b"t", "bool"),
        ("accounts_user", "created_at", b"yesterday", "datetime"),
        ("accounts_kycverification", "expires_on", b"2026-02-30", "date"),
        ("accounts_kycverification", "expires_on", b"2026-01-02 03:04:05", "date"),
        ("accounts_user", "preferences", b"{bad", "json"),
        ("accounts_user", "preferences", b"NaN", "json"),
        ("accounts_user", "preferences", b"1e400", "json"),
        ("accounts_user", "preferences", b'"\\u0000"', "nul"),
        ("accounts_user", "id", b"not-a-uuid", "uuid"),
        ("accounts_kycverification", "risk_score", b"abc", "decimal"),
        ("accounts_kycverification", "risk_score", 123456.0, "decimal"),
        ("accounts_kycverification", "risk_score", float("inf"), "decimal"),
        ("accounts_loginevent", "ip_address", b"999.1.1.1", "ip"),
        ("accounts_user", "email", None, "null"),
        ("django_admin_log", "action_flag", 40000, "range"),
        ("django_admin_log", "action_flag", -1, "range"),  # PositiveSmallIntegerField CHECK
        ("accounts_loginevent", "id", 2**63, "range"),
        # values Django on SQLite never writes (issue 9, item 8), and what jsonb would change
        ("corpus_fields_everyfield", "duration", 1.5, "class"),  # was rounded to 2 µs
        ("corpus_fields_everyfield", "duration", b"1 day", "class"),
        ("corpus_fields_everyfield", "floating", b"1.5", "class"),
        ("corpus_fields_everyfield", "floating", 3, "class"),
        ("corpus_fields_everyfield", "binary", 5, "class"),
        ("corpus_fields_everyfield", "binary", Misfiled(b"text"), "class"),
        ("corpus_fields_everyfield", "char", Misfiled(b"blob"), "class"),
        ("corpus_fields_everyfield", "json", Misfiled(b"{}"), "class"),
        ("corpus_fields_everyfield", "time", b"12:00:00.1234567", "time"),  # was truncated
        ("corpus_fields_everyfield", "time", 43200, "class"),
        ("corpus_fields_everyfield", "datetime", b"2026-01-02 03:04:05.1234567", "datetime"),
        ("corpus_fields_everyfield", "date", 20260102, "class"),
        ("accounts_user", "preferences", b'"\\ud800"', "json"),  # a lone surrogate
        ("accounts_user", "preferences", b'{"a": "x\\udc00"}', "json"),
        ("accounts_user", "preferences", b"[-0.0]", "json"),
        ("accounts_user", "preferences", b"-0e3", "json"),
        ("accounts_user", "preferences", b"[1e999]", "json"),
        ("corpus_fields_everyfield", "stream", b"{bad", "json"),
        ("corpus_fields_everyfield", "stream", b"[-0.0]", "json"),
        ("corpus_fields_everyfield", "tagged", b'["\\udfff"]', "json"),
        ("corpus_fields_everyfield", "pair", b"no comma", "malformed"),
    ],
)
@pytest.mark.parametrize("fast", [True, False])
def test_rejections(table, name, raw, code, fast):
    with pytest.raises(Rejection) as caught:
        build_converter(column(table, name), fast=fast)(raw)
    assert caught.value.code == code and caught.value.reason


def test_enum_and_length_come_from_the_target_catalog():
    col = column("accounts_user", "status")
    target = TargetColumn(
        name="status", type_name="user_status", not_null=True, enum_labels=frozenset({"active"})
    )
    assert build_converter(col, target)(b"active") == "active"
    with pytest.raises(Rejection, match="not a value of PostgreSQL user_status"):
        build_converter(col, target)(b"pending-ish")
    narrow = TargetColumn(name="first_name", type_name="varchar", not_null=True, max_length=3)
    with pytest.raises(Rejection, match="max_length is 3"):
        build_converter(column("accounts_user", "first_name"), narrow)(b"abcd")


def test_strip_nul_repair_is_recorded():
    log = RepairLog(rules=frozenset({"strip-nul"}))
    convert = build_converter(column("accounts_user", "first_name"), repairs=log)
    assert convert(b"Se\x00an") == "Sean"
    assert log.applied == [("first_name", "strip-nul")]


def test_enum_shortcut_equals_reference():
    col = column("accounts_user", "status")
    target = TargetColumn(
        name="status", type_name="user_status", not_null=True, enum_labels=frozenset({"active"})
    )

    @SETTINGS
    @given(st.one_of(st.sampled_from([b"active", b"activ", b"active\x00", b"\xff"]), junk))
    def check(raw):
        assert_same(col, raw, target)

    check()
