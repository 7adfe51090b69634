"""The engine's settings: one ``DBMIGRATION`` dict in the project's Django settings.

Every key is optional::

    DBMIGRATION = {
        "STATE_DIR": BASE_DIR / "database",   # state.json, backups/, reports/, logs/ go here
        "STATE_FILE": ...,                    # default STATE_DIR / "state.json"
        "BACKUP_DIR": ...,                    # default STATE_DIR / "backups"
        "REPORT_DIR": ...,                    # default STATE_DIR / "reports"
        "LOG_DIR": ...,                       # default STATE_DIR / "logs"
        "SQLITE_PATH": ...,                   # default: the 'sqlite' alias's NAME
        "POOL_MAX": 10,                       # connections per app process (max_connections check)
        "WORKERS": 1,                         # app processes sharing the server (gunicorn workers)
        "PGBOUNCER_POOL": None,               # server connections PgBouncer opens (pgbouncer mode)
        "MODEL_POLICIES": {},                 # per-model handling, see model_policies()
        "PROCESS_BACKEND": None,              # dotted path: callable -> backend this process uses
        "SLOW_QUERIES": None,                 # dotted path: callable(window_s) -> slow query count
        "PITR": {},                           # pgBackRest point-in-time recovery, see pitr()
        "REPLICAS": None,                     # dotted path: callable -> replicas' lag, rotation
        "SECURITY": None,                     # dotted path: callable -> unresolved findings
    }

The engine's database aliases are named after the backends: ``sqlite`` (the source) and
``postgresql`` (the target); ``default`` follows the active one (see the README).

Every module of the engine reads its settings here and nowhere else.  The path keys also
accept a top-level Django setting of the same name when the dict leaves them out
(propcore's own layout, which its tests override one by one).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

SOURCE_ALIAS = "sqlite"
TARGET_ALIAS = "postgresql"

# per-model policies (MODEL_POLICIES values)
COPY = "copy"  # the default: every row is copied and verified
SKIP = "skip"  # not copied, verified, synced or carried back; `rebuild` (a command) refills it

_PATH_DEFAULTS = {
    "STATE_FILE": "state.json",
    "BACKUP_DIR": "backups",
    "REPORT_DIR": "reports",
    "LOG_DIR": "logs",
}


def _options() -> dict:
    options = getattr(settings, "DBMIGRATION", None) or {}
    if not isinstance(options, dict):
        raise ImproperlyConfigured("settings.DBMIGRATION must be a dict (see dbmigration/conf.py).")
    return options


def sqlite_path() -> Path:
    """The SQLite source file."""
    options = _options()
    if options.get("SQLITE_PATH"):
        return Path(options["SQLITE_PATH"])
    if getattr(settings, "SQLITE_PATH", None):
        return Path(settings.SQLITE_PATH)
    source = settings.DATABASES.get(SOURCE_ALIAS)
    if not source:
        raise ImproperlyConfigured(
            f"DATABASES has no '{SOURCE_ALIAS}' alias: add it (the SQLite source) or set "
            "DBMIGRATION['SQLITE_PATH']."
        )
    return Path(source["NAME"])


def state_dir() -> Path:
    """Where the state file, backups, reports and logs go unless set one by one."""
    options = _options()
    if options.get("STATE_DIR"):
        return Path(options["STATE_DIR"])
    return sqlite_path().resolve().parent / "dbmigration"


def _path(name: str) -> Path:
    options = _options()
    if options.get(name):
        return Path(options[name])
    if getattr(settings, name, None):
        return Path(getattr(settings, name))
    return state_dir() / _PATH_DEFAULTS[name]


def state_file() -> Path:
    return _path("STATE_FILE")


def backup_dir() -> Path:
    return _path("BACKUP_DIR")


def report_dir() -> Path:
    return _path("REPORT_DIR")


def log_dir() -> Path:
    return _path("LOG_DIR")


def pool_max() -> int:
    """Connections one application process may hold (sizes the max_connections check)."""
    return int(_options().get("POOL_MAX", 10))


def workers() -> int:
    """Application processes that each hold a pool of up to POOL_MAX connections."""
    return int(_options().get("WORKERS", 1))


def pgbouncer_pool() -> int | None:
    """Server connections PgBouncer may open (the app then holds none of its own), or None."""
    value = _options().get("PGBOUNCER_POOL")
    return None if value is None else int(value)


def hook(name: str):
    """The callable a dotted-path key names, or None."""
    from django.utils.module_loading import import_string

    path = _options().get(name)
    return import_string(path) if path else None


@dataclasses.dataclass(frozen=True)
class ModelPolicy:
    label: str  # app_label.ModelName
    policy: str  # COPY or SKIP
    rebuild: tuple[str, ...] = ()  # the management command (and arguments) that refills it
    reason: str = ""  # why: configured, or what the metadata showed


def configured_policies() -> dict[str, ModelPolicy]:
    """MODEL_POLICIES as ModelPolicy objects, keyed by lower-case model label.

    A value is a policy name or a dict: ``{"policy": "skip", "rebuild": ["update_index"]}``.
    """
    found = {}
    for label, value in (_options().get("MODEL_POLICIES") or {}).items():
        spec = {"policy": value} if isinstance(value, str) else dict(value)
        policy = spec.get("policy", COPY)
        if policy not in (COPY, SKIP):
            raise ImproperlyConfigured(
                f"DBMIGRATION['MODEL_POLICIES'][{label!r}]: unknown policy {policy!r}; use "
                f"'{COPY}' or '{SKIP}'."
            )
        rebuild = spec.get("rebuild") or ()
        found[label.lower()] = ModelPolicy(
            label=label,
            policy=policy,
            rebuild=(rebuild,) if isinstance(rebuild, str) else tuple(rebuild),
            reason=spec.get("reason", "configured in DBMIGRATION['MODEL_POLICIES']"),
        )
    return found


PITR_DEFAULTS = {
    "STANZA": "propcore",
    "CONFIG": None,  # default STATE_DIR / "pgbackrest" / "pgbackrest.conf"
    "REPO_PATH": None,  # default STATE_DIR / "pgbackrest" / "repo"
    "RETENTION_FULL": 2,  # full backups kept (their diffs, incrs and WAL expire with them)
    "RETENTION_DIFF": 7,  # differential backups kept
    # by age instead of count: keep the full backups whose recovery window covers N days
    "RETENTION_FULL_DAYS": None,
    "PROCESS_MAX": None,  # default: half the machine's cores, at least 1
    "COMPRESS_TYPE": "zst",
    "OS_USER": "postgres",  # pgbackrest runs as the server's OS user (it reads the data dir)
}


def pitr() -> dict:
    """DBMIGRATION['PITR'] with defaults filled in and paths resolved."""
    import os

    options = {**PITR_DEFAULTS, **(_options().get("PITR") or {})}
    unknown = set(options) - set(PITR_DEFAULTS)
    if unknown:
        raise ImproperlyConfigured(
            f"DBMIGRATION['PITR'] has unknown keys {sorted(unknown)}; "
            f"known: {sorted(PITR_DEFAULTS)}."
        )
    home = state_dir() / "pgbackrest"
    options["CONFIG"] = Path(options["CONFIG"] or home / "pgbackrest.conf")
    options["REPO_PATH"] = Path(options["REPO_PATH"] or home / "repo")
    options["PROCESS_MAX"] = int(options["PROCESS_MAX"] or max(1, (os.cpu_count() or 2) // 2))
    return options
