"""One table: Django internal type -> how a raw SQLite value travels to PostgreSQL COPY.

The reference path is Django's own: the SQLite backend's converters (and ``from_db_value``)
give the Python value, the PostgreSQL backend's ``get_db_prep_save`` prepares it, and
psycopg dumps it as COPY text.  It works for every field, custom ones included.  The fast
paths in ``FAST_PATHS`` give the same text for the common types (tests/test_casts.py
proves it with hypothesis) and hand anything not in canonical form to the reference path.
Every conversion returns the exact value or raises ``Rejection`` with a reason; nothing is
silently changed, except by a repair rule the operator named (recorded by the caller).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import ipaddress
import json
import math
import re
from collections.abc import Callable
from typing import Any

from django.core.exceptions import ValidationError
from django.db import connections, models
from psycopg import Binary
from psycopg.adapt import PyFormat, Transformer

from dbmigration.plan import PlannedColumn, value_field

REPAIR_RULES = {"strip-nul": "remove NUL (0x00) characters from text"}

INT_RANGES = {
    "int2": (-32768, 32767),
    "int4": (-2147483648, 2147483647),
    "int8": (-9223372036854775808, 9223372036854775807),
}
# Django internal type -> PostgreSQL type name, when the target catalog is not available
_DJANGO_PG_INT = {
    "SmallAutoField": "int2",
    "SmallIntegerField": "int2",
    "PositiveSmallIntegerField": "int2",
    "AutoField": "int4",
    "IntegerField": "int4",
    "PositiveIntegerField": "int4",
    "BigAutoField": "int8",
    "BigIntegerField": "int8",
    "PositiveBigIntegerField": "int8",
}


class Misfiled(bytes):
    """A TEXT value where Django writes a BLOB (BinaryField), or a BLOB where it writes text.

    The source is read with text as bytes, so the bytes alone cannot tell the two storage
    classes apart; the readers (``misfiled_sql``, _copytext.c) mark such values with this
    type, and every converter refuses them: Django on SQLite reads str from one and bytes
    from the other, so PostgreSQL's column could not hold what Django read.
    """


TEXT_CLASS, BLOB_CLASS = 1, 2  # SQLite storage classes, as _copytext.c numbers them


class Rejection(Exception):
    """A value that cannot arrive exactly in PostgreSQL."""

    def __init__(self, code: str, reason: str):
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class TargetColumn:
    """What PostgreSQL's catalog says about a column (or Django's guess without a catalog)."""

    name: str
    type_name: str  # pg_type.typname: int4, varchar, jsonb, user_status, ...
    not_null: bool
    max_length: int | None = None
    enum_labels: frozenset[str] | None = None


CATALOG_SQL = """
SELECT a.attname, t.typname, a.attnotnull,
       CASE WHEN t.typname IN ('varchar', 'bpchar') AND a.atttypmod > 4
            THEN a.atttypmod - 4 END,
       CASE WHEN t.typtype = 'e' THEN
            ARRAY(SELECT e.enumlabel::text FROM pg_enum e WHERE e.enumtypid = t.oid) END
  FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
 WHERE a.attrelid = to_regclass(quote_ident(%s)) AND a.attnum > 0 AND NOT a.attisdropped
"""


def target_columns(cursor, db_table: str) -> dict[str, TargetColumn]:
    """Read the target table's column types from PostgreSQL's catalog."""
    cursor.execute(CATALOG_SQL, [db_table])
    return {
        name: TargetColumn(
            name=name,
            type_name=typname,
            not_null=notnull,
            max_length=maxlen,
            enum_labels=frozenset(labels) if labels is not None else None,
        )
        for name, typname, notnull, maxlen, labels in cursor.fetchall()
    }


def guessed_target(column: PlannedColumn) -> TargetColumn:
    """Describe the PostgreSQL column from Django's field when no catalog is at hand."""
    field = column.field
    max_length = getattr(value_field(field), "max_length", None)
    if column.internal_type not in _VARCHAR_TYPES:
        max_length = None
    return TargetColumn(
        name=column.name,
        type_name=_DJANGO_PG_INT.get(column.internal_type, column.internal_type),
        not_null=not field.null,
        max_length=max_length,
    )


def excerpt(value: Any, *, limit: int = 80) -> str:
    """Return a short printable excerpt of a raw value for reports."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclasses.dataclass
class RepairLog:
    """Repair rules the operator allowed, and what they changed in the current row."""

    rules: frozenset[str] = frozenset()
    applied: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (column, rule)


Converter = Callable[[Any], Any]


# --- the reference path -----------------------------------------------------------------


# Django registers only loaders (and a Range dumper) per connection, so psycopg's global
# adapters dump exactly what a Django save would send.
_TRANSFORMER = Transformer()


def _dump_text(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, Binary):  # BinaryField's get_db_prep_value wraps its bytes
        value = value.obj
    if isinstance(value, bytes | bytearray | memoryview):
        # bytea's hex input as text: a Transformer without a connection would escape
        # bytes for an SQL literal (every ' doubled), not for COPY
        return "\\x" + bytes(value).hex()
    if isinstance(value, str):
        return value
    return bytes(_TRANSFORMER.get_dumper(value, PyFormat.TEXT).dump(value)).decode()


_MALFORMED_CODE = {
    "DateTimeField": "datetime",
    "DateField": "date",
    "TimeField": "time",
    "JSONField": "json",
    "UUIDField": "uuid",
    "DecimalField": "decimal",
    "BooleanField": "bool",
    "GenericIPAddressField": "ip",
}


def reference_converter(column: PlannedColumn) -> Converter:
    """Django's path: SQLite converters -> Python value -> PostgreSQL get_db_prep_save -> text."""
    field = column.field
    lite, pg = connections["sqlite"], connections["postgresql"]
    expression = field.get_col(field.model._meta.db_table)
    steps = lite.ops.get_db_converters(expression) + expression.get_db_converters(lite)
    code = _MALFORMED_CODE.get(column.internal_type, "malformed")
    integer = column.internal_type in _DJANGO_PG_INT
    json_field = column.internal_type == "JSONField"
    fraction = column.internal_type in ("DateTimeField", "TimeField")

    def convert(value: Any) -> Any:
        if fraction and _LONG_FRACTION.search(value):
            raise Rejection(
                code,
                f"{excerpt(value)} has more than 6 fractional digits: Django reads "
                "microseconds and drops the rest",
            )
        if json_field:
            parsed, value = _strict_json(value)  # Django would keep malformed JSON as a string
            if parsed is None:
                return "null"  # JSON null, stored as such: Django would save SQL NULL instead
        try:
            raw = value
            for step in steps:
                value = step(value, expression, lite)
            if value is None and raw is not None:  # e.g. parse_date() gives None for junk
                raise Rejection(code, f"malformed {column.internal_type} value {excerpt(raw)}")
            if integer and not isinstance(value, int):
                raise Rejection("kind", f"{type(value).__name__} value in an integer column")
            prepared = field.get_db_prep_save(value, connection=pg)
        except Rejection:
            raise
        except (
            ValueError,
            TypeError,
            ValidationError,
            decimal.DecimalException,
            AttributeError,
            OverflowError,
        ) as exc:
            raise Rejection(code, f"malformed {column.internal_type} value: {exc}") from None
        return _dump_text(prepared)

    return convert


_LONG_FRACTION = re.compile(r"[.,][0-9]{7}")


# --- the fast paths ----------------------------------------------------------------------


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON for PostgreSQL")


# \u0000 as an escape (not an escaped backslash followed by "u0000"): a NUL jsonb refuses
_JSON_NUL = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")
_JSON_DECODER = json.JSONDecoder(parse_constant=_reject_constant)  # built once: it is costly


def _strict_json(value: Any) -> tuple[Any, str]:
    """Parse JSON text strictly; return (parsed, text) or raise Rejection."""
    if not isinstance(value, str):
        raise Rejection("json", f"{type(value).__name__} value in a JSON column")
    try:
        return _JSON_DECODER.decode(value), value
    except ValueError as exc:
        raise Rejection("json", f"malformed JSON: {exc}") from None


def plain_json_field(column: PlannedColumn) -> bool:
    """Is the column exactly Django's JSONField, without an encoder or decoder of its own?

    Anything else built on JSON (a subclass, a field that only calls itself a JSONField,
    like Wagtail's StreamField) is Django's business: it takes the reference path.
    """
    field = value_field(column.field)
    return type(field) is models.JSONField and field.encoder is None and field.decoder is None


def fast_json(column: PlannedColumn, reference: Converter) -> Converter:
    if not plain_json_field(column):
        return reference

    def convert(value: Any) -> str:
        return json.dumps(_strict_json(value)[0])

    return convert


def django_utc_text(value: Any) -> str | None:
    """Return value as text if it is exactly how Django stores a UTC datetime on SQLite, else None.

    Django writes naive UTC as ``str(datetime)``: "YYYY-MM-DD HH:MM:SS[.ffffff]".  Anything else
    (other formats, time zones, impossible dates) must take Django's own path.
    """
    if type(value) is bytes:
        value = value.decode("latin-1")
    elif type(value) is not str:
        return None
    if len(value) != 19 and len(value) != 26:
        return None
    try:
        return value if str(_parse_datetime(value)) == value else None
    except ValueError:
        return None


_parse_datetime = dt.datetime.fromisoformat


def fast_datetime(column: PlannedColumn, reference: Converter) -> Converter:
    def convert(value: Any) -> str:
        text = django_utc_text(value) if isinstance(value, str) else None
        return text + "+00:00" if text is not None else reference(value)

    return convert


def fast_date(column: PlannedColumn, reference: Converter) -> Converter:
    parse = dt.date.fromisoformat

    def convert(value: Any) -> str:
        if isinstance(value, str) and len(value) == 10:
            try:
                if parse(value).isoformat() == value:
                    return value
            except ValueError:
                pass
        return reference(value)

    return convert


_HEX32 = re.compile(r"[0-9a-f]{32}\Z")


def fast_uuid(column: PlannedColumn, reference: Converter) -> Converter:
    match = _HEX32.match

    def convert(value: Any) -> str:
        if isinstance(value, str) and match(value):
            return value  # psycopg dumps a UUID as its 32 lowercase hex digits too
        return reference(value)

    return convert


def fast_bool(column: PlannedColumn, reference: Converter) -> Converter:
    def convert(value: Any) -> str:
        return "t" if value else "f"  # build_converter let only int 0/1 through

    return convert


def fast_int(column: PlannedColumn, reference: Converter) -> Converter:
    def convert(value: Any) -> str:
        if type(value) is int:
            return str(value)
        raise Rejection("kind", f"{type(value).__name__} value in an integer column")

    return convert


def fast_text(column: PlannedColumn, reference: Converter) -> Converter:
    def convert(value: Any) -> str:
        if type(value) is str:
            return value
        return reference(value)

    return convert


def fast_decimal(column: PlannedColumn, reference: Converter) -> Converter:
    field = value_field(column.field)
    if field.decimal_places is None:
        return reference
    # the same arithmetic as Django's SQLite decimal converter, minus its call overhead
    create = decimal.Context(prec=15).create_decimal_from_float
    quantum = decimal.Decimal(1).scaleb(-field.decimal_places)
    context = field.context

    def convert(value: Any) -> str:
        if type(value) is float or type(value) is int:
            try:
                number = create(value).quantize(quantum, context=context)
                if number.is_finite():
                    return str(number)
                raise decimal.InvalidOperation(f"{value!r} is not finite")
            except decimal.DecimalException as exc:
                raise Rejection(
                    "decimal", f"{value!r} does not fit max_digits={field.max_digits}: {exc!r}"
                ) from None
        return reference(value)

    return convert


# Django internal type -> fast path builder (everything else: the reference path)
FAST_PATHS: dict[str, Callable[[PlannedColumn, Converter], Converter]] = {
    "UUIDField": fast_uuid,
    "DateTimeField": fast_datetime,
    "DateField": fast_date,
    "JSONField": fast_json,
    "BooleanField": fast_bool,
    "DecimalField": fast_decimal,
    "CharField": fast_text,
    "TextField": fast_text,
    "EmailField": fast_text,
    "SlugField": fast_text,
    "URLField": fast_text,
    **dict.fromkeys(_DJANGO_PG_INT, fast_int),
}


# --- checks every path shares ------------------------------------------------------------


def _int_range(column: PlannedColumn, target: TargetColumn) -> tuple[int, int] | None:
    """The column type's range, narrowed to >= 0 by the CHECK Django gives Positive*Field."""
    bounds = INT_RANGES.get(target.type_name)
    if bounds is not None and column.internal_type.startswith("Positive"):
        return (0, bounds[1])
    return bounds


# The raw type (text and BLOB as bytes) Django on SQLite writes for the kinds whose
# converters would also take another type and change it on the way (float('1.5') from
# text, timedelta(0, 0, 1.5) from a REAL, bytes(5) from an INTEGER): anything else was
# not written by Django, so it is refused.
STORED_AS: dict[str, type] = {
    "FloatField": float,
    "DurationField": int,
    "BinaryField": bytes,
    "DateField": bytes,
    "DateTimeField": bytes,
    "TimeField": bytes,
}


# Django internal type -> the storage class Django on SQLite writes, where a value of the
# other class would also arrive as bytes (numbers arrive as int/float: their types tell)
STORAGE_CLASS: dict[str, int] = {
    "BinaryField": BLOB_CLASS,
    **dict.fromkeys(
        (
            "CharField",
            "TextField",
            "EmailField",
            "SlugField",
            "URLField",
            "FileField",
            "FilePathField",
            "GenericIPAddressField",
            "IPAddressField",
            "UUIDField",
            "DateField",
            "DateTimeField",
            "TimeField",
            "DecimalField",
            "JSONField",
        ),
        TEXT_CLASS,
    ),
}


def storage_class(column: PlannedColumn) -> int:
    """The storage class Django writes for the column (0: not known, e.g. a custom field)."""
    return STORAGE_CLASS.get(column.internal_type, 0)


def misfiled_sql(columns: tuple[PlannedColumn, ...], quote: Callable[[str], str]) -> str | None:
    """An extra SELECT column: NULL, or one '0'/'1' per column, '1' where the value's storage
    class is the other one of TEXT and BLOB (see ``mark_misfiled``)."""
    tests = []
    for column in columns:
        expected = storage_class(column)
        other = "blob" if expected == TEXT_CLASS else "text"
        tests.append(f"(typeof({quote(column.name)}) = '{other}')" if expected else "0")
    if not any(t != "0" for t in tests):
        return None
    return f"CASE WHEN {' OR '.join(t for t in tests if t != '0')} THEN {' || '.join(tests)} END"


def mark_misfiled(row: tuple) -> tuple:
    """Drop the ``misfiled_sql`` column from a row, wrapping the values it flags."""
    flags = row[-1]
    if flags is None:
        return row[:-1]
    if isinstance(flags, str):  # a connection that decodes text
        flags = flags.encode()
    return tuple(
        Misfiled(value) if flag == ord("1") else value
        for value, flag in zip(row[:-1], flags, strict=True)
    )


def build_converter(
    column: PlannedColumn,
    target: TargetColumn | None = None,
    *,
    fast: bool = True,
    repairs: RepairLog | None = None,
) -> Converter:
    """Return raw SQLite value -> COPY value (str, bytes or None), or raise Rejection."""
    target = target or guessed_target(column)
    reference = reference_converter(column)
    core = (
        FAST_PATHS[column.internal_type](column, reference)
        if (fast and column.internal_type in FAST_PATHS)
        else reference
    )
    binary = column.internal_type == "BinaryField"
    strip_nul = repairs is not None and "strip-nul" in repairs.rules
    not_null = target.not_null
    max_length = target.max_length
    labels = target.enum_labels
    int_range = _int_range(column, target)
    name = column.name
    boolean = column.internal_type == "BooleanField"
    is_json = column.internal_type == "JSONField"
    stored_as = STORED_AS.get(column.internal_type)
    misfiled_reason = (
        f"{'TEXT' if binary else 'BLOB'} value in a {column.internal_type} column: Django on "
        f"SQLite reads {'str' if binary else 'bytes'} from it, which PostgreSQL's "
        f"{target.type_name} cannot hold"
    )

    def convert(value: Any) -> Any:
        if value is None:
            if not_null:
                raise Rejection("null", "NULL in a NOT NULL column")
            return None
        if type(value) is Misfiled:
            raise Rejection("class", misfiled_reason)
        if stored_as is not None and type(value) is not stored_as:
            held = "text" if type(value) is bytes else type(value).__name__
            raise Rejection(
                "class",
                f"{held} value {excerpt(value)} in a {column.internal_type} column: Django on "
                "SQLite never writes it",
            )
        if boolean and not (type(value) is int and (value == 0 or value == 1)):
            # Django would also read 't'/'True'/'1' text as true: a silent change, so refuse
            raise Rejection("bool", f"boolean column holds {excerpt(value)}, not 0 or 1")
        if type(value) is bytes and not binary:
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise Rejection(
                    "utf8",
                    f"invalid UTF-8 at byte {exc.start}: {value[exc.start : exc.start + 8]!r}",
                ) from None
            if "\x00" in value:
                if not strip_nul:
                    raise Rejection(
                        "nul",
                        f"NUL byte at character {value.index(chr(0))} (PostgreSQL rejects it)",
                    )
                value = value.replace("\x00", "")
                repairs.applied.append((name, "strip-nul"))
        out = core(value)
        if out is None:
            if not_null:
                raise Rejection("null", "NULL in a NOT NULL column")
            return None
        if int_range is not None:
            number = int(out)
            if not int_range[0] <= number <= int_range[1]:
                raise Rejection(
                    "range",
                    f"{number} is out of range for PostgreSQL {target.type_name}"
                    + (" (a Positive field: >= 0)" if int_range[0] == 0 else ""),
                )
        elif type(out) is str:
            if max_length is not None and len(out) > max_length:
                raise Rejection("length", f"{len(out)} characters, max_length is {max_length}")
            if labels is not None and out not in labels:
                raise Rejection("enum", f"{out!r} is not a value of PostgreSQL {target.type_name}")
            if "\x00" in out:
                raise Rejection("nul", "NUL character (PostgreSQL rejects it)")
            if is_json:
                out = jsonb_exact(out)
        return out

    if not fast or strip_nul:
        return convert
    return _shortcut(column, target, convert) or convert


_VARCHAR_TYPES = frozenset(
    {"CharField", "SlugField", "EmailField", "URLField", "FileField", "FilePathField"}
)
_IP = re.compile(
    r"(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\Z"
)
# kinds whose Python value is the stored text itself (FileField: its name)
_TEXT_TYPES = frozenset({"TextField", *_VARCHAR_TYPES})


def _shortcut(column: PlannedColumn, target: TargetColumn, general: Converter) -> Converter | None:
    """One small function for the commonest clean values; anything else takes `general`.

    Each shortcut returns only what `general` returns for the same value (the hypothesis
    tests compare fast and reference converters, shortcuts included).
    """
    kind = column.internal_type
    nullable = not target.not_null
    if kind in _TEXT_TYPES and target.enum_labels is not None:
        labels = target.enum_labels

        def enum(value: Any) -> Any:
            if type(value) is bytes:
                try:
                    out = value.decode()
                except UnicodeDecodeError:
                    return general(value)
                if out in labels:
                    return out
            return general(value)

        return enum
    if kind == "JSONField" and FAST_PATHS["JSONField"](column, general) is not general:
        decode, dumps = _JSON_DECODER.decode, json.dumps

        def json_text(value: Any) -> Any:
            if type(value) is bytes:
                try:
                    out = dumps(decode(value.decode()))
                except ValueError:  # UnicodeDecodeError and JSONDecodeError included
                    return general(value)
                if not _JSON_SUSPECT.search(out):
                    return out
            return general(value)

        return json_text
    if kind in _TEXT_TYPES:
        limit = target.max_length if target.max_length is not None else 1 << 62

        def text(value: Any) -> Any:
            if value is None and nullable:
                return None
            if type(value) is bytes:
                try:
                    out = value.decode()
                except UnicodeDecodeError:
                    return general(value)
                if len(out) <= limit and "\x00" not in out:
                    return out
            return general(value)

        return text
    if kind in _DJANGO_PG_INT and target.type_name in INT_RANGES:
        low, high = _int_range(column, target)

        def integer(value: Any) -> Any:
            if value is None and nullable:
                return None
            if type(value) is int and low <= value <= high:
                return str(value)
            return general(value)

        return integer
    if kind == "UUIDField":
        match = _HEX32.match

        def uuid_hex(value: Any) -> Any:
            if value is None and nullable:
                return None
            if type(value) is bytes and len(value) == 32:
                out = value.decode("latin-1")
                if match(out):
                    return out
            return general(value)

        return uuid_hex
    if kind == "DateTimeField":

        def timestamp(value: Any) -> Any:
            if value is None and nullable:
                return None
            if type(value) is bytes:
                text = django_utc_text(value)
                if text is not None:
                    return text + "+00:00"
            return general(value)

        return timestamp
    if kind == "BooleanField":

        def boolean(value: Any) -> Any:
            if value is None and nullable:
                return None
            if type(value) is int:
                if value == 1:
                    return "t"
                if value == 0:
                    return "f"
            return general(value)

        return boolean
    if kind == "GenericIPAddressField":
        match = _IP.match
        ipv6 = ipaddress.IPv6Address

        def ip_address(value: Any) -> Any:
            if value is None and nullable:
                return None
            if type(value) is bytes:
                if 7 <= len(value) <= 15:
                    out = value.decode("latin-1")
                    if match(out):
                        return out  # canonical dotted quad: Django's Inet prints it unchanged
                elif b":" in value and b"%" not in value and b"." not in value:
                    # already in the compressed form Django's clean_ipv6_address gives
                    out = value.decode("latin-1")
                    try:
                        if str(ipv6(out)) == out:
                            return out
                    except ValueError:
                        pass
            return general(value)

        return ip_address
    return None


def _check_json_finite(text: str) -> None:
    # json.dumps writes inf/nan as bare words, which PostgreSQL's jsonb refuses
    try:
        json.loads(text, parse_constant=_reject_constant)
    except ValueError as exc:
        raise Rejection("json", f"JSON number PostgreSQL cannot hold: {exc}") from None


# Text worth a closer look before jsonb gets it: \u0000, inf/nan words, \uD8xx escapes,
# a float with a positive exponent (1e+16) or a negative zero (-0.0)
_JSON_SUSPECT = re.compile(r"\\u0000|Infinity|NaN|\\u[dD][89a-fA-F]|[0-9][eE]\+?[0-9]|-0[.eE]")
_JSON_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")
_JSON_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?')


def jsonb_exact(text: str) -> str:
    """Return JSON text jsonb stores as the document Django reads back, or raise Rejection.

    jsonb refuses \\u0000, inf/nan and lone surrogates.  It keeps numbers as numeric and
    prints them without an exponent, so a float whose literal has no digits after the
    point once expanded (1e16, 1.5e1) would come back as an integer: it is written as
    10000000000000000.0 instead, the same double.  A negative zero cannot be kept.
    """
    if not _JSON_SUSPECT.search(text):
        return text
    if "\\u0000" in text and _JSON_NUL.search(text):
        raise Rejection("nul", "JSON text holds \\u0000, which PostgreSQL's jsonb rejects")
    if "Infinity" in text or "NaN" in text:
        _check_json_finite(text)
    if _JSON_SURROGATE.search(text):
        try:  # a lone surrogate cannot be encoded: jsonb refuses it
            json.dumps(json.loads(text), ensure_ascii=False).encode()
        except UnicodeEncodeError as exc:
            raise Rejection(
                "json",
                f"JSON string holds a lone surrogate {exc.object[exc.start]!r}, which "
                "PostgreSQL's jsonb rejects",
            ) from None
    return _JSON_TOKEN.sub(_exact_number, text)


def _exact_number(match: re.Match) -> str:
    token = match.group()
    if token[0] == '"' or not ("." in token or "e" in token or "E" in token):
        return token  # a string, or an integer (jsonb and Python agree on those)
    number = decimal.Decimal(token)
    if not math.isfinite(float(token)):
        raise Rejection("json", f"JSON number {token} is beyond a double (Django reads inf)")
    if number.is_zero() and number.is_signed():
        raise Rejection(
            "json", f"JSON number {token} is a negative zero, which jsonb stores as 0.0"
        )
    if number.as_tuple().exponent < 0:
        return token  # jsonb prints digits after the point: a float again
    return format(number, "f") + ".0"


# --- the native paths: the copy's C formatter prints clean values --------------------------
#
# A Python call per value is the copy's bottleneck, so dbmigration/_copytext.c checks and
# prints the commonest clean values itself.  Each kind accepts only values whose COPY text
# the Python path would print unchanged (tests/test_copy_lines.py proves it against the
# reference path); anything else sends its whole row to the Python path, which gives the
# exact value or the reason it is refused.  Columns without a native kind are converted
# by their Python converter, called from C.

PYTHON, INT, BOOL, TEXT, UUID, DATETIME, DATE, JSON, IP, DECIMAL = range(10)  # _copytext.c


@dataclasses.dataclass(frozen=True)
class NativeCast:
    """How the C formatter checks and prints one column."""

    kind: int
    low: int = 0  # INT: range; TEXT: max characters (-1: none); DECIMAL: places, max_digits
    high: int = 0
    labels: frozenset[bytes] | None = None  # TEXT: the PostgreSQL enum's labels


def _native_text(column: PlannedColumn, target: TargetColumn) -> NativeCast | None:
    if target.enum_labels is not None:
        return NativeCast(TEXT, -1, labels=frozenset(x.encode() for x in target.enum_labels))
    if target.type_name not in ("varchar", "text", "bpchar", column.internal_type):
        return None  # a custom database type: its own input rules apply
    return NativeCast(TEXT, -1 if target.max_length is None else target.max_length)


def _native_int(column: PlannedColumn, target: TargetColumn) -> NativeCast | None:
    if target.type_name not in INT_RANGES:
        return None
    low, high = _int_range(column, target)
    return NativeCast(INT, low, high)


def _native_json(column: PlannedColumn, target: TargetColumn) -> NativeCast | None:
    if not plain_json_field(column) or target.type_name not in ("jsonb", "JSONField"):
        return None  # custom JSON fields are Django's business
    return NativeCast(JSON)


def _native_decimal(column: PlannedColumn, target: TargetColumn) -> NativeCast | None:
    field = value_field(column.field)
    if field.decimal_places is None or target.type_name not in ("numeric", "DecimalField"):
        return None
    return NativeCast(DECIMAL, field.decimal_places, field.max_digits)


def _native_kind(kind: int, *type_names: str):
    def build(column: PlannedColumn, target: TargetColumn) -> NativeCast | None:
        fits = target.type_name in type_names or target.type_name == column.internal_type
        return NativeCast(kind) if fits else None

    return build


# Django internal type -> native path builder (None or missing: the Python converter)
NATIVE_PATHS: dict[str, Callable[[PlannedColumn, TargetColumn], NativeCast | None]] = {
    "UUIDField": _native_kind(UUID, "uuid"),
    "DateTimeField": _native_kind(DATETIME, "timestamptz"),
    "DateField": _native_kind(DATE, "date"),
    "BooleanField": _native_kind(BOOL, "bool"),
    "GenericIPAddressField": _native_kind(IP, "inet"),
    "JSONField": _native_json,
    "DecimalField": _native_decimal,
    **dict.fromkeys(_TEXT_TYPES, _native_text),
    **dict.fromkeys(_DJANGO_PG_INT, _native_int),
}


def native_cast(column: PlannedColumn, target: TargetColumn | None = None) -> NativeCast:
    """Return how the C formatter handles a column (kind PYTHON: its Python converter)."""
    builder = NATIVE_PATHS.get(column.internal_type)
    cast = builder(column, target or guessed_target(column)) if builder else None
    return cast or NativeCast(PYTHON)
