"""Phase 6, the ``migrate_data`` step: check the state, copy (or sync), verify, report, advance.

A thin orchestration over copy.py, sync.py and verify.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from django.db import connections

from dbmigration import fence
from dbmigration import state as state_mod
from dbmigration.backup import SNAPSHOT, load_backup
from dbmigration.copy import CopyResult, RowsRejected, copy_data
from dbmigration.errors import (
    BackupError,
    PhaseError,
    SourceError,
    VerificationError,
    postgres_lost,
    target_lost,
)
from dbmigration.plan import build_plan
from dbmigration.preflight import conninfo_from_settings, require_same_target
from dbmigration.reports import RunReport
from dbmigration.rows import Progress, key_text
from dbmigration.sqlite_source import (
    content_sha256,
    open_readonly,
    schema_sha256,
    snapshot_to,
    source_fingerprint,
)
from dbmigration.sync import sync_to_postgresql
from dbmigration.verify import Side
from dbmigration.verify import verify as run_verify


@dataclasses.dataclass
class MigrateDataResult:
    mode: str  # copy | sync | verify-only
    copy: CopyResult | None = None
    sync: Any = None  # sync.SyncResult
    verification: Any = None  # verify.VerifyResult
    report_path: Path | None = None
    log_path: Path | None = None
    fingerprint: dict = dataclasses.field(default_factory=dict)


def migrate_data(
    *,
    sqlite_path: Path,
    state_file: Path,
    report_dir: Path,
    log_dir: Path,
    alias: str = "postgresql",
    tables: Iterable[str] | None = None,
    quarantine: bool = False,
    repairs: Iterable[str] = (),
    sync: bool = False,
    verify_only: bool = False,
    verify: bool = True,
    progress: Callable[[str, str, int, int], None] | None = None,
) -> MigrateDataResult:
    """Phase 6: check the state, copy (or sync), verify, write the report, move the state.

    progress(stage, table, done, total) hears every stage: copy, sync and verify.
    """

    state = state_mod.read_state(state_file)
    try:
        state_mod.require_phase(state, "data_migrated")
    except state_mod.StateError as exc:
        raise PhaseError(str(exc)) from exc
    # the target migration_prepare checked, reachable: exit 3 with the fix, not a traceback
    require_same_target(
        state.extra.get("target"), conninfo_from_settings(connections.settings["postgresql"])
    )
    fingerprint = source_fingerprint(sqlite_path)
    if state.source_fingerprint and not (sync or verify_only):
        # rows may change (the copy reads a snapshot; --sync carries the rest); a changed schema
        # or set of migrations needs the prepare again, however far the copy got
        reasons = state_mod.stale_reasons(state, fingerprint)
        if reasons:
            raise SourceError(
                f"The SQLite schema changed since migration_prepare ({'; '.join(reasons)}). "
                "Run migration_prepare again: it brings PostgreSQL's schema up to date."
            )
    mode = "verify-only" if verify_only else "sync" if sync else "copy"
    run = RunReport.open("migrate_data", report_dir=report_dir, log_dir=log_dir)
    result = MigrateDataResult(
        mode=mode, report_path=run.report_path, log_path=run.log_path, fingerprint=fingerprint
    )
    run.facts.update(
        {
            "mode": mode,
            "source": str(sqlite_path),
            "source_sha256": fingerprint["sha256"],
            "target_alias": alias,
            "quarantine": quarantine,
            "repairs": sorted(repairs),
        }
    )
    status = "failed"
    # the application may go on writing: every step reads one consistent snapshot of the
    # file; --sync and the switch's catch-up carry what is written after it
    live_path, temporary = sqlite_path, False
    try:
        sqlite_path, temporary = _consistent_source(state, live_path, mode)
        run.facts["read_from"] = str(sqlite_path)
        # the prepare's snapshot never changes: a resume survives the site's writes
        copied_sha256 = fingerprint["sha256"] if temporary else content_sha256(sqlite_path)
        if mode != "verify-only" and fence.lift_postgres_fence(alias):
            run.facts["lifted_postgres_fence"] = True  # the last rollback left it; we write now
        plan = build_plan(only=tables)
        exclude: dict[str, set[str]] = {}
        if mode == "copy":
            with run.step("copy") as step:
                reject_file = report_dir / f"rejects_{run.started_at[:19].replace(':', '')}.jsonl"
                try:
                    result.copy = copy_data(
                        sqlite_path=sqlite_path,
                        alias=alias,
                        tables=tables,
                        quarantine=quarantine,
                        repairs=repairs,
                        reject_file=reject_file,
                        state_file=state_file,
                        progress=_in_stage(progress, "copy"),
                        source_sha256=copied_sha256,
                    )
                except RowsRejected as exc:
                    _record_copy(run, step, exc.result)
                    raise
                _record_copy(run, step, result.copy)
                for r in result.copy.rejections:
                    exclude.setdefault(r.table, set()).add(key_text(r.pk))
        elif mode == "sync":
            with run.step("sync") as step:
                reject_file = report_dir / f"rejects_{run.started_at[:19].replace(':', '')}.jsonl"
                result.sync = sync_to_postgresql(
                    sqlite_path=sqlite_path,
                    alias=alias,
                    tables=tables,
                    state_file=state_file,
                    progress=_in_stage(progress, "sync"),
                    quarantine=quarantine,
                    reject_file=reject_file,
                )
                quarantined = result.sync.rejections
                for r in quarantined:
                    exclude.setdefault(r.table, set()).add(key_text(r.pk))
                if quarantined:
                    run.facts["rejected_total"] = len(quarantined)
                    run.facts["rejections"] = [r.as_dict() for r in quarantined[:1000]]
                    run.facts["reject_file"] = str(result.sync.reject_file)
                    step.warnings.append(
                        f"{len(quarantined)} row(s) quarantined, listed in "
                        f"{result.sync.reject_file}"
                    )
                step.details.update(
                    {
                        "rows_written": result.sync.rows_written,
                        "rows_deleted": result.sync.rows_deleted,
                        "tables": {
                            d.table: {
                                "inserted": len(d.inserted_pks),
                                "updated": len(d.updated_pks),
                                "deleted": len(d.deleted_pks),
                                "seconds": d.seconds,
                            }
                            for d in result.sync.diffs
                            if d.changed
                        },
                    }
                )
        if verify or verify_only:
            with run.step("verify") as step:
                source, target = Side(sqlite_path=sqlite_path), Side(alias=alias)
                result.verification = run_verify(
                    source=source,
                    target=target,
                    plan=plan,
                    exclude=exclude,
                    progress=_in_stage(progress, "verify"),
                )
                checks = {c.table: c for c in result.verification.tables}
                step.details["tables"] = {
                    t: {
                        "source_rows": c.source_rows,
                        "target_rows": c.target_rows,
                        "quarantined": c.excluded,
                        "source_checksum": c.source_checksum,
                        "target_checksum": c.target_checksum,
                        "mismatched_ranges": c.mismatched_ranges[:20],
                        "seconds": c.seconds,
                    }
                    for t, c in checks.items()
                }
                if result.copy is not None:
                    for table in run.facts.get("tables", {}).values():
                        check = checks.get(table["table"])
                        if check:
                            table["source_checksum"] = check.source_checksum
                            table["target_checksum"] = check.target_checksum
                step.warnings.extend(result.verification.warnings)
                problems = result.verification.problems(source, target)
                if problems:
                    step.details["problems"] = problems
                    raise VerificationError(
                        "Verification failed; the phase did not advance:\n  "
                        + "\n  ".join(problems[:20])
                    )
        if mode != "verify-only" and tables is None:  # a subset is not the whole phase
            state_mod.transition(
                state_file,
                "data_migrated",
                note=f"migrate_data ({mode})",
                source_fingerprint=fingerprint,
                last_report=str(run.report_path),
            )
        quarantined = (result.copy and result.copy.rejected_total) or (
            result.sync and result.sync.rejections
        )
        status = "warning" if quarantined else "ok"
    except Exception as exc:
        lost = postgres_lost(exc)
        if lost is None:
            raise
        during = (
            f"migrate_data's {run.steps[-1].name} step"
            if run.steps
            else "the start of migrate_data"
        )
        raise target_lost(
            lost,
            during=during,
            then="Finished tables stay done and the phase did not move. Check the server "
            "(db_test_postgresql), then run migrate_data again.",
        ) from lost
    finally:
        if temporary:
            sqlite_path.unlink(missing_ok=True)
        run.finish(status)
    return result


def _in_stage(progress, stage: str) -> Progress | None:
    """Adapt a stage-aware progress callback to the (table, done, total) the stages call."""
    if progress is None:
        return None
    return lambda table, done, total: progress(stage, table, done, total)


def _consistent_source(state, live_path: Path, mode: str) -> tuple[Path, bool]:
    """The file to read and whether it is a temporary snapshot of the live one.

    A copy reads the prepare's verified backup when it is a plain SQLite file of the same
    schema (no extra copy: 1.4 s for 100k users' 351 MB); otherwise, and for --sync and
    --verify-only (they need the newest rows), a fresh snapshot with the online backup API.
    """

    if mode == "copy" and state.last_backup:
        candidate = Path(state.last_backup) / SNAPSHOT
        with contextlib.suppress(BackupError):
            info = load_backup(Path(state.last_backup))
            if info.kind == "sqlite" and not info.encrypted and candidate.exists():
                conn = open_readonly(candidate)
                try:
                    schema = schema_sha256(conn)
                finally:
                    conn.close()
                if schema == state.source_fingerprint.get("schema_sha256"):
                    return candidate, False
    stamp = time.strftime("%Y%m%dT%H%M%S") + f"-{os.getpid()}"
    snapshot = live_path.with_name(f"{live_path.name}.migrate_data-{stamp}")
    return snapshot_to(live_path, snapshot), True


def _record_copy(run, step, copy: CopyResult) -> None:
    run.facts["tables"] = {
        t.table: {
            "table": t.table,
            "status": t.status,
            "rows_read": t.rows_read,
            "rows_written": t.rows_written,
            "rows_rejected": t.rows_rejected,
            "rows_repaired": t.rows_repaired,
            "rows_in_python": t.rows_in_python,
            "seconds": t.seconds,
            "rows_per_second": t.rows_per_second,
        }
        for t in copy.tables
    }
    run.facts["rejected_total"] = copy.rejected_total
    run.facts["rejections"] = [r.as_dict() for r in copy.rejections[:1000]]
    run.facts["reject_file"] = str(copy.reject_file) if copy.reject_file else None
    run.facts["repairs"] = [dataclasses.asdict(r) for r in copy.repairs[:10000]]
    step.details.update(
        {
            "rows_written": copy.rows_written,
            "rebuilt": len(copy.rebuilt),
            "schema_problems": copy.schema_problems,
        }
    )
    if copy.rejected_total and copy.reject_file:
        verb = "quarantined" if run.facts.get("quarantine") else "rejected (nothing kept)"
        step.warnings.append(f"{copy.rejected_total} row(s) {verb}, listed in {copy.reject_file}")
