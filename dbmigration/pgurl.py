"""PostgreSQL URLs checked before use: one that would fail later or name another database."""

from __future__ import annotations

from urllib.parse import parse_qsl, unquote, urlsplit


class BadPostgresUrl(ValueError):
    """A PostgreSQL URL that would fail later, or silently point at another database."""


SCHEMES = ("postgres", "postgresql")
# characters that end the password early unless percent-encoded
RESERVED_IN_PASSWORD = "'/' as %2F, '#' as %23, '?' as %3F, '@' as %40"


def check_postgres_url(url: str, *, name: str = "POSTGRES_URL") -> str:
    """Return url if it names one PostgreSQL database unambiguously; else raise BadPostgresUrl.

    Messages name the variable (or option), the problem and the fix; never the password.
    """
    example = "postgres://USER:PASSWORD@HOST:5432/DATABASE"
    scheme, sep, _ = url.partition("://")
    if not sep or scheme.lower() not in SCHEMES:
        raise BadPostgresUrl(
            f"{name} must start with postgres:// or postgresql://; write it as {example}."
        )
    parts = urlsplit(url)
    if "@" not in parts.netloc and "@" in url[len(scheme) + 3 + len(parts.netloc) :]:
        # e.g. a '/' in the password ended the host part early: it would connect elsewhere
        raise BadPostgresUrl(
            f"{name} has a character in its user or password that must be percent-encoded "
            f"({RESERVED_IN_PASSWORD}); encode it and retry."
        )
    try:
        port = parts.port
    except ValueError:  # not a number, or above 65535
        port = -1
    if port is not None and not 1 <= port <= 65535:
        raise BadPostgresUrl(
            f"{name} has a port that is not a number from 1 to 65535; write it as {example}."
        )
    database = unquote(parts.path.lstrip("/"))
    if not database:
        raise BadPostgresUrl(f"{name} names no database; add it after the host, as in {example}.")
    if "/" in database:
        raise BadPostgresUrl(
            f"{name} names the database {database!r}, which holds a '/'; write it as {example}."
        )
    return url


# libpq's sslmodes, weakest first; only verify-full checks both the certificate and the name
SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
ALLOW_REQUIRE_VARIABLE = "POSTGRES_ALLOW_SSLMODE_REQUIRE"


def effective_sslmode(url: str, *, environ: dict) -> str:
    """The sslmode libpq will use for url: its query, else PGSSLMODE, else libpq's 'prefer'."""
    query = dict(parse_qsl(urlsplit(url).query))
    return query.get("sslmode") or environ.get("PGSSLMODE") or "prefer"


def _over_unix_socket(url: str) -> bool:
    parts = urlsplit(url)
    host = dict(parse_qsl(parts.query)).get("host") or unquote(parts.hostname or "")
    return not host or host.startswith("/")


def check_verified_tls(
    url: str, *, name: str, profile: str, allow_require: bool, environ: dict
) -> None:
    """Raise BadPostgresUrl unless connecting to url verifies the server (sslmode=verify-full).

    ``allow_require`` (POSTGRES_ALLOW_SSLMODE_REQUIRE) also accepts ``require``: encrypted,
    but the server's certificate is not checked.  A Unix socket never leaves the machine and
    libpq ignores sslmode there, so socket URLs pass.
    """
    if _over_unix_socket(url):
        return
    mode = effective_sslmode(url, environ=environ)
    accepted = ("require", "verify-full") if allow_require else ("verify-full",)
    if mode in accepted:
        return
    if "sslmode" in dict(parse_qsl(urlsplit(url).query)):
        how = "in the URL"
    else:
        how = "from PGSSLMODE" if environ.get("PGSSLMODE") else "libpq's default: none is given"
    if mode not in SSLMODES:
        problem = f"has sslmode={mode!r}, which libpq does not know"
    elif SSLMODES.index(mode) < SSLMODES.index("require"):
        problem = f"has sslmode={mode} ({how}), which may connect without encryption"
    else:
        problem = f"has sslmode={mode} ({how}), which does not verify the server's certificate"
    raise BadPostgresUrl(
        f"{name} {problem}; the {profile} profile needs ?sslmode=verify-full&sslrootcert="
        f"/path/to/ca.crt (or {ALLOW_REQUIRE_VARIABLE}=true to accept sslmode=require)."
    )
