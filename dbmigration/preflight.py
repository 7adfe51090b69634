"""Safety checks before anything moves: the SQLite source (phase 1) and PostgreSQL (phase 3).

Every check returns a ``Check``; a failed one carries the line that tells the operator
what to do.  The cutover helper's health checks reuse ``check_postgresql``.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import shutil
import sqlite3
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlsplit

from dbmigration.errors import SourceError, TargetError
from dbmigration.sqlite_source import (
    applied_migrations,
    open_readonly,
    translate_sqlite_error,
)

MIN_SERVER_VERSION = 140000  # Django 5.2 supports PostgreSQL 14 and later
CONNECT_TIMEOUT = 5
# connection options passed through from POSTGRES_URL's query or DATABASES OPTIONS
LIBPQ_OPTIONS = {
    "sslmode",
    "sslrootcert",
    "sslcert",
    "sslkey",
    "sslpassword",
    "options",
    "application_name",
    "target_session_attrs",
    "passfile",
    "service",
}

Progress = Callable[[str], None] | None


@dataclasses.dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""  # what to do when not ok
    warning: bool = False  # ok, but worth reading

    def line(self) -> str:
        mark = "ok" if self.ok and not self.warning else ("warning" if self.ok else "FAILED")
        text = f"{self.name}: {mark} - {self.detail}"
        return f"{text.rstrip('.')}. Fix: {self.fix}" if self.fix and not self.ok else text


@dataclasses.dataclass
class CheckReport:
    target: str
    checks: list[Check] = dataclasses.field(default_factory=list)
    facts: dict = dataclasses.field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]


# --- connection details --------------------------------------------------------------------


def conninfo_from_settings(settings_dict: dict) -> dict:
    """psycopg keyword arguments for a Django DATABASES entry."""
    info = {
        "dbname": settings_dict.get("NAME") or "postgres",
        "user": settings_dict.get("USER") or None,
        "password": settings_dict.get("PASSWORD") or None,
        "host": settings_dict.get("HOST") or None,
        "port": settings_dict.get("PORT") or None,
        **{k: v for k, v in (settings_dict.get("OPTIONS") or {}).items() if k in LIBPQ_OPTIONS},
    }
    return {k: v for k, v in info.items() if v is not None}


def conninfo_from_url(url: str) -> dict:
    """psycopg keyword arguments for a postgres:// URL."""
    parts = urlsplit(url)
    info = {
        "dbname": unquote(parts.path.lstrip("/")) or "postgres",
        "user": unquote(parts.username) if parts.username else None,
        "password": unquote(parts.password) if parts.password else None,
        "host": parts.hostname,
        "port": parts.port,
        **{k: v for k, v in parse_qsl(parts.query) if k in LIBPQ_OPTIONS},
    }
    return {k: v for k, v in info.items() if v is not None}


def describe(conninfo: dict) -> str:
    """user@host:port/db, never the password."""
    return (
        f"{conninfo.get('user', '')}@{conninfo.get('host', 'localhost')}:"
        f"{conninfo.get('port', 5432)}/{conninfo.get('dbname', '')}"
    )


def connect(conninfo: dict, *, timeout: int = CONNECT_TIMEOUT):
    """Open a psycopg connection, or raise TargetError naming the cause and the fix."""
    import psycopg

    where = describe(conninfo)
    try:
        return psycopg.connect(**conninfo, connect_timeout=timeout, autocommit=True)
    except psycopg.OperationalError as exc:
        # psycopg's first line names the cause (refused, timeout, unknown host)
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        low = str(exc).lower()
        tls = _tls_failure(low, text, where)
        if tls:
            raise TargetError(tls) from None
        if "password authentication failed" in low or "no password supplied" in low:
            raise TargetError(
                f"PostgreSQL at {where} refused the password for role "
                f"'{conninfo.get('user', '')}'. Fix: put the right password in POSTGRES_URL "
                "(or PGPASSWORD)."
            ) from None
        if f'database "{conninfo.get("dbname")}" does not exist' in low:
            raise TargetError(
                f"Database '{conninfo.get('dbname')}' does not exist on {where}. Fix: "
                "run migration_prepare (it creates it) or ensure_postgres."
            ) from None
        if "role" in low and "does not exist" in low:
            raise TargetError(
                f"Role '{conninfo.get('user', '')}' does not exist on {where}. Fix: create it "
                "(CREATE ROLE ... LOGIN PASSWORD ...) or correct POSTGRES_URL."
            ) from None
        raise TargetError(
            f"PostgreSQL at {where} is not reachable ({text}). Fix: start the server or "
            "correct POSTGRES_URL (host, port), and check firewalls."
        ) from None


# libpq's TLS failures, each with what it means and the fix (README "Encrypted connections")
TLS_FAILURES = (
    (
        "does not match host name",
        "presented a certificate issued for another name",
        "connect with a name the certificate holds (POSTGRES_URL's host), or reissue the "
        "server certificate with this name in its subjectAltName",
    ),
    (
        "certificate verify failed",
        "presented a certificate that the CA in sslrootcert did not sign",
        "point sslrootcert at the CA that signed the server's certificate",
    ),
    (
        "root certificate file",
        "cannot be verified: no CA file to check its certificate against",
        "add sslrootcert=/path/to/ca.crt to POSTGRES_URL (or sslrootcert=system for the "
        "system's trusted roots)",
    ),
    (
        "no encryption",
        "accepts only encrypted connections",
        "add sslmode=verify-full&sslrootcert=/path/to/ca.crt to POSTGRES_URL",
    ),
    (
        "server does not support ssl",
        "does not offer SSL",
        "turn ssl on at the server (ssl_cert_file, ssl_key_file), or lower sslmode in dev only",
    ),
)


def _tls_failure(low: str, text: str, where: str) -> str | None:
    """One line for a TLS failure (the cause without libpq's 'connection to ... failed:')."""
    for marker, meaning, fix in TLS_FAILURES:
        if marker in low:
            cause = text.rsplit(" failed: ", 1)[-1].removeprefix("FATAL:").strip()
            return f"PostgreSQL at {where} {meaning} ({cause}). Fix: {fix}."
    return None


def target_identity(conninfo: dict) -> dict:
    """Which cluster and which database conninfo reaches (raises TargetError if none).

    The cluster's system identifier survives a renamed host; the database's oid changes
    when it is dropped and created again.
    """
    with connect(conninfo) as conn:
        system, oid = identity_row(conn.cursor())
    return {"where": describe(conninfo), "system_identifier": system, "database_oid": oid}


def identity_row(cursor) -> tuple[str, int]:
    """(cluster system identifier, database oid) of the database cursor is connected to."""
    cursor.execute(
        "SELECT (pg_control_system()).system_identifier::text, "
        "(SELECT oid::bigint FROM pg_database WHERE datname = current_database())"
    )
    return cursor.fetchone()


def require_same_target(recorded: dict | None, conninfo: dict) -> None:
    """Raise TargetError unless conninfo reaches the database migration_prepare checked."""
    now = target_identity(conninfo)  # also: unreachable is exit 3 now, not a pool timeout later
    if not recorded:
        return  # a state written before targets were recorded
    keys = ("system_identifier", "database_oid")
    if all(now[key] == recorded.get(key) for key in keys):
        return
    why = (
        "another server"
        if now["system_identifier"] != recorded.get("system_identifier")
        else "a database dropped and created again since"
    )
    raise TargetError(
        f"PostgreSQL at {now['where']} is not the target migration_prepare checked "
        f"({recorded.get('where')}): it is {why}. Point POSTGRES_URL back at it, or run "
        "migration_prepare to start over on this one."
    )


# --- PostgreSQL checks (db_test_postgresql, phase 3) -----------------------------------------


def required_extensions() -> list[str]:
    """Extensions our migrations create (CreateExtension operations), sorted."""
    from django.contrib.postgres.operations import CreateExtension
    from django.db.migrations.loader import MigrationLoader

    loader = MigrationLoader(None, ignore_no_migrations=True)
    names = {
        op.name
        for migration in loader.disk_migrations.values()
        for op in migration.operations
        if isinstance(op, CreateExtension)
    }
    return sorted(names)


def _is_local(host: str | None) -> bool:
    if not host or host.startswith("/") or host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_postgresql(
    *,
    conninfo: dict,
    pool_max: int,
    workers: int = 1,
    pgbouncer_pool: int | None = None,
    extensions: list[str] | None = None,
    progress: Progress = None,
) -> CheckReport:
    """Run every check the migration needs against a PostgreSQL server; never raises.

    ``workers`` processes each hold a pool of up to ``pool_max`` connections; with PgBouncer
    (``pgbouncer_pool`` set) the server sees PgBouncer's pool instead.
    """
    report = CheckReport(target=describe(conninfo))
    missing_db = False
    try:
        conn = connect(conninfo)
    except TargetError as exc:
        if "does not exist" not in str(exc) or "Database" not in str(exc):
            report.checks.append(Check("connect", False, str(exc).split(" Fix: ")[0], _fix(exc)))
            return report
        # the database may not exist yet: check from the maintenance database instead
        missing_db = True
        try:
            conn = connect({**conninfo, "dbname": "postgres"})
        except TargetError as exc2:
            report.checks.append(Check("connect", False, str(exc2).split(" Fix: ")[0], _fix(exc2)))
            return report
    with conn:
        _run_checks(
            conn,
            report,
            conninfo=conninfo,
            demand=ConnectionDemand(pool_max, workers, pgbouncer_pool),
            missing_db=missing_db,
            extensions=required_extensions() if extensions is None else extensions,
        )
    if progress:
        progress(f"{len(report.checks)} checks, {len(report.failed)} failed")
    return report


def _fix(exc: Exception) -> str:
    text = str(exc)
    return text.split(" Fix: ", 1)[1] if " Fix: " in text else ""


def _run_checks(conn, report, *, conninfo, demand, missing_db, extensions) -> None:
    one = conn.execute
    samples = []
    for _ in range(5):
        t0 = time.perf_counter()
        one("SELECT 1").fetchone()
        samples.append((time.perf_counter() - t0) * 1000)
    latency = round(statistics.median(samples), 3)
    report.facts["latency_ms"] = latency
    report.checks.append(
        Check(
            "connect",
            True,
            f"connected as {conninfo.get('user', '')}, round trip {latency} ms (median of 5)",
            warning=latency > 50,
        )
    )
    version_num = int(one("SHOW server_version_num").fetchone()[0])
    version = one("SHOW server_version").fetchone()[0]
    report.facts["server_version"] = version
    report.checks.append(
        Check(
            "server_version",
            version_num >= MIN_SERVER_VERSION,
            f"PostgreSQL {version}",
            "upgrade the server to PostgreSQL 14 or later (Django 5.2 needs it)",
        )
    )
    ssl_row = one("SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone()
    uses_ssl = bool(ssl_row and ssl_row[0])
    local = _is_local(conninfo.get("host"))
    report.facts["ssl"] = uses_ssl
    report.checks.append(
        Check(
            "ssl",
            True,
            f"SSL in use ({ssl_row[1]})"
            if uses_ssl
            else ("no SSL (local connection)" if local else "no SSL over the network"),
            warning=not uses_ssl and not local,
        )
    )
    if missing_db:
        report.checks.append(_createdb_check(one, conninfo))
        report.facts["encoding"] = None
    else:
        encoding = one(
            "SELECT pg_encoding_to_char(encoding) FROM pg_database WHERE datname = "
            "current_database()"
        ).fetchone()[0]
        report.facts["encoding"] = encoding
        report.checks.append(
            Check(
                "encoding",
                encoding == "UTF8",
                f"database encoding {encoding}",
                "recreate the database with ENCODING 'UTF8' TEMPLATE template0",
            )
        )
        report.checks.append(_privileges_check(conn, conninfo))
    report.checks.append(_extensions_check(one, extensions))
    report.checks.append(_connections_check(one, demand))


def _createdb_check(one, conninfo) -> Check:
    can = one(
        "SELECT rolsuper OR rolcreatedb FROM pg_roles WHERE rolname = current_user"
    ).fetchone()[0]
    return Check(
        "database",
        bool(can),
        f"database '{conninfo.get('dbname')}' does not exist yet"
        + ("; migration_prepare will create it" if can else " and this role cannot create it"),
        f'create it as an administrator: CREATE DATABASE "{conninfo.get("dbname")}" OWNER '
        f"\"{conninfo.get('user', '')}\" ENCODING 'UTF8' TEMPLATE template0",
    )


def _privileges_check(conn, conninfo) -> Check:
    """Connect, create in the schema and create types: tried for real, then rolled back."""
    one = conn.execute
    user = conninfo.get("user", "")
    schema = one("SELECT current_schema()").fetchone()[0]
    has_connect, has_create = one(
        "SELECT has_database_privilege(current_database(), 'CONNECT'), "
        "has_schema_privilege(current_schema(), 'CREATE')"
    ).fetchone()
    problems = []
    if not has_connect:
        problems.append("CONNECT on the database")
    if not has_create:
        problems.append(f"CREATE on schema {schema}")
    else:
        import psycopg

        # the only proof that CREATE TYPE / TABLE work is to do them and roll back
        try:
            with conn.transaction(force_rollback=True):
                one("CREATE TYPE propcore_probe_type AS ENUM ('x')")
                one("CREATE TABLE propcore_probe_table (v propcore_probe_type)")
        except psycopg.Error as exc:
            problems.append(f"CREATE TYPE/TABLE ({str(exc).splitlines()[0]})")
    not_owned = one(
        "SELECT count(*) FROM pg_tables WHERE schemaname = current_schema() "
        "AND NOT pg_has_role(tableowner, 'USAGE')"
    ).fetchone()[0]
    if not_owned:
        problems.append(f"ownership of {not_owned} existing tables in {schema}")
    return Check(
        "privileges",
        not problems,
        "connect, create in schema and create types: all granted"
        if not problems
        else f"role '{user}' lacks " + ", ".join(problems),
        f'as an administrator: GRANT CONNECT ON DATABASE ... TO "{user}"; GRANT CREATE ON '
        f'SCHEMA {schema} TO "{user}" (or make the role the database owner)',
    )


def _extensions_check(one, extensions: list[str]) -> Check:
    if not extensions:
        return Check("extensions", True, "none needed by our migrations")
    rows = dict(
        one(
            "SELECT name, installed_version IS NOT NULL FROM pg_available_extensions "
            "WHERE name = ANY(%s)",
            [extensions],
        ).fetchall()
    )
    missing = [e for e in extensions if e not in rows]
    return Check(
        "extensions",
        not missing,
        f"needed: {', '.join(extensions)}"
        + (f"; not available on the server: {', '.join(missing)}" if missing else ""),
        "install the server packages that provide them (e.g. postgresql-contrib)",
    )


@dataclasses.dataclass(frozen=True)
class ConnectionDemand:
    """How many server connections the application can hold at its peak."""

    pool_max: int  # per application process
    workers: int = 1  # application processes (gunicorn workers)
    pgbouncer_pool: int | None = None  # PgBouncer's default_pool_size + reserve_pool_size

    @property
    def app_total(self) -> int:
        if self.pgbouncer_pool is not None:
            return self.pgbouncer_pool  # PgBouncer holds the server connections, not the app
        return self.workers * self.pool_max

    def describe(self) -> str:
        if self.pgbouncer_pool is not None:
            return f"PgBouncer's pool of {self.pgbouncer_pool} (default_pool_size + reserve)"
        return f"{self.workers} worker(s) x a pool of up to {self.pool_max}"


def _connections_check(one, demand: ConnectionDemand) -> Check:
    max_conn = int(one("SHOW max_connections").fetchone()[0])
    reserved = int(one("SHOW superuser_reserved_connections").fetchone()[0])
    in_use = one("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'")
    used = in_use.fetchone()[0]
    available = max_conn - reserved - used
    # what the app holds at peak, plus one for the migration runbook itself
    needed = demand.app_total + 1
    server = f"max_connections {max_conn} ({reserved} reserved, {used} in use, {available} free)"
    if demand.pgbouncer_pool is None and demand.pool_max + 1 > available:
        return Check(
            "max_connections",
            False,
            f"{server} for a pool of up to {demand.pool_max} per process",
            "raise max_connections on the server or lower the profile's pool_max",
        )
    if needed > available:
        # a warning: the app starts, and fails with "too many connections" only at its peak
        fix = (
            "lower default_pool_size in pgbouncer.ini"
            if demand.pgbouncer_pool is not None
            else "lower pool_max or the worker count (WEB_CONCURRENCY), or put PgBouncer in "
            "front (POSTGRES_POOLING=pgbouncer)"
        )
        return Check(
            "max_connections",
            True,
            f"{server} is too small for {demand.describe()}: {needed} needed at peak (with one "
            f"for the runbook); set max_connections to at least {max_conn + needed - available} "
            f"(a restart) or {fix}",
            warning=True,
        )
    return Check(
        "max_connections",
        True,
        f"{server} for {demand.describe()}: {needed} needed at peak (with one for the runbook)",
    )


# --- phase 1: the SQLite source and the target ------------------------------------------------


def code_migrations() -> list[str]:
    """Every migration the code defines, as sorted 'app.name' (squashed ones collapsed)."""
    from django.db.migrations.loader import MigrationLoader

    loader = MigrationLoader(None, ignore_no_migrations=True)
    return sorted(f"{app}.{name}" for app, name in loader.graph.nodes)


def known_migrations() -> set[str]:
    """Every name a database migrated by this code may record: each migration of the graph
    and each one a squashed migration replaces (Django records those when it applies one)."""
    from django.db.migrations.loader import MigrationLoader

    loader = MigrationLoader(None, ignore_no_migrations=True)
    names = {f"{app}.{name}" for app, name in loader.graph.nodes}
    for migration in loader.disk_migrations.values():
        names.update(f"{app}.{name}" for app, name in migration.replaces)
    return names


def unapplied_migrations(applied) -> list[str]:
    """The code's migrations a database has not applied, judged as Django does: a squashed
    migration counts as applied when all the migrations it replaces are."""
    from django.db.migrations.loader import MigrationLoader

    applied = set(applied)
    loader = MigrationLoader(None, ignore_no_migrations=True)
    missing = []
    for key, migration in loader.graph.nodes.items():
        name = f"{key[0]}.{key[1]}"
        replaced = [f"{app}.{n}" for app, n in migration.replaces]
        if name in applied or (replaced and all(r in applied for r in replaced)):
            continue
        missing.append(name)
    return sorted(missing)


def check_sqlite_source(*, sqlite_path: Path, lock_timeout: float = 5.0) -> CheckReport:
    """Integrity, foreign keys and applied migrations of the source; raise SourceError early."""
    sqlite_path = Path(sqlite_path)
    report = CheckReport(target=str(sqlite_path))
    conn = open_readonly(sqlite_path, timeout=lock_timeout)
    try:
        integrity = [r[0] for r in conn.execute("PRAGMA integrity_check(20)").fetchall()]
        fk_rows = conn.execute("PRAGMA foreign_key_check").fetchall()
        applied = applied_migrations(conn)
        journal = conn.execute("PRAGMA journal_mode").fetchone()[0]
    except sqlite3.Error as exc:
        raise translate_sqlite_error(sqlite_path, exc) from exc
    finally:
        conn.close()
    report.facts["journal_mode"] = journal
    report.checks.append(
        Check(
            "integrity_check",
            integrity == ["ok"],
            "ok" if integrity == ["ok"] else "; ".join(integrity[:3]),
            "the file is damaged: restore it with db_restore or repair it with sqlite3 .recover",
        )
    )
    if integrity != ["ok"]:
        check = report.checks[-1]
        raise SourceError(
            f"SQLite database {sqlite_path} fails integrity_check: {check.detail}. "
            f"Fix: {check.fix}."
        )
    violations = [{"table": t, "rowid": r, "parent": p, "fk_index": i} for t, r, p, i in fk_rows]
    report.facts["foreign_key_violations"] = violations[:1000]
    # A warning, not a failure: the copy refuses these rows one by one (phase 5 lists them),
    # so the operator can still choose migrate_data --quarantine instead of editing SQLite.
    report.checks.append(
        Check(
            "foreign_key_check",
            True,
            "no violations"
            if not violations
            else f"{len(violations)} rows point at missing parents, first: "
            + ", ".join(f"{v['table']} rowid {v['rowid']} -> {v['parent']}" for v in violations[:3])
            + "; PostgreSQL enforces foreign keys, so migrate_data refuses them (see phase 5)",
            warning=bool(violations),
        )
    )
    expected = code_migrations()
    missing = unapplied_migrations(applied)
    report.facts["applied_migrations"] = applied
    report.checks.append(
        Check(
            "migrations_applied",
            not missing,
            f"all {len(expected)} migrations applied"
            if not missing
            else f"{len(missing)} not applied on SQLite: {', '.join(missing[:5])}",
            "run 'manage.py migrate' while SQLite is the active backend, then prepare again",
        )
    )
    return report


def check_disk_space(*, directory: Path, needed_bytes: int) -> Check:
    """Free space where backups go, against what they need."""
    directory = Path(directory)
    probe = directory
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    return Check(
        "disk_space",
        free >= needed_bytes,
        f"{free // 2**20} MiB free in {directory}, backups need about "
        f"{needed_bytes // 2**20 + 1} MiB",
        f"free space in {directory} or point the backups elsewhere (--backup-dir)",
    )


def our_relations() -> set[str]:
    """Every table the installed models create on PostgreSQL."""
    from django.apps import apps

    names = {"django_migrations"}
    for model in apps.get_models(include_auto_created=True):
        if model._meta.managed and not model._meta.proxy:
            names.add(model._meta.db_table)
    return names


def check_target_is_ours(*, conninfo: dict) -> Check:
    """The target database is absent, empty, or holds only our schema: never foreign data.

    Only tables count: views and materialized views hold no data of their own that a copy
    could overwrite, and a project's migrations may create any number of them.
    """
    try:
        conn = connect(conninfo)
    except TargetError as exc:
        if "does not exist" in str(exc) and "Database" in str(exc):
            return Check("target_is_ours", True, "database does not exist yet (will be created)")
        raise
    with conn:
        rels = conn.execute(
            "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n "
            "ON n.oid = c.relnamespace WHERE c.relkind IN ('r', 'p', 'f') "
            "AND n.nspname NOT IN ('pg_catalog', 'information_schema') "
            "AND n.nspname NOT LIKE 'pg_toast%' AND n.nspname NOT LIKE 'pg_temp%'"
        ).fetchall()
        ours = our_relations()
        foreign = sorted(
            f"{s}.{r}" if s != "public" else r for s, r in rels if s != "public" or r not in ours
        )
        foreign_migrations = []
        if any(r == "django_migrations" and s == "public" for s, r in rels):
            applied = {
                f"{a}.{n}" for a, n in conn.execute("SELECT app, name FROM django_migrations")
            }
            foreign_migrations = sorted(applied - known_migrations())
    if foreign or foreign_migrations:
        what = ", ".join((foreign + foreign_migrations)[:5])
        more = len(foreign) + len(foreign_migrations) - 5
        return Check(
            "target_is_ours",
            False,
            f"database {conninfo.get('dbname')} holds tables or migrations that are not ours: "
            f"{what}{f' and {more} more' if more > 0 else ''}",
            "point POSTGRES_URL at an empty database (we never overwrite foreign data)",
        )
    return Check(
        "target_is_ours",
        True,
        "empty" if not rels else f"holds only our schema ({len(rels)} relations)",
    )
