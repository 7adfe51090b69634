/* COPY text for clean SQLite values, written in C because a Python call per value (and
 * even a Python object per value) is the copy's bottleneck.
 *
 * Reader(uri, select, spec, skip, pk_index, binary).batch(max_rows)
 *     -> (bytes, fallback rows, skipped, read)
 *     steps the SELECT on its own read-only connection to the SQLite file and makes
 *     Python objects only for the values a Python converter needs and the rows it hands
 *     back (as Python's sqlite3 gives them, text as bytes).
 * format_rows(rows, spec, skip, pk_index) -> (bytes, fallback indexes, skipped)
 *     the same for rows already fetched (the tests compare both with the reference path).
 *
 * spec:  one (kind, nullable, a, b, obj, width, storage) tuple per column, in the SELECT's
 *        order; storage: the SQLite storage class Django writes there (1 TEXT, 2 BLOB, 0 not
 *        known).  A value of the other one sends its row to Python, marked by `misfiled`.
 * binary: COPY's binary format (rows only; the caller writes header and trailer), in
 *        which values C cannot encode itself send their row to Python instead.
 * skip:  a set of primary keys to leave out (quarantined rows), or None.
 *
 * Each value is checked against the exact form the Python path would print unchanged;
 * a row with any other value is left out of the bytes and handed back, so Python
 * converts it whole (exact value, or a rejection with its reason).  The checks mirror
 * casts.py's shortcuts; tests/test_copy_lines.py proves the output equal to Django's
 * reference path.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <sqlite3.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum {
    K_PYTHON = 0, /* obj(value) -> str | None; any exception or other type: fallback */
    K_INT = 1,    /* a..b */
    K_BOOL = 2,   /* 0 or 1 -> t / f */
    K_TEXT = 3,   /* UTF-8, no NUL, at most a characters (a < 0: no limit), in obj if a set */
    K_UUID = 4,   /* 32 lowercase hex digits */
    K_DATETIME = 5, /* "YYYY-MM-DD HH:MM:SS[.ffffff]" (naive UTC) -> + "+00:00" */
    K_DATE = 6,   /* "YYYY-MM-DD" */
    K_JSON = 7,   /* clean_json(): integers only, no \u0000 or lone surrogate */
    K_IP = 8,     /* a dotted quad or compressed IPv6 as Django saves it, else like K_PYTHON */
    K_DECIMAL = 9, /* put_decimal() with a places, b max_digits, else like K_PYTHON */
};

typedef struct {
    int kind;
    int nullable;
    long long a, b;
    PyObject *obj; /* borrowed from spec */
    int width;     /* binary COPY: bytes of an integer column (2, 4 or 8) */
    int storage;   /* TEXT or BLOB: what Django writes; 0 not known */
} Column;

typedef struct {
    char *data;
    Py_ssize_t len, cap;
} Buffer;

/* One raw value, from a Python tuple (format_rows) or straight from SQLite (Reader). */
enum { R_NULL, R_INT, R_FLOAT, R_BYTES, R_BIG_INT, R_OTHER };
enum { S_UNKNOWN = 0, S_TEXT = 1, S_BLOB = 2 }; /* casts.TEXT_CLASS, casts.BLOB_CLASS */

typedef struct {
    int type;
    long long i;
    double d;
    const char *s;
    Py_ssize_t n;
    int storage;   /* R_BYTES straight from SQLite: S_TEXT or S_BLOB */
    PyObject *obj; /* the value as Python's sqlite3 (text as bytes) gives it, when needed */
    int owned;     /* obj made here, to release */
} Raw;

static void raw_from_object(Raw *raw, PyObject *value) {
    memset(raw, 0, sizeof *raw);
    raw->obj = value;
    if (value == Py_None) {
        raw->type = R_NULL;
    } else if (PyLong_CheckExact(value)) {
        int overflow;
        raw->i = PyLong_AsLongLongAndOverflow(value, &overflow);
        raw->type = overflow ? R_BIG_INT : R_INT;
    } else if (PyFloat_CheckExact(value)) {
        raw->type = R_FLOAT;
        raw->d = PyFloat_AS_DOUBLE(value);
    } else if (PyBytes_CheckExact(value)) {
        raw->type = R_BYTES;
        raw->s = PyBytes_AS_STRING(value);
        raw->n = PyBytes_GET_SIZE(value);
    } else {
        raw->type = R_OTHER;
    }
}

/* The value as a Python object (borrowed from raw); NULL on memory error. */
static PyObject *raw_object(Raw *raw) {
    if (raw->obj)
        return raw->obj;
    switch (raw->type) {
    case R_NULL:
        raw->obj = Py_None;
        Py_INCREF(Py_None);
        break;
    case R_INT:
        raw->obj = PyLong_FromLongLong(raw->i);
        break;
    case R_FLOAT:
        raw->obj = PyFloat_FromDouble(raw->d);
        break;
    default:
        raw->obj = PyBytes_FromStringAndSize(raw->s ? raw->s : "", raw->n);
    }
    raw->owned = raw->obj != NULL;
    return raw->obj;
}

static void raw_release(Raw *raw) {
    if (raw->owned)
        Py_DECREF(raw->obj);
    raw->obj = NULL;
    raw->owned = 0;
}

static int buf_reserve(Buffer *buf, Py_ssize_t extra) {
    if (buf->len + extra <= buf->cap)
        return 0;
    Py_ssize_t cap = buf->cap ? buf->cap : 1 << 16;
    while (cap < buf->len + extra)
        cap *= 2;
    char *data = PyMem_Realloc(buf->data, cap);
    if (!data) {
        PyErr_NoMemory();
        return -1;
    }
    buf->data = data;
    buf->cap = cap;
    return 0;
}

/* The buffer's bytes as a bytes object; the buffer is freed either way. */
static PyObject *take_bytes(Buffer *buf) {
    PyObject *data = PyBytes_FromStringAndSize(buf->data ? buf->data : "", buf->len);
    PyMem_Free(buf->data);
    buf->data = NULL;
    return data;
}

static int buf_put(Buffer *buf, const char *src, Py_ssize_t n) {
    if (buf_reserve(buf, n) < 0)
        return -1;
    memcpy(buf->data + buf->len, src, n);
    buf->len += n;
    return 0;
}

/* Append text with COPY's escapes (as psycopg writes them); return -1 on memory error. */
static int put_escaped(Buffer *buf, const char *s, Py_ssize_t n) {
    if (buf_reserve(buf, 2 * n) < 0)
        return -1;
    char *out = buf->data + buf->len;
    for (Py_ssize_t i = 0; i < n; i++) {
        char c = s[i];
        switch (c) {
        case '\\': *out++ = '\\'; *out++ = '\\'; break;
        case '\t': *out++ = '\\'; *out++ = 't'; break;
        case '\n': *out++ = '\\'; *out++ = 'n'; break;
        case '\r': *out++ = '\\'; *out++ = 'r'; break;
        /* not needed by COPY, but psycopg escapes them too: byte-identical lines */
        case '\b': *out++ = '\\'; *out++ = 'b'; break;
        case '\f': *out++ = '\\'; *out++ = 'f'; break;
        case '\v': *out++ = '\\'; *out++ = 'v'; break;
        default: *out++ = c;
        }
    }
    buf->len = out - buf->data;
    return 0;
}

/* Strict UTF-8 (as Python decodes it): return the number of characters, or -1 if the
 * bytes are not valid UTF-8 or hold a NUL. */
static Py_ssize_t utf8_chars(const unsigned char *s, Py_ssize_t n) {
    Py_ssize_t chars = 0, i = 0;
    while (i < n) {
        unsigned char c = s[i];
        if (c < 0x80) {
            if (c == 0)
                return -1;
            i++;
        } else if (c >= 0xC2 && c <= 0xDF) {
            if (i + 1 >= n || (s[i + 1] & 0xC0) != 0x80)
                return -1;
            i += 2;
        } else if (c >= 0xE0 && c <= 0xEF) {
            if (i + 2 >= n || (s[i + 1] & 0xC0) != 0x80 || (s[i + 2] & 0xC0) != 0x80)
                return -1;
            if (c == 0xE0 && s[i + 1] < 0xA0) /* overlong */
                return -1;
            if (c == 0xED && s[i + 1] >= 0xA0) /* surrogate */
                return -1;
            i += 3;
        } else if (c >= 0xF0 && c <= 0xF4) {
            if (i + 3 >= n || (s[i + 1] & 0xC0) != 0x80 || (s[i + 2] & 0xC0) != 0x80 ||
                (s[i + 3] & 0xC0) != 0x80)
                return -1;
            if (c == 0xF0 && s[i + 1] < 0x90) /* overlong */
                return -1;
            if (c == 0xF4 && s[i + 1] >= 0x90) /* above U+10FFFF */
                return -1;
            i += 4;
        } else {
            return -1;
        }
        chars++;
    }
    return chars;
}

static int digits(const char *s, int n, int *value) {
    int v = 0;
    for (int i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9')
            return 0;
        v = v * 10 + (s[i] - '0');
    }
    *value = v;
    return 1;
}

/* "YYYY-MM-DD" with a real day of a year 1..9999. */
static int valid_date(const char *s) {
    static const int days[] = {31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
    int y = 0, m = 0, d = 0;
    if (s[4] != '-' || s[7] != '-' || !digits(s, 4, &y) || !digits(s + 5, 2, &m) ||
        !digits(s + 8, 2, &d))
        return 0;
    if (y < 1 || m < 1 || m > 12 || d < 1)
        return 0;
    int leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    return d <= days[m - 1] + (m == 2 && leap);
}

/* What str() of a naive datetime prints: microseconds only when not zero. */
static int valid_datetime(const char *s, Py_ssize_t n) {
    int h = 0, mi = 0, se = 0, frac = 0;
    if (n != 19 && n != 26)
        return 0;
    if (!valid_date(s) || s[10] != ' ' || s[13] != ':' || s[16] != ':' ||
        !digits(s + 11, 2, &h) || !digits(s + 14, 2, &mi) || !digits(s + 17, 2, &se))
        return 0;
    if (h > 23 || mi > 59 || se > 59)
        return 0;
    if (n == 26 && (s[19] != '.' || !digits(s + 20, 6, &frac) || frac == 0))
        return 0;
    return 1;
}

static int valid_uuid_hex(const char *s, Py_ssize_t n) {
    if (n != 32)
        return 0;
    for (int i = 0; i < 32; i++) {
        char c = s[i];
        if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f')))
            return 0;
    }
    return 1;
}

/* Four decimal octets 0..255 without leading zeros: Django passes those through as is. */
static int valid_ipv4(const char *s, Py_ssize_t n) {
    if (n < 7 || n > 15)
        return 0;
    int octets = 0;
    Py_ssize_t i = 0;
    while (i < n) {
        int value = 0, len = 0;
        while (i < n && s[i] >= '0' && s[i] <= '9') {
            value = value * 10 + (s[i] - '0');
            len++;
            i++;
        }
        if (len == 0 || len > 3 || value > 255 || (len > 1 && s[i - len] == '0'))
            return 0;
        octets++;
        if (i == n)
            break;
        if (s[i] != '.' || octets == 4)
            return 0;
        i++;
        if (i == n) /* trailing dot */
            return 0;
    }
    return octets == 4;
}

/* Already the compressed form Python's ipaddress prints (lowercase, no leading zeros, the
 * first longest run of two or more zero groups as "::"), which Django saves unchanged. */
static int canonical_ipv6(const char *s, Py_ssize_t n, unsigned int *out) {
    unsigned int groups[8];
    int count = 0, gap = -1;
    Py_ssize_t i = 0;
    if (n < 2 || n > 39)
        return 0;
    if (s[0] == ':') {
        if (s[1] != ':')
            return 0;
        gap = 0;
        i = 2;
    }
    while (i < n) {
        unsigned int value = 0;
        int len = 0;
        while (i < n && len < 5 && ((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f'))) {
            value = value * 16 + (s[i] <= '9' ? s[i] - '0' : s[i] - 'a' + 10);
            len++;
            i++;
        }
        if (len == 0 || len > 4 || count == 8)
            return 0;
        groups[count++] = value;
        if (i == n)
            break;
        if (s[i] != ':')
            return 0;
        i++;
        if (i < n && s[i] == ':') {
            if (gap >= 0)
                return 0;
            gap = count;
            i++;
        } else if (i == n) {
            return 0;
        }
    }
    if (gap < 0 ? count != 8 : count > 7)
        return 0;
    unsigned int full[8] = {0};
    int tail = gap < 0 ? 0 : count - gap;
    for (int k = 0; k < count; k++)
        full[k < count - tail ? k : 8 - tail + (k - (count - tail))] = groups[k];
    int best = -1, best_len = 0;
    for (int k = 0, run = 0; k < 8; k++) {
        run = full[k] == 0 ? run + 1 : 0;
        if (run > best_len) {
            best_len = run;
            best = k - run + 1;
        }
    }
    if (best_len < 2)
        best = -1;
    char text[48];
    int len = 0;
    for (int k = 0; k < 8; k++) {
        if (k == best) {
            len += snprintf(text + len, sizeof text - len, "::");
            k += best_len - 1;
            continue;
        }
        if (len && text[len - 1] != ':')
            text[len++] = ':';
        len += snprintf(text + len, sizeof text - len, "%x", full[k]);
    }
    if (len != n || memcmp(text, s, n) != 0)
        return 0;
    if (out)
        memcpy(out, full, sizeof full);
    return 1;
}

/* Strict JSON (RFC 8259) whose text jsonb stores exactly as Django would save it: numbers
 * only integers (Django saves a float's repr, jsonb keeps the digits written), no \u0000
 * and no lone surrogate escape (jsonb refuses both).  Anything else: the Python path. */
typedef struct {
    const char *p, *end;
} Json;

#define JSON_MAX_DEPTH 256 /* deeper documents take the Python path */

static void json_space(Json *j) {
    while (j->p < j->end && (*j->p == ' ' || *j->p == '\t' || *j->p == '\n' || *j->p == '\r'))
        j->p++;
}

static int hex4(const char *p, unsigned int *value) {
    *value = 0;
    for (int i = 0; i < 4; i++) {
        char c = p[i];
        int digit = (c >= '0' && c <= '9')   ? c - '0'
                    : (c >= 'a' && c <= 'f') ? c - 'a' + 10
                    : (c >= 'A' && c <= 'F') ? c - 'A' + 10
                                             : -1;
        if (digit < 0)
            return 0;
        *value = *value * 16 + digit;
    }
    return 1;
}

static int json_string(Json *j) {
    j->p++; /* the opening quote */
    while (j->p < j->end) {
        unsigned char c = *j->p;
        if (c == '"') {
            j->p++;
            return 1;
        }
        if (c < 0x20)
            return 0;
        if (c != '\\') {
            j->p++;
            continue;
        }
        if (j->end - j->p < 2)
            return 0;
        char e = j->p[1];
        if (strchr("\"\\/bfnrt", e) && e) {
            j->p += 2;
            continue;
        }
        unsigned int code, low;
        if (e != 'u' || j->end - j->p < 6 || !hex4(j->p + 2, &code) || code == 0)
            return 0;
        j->p += 6;
        if (code >= 0xDC00 && code <= 0xDFFF)
            return 0; /* a low surrogate alone */
        if (code >= 0xD800 && code <= 0xDBFF) {
            if (j->end - j->p < 6 || j->p[0] != '\\' || j->p[1] != 'u' ||
                !hex4(j->p + 2, &low) || low < 0xDC00 || low > 0xDFFF)
                return 0;
            j->p += 6;
        }
    }
    return 0;
}

static int json_value(Json *j, int depth);

static int json_items(Json *j, int depth, char close, int keyed) {
    j->p++; /* [ or { */
    json_space(j);
    if (j->p < j->end && *j->p == close) {
        j->p++;
        return 1;
    }
    for (;;) {
        if (keyed) {
            if (j->p >= j->end || *j->p != '"' || !json_string(j))
                return 0;
            json_space(j);
            if (j->p >= j->end || *j->p != ':')
                return 0;
            j->p++;
            json_space(j);
        }
        if (!json_value(j, depth + 1))
            return 0;
        json_space(j);
        if (j->p >= j->end)
            return 0;
        if (*j->p == close) {
            j->p++;
            return 1;
        }
        if (*j->p != ',')
            return 0;
        j->p++;
        json_space(j);
    }
}

static int json_literal(Json *j, const char *word) {
    size_t n = strlen(word);
    if ((size_t)(j->end - j->p) < n || memcmp(j->p, word, n) != 0)
        return 0;
    j->p += n;
    return 1;
}

static int json_value(Json *j, int depth) {
    if (j->p >= j->end || depth > JSON_MAX_DEPTH)
        return 0;
    char c = *j->p;
    if (c == '{')
        return json_items(j, depth, '}', 1);
    if (c == '[')
        return json_items(j, depth, ']', 0);
    if (c == '"')
        return json_string(j);
    if (c == 't')
        return json_literal(j, "true");
    if (c == 'f')
        return json_literal(j, "false");
    if (c == 'n')
        return json_literal(j, "null");
    if (c == '-')
        j->p++;
    if (j->p >= j->end || *j->p < '0' || *j->p > '9')
        return 0;
    if (*j->p == '0')
        j->p++;
    else
        while (j->p < j->end && *j->p >= '0' && *j->p <= '9')
            j->p++;
    /* a fraction or an exponent: a float in Python */
    return !(j->p < j->end && (*j->p == '.' || *j->p == 'e' || *j->p == 'E'));
}

static int clean_json(const char *s, Py_ssize_t n) {
    Json j = {s, s + n};
    json_space(&j);
    if (!json_value(&j, 0))
        return 0;
    json_space(&j);
    return j.p == j.end;
}

/* Write a value through the Python converter; 1 written, 0 fallback, -1 error. */
static int put_converted(Buffer *buf, PyObject *convert, Raw *raw) {
    PyObject *value = raw_object(raw);
    if (!value)
        return -1;
    PyObject *out = PyObject_CallOneArg(convert, value);
    if (!out) {
        if (PyErr_ExceptionMatches(PyExc_MemoryError) ||
            PyErr_ExceptionMatches(PyExc_KeyboardInterrupt))
            return -1;
        PyErr_Clear(); /* the whole-row path raises it again, with the row */
        return 0;
    }
    int result = 0;
    if (out == Py_None) {
        result = buf_put(buf, "\\N", 2) < 0 ? -1 : 1;
    } else if (PyUnicode_CheckExact(out)) {
        Py_ssize_t n;
        const char *s = PyUnicode_AsUTF8AndSize(out, &n);
        result = (!s || put_escaped(buf, s, n) < 0) ? -1 : 1;
    }
    Py_DECREF(out);
    return result;
}

/* Django's SQLite decimal converter, exactly: the float's binary value rounded to 15
 * significant digits (create_decimal_from_float, half-even; glibc's printf rounds the
 * exact value the same way), then quantized to `places` (half-even), at most
 * `max_digits` digits.  1 written, 0 not handled here (the Python converter decides). */
typedef struct {
    int negative;
    char digits[72]; /* the coefficient, no leading zeros ("" for zero) */
    int len, places;
} Decimal;

static int round_decimal(Decimal *out, const Raw *raw, int places, int max_digits) {
    double v;
    if (raw->type == R_FLOAT) {
        v = raw->d;
    } else if (raw->type == R_INT) {
        if (raw->i > 999999999999999LL || raw->i < -999999999999999LL)
            return 0; /* more than 15 digits: the first rounding matters */
        v = (double)raw->i; /* exact below 2**53 */
    } else {
        return 0;
    }
    if (!isfinite(v) || places < 0 || places > 6) /* str() turns to 5E-7 beyond 6 places */
        return 0;
    char text[40];
    snprintf(text, sizeof text, "%.14e", v); /* [-]d.dddddddddddddde[+-]x */
    const char *p = text;
    int negative = *p == '-';
    if (negative)
        p++;
    char sig[15];
    sig[0] = *p++;
    p++; /* the point */
    memcpy(sig + 1, p, 14);
    int exp10 = atoi(p + 15); /* sig[i] weighs 10**(exp10 - i) */
    int keep = exp10 + places + 1; /* digits at or above 10**-places */
    char coeff[64];
    int n = 0;
    for (int i = 0; i < keep && n < 60; i++)
        coeff[n++] = i < 15 ? sig[i] : '0';
    if (keep >= 60)
        return 0;
    int up = 0;
    if (keep < 15) {
        int first = keep >= 0 ? keep : 0;
        if (keep < 0) {
            up = 0; /* below half a unit of the last place */
        } else if (sig[first] > '5') {
            up = 1;
        } else if (sig[first] == '5') {
            int rest = 0;
            for (int i = first + 1; i < 15; i++)
                rest |= sig[i] != '0';
            up = rest || (n > 0 && (coeff[n - 1] - '0') % 2 == 1);
        }
    }
    for (int i = n - 1; up && i >= 0; i--) {
        if (coeff[i] == '9') {
            coeff[i] = '0';
        } else {
            coeff[i]++;
            up = 0;
        }
    }
    int len = 0, lead = 0;
    if (up) /* carried out of the first digit: 99.996 -> 100.00 */
        out->digits[len++] = '1';
    else
        while (lead < n && coeff[lead] == '0')
            lead++;
    memcpy(out->digits + len, coeff + lead, n - lead);
    len += n - lead;
    if (len > max_digits)
        return 0; /* the Python converter rejects it with Django's reason */
    out->negative = negative;
    out->len = len;
    out->places = places;
    return 1;
}

static int put_decimal(Buffer *buf, const Raw *raw, int places, int max_digits) {
    Decimal d;
    if (!round_decimal(&d, raw, places, max_digits))
        return 0;
    const char *digits = d.digits;
    int len = d.len;
    /* at least one digit before the point */
    char out[96];
    int o = 0;
    if (d.negative)
        out[o++] = '-';
    int whole = len - places;
    if (whole <= 0) {
        out[o++] = '0';
    } else {
        memcpy(out + o, digits, whole);
        o += whole;
    }
    if (places > 0) {
        out[o++] = '.';
        for (int i = whole; i < 0; i++)
            out[o++] = '0';
        int from = whole > 0 ? whole : 0;
        memcpy(out + o, digits + from, len - from);
        o += len - from;
    }
    return buf_put(buf, out, o) < 0 ? -1 : 1;
}

/* Text the target takes unchanged: valid UTF-8 without NUL, within the column's length,
 * one of the enum's labels if it is one.  1 yes, 0 no, -1 error. */
static int clean_text(const Column *col, Raw *raw) {
    Py_ssize_t chars = utf8_chars((const unsigned char *)(raw->s ? raw->s : ""), raw->n);
    if (chars < 0 || (col->a >= 0 && chars > col->a))
        return 0;
    if (col->obj == Py_None)
        return 1;
    PyObject *value = raw_object(raw);
    return value ? PySet_Contains(col->obj, value) : -1;
}

/* --- binary COPY: the same checks, PostgreSQL's binary forms --------------------------- */

static int put_be(Buffer *buf, unsigned long long v, int bytes) {
    if (buf_reserve(buf, bytes) < 0)
        return -1;
    for (int i = bytes - 1; i >= 0; i--)
        buf->data[buf->len++] = (char)((v >> (8 * i)) & 0xff);
    return 0;
}

/* A field: its length, then its bytes. */
static int put_field(Buffer *buf, const char *s, Py_ssize_t n) {
    return (put_be(buf, (unsigned long long)n, 4) < 0 || buf_put(buf, s, n) < 0) ? -1 : 1;
}

static long long days_from_civil(long long y, int m, int d) { /* Howard Hinnant's */
    y -= m <= 2;
    long long era = (y >= 0 ? y : y - 399) / 400;
    long long yoe = y - era * 400;
    long long doy = (153 * (m + (m > 2 ? -3 : 9)) + 2) / 5 + d - 1;
    long long doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    return era * 146097 + doe - 719468;
}

#define PG_EPOCH_DAYS 10957 /* 2000-01-01, PostgreSQL's epoch, in days after 1970-01-01 */

static long long pg_days(const char *s) { /* s passed valid_date() */
    int y = 0, m = 0, d = 0;
    digits(s, 4, &y);
    digits(s + 5, 2, &m);
    digits(s + 8, 2, &d);
    return days_from_civil(y, m, d) - PG_EPOCH_DAYS;
}

/* PostgreSQL's numeric: base-10000 digits around the point, weight, sign, scale. */
static int put_numeric(Buffer *buf, const Decimal *d) {
    char text[96];
    int places = d->places, len = d->len;
    int whole = len > places ? len - places : 0;
    int pad_left = (4 - whole % 4) % 4, frac_pad = (4 - places % 4) % 4;
    int n = 0;
    for (int i = 0; i < pad_left; i++)
        text[n++] = '0';
    for (int i = 0; i < places - len; i++) /* 0.05: zeros between the point and the digits */
        text[n++] = '0';
    memcpy(text + n, d->digits, len);
    n += len;
    for (int i = 0; i < frac_pad; i++)
        text[n++] = '0';
    int groups = n / 4, weight = (whole + pad_left) / 4 - 1, first = 0, last = groups;
    unsigned short value[24];
    for (int g = 0; g < groups; g++)
        value[g] = (unsigned short)((text[4 * g] - '0') * 1000 + (text[4 * g + 1] - '0') * 100 +
                                    (text[4 * g + 2] - '0') * 10 + (text[4 * g + 3] - '0'));
    while (first < last && value[first] == 0) {
        first++;
        weight--;
    }
    while (last > first && value[last - 1] == 0)
        last--;
    int ndigits = last - first;
    if (ndigits == 0)
        weight = 0;
    int sign = (d->negative && ndigits) ? 0x4000 : 0;
    if (put_be(buf, 8 + 2 * ndigits, 4) < 0 || put_be(buf, ndigits, 2) < 0 ||
        put_be(buf, (unsigned short)weight, 2) < 0 || put_be(buf, sign, 2) < 0 ||
        put_be(buf, places, 2) < 0)
        return -1;
    for (int g = first; g < last; g++)
        if (put_be(buf, value[g], 2) < 0)
            return -1;
    return 1;
}

static int hexval(char c) { return c <= '9' ? c - '0' : c - 'a' + 10; }

/* A TEXT value where Django writes BLOBs or the other way round: Python refuses it. */
static int misfiled(const Column *col, const Raw *raw) {
    return col->storage && raw->storage && raw->storage != col->storage;
}

/* Write one value in binary; 1 written, 0 fallback (the row goes to Python), -1 error. */
static int put_value_binary(Buffer *buf, const Column *col, Raw *raw) {
    if (misfiled(col, raw))
        return 0;
    if (raw->type == R_NULL)
        return col->nullable ? (put_be(buf, 0xffffffffULL, 4) < 0 ? -1 : 1) : 0;
    if (col->kind == K_INT || col->kind == K_BOOL) {
        if (raw->type != R_INT)
            return 0;
        if (col->kind == K_BOOL) {
            if (raw->i != 0 && raw->i != 1)
                return 0;
            char byte = (char)raw->i;
            return put_field(buf, &byte, 1);
        }
        if (raw->i < col->a || raw->i > col->b)
            return 0;
        return (put_be(buf, col->width, 4) < 0 ||
                put_be(buf, (unsigned long long)raw->i, col->width) < 0)
                   ? -1
                   : 1;
    }
    if (col->kind == K_DECIMAL) {
        Decimal d;
        return round_decimal(&d, raw, (int)col->a, (int)col->b) ? put_numeric(buf, &d) : 0;
    }
    if (raw->type != R_BYTES || col->kind == K_PYTHON)
        return 0;
    const char *s = raw->s ? raw->s : "";
    Py_ssize_t n = raw->n;
    switch (col->kind) {
    case K_TEXT: {
        int ok = clean_text(col, raw);
        return ok == 1 ? put_field(buf, s, n) : ok;
    }
    case K_JSON: /* jsonb: a version byte, then the text */
        if (utf8_chars((const unsigned char *)s, n) < 0 || !clean_json(s, n))
            return 0;
        return (put_be(buf, (unsigned long long)n + 1, 4) < 0 || buf_put(buf, "\1", 1) < 0 ||
                buf_put(buf, s, n) < 0)
                   ? -1
                   : 1;
    case K_UUID: {
        if (!valid_uuid_hex(s, n))
            return 0;
        char bytes[16];
        for (int i = 0; i < 16; i++)
            bytes[i] = (char)(hexval(s[2 * i]) * 16 + hexval(s[2 * i + 1]));
        return put_field(buf, bytes, 16);
    }
    case K_DATETIME: { /* microseconds since 2000-01-01 00:00 UTC */
        if (!valid_datetime(s, n))
            return 0;
        int h = 0, mi = 0, se = 0, frac = 0;
        digits(s + 11, 2, &h);
        digits(s + 14, 2, &mi);
        digits(s + 17, 2, &se);
        if (n == 26)
            digits(s + 20, 6, &frac);
        long long us = ((pg_days(s) * 24 + h) * 60 + mi) * 60 + se;
        us = us * 1000000 + frac;
        return (put_be(buf, 8, 4) < 0 || put_be(buf, (unsigned long long)us, 8) < 0) ? -1 : 1;
    }
    case K_DATE:
        if (n != 10 || !valid_date(s))
            return 0;
        return (put_be(buf, 4, 4) < 0 || put_be(buf, (unsigned long long)pg_days(s), 4) < 0)
                   ? -1
                   : 1;
    case K_IP: { /* inet: family, bits, is_cidr, length, address */
        unsigned int groups[8];
        char out[20];
        if (valid_ipv4(s, n)) {
            int octet[4];
            sscanf(s, "%d.%d.%d.%d", &octet[0], &octet[1], &octet[2], &octet[3]);
            out[0] = 2, out[1] = 32, out[2] = 0, out[3] = 4;
            for (int i = 0; i < 4; i++)
                out[4 + i] = (char)octet[i];
            return put_field(buf, out, 8);
        }
        if (!canonical_ipv6(s, n, groups))
            return 0;
        out[0] = 3, out[1] = (char)128, out[2] = 0, out[3] = 16;
        for (int i = 0; i < 8; i++) {
            out[4 + 2 * i] = (char)(groups[i] >> 8);
            out[5 + 2 * i] = (char)(groups[i] & 0xff);
        }
        return put_field(buf, out, 20);
    }
    }
    return 0;
}

/* Write one value; 1 written, 0 fallback, -1 error. */
static int put_value(Buffer *buf, const Column *col, Raw *raw) {
    if (misfiled(col, raw))
        return 0;
    if (raw->type == R_NULL) {
        if (col->kind == K_PYTHON)
            return put_converted(buf, col->obj, raw);
        return col->nullable ? (buf_put(buf, "\\N", 2) < 0 ? -1 : 1) : 0;
    }
    if (col->kind == K_INT || col->kind == K_BOOL) {
        if (raw->type != R_INT)
            return 0;
        long long v = raw->i;
        if (col->kind == K_BOOL) {
            if (v != 0 && v != 1)
                return 0;
            return buf_put(buf, v ? "t" : "f", 1) < 0 ? -1 : 1;
        }
        if (v < col->a || v > col->b)
            return 0;
        char text[24];
        int n = snprintf(text, sizeof text, "%lld", v);
        return buf_put(buf, text, n) < 0 ? -1 : 1;
    }
    if (col->kind == K_PYTHON)
        return put_converted(buf, col->obj, raw);
    if (col->kind == K_DECIMAL) {
        int done = put_decimal(buf, raw, (int)col->a, (int)col->b);
        return done ? done : put_converted(buf, col->obj, raw);
    }
    if (raw->type != R_BYTES)
        return col->kind == K_IP ? put_converted(buf, col->obj, raw) : 0;
    const char *s = raw->s ? raw->s : "";
    Py_ssize_t n = raw->n;
    switch (col->kind) {
    case K_TEXT: {
        int ok = clean_text(col, raw);
        return ok == 1 ? (put_escaped(buf, s, n) < 0 ? -1 : 1) : ok;
    }
    case K_JSON:
        if (utf8_chars((const unsigned char *)s, n) < 0 || !clean_json(s, n))
            return 0;
        return put_escaped(buf, s, n) < 0 ? -1 : 1;
    case K_UUID:
        if (!valid_uuid_hex(s, n))
            return 0;
        return buf_put(buf, s, n) < 0 ? -1 : 1;
    case K_DATETIME:
        if (!valid_datetime(s, n))
            return 0;
        return (buf_put(buf, s, n) < 0 || buf_put(buf, "+00:00", 6) < 0) ? -1 : 1;
    case K_DATE:
        if (n != 10 || !valid_date(s))
            return 0;
        return buf_put(buf, s, n) < 0 ? -1 : 1;
    case K_IP:
        if (!valid_ipv4(s, n) && !canonical_ipv6(s, n, NULL))
            return put_converted(buf, col->obj, raw);
        return buf_put(buf, s, n) < 0 ? -1 : 1;
    }
    return 0;
}

static int parse_spec(PyObject *spec, Column **columns, Py_ssize_t *count) {
    if (!PyTuple_Check(spec)) {
        PyErr_SetString(PyExc_TypeError, "spec must be a tuple");
        return -1;
    }
    *count = PyTuple_GET_SIZE(spec);
    *columns = PyMem_Calloc(*count ? *count : 1, sizeof(Column));
    if (!*columns) {
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < *count; i++) {
        Column *col = &(*columns)[i];
        if (!PyArg_ParseTuple(PyTuple_GET_ITEM(spec, i), "iiLLOii", &col->kind, &col->nullable,
                              &col->a, &col->b, &col->obj, &col->width, &col->storage)) {
            PyMem_Free(*columns);
            *columns = NULL; /* the Reader frees its columns again when it is dropped */
            return -1;
        }
    }
    return 0;
}

static int put_row_start(Buffer *buf, Py_ssize_t ncols, int binary) {
    return binary ? (put_be(buf, (unsigned long long)ncols, 2) < 0 ? -1 : 1) : 1;
}

static int put_column(Buffer *buf, const Column *col, Raw *raw, Py_ssize_t index, int binary) {
    if (binary)
        return put_value_binary(buf, col, raw);
    if (index && buf_put(buf, "\t", 1) < 0)
        return -1;
    return put_value(buf, col, raw);
}

static int put_row_end(Buffer *buf, int binary) {
    return binary ? 1 : (buf_put(buf, "\n", 1) < 0 ? -1 : 1);
}

static PyObject *format_rows(PyObject *self, PyObject *args) {
    PyObject *rows, *spec, *skip;
    Py_ssize_t pk_index;
    int binary = 0;
    if (!PyArg_ParseTuple(args, "O!OOn|p", &PyList_Type, &rows, &spec, &skip, &pk_index,
                          &binary))
        return NULL;
    Column *columns;
    Py_ssize_t ncols;
    if (parse_spec(spec, &columns, &ncols) < 0)
        return NULL;
    Buffer buf = {NULL, 0, 0};
    PyObject *fallback = PyList_New(0);
    Py_ssize_t skipped = 0;
    if (!fallback)
        goto error;
    for (Py_ssize_t r = 0; r < PyList_GET_SIZE(rows); r++) {
        PyObject *row = PyList_GET_ITEM(rows, r);
        if (!PyTuple_Check(row) || PyTuple_GET_SIZE(row) < ncols) {
            PyErr_SetString(PyExc_TypeError, "each row must be a tuple with every column");
            goto error;
        }
        if (skip != Py_None) {
            int found = PySet_Contains(skip, PyTuple_GET_ITEM(row, pk_index));
            if (found < 0)
                goto error;
            if (found) {
                skipped++;
                continue;
            }
        }
        Py_ssize_t start = buf.len;
        int ok = put_row_start(&buf, ncols, binary);
        for (Py_ssize_t c = 0; c < ncols && ok == 1; c++) {
            Raw raw;
            raw_from_object(&raw, PyTuple_GET_ITEM(row, c));
            ok = put_column(&buf, &columns[c], &raw, c, binary);
        }
        if (ok == 1)
            ok = put_row_end(&buf, binary);
        if (ok < 0)
            goto error;
        if (ok == 0) {
            buf.len = start;
            PyObject *index = PyLong_FromSsize_t(r);
            if (!index || PyList_Append(fallback, index) < 0) {
                Py_XDECREF(index);
                goto error;
            }
            Py_DECREF(index);
        }
    }
    PyObject *data = take_bytes(&buf);
    PyMem_Free(columns);
    if (!data) {
        Py_DECREF(fallback);
        return NULL;
    }
    return Py_BuildValue("(NNn)", data, fallback, skipped);
error:
    PyMem_Free(buf.data);
    PyMem_Free(columns);
    Py_XDECREF(fallback);
    return NULL;
}

/* --- Reader: rows straight from SQLite, Python objects only where a value needs them --- */

typedef struct {
    PyObject_HEAD sqlite3 *db;
    sqlite3_stmt *stmt;
    PyObject *spec; /* columns borrow their objects from it */
    PyObject *skip;
    PyObject *misfiled; /* a bytes subclass: wraps misfiled values in fallback rows */
    Column *columns;
    Py_ssize_t ncols, pk_index;
    int binary; /* COPY's binary format instead of text */
} Reader;

static PyObject *sqlite_error(sqlite3 *db, const char *what) {
    PyObject *module = PyImport_ImportModule("sqlite3");
    PyObject *kind = module ? PyObject_GetAttrString(module, "OperationalError") : NULL;
    Py_XDECREF(module);
    if (kind) {
        PyErr_Format(kind, "%s: %s", what, db ? sqlite3_errmsg(db) : "out of memory");
        Py_DECREF(kind);
    }
    return NULL;
}

static void reader_close_handles(Reader *self) {
    if (self->stmt) {
        sqlite3_finalize(self->stmt);
        self->stmt = NULL;
    }
    if (self->db) {
        sqlite3_close(self->db);
        self->db = NULL;
    }
}

static void reader_dealloc(Reader *self) {
    reader_close_handles(self);
    PyMem_Free(self->columns);
    Py_XDECREF(self->spec);
    Py_XDECREF(self->skip);
    Py_XDECREF(self->misfiled);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int reader_init(Reader *self, PyObject *args, PyObject *kwargs) {
    const char *uri, *sql;
    PyObject *spec, *skip, *misfiled_type = (PyObject *)&PyBytes_Type;
    Py_ssize_t pk_index;
    self->binary = 0;
    if (!PyArg_ParseTuple(args, "ssOOn|pO", &uri, &sql, &spec, &skip, &pk_index, &self->binary,
                          &misfiled_type))
        return -1;
    Py_INCREF(misfiled_type);
    Py_XSETREF(self->misfiled, misfiled_type);
    if (parse_spec(spec, &self->columns, &self->ncols) < 0)
        return -1;
    Py_INCREF(spec);
    self->spec = spec;
    Py_INCREF(skip);
    self->skip = skip;
    self->pk_index = pk_index;
    int flags = SQLITE_OPEN_READONLY | SQLITE_OPEN_URI;
    if (sqlite3_open_v2(uri, &self->db, flags, NULL) != SQLITE_OK) {
        sqlite_error(self->db, "cannot open the SQLite source");
        reader_close_handles(self);
        return -1;
    }
    sqlite3_busy_timeout(self->db, 5000);
    if (sqlite3_prepare_v2(self->db, sql, -1, &self->stmt, NULL) != SQLITE_OK) {
        sqlite_error(self->db, "cannot read the SQLite source");
        reader_close_handles(self);
        return -1;
    }
    if (sqlite3_column_count(self->stmt) != self->ncols) {
        PyErr_SetString(PyExc_ValueError, "the SELECT and the spec differ in columns");
        reader_close_handles(self);
        return -1;
    }
    return 0;
}

static void raw_from_sqlite(Raw *raw, sqlite3_stmt *stmt, int column) {
    memset(raw, 0, sizeof *raw);
    switch (sqlite3_column_type(stmt, column)) {
    case SQLITE_INTEGER:
        raw->type = R_INT;
        raw->i = sqlite3_column_int64(stmt, column);
        break;
    case SQLITE_FLOAT:
        raw->type = R_FLOAT;
        raw->d = sqlite3_column_double(stmt, column);
        break;
    case SQLITE_TEXT:
        raw->type = R_BYTES; /* as the copy's sqlite3 connection gives text: bytes */
        raw->storage = S_TEXT;
        raw->s = (const char *)sqlite3_column_text(stmt, column);
        raw->n = sqlite3_column_bytes(stmt, column);
        break;
    case SQLITE_BLOB:
        raw->type = R_BYTES;
        raw->storage = S_BLOB;
        raw->s = (const char *)sqlite3_column_blob(stmt, column);
        raw->n = sqlite3_column_bytes(stmt, column);
        break;
    default:
        raw->type = R_NULL;
    }
}

/* The whole current row as Python's sqlite3 would give it (text as bytes), misfiled
 * values wrapped in the `misfiled` type (as copy.read_rows marks them). */
static PyObject *current_row(Reader *self) {
    PyObject *row = PyTuple_New(self->ncols);
    if (!row)
        return NULL;
    for (Py_ssize_t c = 0; c < self->ncols; c++) {
        Raw raw;
        raw_from_sqlite(&raw, self->stmt, (int)c);
        PyObject *value = raw_object(&raw);
        if (value && misfiled(&self->columns[c], &raw)) {
            PyObject *marked = PyObject_CallOneArg(self->misfiled, value);
            Py_DECREF(value);
            value = marked;
        }
        if (!value) {
            Py_DECREF(row);
            return NULL;
        }
        PyTuple_SET_ITEM(row, c, value); /* steals the reference raw_object made */
    }
    return row;
}

static PyObject *reader_batch(Reader *self, PyObject *args) {
    Py_ssize_t max_rows;
    if (!PyArg_ParseTuple(args, "n", &max_rows))
        return NULL;
    if (!self->stmt)
        return Py_BuildValue("(y#Nnn)", "", (Py_ssize_t)0, PyList_New(0), (Py_ssize_t)0,
                             (Py_ssize_t)0);
    Buffer buf = {NULL, 0, 0};
    PyObject *fallback = PyList_New(0);
    Py_ssize_t read = 0, skipped = 0;
    if (!fallback)
        return NULL;
    while (read < max_rows) {
        int step;
        Py_BEGIN_ALLOW_THREADS /* the other lane's table goes on meanwhile */
        step = sqlite3_step(self->stmt);
        Py_END_ALLOW_THREADS
        if (step == SQLITE_DONE) {
            reader_close_handles(self);
            break;
        }
        if (step != SQLITE_ROW) {
            sqlite_error(self->db, "reading the SQLite source failed");
            goto error;
        }
        read++;
        if (self->skip != Py_None) {
            Raw pk;
            raw_from_sqlite(&pk, self->stmt, (int)self->pk_index);
            PyObject *value = raw_object(&pk);
            int found = value ? PySet_Contains(self->skip, value) : -1;
            raw_release(&pk);
            if (found < 0)
                goto error;
            if (found) {
                skipped++;
                continue;
            }
        }
        Py_ssize_t start = buf.len;
        int ok = put_row_start(&buf, self->ncols, self->binary);
        for (Py_ssize_t c = 0; c < self->ncols && ok == 1; c++) {
            Raw raw;
            raw_from_sqlite(&raw, self->stmt, (int)c);
            ok = put_column(&buf, &self->columns[c], &raw, c, self->binary);
            raw_release(&raw);
        }
        if (ok == 1)
            ok = put_row_end(&buf, self->binary);
        if (ok < 0)
            goto error;
        if (ok == 1)
            continue;
        buf.len = start;
        PyObject *row = current_row(self);
        if (!row || PyList_Append(fallback, row) < 0) {
            Py_XDECREF(row);
            goto error;
        }
        Py_DECREF(row);
    }
    PyObject *data = take_bytes(&buf);
    if (!data) {
        Py_DECREF(fallback);
        return NULL;
    }
    return Py_BuildValue("(NNnn)", data, fallback, skipped, read);
error:
    PyMem_Free(buf.data);
    Py_DECREF(fallback);
    return NULL;
}

static PyObject *reader_close(Reader *self, PyObject *unused) {
    reader_close_handles(self);
    Py_RETURN_NONE;
}

static PyMethodDef reader_methods[] = {
    {"batch", (PyCFunction)reader_batch, METH_VARARGS,
     "batch(max_rows) -> (bytes, fallback rows, skipped, read); read is 0 at the end"},
    {"close", (PyCFunction)reader_close, METH_NOARGS, "Finish the statement, close the file."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject ReaderType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "dbmigration._copytext.Reader",
    .tp_basicsize = sizeof(Reader),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Reader(uri, select, spec, skip, pk_index, binary=False, misfiled=bytes): COPY "
              "batches of a SELECT.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)reader_init,
    .tp_dealloc = (destructor)reader_dealloc,
    .tp_methods = reader_methods,
};

/* --- range checksums: PostgreSQL's own hash functions over the values the copy writes ---
 *
 * range_sums(uri, select, spec, pk_index, mode, low, width, buckets, skip)
 *     -> None (a value outside the clean forms: the caller takes the Python path), or
 *        (rows, [(bucket, count, sum mod 2**64), ...])
 *
 * spec: one (kind, a, b, storage) per column.  Each value is hashed as PostgreSQL hashes
 * the value the copy stores from it (verify.py's ROW_HASH_SQL gives the SQL side):
 * integers, booleans, dates and timestamps with hashint8extended (timestamps as
 * microseconds since 2000, dates as days), UUIDs with uuid_hash_extended, inet with
 * hashinetextended, text with hashtextextended; decimals and JSON hash their output text
 * (numeric's with its scale; jsonb's normalized form), because their binary hashes
 * ignore the sign.  Column i is hashed with seed i + 1 (a NULL contributes the seed), a
 * row is the XOR of its columns, a range the sum of its rows, mod 2**64.
 * mode 0: integer keys, bucket (pk - low) / width; mode 1: UUID keys, bucket = the first
 * three hex digits (as verify.Ranges.bucket).  Runs without the GIL unless a skip set
 * (quarantined keys, matched as the copy matches them) needs Python.
 */
#include <stdint.h>

#define ROT32(x, k) (((x) << (k)) | ((x) >> (32 - (k))))
#define LOOKUP3_MIX(a, b, c)                                                                   \
    {                                                                                          \
        a -= c, a ^= ROT32(c, 4), c += b;                                                      \
        b -= a, b ^= ROT32(a, 6), a += c;                                                      \
        c -= b, c ^= ROT32(b, 8), b += a;                                                      \
        a -= c, a ^= ROT32(c, 16), c += b;                                                     \
        b -= a, b ^= ROT32(a, 19), a += c;                                                     \
        c -= b, c ^= ROT32(b, 4), b += a;                                                      \
    }
#define LOOKUP3_FINAL(a, b, c)                                                                 \
    {                                                                                          \
        c ^= b, c -= ROT32(b, 14);                                                             \
        a ^= c, a -= ROT32(c, 11);                                                             \
        b ^= a, b -= ROT32(a, 25);                                                             \
        c ^= b, c -= ROT32(b, 16);                                                             \
        a ^= c, a -= ROT32(c, 4);                                                              \
        b ^= a, b -= ROT32(a, 14);                                                             \
        c ^= b, c -= ROT32(b, 24);                                                             \
    }

static uint32_t le32(const unsigned char *k) {
    return k[0] | ((uint32_t)k[1] << 8) | ((uint32_t)k[2] << 16) | ((uint32_t)k[3] << 24);
}

/* PostgreSQL's hash_bytes_extended (src/common/hashfn.c, Bob Jenkins' lookup3) as it
 * runs on a little-endian server. */
static uint64_t pg_hash_bytes(const unsigned char *k, Py_ssize_t keylen, uint64_t seed) {
    uint32_t a, b, c, len = (uint32_t)keylen;
    a = b = c = 0x9e3779b9 + len + 3923095;
    if (seed != 0) {
        a += (uint32_t)(seed >> 32);
        b += (uint32_t)seed;
        LOOKUP3_MIX(a, b, c);
    }
    while (len >= 12) {
        a += le32(k);
        b += le32(k + 4);
        c += le32(k + 8);
        LOOKUP3_MIX(a, b, c);
        k += 12;
        len -= 12;
    }
    switch (len) { /* the lowest byte of c is reserved for the length */
    case 11: c += (uint32_t)k[10] << 24; /* fall through */
    case 10: c += (uint32_t)k[9] << 16; /* fall through */
    case 9: c += (uint32_t)k[8] << 8; /* fall through */
    case 8: b += (uint32_t)k[7] << 24; /* fall through */
    case 7: b += (uint32_t)k[6] << 16; /* fall through */
    case 6: b += (uint32_t)k[5] << 8; /* fall through */
    case 5: b += k[4]; /* fall through */
    case 4: a += (uint32_t)k[3] << 24; /* fall through */
    case 3: a += (uint32_t)k[2] << 16; /* fall through */
    case 2: a += (uint32_t)k[1] << 8; /* fall through */
    case 1: a += k[0];
    }
    LOOKUP3_FINAL(a, b, c);
    return ((uint64_t)b << 32) | c;
}

/* hash_uint32_extended */
static uint64_t pg_hash_uint32(uint32_t k, uint64_t seed) {
    uint32_t a, b, c;
    a = b = c = 0x9e3779b9 + (uint32_t)sizeof(uint32_t) + 3923095;
    if (seed != 0) {
        a += (uint32_t)(seed >> 32);
        b += (uint32_t)seed;
        LOOKUP3_MIX(a, b, c);
    }
    a += k;
    LOOKUP3_FINAL(a, b, c);
    return ((uint64_t)b << 32) | c;
}

/* hashint8extended (also timestamp_hash_extended): fold to 32 bits, then hash */
static uint64_t pg_hash_int8(long long value, uint64_t seed) {
    uint32_t lo = (uint32_t)value, hi = (uint32_t)((unsigned long long)value >> 32);
    lo ^= value >= 0 ? hi : ~hi;
    return pg_hash_uint32(lo, seed);
}

/* A growing byte buffer that needs no GIL (malloc, no Python error on failure). */
typedef struct {
    char *data;
    size_t len, cap;
} HBuf;

static int hput(HBuf *b, const char *s, size_t n) {
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->len + n)
            cap *= 2;
        char *data = realloc(b->data, cap);
        if (!data)
            return -1;
        b->data = data;
        b->cap = cap;
    }
    memcpy(b->data + b->len, s, n);
    b->len += n;
    return 0;
}

/* --- jsonb's output text of a clean_json() document: keys sorted (shorter first, then
 * bytewise, on the decoded bytes), the last of duplicate keys kept, ", " and ": " between
 * items, strings escaped as PostgreSQL's escape_json(), "-0" as "0". */

static int put_utf8(HBuf *out, unsigned int code) {
    char s[4];
    size_t n = 0;
    if (code < 0x80) {
        s[n++] = (char)code;
    } else if (code < 0x800) {
        s[n++] = (char)(0xC0 | (code >> 6));
        s[n++] = (char)(0x80 | (code & 0x3F));
    } else if (code < 0x10000) {
        s[n++] = (char)(0xE0 | (code >> 12));
        s[n++] = (char)(0x80 | ((code >> 6) & 0x3F));
        s[n++] = (char)(0x80 | (code & 0x3F));
    } else {
        s[n++] = (char)(0xF0 | (code >> 18));
        s[n++] = (char)(0x80 | ((code >> 12) & 0x3F));
        s[n++] = (char)(0x80 | ((code >> 6) & 0x3F));
        s[n++] = (char)(0x80 | (code & 0x3F));
    }
    return hput(out, s, n);
}

/* The next character of the string at j->p (clean_json() accepted it), decoded: its code
 * point, or -1 at the closing quote (consumed). */
static long jnext(Json *j) {
    unsigned char c = (unsigned char)*j->p;
    if (c == '"') {
        j->p++;
        return -1;
    }
    if (c != '\\') {
        j->p++;
        return c; /* a byte of UTF-8: copied as it is */
    }
    char e = j->p[1];
    unsigned int code = 0, low = 0;
    j->p += 2;
    switch (e) {
    case 'b': return '\b';
    case 'f': return '\f';
    case 'n': return '\n';
    case 'r': return '\r';
    case 't': return '\t';
    case 'u':
        hex4(j->p, &code);
        j->p += 4;
        if (code >= 0xD800 && code <= 0xDBFF) {
            hex4(j->p + 2, &low);
            j->p += 6;
            code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00);
        }
        return code >= 0x80 ? -2 - (long)code : (long)code; /* -2 - code: write as UTF-8 */
    default: return (unsigned char)e; /* " \ / */
    }
}

/* Append one decoded character (jnext's result, not -1); escaped when `escape`. */
static int jput(HBuf *out, long ch, int escape) {
    if (ch <= -2)
        return put_utf8(out, (unsigned int)(-2 - ch));
    unsigned char c = (unsigned char)ch;
    if (escape) {
        const char *esc = NULL;
        char text[8];
        switch (c) {
        case '\b': esc = "\\b"; break;
        case '\f': esc = "\\f"; break;
        case '\n': esc = "\\n"; break;
        case '\r': esc = "\\r"; break;
        case '\t': esc = "\\t"; break;
        case '"': esc = "\\\""; break;
        case '\\': esc = "\\\\"; break;
        }
        if (!esc && c < 0x20) {
            snprintf(text, sizeof text, "\\u%04x", c);
            esc = text;
        }
        if (esc)
            return hput(out, esc, strlen(esc));
    }
    return hput(out, (const char *)&c, 1);
}

/* The string at j->p, decoded (escape 0: the bytes jsonb compares keys by) or as
 * escape_json() prints it (escape 1: with its quotes). */
static int jstring(Json *j, HBuf *out, int escape) {
    j->p++;
    if (escape && hput(out, "\"", 1) < 0)
        return -1;
    for (;;) {
        const char *start = j->p; /* a run of bytes printed as they are */
        while (*j->p != '"' && *j->p != '\\')
            j->p++;
        if (j->p > start && hput(out, start, j->p - start) < 0)
            return -1;
        if (*j->p == '"') {
            j->p++;
            break;
        }
        if (jput(out, jnext(j), escape) < 0) /* an escape */
            return -1;
    }
    return escape ? hput(out, "\"", 1) : 0;
}

static int jescape(HBuf *out, const char *s, size_t n) {
    if (hput(out, "\"", 1) < 0)
        return -1;
    for (size_t i = 0; i < n; i++)
        if (jput(out, (unsigned char)s[i], 1) < 0)
            return -1;
    return hput(out, "\"", 1);
}

typedef struct {
    size_t key, key_len, value, value_len; /* offsets in the level's two buffers */
    size_t order;
} JMember;

/* Buffers for each nesting level, kept from one document to the next. */
typedef struct {
    HBuf keys, values;
    JMember *members;
    size_t cap;
} JLevel;

typedef struct {
    HBuf out;
    JLevel levels[JSON_MAX_DEPTH + 2];
} JScratch;

static void jscratch_free(JScratch *js) {
    free(js->out.data);
    for (int i = 0; i < JSON_MAX_DEPTH + 2; i++) {
        free(js->levels[i].keys.data);
        free(js->levels[i].values.data);
        free(js->levels[i].members);
    }
}

/* jsonb's order: shorter keys first, then bytewise; among equal keys the later first */
static int jmember_after(const JMember *a, const JMember *b, const char *keys) {
    if (a->key_len != b->key_len)
        return a->key_len > b->key_len;
    int res = memcmp(keys + a->key, keys + b->key, a->key_len);
    return res ? res > 0 : a->order < b->order;
}

static int jnorm(Json *j, HBuf *out, JScratch *js, int depth);

static int jnorm_object(Json *j, HBuf *out, JScratch *js, int depth) {
    JLevel *level = &js->levels[depth];
    HBuf *keys = &level->keys, *values = &level->values;
    size_t count = 0;
    keys->len = values->len = 0;
    j->p++;
    json_space(j);
    while (*j->p != '}') {
        if (count == level->cap) {
            size_t cap = level->cap ? level->cap * 2 : 16;
            JMember *grown = realloc(level->members, cap * sizeof(JMember));
            if (!grown)
                return -1;
            level->members = grown;
            level->cap = cap;
        }
        JMember *m = &level->members[count];
        m->order = count;
        m->key = keys->len;
        if (jstring(j, keys, 0) < 0)
            return -1;
        m->key_len = keys->len - m->key;
        json_space(j);
        j->p++; /* : */
        m->value = values->len;
        if (jnorm(j, values, js, depth + 1) < 0)
            return -1;
        m->value_len = values->len - m->value;
        count++;
        json_space(j);
        if (*j->p == ',') {
            j->p++;
            json_space(j);
        }
    }
    j->p++;
    JMember *members = level->members;
    for (size_t i = 1; i < count; i++) { /* insertion sort: one level's keys, usually few */
        JMember item = members[i];
        size_t k = i;
        while (k > 0 && jmember_after(&members[k - 1], &item, keys->data)) {
            members[k] = members[k - 1];
            k--;
        }
        members[k] = item;
    }
    if (hput(out, "{", 1) < 0)
        return -1;
    for (size_t i = 0, written = 0; i < count; i++) {
        JMember *m = &members[i];
        if (i && m->key_len == members[i - 1].key_len &&
            memcmp(keys->data + m->key, keys->data + members[i - 1].key, m->key_len) == 0)
            continue; /* an earlier duplicate: the later one was kept */
        if ((written++ && hput(out, ", ", 2) < 0) ||
            jescape(out, keys->data + m->key, m->key_len) < 0 || hput(out, ": ", 2) < 0 ||
            hput(out, values->data + m->value, m->value_len) < 0)
            return -1;
    }
    return hput(out, "}", 1);
}

static int jnorm(Json *j, HBuf *out, JScratch *js, int depth) {
    json_space(j);
    char c = *j->p;
    if (c == '{')
        return jnorm_object(j, out, js, depth);
    if (c == '[') {
        j->p++;
        json_space(j);
        if (hput(out, "[", 1) < 0)
            return -1;
        for (int first = 1; *j->p != ']'; first = 0) {
            if ((!first && hput(out, ", ", 2) < 0) || jnorm(j, out, js, depth + 1) < 0)
                return -1;
            json_space(j);
            if (*j->p == ',')
                j->p++;
            json_space(j);
        }
        j->p++;
        return hput(out, "]", 1);
    }
    if (c == '"')
        return jstring(j, out, 1);
    const char *start = j->p; /* a literal or an integer */
    while (j->p < j->end && (*j->p == '-' || (*j->p >= '0' && *j->p <= '9') ||
                             (*j->p >= 'a' && *j->p <= 'z')))
        j->p++;
    if (j->p - start == 2 && start[0] == '-' && start[1] == '0')
        return hput(out, "0", 1);
    return hput(out, start, j->p - start);
}

/* --- one value's hash ------------------------------------------------------------------ */

/* The hash PostgreSQL computes for the value the copy stores: 1 done, 0 not a clean value
 * (the Python path decides), -1 out of memory. */
static int value_hash(const Column *col, const Raw *raw, uint64_t seed, JScratch *scratch,
                      uint64_t *hash) {
    if (misfiled(col, raw))
        return 0;
    if (raw->type == R_NULL) {
        *hash = seed;
        return 1;
    }
    if (col->kind == K_INT || col->kind == K_BOOL) {
        if (raw->type != R_INT || (col->kind == K_BOOL && raw->i != 0 && raw->i != 1))
            return 0;
        *hash = pg_hash_int8(raw->i, seed);
        return 1;
    }
    if (col->kind == K_DECIMAL) {
        Decimal d;
        if (!round_decimal(&d, raw, (int)col->a, (int)col->b))
            return 0;
        char out[96];
        int o = 0, places = d.places, len = d.len, whole = len - places;
        if (d.negative && len) /* numeric has no negative zero */
            out[o++] = '-';
        if (whole <= 0) {
            out[o++] = '0';
        } else {
            memcpy(out + o, d.digits, whole);
            o += whole;
        }
        if (places > 0) {
            out[o++] = '.';
            for (int i = whole; i < 0; i++)
                out[o++] = '0';
            int from = whole > 0 ? whole : 0;
            memcpy(out + o, d.digits + from, len - from);
            o += len - from;
        }
        *hash = pg_hash_bytes((const unsigned char *)out, o, seed);
        return 1;
    }
    if (raw->type != R_BYTES)
        return 0;
    const char *s = raw->s ? raw->s : "";
    Py_ssize_t n = raw->n;
    switch (col->kind) {
    case K_TEXT:
        if (utf8_chars((const unsigned char *)s, n) < 0)
            return 0;
        *hash = pg_hash_bytes((const unsigned char *)s, n, seed);
        return 1;
    case K_UUID: {
        if (!valid_uuid_hex(s, n))
            return 0;
        unsigned char bytes[16];
        for (int i = 0; i < 16; i++)
            bytes[i] = (unsigned char)(hexval(s[2 * i]) * 16 + hexval(s[2 * i + 1]));
        *hash = pg_hash_bytes(bytes, 16, seed);
        return 1;
    }
    case K_DATETIME: {
        if (!valid_datetime(s, n))
            return 0;
        int h = 0, mi = 0, se = 0, frac = 0;
        digits(s + 11, 2, &h);
        digits(s + 14, 2, &mi);
        digits(s + 17, 2, &se);
        if (n == 26)
            digits(s + 20, 6, &frac);
        long long us = ((pg_days(s) * 24 + h) * 60 + mi) * 60 + se;
        *hash = pg_hash_int8(us * 1000000 + frac, seed);
        return 1;
    }
    case K_DATE:
        if (n != 10 || !valid_date(s))
            return 0;
        *hash = pg_hash_int8(pg_days(s), seed);
        return 1;
    case K_JSON: {
        if (utf8_chars((const unsigned char *)s, n) < 0 || !clean_json(s, n))
            return 0;
        Json j = {s, s + n};
        scratch->out.len = 0;
        if (jnorm(&j, &scratch->out, scratch, 0) < 0)
            return -1;
        *hash = pg_hash_bytes((const unsigned char *)scratch->out.data, scratch->out.len, seed);
        return 1;
    }
    case K_IP: { /* inet's varlena data: family, bits, address */
        unsigned char bytes[18];
        unsigned int groups[8];
        if (valid_ipv4(s, n)) {
            int octet = 0;
            bytes[0] = 2, bytes[1] = 32, bytes[2] = 0;
            for (Py_ssize_t i = 0; i < n; i++) {
                if (s[i] == '.')
                    bytes[2 + ++octet] = 0;
                else
                    bytes[2 + octet] = (unsigned char)(bytes[2 + octet] * 10 + (s[i] - '0'));
            }
            *hash = pg_hash_bytes(bytes, 6, seed);
            return 1;
        }
        if (!canonical_ipv6(s, n, groups))
            return 0;
        bytes[0] = 3, bytes[1] = 128;
        for (int i = 0; i < 8; i++) {
            bytes[2 + 2 * i] = (unsigned char)(groups[i] >> 8);
            bytes[3 + 2 * i] = (unsigned char)(groups[i] & 0xff);
        }
        *hash = pg_hash_bytes(bytes, 18, seed);
        return 1;
    }
    }
    return 0;
}

/* --- a table's range sums --------------------------------------------------------------- */

enum { SUMS_OK, SUMS_UNCLEAN, SUMS_NO_MEMORY, SUMS_SQLITE, SUMS_PYTHON };

static PyObject *range_sums(PyObject *self, PyObject *args) {
    const char *uri, *sql;
    PyObject *spec, *skip;
    Py_ssize_t pk_index, nbuckets;
    int mode;
    long long low, width;
    if (!PyArg_ParseTuple(args, "ssOniLLnO", &uri, &sql, &spec, &pk_index, &mode, &low, &width,
                          &nbuckets, &skip))
        return NULL;
    if (!PyTuple_Check(spec) || width < 1 || (mode == 1 && nbuckets != 4096) || nbuckets < 1 ||
        nbuckets > (1 << 20)) {
        PyErr_SetString(PyExc_ValueError, "range_sums: bad spec, width or buckets");
        return NULL;
    }
    Py_ssize_t ncols = PyTuple_GET_SIZE(spec);
    Column *columns = PyMem_Calloc(ncols ? ncols : 1, sizeof(Column));
    unsigned long long *counts = PyMem_Calloc(nbuckets, sizeof *counts);
    uint64_t *sums = PyMem_Calloc(nbuckets, sizeof *sums);
    sqlite3 *db = NULL;
    sqlite3_stmt *stmt = NULL;
    PyObject *result = NULL;
    JScratch *scratch = calloc(1, sizeof(JScratch));
    if (!columns || !counts || !sums) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < ncols; i++) {
        Column *col = &columns[i];
        if (!PyArg_ParseTuple(PyTuple_GET_ITEM(spec, i), "iLLi", &col->kind, &col->a, &col->b,
                              &col->storage))
            goto done;
    }
    /* one thread uses this connection: no mutex around every column read */
    int flags = SQLITE_OPEN_READONLY | SQLITE_OPEN_URI | SQLITE_OPEN_NOMUTEX;
    if (sqlite3_open_v2(uri, &db, flags, NULL) != SQLITE_OK) {
        sqlite_error(db, "cannot open the SQLite source");
        goto done;
    }
    sqlite3_busy_timeout(db, 5000);
    if (sqlite3_prepare_v2(db, sql, -1, &stmt, NULL) != SQLITE_OK) {
        sqlite_error(db, "cannot read the SQLite source");
        goto done;
    }
    if (sqlite3_column_count(stmt) != ncols || pk_index < 0 || pk_index >= ncols) {
        PyErr_SetString(PyExc_ValueError, "the SELECT and the spec differ in columns");
        goto done;
    }
    int status = SUMS_OK, gil_free = skip == Py_None;
    unsigned long long rows = 0;
    PyThreadState *released = gil_free ? PyEval_SaveThread() : NULL;
    for (;;) {
        int step = sqlite3_step(stmt);
        if (step == SQLITE_DONE)
            break;
        if (step != SQLITE_ROW) {
            status = SUMS_SQLITE;
            break;
        }
        Raw pk;
        raw_from_sqlite(&pk, stmt, (int)pk_index);
        if (!gil_free) { /* quarantined keys, matched as the copy's Reader matches them */
            PyObject *value = raw_object(&pk);
            int found = value ? PySet_Contains(skip, value) : -1;
            raw_release(&pk);
            if (found < 0) {
                status = SUMS_PYTHON;
                break;
            }
            if (found)
                continue;
            raw_from_sqlite(&pk, stmt, (int)pk_index);
        }
        long long bucket;
        if (mode == 0) {
            if (pk.type != R_INT || pk.i < low || (bucket = (pk.i - low) / width) >= nbuckets) {
                status = SUMS_UNCLEAN;
                break;
            }
        } else {
            if (pk.type != R_BYTES || !valid_uuid_hex(pk.s, pk.n)) {
                status = SUMS_UNCLEAN;
                break;
            }
            bucket = hexval(pk.s[0]) * 256 + hexval(pk.s[1]) * 16 + hexval(pk.s[2]);
        }
        uint64_t row = 0;
        for (Py_ssize_t c = 0; c < ncols && status == SUMS_OK; c++) {
            Raw raw;
            uint64_t hash = 0;
            raw_from_sqlite(&raw, stmt, (int)c);
            int ok = value_hash(&columns[c], &raw, (uint64_t)(c + 1), scratch, &hash);
            if (ok <= 0)
                status = ok < 0 ? SUMS_NO_MEMORY : SUMS_UNCLEAN;
            row ^= hash;
        }
        if (status != SUMS_OK)
            break;
        counts[bucket]++;
        sums[bucket] += row;
        rows++;
    }
    if (released)
        PyEval_RestoreThread(released);
    if (status == SUMS_SQLITE) {
        sqlite_error(db, "reading the SQLite source failed");
        goto done;
    }
    if (status == SUMS_NO_MEMORY)
        PyErr_NoMemory();
    if (status == SUMS_NO_MEMORY || status == SUMS_PYTHON)
        goto done;
    if (status == SUMS_UNCLEAN) {
        result = Py_None;
        Py_INCREF(result);
        goto done;
    }
    PyObject *ranges = PyList_New(0);
    if (!ranges)
        goto done;
    for (Py_ssize_t b = 0; b < nbuckets; b++) {
        if (!counts[b])
            continue;
        PyObject *item = mode == 0 ? Py_BuildValue("(nKK)", b, counts[b], (unsigned long long)sums[b])
                                   : PyUnicode_FromFormat("%03x", (int)b);
        if (item && mode == 1) {
            PyObject *key = item;
            item = Py_BuildValue("(NKK)", key, counts[b], (unsigned long long)sums[b]);
        }
        if (!item || PyList_Append(ranges, item) < 0) {
            Py_XDECREF(item);
            Py_DECREF(ranges);
            goto done;
        }
        Py_DECREF(item);
    }
    result = Py_BuildValue("(KN)", rows, ranges);
done:
    if (stmt)
        sqlite3_finalize(stmt);
    if (db)
        sqlite3_close(db);
    if (scratch)
        jscratch_free(scratch);
    free(scratch);
    PyMem_Free(columns);
    PyMem_Free(counts);
    PyMem_Free(sums);
    return result;
}


/* hash_rows(rows, spec) -> [row hash | None, ...]: range_sums' row hashes of rows already
 * fetched (None: a value outside the clean forms); the tests compare them with
 * PostgreSQL's. */
static PyObject *hash_rows(PyObject *self, PyObject *args) {
    PyObject *rows, *spec;
    if (!PyArg_ParseTuple(args, "O!O!", &PyList_Type, &rows, &PyTuple_Type, &spec))
        return NULL;
    Py_ssize_t ncols = PyTuple_GET_SIZE(spec);
    Column *columns = PyMem_Calloc(ncols ? ncols : 1, sizeof(Column));
    PyObject *out = PyList_New(0);
    JScratch *scratch = calloc(1, sizeof(JScratch));
    if (!columns || !out)
        goto error;
    for (Py_ssize_t i = 0; i < ncols; i++) {
        Column *col = &columns[i];
        if (!PyArg_ParseTuple(PyTuple_GET_ITEM(spec, i), "iLLi", &col->kind, &col->a, &col->b,
                              &col->storage))
            goto error;
    }
    for (Py_ssize_t r = 0; r < PyList_GET_SIZE(rows); r++) {
        PyObject *row = PyList_GET_ITEM(rows, r);
        if (!PyTuple_Check(row) || PyTuple_GET_SIZE(row) != ncols) {
            PyErr_SetString(PyExc_TypeError, "each row must be a tuple with every column");
            goto error;
        }
        uint64_t hash = 0;
        int ok = 1;
        for (Py_ssize_t c = 0; c < ncols && ok == 1; c++) {
            Raw raw;
            uint64_t one = 0;
            raw_from_object(&raw, PyTuple_GET_ITEM(row, c));
            ok = value_hash(&columns[c], &raw, (uint64_t)(c + 1), scratch, &one);
            hash ^= one;
        }
        if (ok < 0) {
            PyErr_NoMemory();
            goto error;
        }
        PyObject *item = ok ? PyLong_FromUnsignedLongLong(hash) : Py_NewRef(Py_None);
        if (!item || PyList_Append(out, item) < 0) {
            Py_XDECREF(item);
            goto error;
        }
        Py_DECREF(item);
    }
    if (scratch)
        jscratch_free(scratch);
    free(scratch);
    PyMem_Free(columns);
    return out;
error:
    if (scratch)
        jscratch_free(scratch);
    free(scratch);
    PyMem_Free(columns);
    Py_XDECREF(out);
    return NULL;
}

static PyMethodDef methods[] = {
    {"format_rows", format_rows, METH_VARARGS,
     "format_rows(rows, spec, skip, pk_index, binary=False) -> (bytes, fallback indexes, "
     "skipped count)"},
    {"hash_rows", hash_rows, METH_VARARGS,
     "hash_rows(rows, spec) -> [row hash (as range_sums sums them) or None, ...]"},
    {"range_sums", range_sums, METH_VARARGS,
     "range_sums(uri, select, spec, pk_index, mode, low, width, buckets, skip) -> None (a "
     "value outside the clean forms) or (rows, [(bucket, count, sum mod 2**64), ...])"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_copytext", "COPY text for clean SQLite values.", -1, methods,
};

PyMODINIT_FUNC PyInit__copytext(void) {
    if (PyType_Ready(&ReaderType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m)
        return NULL;
    Py_INCREF(&ReaderType);
    if (PyModule_AddObject(m, "Reader", (PyObject *)&ReaderType) < 0) {
        Py_DECREF(&ReaderType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
