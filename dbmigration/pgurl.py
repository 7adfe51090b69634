"""PostgreSQL URLs checked before use: one that would fail later or name another database."""

from __future__ import annotations

from urllib.parse import unquote, urlsplit


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
