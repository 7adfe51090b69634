"""Run Django's migrations on the PostgreSQL target with ``default`` pointing at it.

Used by migration_prepare (apply every migration) and by rollback_to_sqlite --drop-postgres
(unapply every migration).  Why a child process: data migrations (RunPython, forwards or
backwards) write through ``default`` and the routers, which in the command's own process
point at the SQLite source.  Repointing ``default`` in a running process is not safe (open
connections, cached routers, signal receivers that captured an alias), so the child starts
from the project's settings and, before Django sets up, rewrites DATABASES:

- ``default`` and the target alias become the target, so data migrations and the
  post_migrate handlers write to PostgreSQL, in the same connection and transaction as the
  schema changes they depend on;
- every SQLite alias on the source file is opened with ``mode=ro``, so anything that still
  reaches the source fails instead of writing.  Routers stay: one that answers None sends
  writes to ``default`` (the target); one that names the source alias meets the read-only
  file.

The parent (``migrate_target``) sends a JSON payload on stdin and reads one JSON line back:
the migrations done and migrate's last lines, or ``{"error": ...}`` with the traceback on
stderr, which goes to the run's log, never to the operator's screen.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

SQLITE_ENGINE = "django.db.backends.sqlite3"


# --- the parent side -------------------------------------------------------------------------


def migrate_target(
    *,
    target_alias: str,
    source_path: Path,
    unapply: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Apply (or with ``unapply``, undo) every migration on the target; raise TargetError."""
    from django.conf import settings
    from django.db import connections

    from dbmigration import conf
    from dbmigration.errors import MigrationError, TargetError

    # override_settings() hides SETTINGS_MODULE; the environment still names the module
    settings_module = os.environ.get("DJANGO_SETTINGS_MODULE") or settings.SETTINGS_MODULE
    if not settings_module:
        raise MigrationError(
            "Migrating the target needs DJANGO_SETTINGS_MODULE (it runs in a child process). "
            "Fix: run the command through manage.py (or set the variable)."
        )
    target = {k: v for k, v in connections[target_alias].settings_dict.items() if k != "TEST"}
    payload = {
        "target": target,
        "target_alias": target_alias,
        "source_alias": conf.SOURCE_ALIAS,
        "source_path": str(Path(source_path).resolve()),
        "unapply": unapply,
    }
    proc = subprocess.run(
        [sys.executable, "-m", "dbmigration.schema_child"],
        input=json.dumps(payload, default=str),
        capture_output=True,
        text=True,
        env={
            **os.environ,
            "DJANGO_SETTINGS_MODULE": settings_module,
            "PYTHONPATH": os.pathsep.join(p for p in sys.path if p),
        },
        check=False,
    )
    lines = proc.stdout.strip().splitlines()
    try:
        outcome = json.loads(lines[-1]) if lines else {}
    except json.JSONDecodeError:
        outcome = {}
    if proc.returncode != 0 or not outcome or "error" in outcome:
        error = outcome.get("error") or (proc.stderr.strip().splitlines() or ["no output"])[-1]
        if log:
            log(f"migrations in the schema child failed:\n{proc.stderr}")
        raise TargetError(_failure(error, unapply=unapply))
    return outcome


def _failure(error: str, *, unapply: bool) -> str:
    again = "rollback_to_sqlite --drop-postgres" if unapply else "migration_prepare"
    if "readonly database" in error:
        return (
            f"A migration tried to write to the SQLite source while it ran on PostgreSQL "
            f"({error}); the source is kept read-only then, so nothing was written there. Fix: "
            "make that data migration use schema_editor.connection.alias (or the default "
            f"manager), then run {again} again."
        )
    return (
        f"Django's migrations on the PostgreSQL target failed: {error}. The SQLite source was "
        "open read-only and is unchanged; each migration that failed was rolled back. Fix the "
        f"migration (the log has the traceback), then run {again} again."
    )


# --- the child side --------------------------------------------------------------------------


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


def _migrate(unapply: bool) -> dict:
    from django.core.management import call_command
    from django.db import connections
    from django.db.migrations.executor import MigrationExecutor

    executor = MigrationExecutor(connections["default"])
    if unapply:
        targets = [(app, None) for app in sorted(executor.loader.migrated_apps)]
        plan = executor.migration_plan(targets)
        executor.migrate(targets, plan=plan)
        return {"migrations_unapplied": [f"{m.app_label}.{m.name}" for m, _ in plan]}
    plan = executor.migration_plan(executor.loader.graph.leaf_nodes())
    out = io.StringIO()
    call_command("migrate", database="default", interactive=False, verbosity=1, stdout=out)
    # DatabaseCache tables are part of the schema a project deploys but no migration makes
    # them; without one, every cached view fails on PostgreSQL after the switch
    call_command("createcachetable", database="default", verbosity=0)
    return {
        "migrations_applied": [f"{m.app_label}.{m.name}" for m, _ in plan],
        "migrate_output": out.getvalue().strip().splitlines()[-20:],
    }


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
        with contextlib.redirect_stdout(sys.stderr):  # a migration's print() must not mix in
            outcome = _migrate(bool(payload.get("unapply")))
    except Exception as exc:  # reported to the parent, which raises its own TargetError
        traceback.print_exc()
        first_line = (str(exc).strip().splitlines() or [""])[0]
        print(json.dumps({"error": f"{type(exc).__name__}: {first_line}"}))
        return 1
    print(json.dumps(outcome))
    return 0


if __name__ == "__main__":
    sys.exit(main())
