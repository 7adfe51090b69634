"""Run Django's ``migrate`` on the PostgreSQL target with ``default`` pointing at it.

Started by migration_prepare (prepare._create_schema) as ``python -m dbmigration.schema_child``
with the project's DJANGO_SETTINGS_MODULE and a JSON payload on stdin:
``{"target": <the target alias's settings dict>, "target_alias": ..., "source_alias": ...,
"source_path": ...}``.  Before Django sets up, it rewrites DATABASES:

- ``default`` and the target alias become the target, so data migrations (RunPython writing
  through the default manager) and the post_migrate handlers write to PostgreSQL, in the
  same connection and transaction as the schema changes they depend on;
- every SQLite alias on the source file is opened with ``mode=ro``, so anything that still
  reaches the source (a router, an explicit ``using="sqlite"``) fails instead of writing.

Writes one JSON line to stdout: the migrations applied and migrate's last lines, or
``{"error": ...}`` with the traceback on stderr.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import traceback
from pathlib import Path

SQLITE_ENGINE = "django.db.backends.sqlite3"


def read_only_name(path: str) -> str:
    """An SQLite URI that opens the file read-only (Django's SQLite backend passes uri=True)."""
    return Path(path).resolve().as_uri() + "?mode=ro"


def _same_file(name, path: Path) -> bool:
    if not name or str(name).startswith("file:") or str(name) == ":memory:":
        return False
    return Path(name).resolve() == path


def repoint(databases: dict, *, target: dict, target_alias: str, source_alias: str, source_path):
    """Rewrite DATABASES in place: default -> target, the source file -> read-only."""
    source_path = Path(source_path).resolve()
    for alias, config in databases.items():
        if config.get("ENGINE") != SQLITE_ENGINE:
            continue
        if alias == source_alias or _same_file(config.get("NAME"), source_path):
            options = dict(config.get("OPTIONS") or {})
            # a read-only connection cannot switch the journal mode or take a write lock
            options.pop("init_command", None)
            options.pop("transaction_mode", None)
            databases[alias] = {**config, "NAME": read_only_name(source_path), "OPTIONS": options}
    databases["default"] = dict(target)
    databases[target_alias] = dict(target)


def main() -> int:
    payload = json.load(sys.stdin)
    from django.conf import settings

    repoint(
        settings.DATABASES,  # reading it loads the settings module; no connection exists yet
        target=payload["target"],
        target_alias=payload["target_alias"],
        source_alias=payload["source_alias"],
        source_path=payload["source_path"],
    )
    import django

    try:
        django.setup()
        from django.core.management import call_command
        from django.db import connections
        from django.db.migrations.executor import MigrationExecutor

        executor = MigrationExecutor(connections["default"])
        pending = executor.migration_plan(executor.loader.graph.leaf_nodes())
        out = io.StringIO()
        with contextlib.redirect_stdout(sys.stderr):  # a migration's print() must not mix in
            call_command("migrate", database="default", interactive=False, verbosity=1, stdout=out)
    except Exception as exc:  # reported to the parent, which raises its own TargetError
        traceback.print_exc()
        first_line = (str(exc).strip().splitlines() or [""])[0]
        print(json.dumps({"error": f"{type(exc).__name__}: {first_line}"}))
        return 1
    print(
        json.dumps(
            {
                "migrations_applied": [f"{m.app_label}.{m.name}" for m, _ in pending],
                "migrate_output": out.getvalue().strip().splitlines()[-20:],
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
