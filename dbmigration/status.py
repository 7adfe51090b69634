"""migration_status: where the runbook stands and what to run next."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from dbmigration import freeze as fz
from dbmigration import state as state_mod
from dbmigration.backup import BackupInfo, last_verified_backup
from dbmigration.errors import MigrationError, PhaseError

# the same next command the refusals name (state.NEXT_COMMAND), with a word on the ends
NEXT_STEP = {
    **state_mod.NEXT_COMMAND,
    "switched": "PostgreSQL is live: back it up daily (db_backup) and watch db_health_check; "
    "rollback_to_sqlite only if you must go back",
    "rolled_back": f"{state_mod.NEXT_COMMAND['rolled_back']}, when ready to try again",
}


@dataclasses.dataclass
class StatusResult:
    phase: str
    active_backend: str
    next_step: str
    last_report: str | None
    last_report_status: str | None
    last_backup: BackupInfo | None
    stale: list[str]  # why the prepare no longer holds (empty: fresh or not applicable)
    history: list[dict]
    write_freeze: dict | None = None  # Freeze.summary() of the flag on disk, live or void


def migration_status(
    *, state_file: Path, backup_dir: Path, sqlite_path: Path, report_dir: Path | None = None
) -> StatusResult:
    """Read the state file, the last report and the backups; never writes anything."""
    try:
        current = state_mod.read_state(state_file)
    except state_mod.StateError as exc:
        raise PhaseError(str(exc)) from exc
    last_report = current.last_report
    if report_dir is not None and Path(report_dir).exists():
        # a failed run moves no state, but its report is what the operator needs to read
        newest = sorted(Path(report_dir).glob("migration_report_*.json"))
        if newest and (not last_report or newest[-1].name > Path(last_report).name):
            last_report = str(newest[-1])
    report_status = None
    if last_report and Path(last_report).exists():
        try:
            report = json.loads(Path(last_report).read_text())
            report_status = f"{report.get('command')}: {report.get('status')}"
        except (OSError, ValueError):
            report_status = "unreadable"
    stale: list[str] = []
    if current.phase == "prepared":
        try:
            from dbmigration.sqlite_source import source_fingerprint

            stale = state_mod.stale_reasons(current, source_fingerprint(sqlite_path))
        except MigrationError as exc:
            stale = [str(exc)]
    # the backup that protects the data the application writes now
    last_backup = last_verified_backup(backup_dir, kind=current.active_backend)
    next_step = NEXT_STEP[current.phase]
    if stale:
        next_step = "migration_prepare (the SQLite schema or migrations changed since it ran)"
    elif current.phase == "switched" and last_backup is None:
        next_step = (
            "db_backup: nothing protects the live PostgreSQL yet (the SQLite backups hold none "
            "of its writes)"
        )
    freeze = fz.inspect_freeze(fz.freeze_path_for(state_file))
    return StatusResult(
        write_freeze=freeze.summary() if freeze is not None else None,
        phase=current.phase,
        active_backend=current.active_backend,
        next_step=next_step,
        last_report=last_report,
        last_report_status=report_status,
        last_backup=last_backup,
        stale=stale,
        history=current.history[-5:],
    )
