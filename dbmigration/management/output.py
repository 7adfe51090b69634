"""The one JSON shape every command's --json prints: top-level status/ok, stable keys, values."""

from __future__ import annotations

import json
from typing import Any


def json_document(*, status: str, **fields: Any) -> str:
    """Render a command's result: "status" and "ok" first, then the command's own keys."""
    return json.dumps({"status": status, "ok": status == "ok", **fields}, indent=2, default=str)


def thousands(n: int) -> str:
    """Write a count the way every command does: 76,439."""
    return f"{n:,}"


# tables no project writes: Django's bookkeeping and SQLite's own
_BOOKKEEPING = {"django_migrations", "sqlite_sequence", "sqlite_stat1", "sqlite_stat4"}
# named on its own: a backup holds it, a copy leaves it to migrate (verification compares it)
_MIGRATIONS = "django_migrations"


def _djangos_own_tables() -> set[str]:
    from django.apps import apps

    own = set(_BOOKKEEPING)
    for model in apps.get_models(include_auto_created=True):
        if model._meta.app_config.name.startswith("django."):
            own.add(model._meta.db_table)
    return own


def describe_rows(counts: dict[str, int]) -> str:
    """Say what a row total counts, the same way everywhere: project tables first, then
    Django's own (content types, permissions, sessions...), then django_migrations, e.g.
    "76,384 rows in 12 tables (+93 in 6 of Django's own tables, +38 in django_migrations)"."""
    own = _djangos_own_tables()
    ours = {t: n for t, n in counts.items() if t not in own}
    theirs = {t: n for t, n in counts.items() if t in own and t != _MIGRATIONS}
    text = f"{_rows(sum(ours.values()))} in {_tables(len(ours))}"
    extra = []
    if theirs:
        extra.append(f"+{sum(theirs.values()):,} in {len(theirs)} of Django's own tables")
    if _MIGRATIONS in counts:
        extra.append(f"+{counts[_MIGRATIONS]:,} in {_MIGRATIONS}")
    return f"{text} ({', '.join(extra)})" if extra else text


def _rows(n: int) -> str:
    return "1 row" if n == 1 else f"{n:,} rows"


def _tables(n: int) -> str:
    return "1 table" if n == 1 else f"{n:,} tables"
