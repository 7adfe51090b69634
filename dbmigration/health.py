"""The one set of health checks behind both ``db_health_check`` and ``/health/``.

Each check returns a ``CheckResult`` with status ok, degraded or down.  The command
maps the worst status to its exit code (0, 1, 2); ``propcore.health`` wraps each check
as a django-health-check check (down -> ServiceUnavailable, degraded -> ServiceWarning).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from django.conf import settings
from django.db import connections

from dbmigration import conf
from dbmigration.fence import describe_sqlite_fence, lift_orphaned_sqlite_fence
from dbmigration.freeze import freeze_path_for, inspect_freeze
from dbmigration.state import StateError, read_active_backend, read_state

OK, DEGRADED, DOWN = "ok", "degraded", "down"
SEVERITY = {OK: 0, DEGRADED: 1, DOWN: 2}  # also the command's exit status


@dataclasses.dataclass
class CheckResult:
    name: str
    status: str
    message: str
    details: dict = dataclasses.field(default_factory=dict)
    seconds: float = 0.0


@dataclasses.dataclass
class HealthReport:
    checks: list[CheckResult]

    @property
    def status(self) -> str:
        return max((c.status for c in self.checks), key=SEVERITY.__getitem__, default=OK)

    @property
    def exit_code(self) -> int:
        return SEVERITY[self.status]

    def to_dict(self) -> dict:
        return {
            "status": self.status,
            "ok": self.status == OK,
            "checked_at": datetime.now(UTC).isoformat(),
            "checks": [dataclasses.asdict(c) for c in self.checks],
        }


def _limit(name: str, default: float) -> float:
    """A threshold from settings (HEALTH_<NAME>), so operators tune them per profile."""
    return float(getattr(settings, f"HEALTH_{name}", default))


def process_backend() -> str:
    """The backend this process sends 'default' queries to: the project's hook
    (DBMIGRATION['PROCESS_BACKEND'], e.g. one that follows reloads), else the state file's."""
    reporter = conf.hook("PROCESS_BACKEND")
    return reporter() if reporter else read_active_backend(conf.state_file())


def _pg_connect(alias: str = "postgresql", *, timeout: int = 3):
    """A direct, short-timeout connection (not from the pool: a probe must not queue)."""
    import psycopg

    cfg = connections.settings[alias]
    params = {"dbname": cfg["NAME"], "connect_timeout": timeout, "autocommit": True}
    for key, name in (("USER", "user"), ("PASSWORD", "password"), ("HOST", "host")):
        if cfg.get(key):
            params[name] = cfg[key]
    if cfg.get("PORT"):
        params["port"] = int(cfg["PORT"])
    return psycopg.connect(**params)


def expected_tables() -> list[str]:
    """The tables the code's models live in: a backend without them does not really answer."""
    from dbmigration.plan import copied_models

    return sorted({model._meta.db_table for model in copied_models()})


def _probe(alias: str) -> tuple[float, list[str]]:
    """Run a trivial query on alias; return milliseconds and the model tables it lacks.

    Raises on failure.  Opens SQLite read-only, so a missing file is reported, not created.
    """
    start = time.perf_counter()
    wanted = expected_tables()
    if connections.settings[alias]["ENGINE"].endswith("sqlite3"):
        from dbmigration.sqlite_source import open_readonly

        conn = open_readonly(Path(connections.settings[alias]["NAME"]), timeout=3)
        try:
            present = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
        finally:
            conn.close()
    else:
        with _pg_connect(alias) as conn:
            present = {
                row[0]
                for row in conn.execute(
                    "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
                )
            }
    ms = round((time.perf_counter() - start) * 1000, 2)
    return ms, [name for name in wanted if name not in present]


# what to do when the active backend lost its tables
RESTORE_ADVICE = {
    "sqlite": "restore the file with db_restore (db_backup --list shows the backups)",
    "postgresql": "restore it from its last PostgreSQL backup with pg_restore (db_backup --list), "
    "or run rollback_to_sqlite --discard-postgres-writes",
}


def _error_text(exc: Exception) -> str:
    # first line only: psycopg messages carry DETAIL/HINT lines, never the password
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def check_active_backend() -> CheckResult:
    """The backend the state file names answers a query."""
    try:
        backend = read_active_backend(conf.state_file())
    except StateError as exc:
        return CheckResult("active_backend", DOWN, str(exc))
    try:
        ms, missing = _probe(backend)
    except Exception as exc:  # any failure to answer is 'down'; say which and why
        return CheckResult(
            "active_backend",
            DOWN,
            f"{backend} does not answer: {_error_text(exc)}",
            {"backend": backend},
        )
    if missing:
        return CheckResult(
            "active_backend",
            DOWN,
            f"{backend} answers but lacks {len(missing)} of the application's tables "
            f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); "
            f"{RESTORE_ADVICE[backend]}",
            {"backend": backend, "ms": ms, "missing_tables": missing},
        )
    return CheckResult(
        "active_backend", OK, f"{backend} answers in {ms} ms", {"backend": backend, "ms": ms}
    )


def check_process_backend() -> CheckResult:
    """This process uses the backend the state file names (not stale)."""
    try:
        wanted = read_active_backend(conf.state_file())
        on_file = read_state(conf.state_file()).active_backend
    except StateError as exc:
        return CheckResult("process_backend", DOWN, str(exc))
    using = process_backend()
    details = {"process": using, "state_file": on_file, "wanted": wanted, "stale": using != wanted}
    if using != wanted:
        return CheckResult(
            "process_backend",
            DOWN,
            f"stale: this process uses {using} but the state file says {wanted}; send it "
            "SIGHUP or restart it",
            details,
        )
    if wanted != on_file:
        return CheckResult(
            "process_backend",
            DEGRADED,
            f"process uses {using} by DATABASE_ACTIVE, overriding the state file ({on_file})",
            details,
        )
    return CheckResult("process_backend", OK, f"process uses {using}; not stale", details)


def check_migration_phase() -> CheckResult:
    """The runbook phase, and whether a write freeze is on."""
    try:
        state = read_state(conf.state_file())
    except StateError as exc:
        return CheckResult("migration_phase", DOWN, str(exc))
    details = {"phase": state.phase, "active_backend": state.active_backend}
    # a switch killed after fencing SQLite, before its flip: every write would be refused
    orphan = lift_orphaned_sqlite_fence(conf.sqlite_path(), state_file=conf.state_file())
    if orphan is not None:
        details["lifted_fence"] = lifted = describe_sqlite_fence(orphan)
        return CheckResult(
            "migration_phase",
            DEGRADED,
            f"phase {state.phase}; lifted the orphaned {lifted} (that switch was killed before "
            "its flip: no write reached PostgreSQL); writes go on on SQLite. Run "
            "switch_to_postgresql again.",
            details,
        )
    freeze = inspect_freeze(freeze_path_for(conf.state_file()))
    if freeze is not None:
        details["write_freeze"] = summary = freeze.summary()
        if summary["void"]:
            message = (
                f"phase {state.phase}; a write freeze by {freeze.owner} ({freeze.reason}) was "
                f"left over, void ({summary['void']}): writes go on, the next switch or "
                "rollback clears it"
            )
        else:
            message = (
                f"phase {state.phase}; writes frozen for {summary['age_seconds']:g} s by "
                f"{freeze.owner} ({freeze.reason}), renewed "
                f"{summary['renewed_seconds_ago']:g} s ago"
            )
        return CheckResult("migration_phase", DEGRADED, message, details)
    if (state.phase == "switched") != (state.active_backend == "postgresql"):
        return CheckResult(
            "migration_phase",
            DEGRADED,
            f"phase {state.phase} does not match the active backend {state.active_backend}",
            details,
        )
    return CheckResult(
        "migration_phase", OK, f"phase {state.phase}, active {state.active_backend}", details
    )


def check_backup_age() -> CheckResult:
    """The newest verified backup of the active backend is younger than the limit.

    Only backups of the active backend count: after the switch, a SQLite snapshot holds
    none of the writes made on PostgreSQL.  The limit is HEALTH_BACKUP_MAX_AGE_HOURS.
    """
    max_hours = _limit("BACKUP_MAX_AGE_HOURS", 26.0)
    from dbmigration.backup import last_verified_backup

    try:
        backend = read_active_backend(conf.state_file())
    except StateError as exc:
        return CheckResult("backup_age", DOWN, str(exc))
    info = last_verified_backup(conf.backup_dir(), kind=backend)
    if info is None:
        other = "sqlite" if backend == "postgresql" else "postgresql"
        return CheckResult(
            "backup_age",
            DEGRADED,
            f"no verified {backend} backup under {conf.backup_dir()} (backups of {other} "
            "do not count); run db_backup",
            {"backend": backend},
        )
    created = datetime.fromisoformat(info.created_at)
    if created.tzinfo is None:
        created = created.replace(tzinfo=UTC)
    hours = round((datetime.now(UTC) - created).total_seconds() / 3600, 2)
    details = {"backend": backend, "backup": str(info.path), "age_hours": hours}
    if hours > max_hours:
        return CheckResult(
            "backup_age",
            DEGRADED,
            f"last verified {backend} backup is {hours} h old (limit {max_hours:g} h); "
            "run db_backup",
            details,
        )
    return CheckResult("backup_age", OK, f"last verified {backend} backup {hours} h old", details)


def check_pool() -> CheckResult:
    """Pooled PostgreSQL connections in this process: usage and waiting requests."""
    from django.db.backends.postgresql.base import DatabaseWrapper

    warn = _limit("POOL_USAGE_WARN", 0.9)
    details, worst, notes = {}, OK, []
    for alias, pool in sorted(DatabaseWrapper._connection_pools.items()):
        stats = pool.get_stats()
        used = stats.get("pool_size", 0) - stats.get("pool_available", 0)
        usage = round(used / pool.max_size, 3) if pool.max_size else 0.0
        waiting = stats.get("requests_waiting", 0)
        details[alias] = {"used": used, "max_size": pool.max_size, "usage": usage, **stats}
        notes.append(f"{alias} {used}/{pool.max_size} in use, {waiting} waiting")
        if waiting or usage >= warn:
            worst = DEGRADED
    if not details:
        configured = connections.settings["postgresql"]["OPTIONS"].get("pool", {})
        return CheckResult(
            "pool",
            OK,
            f"no pool open in this process (max_size {configured.get('max_size', '-')})",
            {"configured": configured},
        )
    return CheckResult("pool", worst, "; ".join(notes), details)


def check_replication() -> CheckResult:
    """Replication lag when PostgreSQL has a replica (or is one); 'no replica' otherwise."""
    max_lag = _limit("REPLICA_LAG_WARN_SECONDS", 30.0)
    try:
        with _pg_connect("postgresql") as conn:
            in_recovery = conn.execute("SELECT pg_is_in_recovery()").fetchone()[0]
            if in_recovery:
                lag = conn.execute(
                    "SELECT EXTRACT(EPOCH FROM now() - pg_last_xact_replay_timestamp())"
                ).fetchone()[0]
                rows = [("this server (replica)", "replaying", lag)]
            else:
                rows = conn.execute(
                    "SELECT coalesce(application_name, client_addr::text), state, "
                    "EXTRACT(EPOCH FROM replay_lag) FROM pg_stat_replication"
                ).fetchall()
    except Exception as exc:  # PostgreSQL may legitimately be absent before the migration
        status = DEGRADED if process_backend() == "postgresql" else OK
        return CheckResult("replication", status, f"not checked: {_error_text(exc)}")
    if not rows:
        return CheckResult("replication", OK, "no replica", {"replicas": []})
    replicas = [
        {"name": name, "state": state, "lag_seconds": float(lag) if lag is not None else 0.0}
        for name, state, lag in rows
    ]
    behind = [r for r in replicas if r["lag_seconds"] > max_lag]
    broken = [r for r in replicas if r["state"] not in ("streaming", "replaying")]
    worst_lag = max(r["lag_seconds"] for r in replicas)
    message = f"{len(replicas)} replica(s), max lag {worst_lag:.1f} s"
    if behind or broken:
        return CheckResult(
            "replication",
            DEGRADED,
            message + f" (limit {max_lag:g} s; states {[r['state'] for r in replicas]})",
            {"replicas": replicas},
        )
    return CheckResult("replication", OK, message, {"replicas": replicas})


def check_slow_queries() -> CheckResult:
    """Slow queries this process logged in the last HEALTH_SLOW_QUERY_WINDOW_SECONDS."""
    slow_queries_since = conf.hook("SLOW_QUERIES")
    if slow_queries_since is None:
        return CheckResult("slow_queries", OK, "not tracked (DBMIGRATION['SLOW_QUERIES'] unset)")
    window = _limit("SLOW_QUERY_WINDOW_SECONDS", 300.0)
    warn = int(_limit("SLOW_QUERY_WARN", 10))
    count = slow_queries_since(window)
    details = {"count": count, "window_seconds": window, "threshold_ms": settings.SLOW_QUERY_MS}
    status = DEGRADED if count >= warn else OK
    return CheckResult(
        "slow_queries",
        status,
        f"{count} slow queries (>= {settings.SLOW_QUERY_MS:g} ms) in the last {window:g} s",
        details,
    )


def check_pitr() -> CheckResult:
    """pgBackRest: last backup per type and its age; failing WAL archiving is degraded at once."""
    from dbmigration import pitr
    from dbmigration.errors import MigrationError

    try:
        posture = pitr.posture(
            backup_max_age_hours=_limit("PITR_BACKUP_MAX_AGE_HOURS", 26.0),
            full_max_age_hours=_limit("PITR_FULL_MAX_AGE_HOURS", 8 * 24.0),
            drill_max_age_hours=_limit("PITR_DRILL_MAX_AGE_HOURS", 8 * 24.0),
        )
    except MigrationError as exc:
        return CheckResult("pitr", DEGRADED, str(exc))
    if not posture.set_up:
        return CheckResult("pitr", OK, "point-in-time recovery not set up (db_pitr setup)")
    details = {
        "backups": posture.last_backups,
        "archiver": posture.archiver,
        "drill": posture.drill,
    }
    if posture.problems:
        return CheckResult("pitr", DEGRADED, "; ".join(posture.problems), details)
    ages = ", ".join(f"{t} {b['age_hours']} h" for t, b in posture.last_backups.items())
    return CheckResult(
        "pitr",
        OK,
        f"last backups: {ages}; WAL archived up to {posture.archiver['last_archived_wal']}; "
        + (f"last drill ok ({posture.drill['seconds']} s)" if posture.drill else "no drill yet"),
        details,
    )


def check_read_replicas() -> CheckResult:
    """Each read replica's lag and whether the router sends it reads (DBMIGRATION['REPLICAS'])."""
    replica_status = conf.hook("REPLICAS")
    replicas = replica_status() if replica_status else []
    if not replicas:
        return CheckResult("read_replicas", OK, "no read replicas configured", {"replicas": []})
    out = [r for r in replicas if not r["in_rotation"]]
    message = f"{len(replicas) - len(out)} of {len(replicas)} read replica(s) in rotation"
    if out:  # reads still succeed on the primary: a warning, not down
        reasons = ", ".join(f"{r['alias']}: {r['error'] or _lag_text(r)}" for r in out)
        return CheckResult(
            "read_replicas", DEGRADED, f"{message} ({reasons})", {"replicas": replicas}
        )
    return CheckResult("read_replicas", OK, message, {"replicas": replicas})


_last_dealloc: dict[tuple, int] = {}  # per server and database: pg_stat_statements' evictions


def check_statement_evictions() -> CheckResult:
    """pg_stat_statements evicting entries since the last check (its top list then misses some)."""
    try:
        with _pg_connect("postgresql") as conn:
            installed = conn.execute(
                "SELECT to_regclass('pg_stat_statements_info') IS NOT NULL"
            ).fetchone()[0]
            if not installed:
                return CheckResult("query_stats", OK, "pg_stat_statements not installed")
            dealloc = conn.execute("SELECT dealloc FROM pg_stat_statements_info").fetchone()[0]
            server = conn.info.host, conn.info.port, conn.info.dbname
    except Exception as exc:
        status = DEGRADED if process_backend() == "postgresql" else OK
        return CheckResult("query_stats", status, f"not checked: {_error_text(exc)}")
    evicted = dealloc - _last_dealloc.get(server, dealloc)
    _last_dealloc[server] = dealloc
    details = {"dealloc": dealloc, "evicted_since_last_check": max(evicted, 0)}
    if evicted > 0:
        return CheckResult(
            "query_stats",
            DEGRADED,
            f"pg_stat_statements evicted entries {evicted} time(s) since the last check; raise "
            "pg_stat_statements.max (a restart) so the top list keeps every hot query",
            details,
        )
    return CheckResult("query_stats", OK, f"pg_stat_statements: {dealloc} eviction(s)", details)


def check_security() -> CheckResult:
    """Unresolved threat-detection findings (DBMIGRATION['SECURITY']): degraded while any."""
    summary = conf.hook("SECURITY")
    if summary is None:
        return CheckResult("security", OK, "not tracked (DBMIGRATION['SECURITY'] unset)")
    try:
        found = summary()
    except Exception as exc:  # the database is down or not migrated: active_backend says so
        return CheckResult("security", OK, f"not checked: {_error_text(exc)}")
    details = {
        "unresolved": found["unresolved"],
        "by_severity": found["by_severity"],
        "last_seen": found["last_seen"],
    }
    if not found["unresolved"]:
        return CheckResult("security", OK, "no unresolved security findings", details)
    counts = ", ".join(f"{n} {severity}" for severity, n in found["by_severity"].items())
    return CheckResult(
        "security",
        DEGRADED,
        f"{found['unresolved']} unresolved security finding(s) ({counts}); newest: "
        f"{found['newest']}. Read them in the admin (Threat detection), resolve each when "
        "handled",
        details,
    )


def _lag_text(replica: dict) -> str:
    return f"lag {replica['lag_bytes']} bytes, {replica['lag_seconds'] or 0:.1f} s"


CHECKS: dict[str, Callable[[], CheckResult]] = {
    "active_backend": check_active_backend,
    "process_backend": check_process_backend,
    "migration_phase": check_migration_phase,
    "backup_age": check_backup_age,
    "pool": check_pool,
    "replication": check_replication,
    "slow_queries": check_slow_queries,
    "pitr": check_pitr,
    "read_replicas": check_read_replicas,
    "query_stats": check_statement_evictions,
    "security": check_security,
}


def run_check(name: str) -> CheckResult:
    """Run one check; a crash inside a check is reported as 'down', not raised."""
    start = time.perf_counter()
    try:
        result = CHECKS[name]()
    except Exception as exc:  # a broken check must not hide the others
        result = CheckResult(name, DOWN, f"check failed: {_error_text(exc)}")
    result.seconds = round(time.perf_counter() - start, 4)
    return result


def run_checks(
    names: list[str] | None = None, *, progress: Callable[[CheckResult], None] | None = None
) -> HealthReport:
    """Run the named checks (all by default) and return the report."""
    results = []
    for name in names or list(CHECKS):
        result = run_check(name)
        if progress:
            progress(result)
        results.append(result)
    return HealthReport(results)
