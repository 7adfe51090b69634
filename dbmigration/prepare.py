"""migration_prepare: phases 1 to 5 of the runbook, read-only on SQLite, idempotent.

1. safety checks   2. verified backups   3. PostgreSQL checks   4. schema (Django migrate)
5. final validation: tables/columns/types on PostgreSQL, a dry run of the data conversion
   over every source row, an estimate of the copy time.
"""

from __future__ import annotations

import dataclasses
import io
import re
import time
from collections.abc import Callable
from pathlib import Path

from dbmigration import state as state_mod
from dbmigration.backup import BackupInfo, create_sqlite_backup, signals_as_errors
from dbmigration.errors import (
    DataError,
    Interrupted,
    MigrationError,
    PhaseError,
    SourceError,
    TargetError,
)
from dbmigration.preflight import (
    CheckReport,
    check_disk_space,
    check_postgresql,
    check_sqlite_source,
    check_target_is_ours,
    connect,
    describe,
)
from dbmigration.reports import RunReport
from dbmigration.sqlite_source import source_fingerprint

Progress = Callable[[str], None] | None

# write cost on top of the measured conversion: binary COPY into bare tables plus index
# builds was ~0.2x the Python conversion time in our 400k-row measurement (GUIDE section 3)
WRITE_OVERHEAD = 0.25
MAX_LISTED_REJECTIONS = 10_000


@dataclasses.dataclass
class Rejection:
    table: str
    pk: str
    column: str
    reason: str
    excerpt: str


@dataclasses.dataclass
class PrepareResult:
    ok: bool
    report_path: Path | None
    log_path: Path | None
    phases: list  # reports.StepResult, in order
    backup: BackupInfo | None = None
    fingerprint_before: dict = dataclasses.field(default_factory=dict)
    fingerprint_after: dict = dataclasses.field(default_factory=dict)
    rows_scanned: int = 0
    rejections: list[Rejection] = dataclasses.field(default_factory=list)
    conversion_rows_per_s: float = 0.0
    estimated_copy_seconds: float = 0.0
    schema_problems: list[str] = dataclasses.field(default_factory=list)
    target: str = ""


def run_prepare(
    *,
    sqlite_path: Path,
    state_file: Path,
    backup_dir: Path,
    report_dir: Path,
    log_dir: Path,
    pg_alias: str = "postgresql",
    pool_max: int = 10,
    keep: int | None = None,
    encrypt_key: str | None = None,
    lock_timeout: float = 5.0,
    strict: bool = False,
    progress: Progress = None,
) -> PrepareResult:
    """Run phases 1-5; on success move the state to 'prepared'. Raise MigrationError.

    Rows the copy would reject are listed (result.rejections) and, with strict, refused.
    """
    from django.db import connections

    sqlite_path = Path(sqlite_path)
    conninfo = _conninfo(connections[pg_alias].settings_dict)
    run = RunReport.open("migration_prepare", report_dir=Path(report_dir), log_dir=Path(log_dir))
    result = PrepareResult(
        ok=False,
        report_path=None,
        log_path=run.log_path,
        phases=run.steps,
        target=describe(conninfo),
    )
    note = _progress(run, progress)
    try:
        with signals_as_errors(_interrupted):
            return _phases(
                run,
                result,
                note,
                sqlite_path=sqlite_path,
                state_file=state_file,
                backup_dir=backup_dir,
                pg_alias=pg_alias,
                conninfo=conninfo,
                pool_max=pool_max,
                keep=keep,
                encrypt_key=encrypt_key,
                lock_timeout=lock_timeout,
                strict=strict,
            )
    except BaseException as exc:
        run.facts["error"] = str(exc)
        result.report_path = run.finish("failed")
        if isinstance(exc, KeyboardInterrupt):
            exc = _interrupted("SIGINT")
        if isinstance(exc, MigrationError) and result.report_path:
            exc.args = (f"{exc}\nReport: {result.report_path}",)
        raise exc from None


def _interrupted(signame: str) -> Interrupted:
    return Interrupted(
        f"migration_prepare interrupted by {signame}; nothing was marked prepared and any "
        "partial backup was removed. Run migration_prepare again (it is safe to re-run)."
    )


def _phases(
    run,
    result,
    note,
    *,
    sqlite_path,
    state_file,
    backup_dir,
    pg_alias,
    conninfo,
    pool_max,
    keep,
    encrypt_key,
    lock_timeout,
    strict,
) -> PrepareResult:
    """Phases 1-5 in order; the first failure raises."""
    try:
        current = state_mod.read_state(state_file)
        state_mod.require_phase(current, "prepared")
    except state_mod.StateError as exc:
        raise PhaseError(str(exc)) from exc

    with run.step("1_safety_checks") as step:
        result.fingerprint_before = source_fingerprint(sqlite_path, timeout=lock_timeout)
        run.facts["source_sha256_before"] = result.fingerprint_before["sha256"]
        source = check_sqlite_source(sqlite_path=sqlite_path, lock_timeout=lock_timeout)
        size = result.fingerprint_before["size"] + result.fingerprint_before["wal_size"]
        # the snapshot plus JSON Lines, which run up to ~3x the file on text-heavy data
        disk = check_disk_space(directory=Path(backup_dir), needed_bytes=4 * size)
        target_check = check_target_is_ours(conninfo=conninfo)
        _record(step, source, extra=[disk, target_check])
        note(f"phase 1: {len(source.checks) + 2} checks")
        failed = source.failed + [c for c in (disk, target_check) if not c.ok]
        if failed:
            err = TargetError if failed[0] is target_check else SourceError
            raise err(_lines(failed))

    with run.step("2_backup") as step:
        result.backup = create_sqlite_backup(
            sqlite_path=sqlite_path,
            backup_dir=Path(backup_dir),
            label="prepare",
            keep=keep,
            encrypt_key=encrypt_key,
            lock_timeout=lock_timeout,
            progress=note,
        )
        step.details = {
            "path": str(result.backup.path),
            "verified": result.backup.verified,
            "files": [dataclasses.asdict(f) for f in result.backup.files],
            "row_counts": result.backup.row_counts,
            "checks": result.backup.checks,
        }
        run.facts["backups"] = [step.details]

    with run.step("3_postgresql_checks") as step:
        pg = check_postgresql(conninfo=conninfo, pool_max=pool_max)
        _record(step, pg)
        if not pg.ok:
            raise TargetError(_lines(pg.failed))

    with run.step("4_schema") as step:
        step.details = _create_schema(pg_alias, conninfo)
        note("phase 4: schema migrated on PostgreSQL")

    with run.step("5_validation") as step:
        result.schema_problems = compare_schema(pg_alias)
        step.details["schema_problems"] = result.schema_problems
        if result.schema_problems:
            raise TargetError(
                f"{len(result.schema_problems)} schema differences on PostgreSQL, first: "
                f"{result.schema_problems[0]}. Fix: drop the target database and prepare again."
            )
        _dry_run(sqlite_path, result, step, note, pg_alias=pg_alias)
        if result.rejections:
            summary = (
                f"{len(result.rejections)} source rows would be rejected by the copy, "
                f"first: {_describe_rejection(result.rejections[0])}"
            )
            if strict:
                raise DataError(
                    f"{summary}. Fix them in SQLite (the report lists each one), then prepare "
                    "again."
                )
            # migrate_data stops on them unless told to quarantine or repair: the operator's call
            step.warnings.append(summary)

    with run.step("read_only_proof") as step:
        result.fingerprint_after = source_fingerprint(sqlite_path, timeout=lock_timeout)
        before, after = result.fingerprint_before, result.fingerprint_after
        step.details = {"sha256_before": before["sha256"], "sha256_after": after["sha256"]}
        run.facts["source_sha256_after"] = after["sha256"]
        changed = state_mod.stale_reasons(
            state_mod.MigrationState(source_fingerprint=before), after
        )
        if changed:
            # rows may change meanwhile (the site keeps writing); the schema may not
            raise SourceError(
                f"The SQLite schema changed while prepare ran ({', '.join(changed)}): a "
                "deploy migrated it meanwhile. Run migration_prepare again once it is done."
            )
    result.ok = True
    result.report_path = run.report_path
    run.facts["fingerprint"] = result.fingerprint_before
    try:
        state_mod.transition(
            state_file,
            "prepared",
            note="migration_prepare",
            source_fingerprint=result.fingerprint_before,
            last_report=str(run.report_path),
            last_backup=str(result.backup.path),
        )
    except state_mod.StateError as exc:  # another command moved the state meanwhile
        raise PhaseError(str(exc)) from exc
    result.report_path = run.finish("ok")
    return result


def _conninfo(settings_dict: dict) -> dict:
    from dbmigration.preflight import conninfo_from_settings

    return conninfo_from_settings(settings_dict)


def _progress(run: RunReport, progress: Progress):
    def note(message: str) -> None:
        run.log(message)
        if progress:
            progress(message)

    return note


def _record(step, report: CheckReport, extra: list | None = None) -> None:
    checks = report.checks + (extra or [])
    step.details["checks"] = [dataclasses.asdict(c) for c in checks]
    step.details["facts"] = report.facts
    step.warnings.extend(c.line() for c in checks if c.ok and c.warning)


def _lines(failed: list) -> str:
    return "\n".join(c.line() for c in failed)


def _url(conninfo: dict) -> str:
    """The conninfo as a URL for pgserver.ensure_database (ssl options kept)."""
    from urllib.parse import quote, urlencode

    from dbmigration.preflight import LIBPQ_OPTIONS

    auth = quote(conninfo.get("user", ""))
    if conninfo.get("password"):
        auth += ":" + quote(str(conninfo["password"]), safe="")
    host = conninfo.get("host", "127.0.0.1")
    query = urlencode({k: v for k, v in conninfo.items() if k in LIBPQ_OPTIONS})
    url = f"postgres://{auth}@{host}:{conninfo.get('port', 5432)}/{conninfo['dbname']}"
    return f"{url}?{query}" if query else url


def _create_schema(pg_alias: str, conninfo: dict) -> dict:
    """Create the database if missing, then Django migrate on the PostgreSQL alias."""
    import psycopg
    from django.core.management import call_command
    from django.db.migrations.executor import MigrationExecutor

    from propcore.pgserver import ensure_database

    try:
        created = ensure_database(_url(conninfo))
    except psycopg.Error as exc:
        raise TargetError(
            f"Could not create database {conninfo['dbname']} ({str(exc).strip()}). Fix: create it "
            "as an administrator, owned by the migration role."
        ) from None
    from django.db import connections

    executor = MigrationExecutor(connections[pg_alias])
    pending = executor.migration_plan(executor.loader.graph.leaf_nodes())
    out = io.StringIO()
    call_command("migrate", database=pg_alias, interactive=False, verbosity=1, stdout=out)
    return {
        "database_created": created,
        "migrations_applied": [f"{m.app_label}.{m.name}" for m, _ in pending],
        "migrate_output": out.getvalue().strip().splitlines()[-20:],
    }


_TYPE_ALIASES = [
    (re.compile(r"^varchar\((\d+)\)$"), r"character varying(\1)"),
    (re.compile(r"^numeric\((\d+), ?(\d+)\)$"), r"numeric(\1,\2)"),
    (re.compile(r"^timestamp with time zone$"), "timestamp with time zone"),
]


def _normalise(db_type: str) -> str:
    db_type = db_type.strip().lower()
    for pattern, repl in _TYPE_ALIASES:
        db_type = pattern.sub(repl, db_type)
    return {"serial": "integer", "bigserial": "bigint", "smallserial": "smallint"}.get(
        db_type, db_type
    )


_WIDENINGS = {
    ("smallint", "integer"),
    ("smallint", "bigint"),
    ("integer", "bigint"),
}


def compare_schema(pg_alias: str) -> list[str]:
    """Every model's table and columns exist on PostgreSQL with the expected types."""
    from django.apps import apps
    from django.db import connections

    connection = connections[pg_alias]
    problems = []
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT c.relname, a.attname, format_type(a.atttypid, a.atttypmod), t.typtype "
            "FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid "
            "JOIN pg_namespace n ON n.oid = c.relnamespace JOIN pg_type t ON t.oid = a.atttypid "
            "WHERE n.nspname = current_schema() AND a.attnum > 0 AND NOT a.attisdropped "
            "AND c.relkind IN ('r', 'p')"
        )
        actual: dict[str, dict[str, tuple[str, str]]] = {}
        for table, column, type_, typtype in cursor.fetchall():
            actual.setdefault(table, {})[column] = (type_, typtype)
    for model in apps.get_models(include_auto_created=True):
        meta = model._meta
        if not meta.managed or meta.proxy:
            continue
        columns = actual.get(meta.db_table)
        if columns is None:
            problems.append(f"table {meta.db_table} is missing")
            continue
        for field in meta.local_concrete_fields:
            expected = field.db_type(connection)
            if expected is None:
                continue
            got = columns.get(field.column)
            if got is None:
                problems.append(f"{meta.db_table}.{field.column} is missing")
                continue
            type_, typtype = got
            if typtype == "e" and _normalise(expected).startswith(("character varying", "text")):
                continue  # our 0002 migration turns choice columns into PostgreSQL enums
            if (_normalise(expected), _normalise(type_)) in _WIDENINGS:
                continue  # e.g. auto-created m2m ids: wider on PostgreSQL, nothing lost
            if _normalise(expected) != _normalise(type_):
                problems.append(
                    f"{meta.db_table}.{field.column} is {type_}, expected {_normalise(expected)}"
                )
    return problems


def _dry_run(sqlite_path: Path, result: PrepareResult, step, note, *, pg_alias: str) -> None:
    """Run the copy's own conversion over every source row without writing anything."""
    from dbmigration.copy import scan_source

    t0 = time.perf_counter()
    # with the target alias the column limits (enum labels, lengths) come from PostgreSQL
    scan = scan_source(sqlite_path=sqlite_path, target_alias=pg_alias)
    seconds = max(time.perf_counter() - t0, 1e-6)
    result.rows_scanned = sum(scan.rows_scanned.values())
    result.rejections = [
        Rejection(
            table=r.table,
            pk=str(r.pk),
            column=r.column,
            reason=r.reason,
            excerpt=str(r.excerpt)[:200],
        )
        for r in scan.rejections
    ]
    result.conversion_rows_per_s = round(result.rows_scanned / seconds, 1)
    result.estimated_copy_seconds = round(seconds * (1 + WRITE_OVERHEAD), 2)
    step.details.update(
        {
            "rows_scanned": scan.rows_scanned,
            "rows_scanned_total": result.rows_scanned,
            "rejected_total": max(scan.rejected_total, len(scan.rejections)),
            "conversion_seconds": round(seconds, 3),
            "conversion_rows_per_s": result.conversion_rows_per_s,
            "estimated_copy_seconds": result.estimated_copy_seconds,
            "estimate_basis": f"measured conversion time x {1 + WRITE_OVERHEAD} for the writes",
            "rejections": [dataclasses.asdict(r) for r in result.rejections][
                :MAX_LISTED_REJECTIONS
            ],
        }
    )
    note(
        f"phase 5: {result.rows_scanned} rows converted in {seconds:.2f}s, "
        f"{len(result.rejections)} would be rejected"
    )


def _describe_rejection(r: Rejection) -> str:
    return f"{r.table} pk={r.pk} column {r.column}: {r.reason} ({r.excerpt[:40]!r})"


def connect_target(pg_alias: str = "postgresql"):
    """Open a plain psycopg connection to the alias (TargetError with a fix if we can't)."""
    from django.db import connections

    return connect(_conninfo(connections[pg_alias].settings_dict))
