"""migration_prepare: phases 1 to 5 of the runbook, read-only on SQLite, idempotent.

1. safety checks   2. verified backups   3. PostgreSQL checks   4. schema (Django migrate)
5. final validation: tables/columns/types on PostgreSQL, a dry run of the data conversion
   over every source row, an estimate of the copy time.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

from django.apps import apps

from dbmigration import fence
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
from dbmigration.policies import skipped_models
from dbmigration.preflight import (
    CheckReport,
    check_disk_space,
    check_postgresql,
    check_sqlite_source,
    check_target_is_ours,
    connect,
    describe,
    target_identity,
)
from dbmigration.reports import RunReport
from dbmigration.schema_child import migrate_target
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
    rows_by_table: dict[str, int] = dataclasses.field(default_factory=dict)
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
        step.details = _create_schema(pg_alias, conninfo, sqlite_path=sqlite_path, log=run.log)
        note("phase 4: schema migrated on PostgreSQL")
        skipped = skipped_models(apps.get_models(include_auto_created=True))
        step.details["skipped_models"] = [dataclasses.asdict(p) for p in skipped]
        step.warnings.extend(
            f"{p.label} is not copied ({p.reason}); after the switch, refill it with: "
            + (" ".join(p.rebuild) if p.rebuild else "the project's own rebuild command")
            for p in skipped
        )

    with run.step("5_validation") as step:
        result.schema_problems = compare_schema(pg_alias)
        step.details["schema_problems"] = result.schema_problems
        if result.schema_problems:
            raise TargetError(
                f"{len(result.schema_problems)} schema differences on PostgreSQL, first: "
                f"{result.schema_problems[0]}. Fix: if the target was migrated by other code, "
                "drop it and prepare again; if the project's migrations make that column or "
                "table differ by vendor on purpose, give the model a policy in "
                "DBMIGRATION['MODEL_POLICIES'] (README: per-model policies)."
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
    # later steps refuse a POSTGRES_URL that reaches another server or a re-created database
    target = target_identity(conninfo)
    try:
        extra = state_mod.read_state(state_file).extra
        state_mod.transition(
            state_file,
            "prepared",
            note="migration_prepare",
            source_fingerprint=result.fingerprint_before,
            last_report=str(run.report_path),
            last_backup=str(result.backup.path),
            extra={**extra, "target": target},
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


def _ensure_database(conninfo: dict) -> bool:
    """Create the target database if it does not exist; return whether it was created."""
    import psycopg
    from psycopg import sql

    name = conninfo["dbname"]
    try:
        with connect({**conninfo, "dbname": "postgres"}) as conn:
            if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone():
                return False
            conn.execute(
                sql.SQL("CREATE DATABASE {} ENCODING 'UTF8' TEMPLATE template0").format(
                    sql.Identifier(name)
                )
            )
            return True
    except psycopg.Error as exc:
        raise TargetError(
            f"Could not create database {name} ({str(exc).strip()}). Fix: create it "
            "as an administrator, owned by the migration role."
        ) from None


def _create_schema(
    pg_alias: str, conninfo: dict, *, sqlite_path: Path, log: Callable[[str], None]
) -> dict:
    """Create the database if missing, then run Django's migrate against it with ``default``
    pointing at it and the source read-only (in a child process: schema_child.py says why)."""
    created = _ensure_database(conninfo)
    # the last rollback left the target fenced (fence.py); it is not the live store (the
    # phase allows a prepare) and migrate's own writes (content types, permissions) need it
    lifted = fence.lift_postgres_fence(pg_alias)
    outcome = migrate_target(target_alias=pg_alias, source_path=sqlite_path, log=log)
    return {"database_created": created, "lifted_postgres_fence": lifted, **outcome}


# column types PostgreSQL may hold wider than Django asks for, nothing lost (e.g. the ids of
# auto-created m2m tables), in format_type's spelling
_WIDENINGS = {
    ("smallint", "integer"),
    ("smallint", "bigint"),
    ("integer", "bigint"),
}


def canonical_types(conn, type_names) -> dict[str, str]:
    """PostgreSQL's own spelling of each type name (format_type of a probe column).

    ``time`` becomes ``time without time zone``, ``varchar(20)`` ``character varying(20)``,
    ``serial`` ``integer``: comparing these with the catalog needs no alias table of ours.
    A name PostgreSQL does not know maps to itself (and then differs from what it finds).
    """
    import psycopg
    from psycopg import sql

    found = {}
    with conn.transaction(force_rollback=True):
        for name in sorted(set(type_names)):
            try:
                with conn.transaction():
                    conn.execute(
                        sql.SQL("CREATE TEMP TABLE dbmigration_type_probe (c {})").format(
                            sql.SQL(name)
                        )
                    )
                    found[name] = conn.execute(
                        "SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
                        "WHERE attrelid = 'dbmigration_type_probe'::regclass AND attname = 'c'"
                    ).fetchone()[0]
                    conn.execute("DROP TABLE dbmigration_type_probe")
            except psycopg.Error:
                found[name] = name
    return found


def compare_schema(pg_alias: str) -> list[str]:
    """Every copied model's table and columns exist on PostgreSQL with the expected types."""
    from django.db import connections

    from dbmigration.plan import copied_models

    connection = connections[pg_alias]
    with connect(_conninfo(connection.settings_dict)) as conn:
        actual: dict[str, dict[str, tuple[str, str]]] = {}
        for table, column, type_, typtype in conn.execute(
            "SELECT c.relname, a.attname, format_type(a.atttypid, a.atttypmod), t.typtype "
            "FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid "
            "JOIN pg_namespace n ON n.oid = c.relnamespace JOIN pg_type t ON t.oid = a.atttypid "
            "WHERE n.nspname = current_schema() AND a.attnum > 0 AND NOT a.attisdropped "
            "AND c.relkind IN ('r', 'p')"
        ):
            actual.setdefault(table, {})[column] = (type_, typtype)
        expected: dict[tuple[str, str], str] = {}
        problems = []
        for model in copied_models():
            meta = model._meta
            columns = actual.get(meta.db_table)
            if columns is None:
                problems.append(
                    f"table {meta.db_table} is missing (if {meta.label}'s migrations create it "
                    "on SQLite only, give it a policy in DBMIGRATION['MODEL_POLICIES'])"
                )
                continue
            for field in meta.local_concrete_fields:
                db_type = field.db_type(connection)
                if db_type is None:
                    continue
                if field.column not in columns:
                    problems.append(f"{meta.db_table}.{field.column} is missing")
                    continue
                expected[(meta.db_table, field.column)] = db_type
        canonical = canonical_types(conn, expected.values())
    for (table, column), db_type in expected.items():
        want = canonical[db_type]
        got, typtype = actual[table][column]
        if typtype == "e" and want.startswith(("character varying", "text")):
            continue  # a migration turned a choice column into a PostgreSQL enum
        if got == want or (want, got) in _WIDENINGS:
            continue
        problems.append(f"{table}.{column} is {got}, expected {want}")
    return problems


def _dry_run(sqlite_path: Path, result: PrepareResult, step, note, *, pg_alias: str) -> None:
    """Run the copy's own conversion over every source row without writing anything."""
    from dbmigration.source_scan import scan_source

    t0 = time.perf_counter()
    # with the target alias the column limits (enum labels, lengths) come from PostgreSQL
    scan = scan_source(sqlite_path=sqlite_path, target_alias=pg_alias)
    seconds = max(time.perf_counter() - t0, 1e-6)
    result.rows_scanned = sum(scan.rows_scanned.values())
    result.rows_by_table = dict(scan.rows_scanned)
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
        # no row total: the command's summary gives it, saying what it counts
        f"phase 5: every table converted in {seconds:.2f}s, "
        f"{len(result.rejections):,} row(s) would be rejected"
    )


def _describe_rejection(r: Rejection) -> str:
    return f"{r.table} pk={r.pk} column {r.column}: {r.reason} ({r.excerpt[:40]!r})"


def connect_target(pg_alias: str = "postgresql"):
    """Open a plain psycopg connection to the alias (TargetError with a fix if we can't)."""
    from django.db import connections

    return connect(_conninfo(connections[pg_alias].settings_dict))
