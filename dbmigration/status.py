"""migration_status: where the runbook stands and what to run next."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from dbmigration import fence
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
    # the last runbook step that moved the state (a refusal or failure moves none)
    last_completed_step: str | None = None
    # the SQLite fence a switch killed before its flip left (lifted by this call), described
    lifted_fence: str | None = None

    def to_json(self) -> dict:
        """The status with stable keys and plain values, for --json and monitors."""
        backup = self.last_backup
        return {
            "phase": self.phase,
            "active_backend": self.active_backend,
            "next_step": self.next_step,
            "last_completed_step": self.last_completed_step,
            "last_report": {"path": self.last_report, "status": self.last_report_status}
            if self.last_report
            else None,
            "last_backup": {
                "path": str(backup.path),
                "kind": backup.kind,
                "created_at": backup.created_at,
                "verified": backup.verified,
            }
            if backup
            else None,
            "stale": self.stale,
            "write_freeze": self.write_freeze,
            "lifted_fence": self.lifted_fence,
            "history": self.history,
        }


def migration_status(
    *, state_file: Path, backup_dir: Path, sqlite_path: Path, report_dir: Path | None = None
) -> StatusResult:
    """Read the state file, the last report and the backups; writes nothing, except that it
    lifts the SQLite fence a switch killed before its flip left (fence.py says why it is safe)."""
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
    # every write on the live SQLite is refused until this fence goes: lift it, say so
    orphan = fence.lift_orphaned_sqlite_fence(sqlite_path, state_file=state_file)
    return StatusResult(
        lifted_fence=fence.describe_sqlite_fence(orphan) if orphan else None,
        write_freeze=freeze.summary() if freeze is not None else None,
        phase=current.phase,
        active_backend=current.active_backend,
        next_step=next_step,
        last_report=last_report,
        last_report_status=report_status,
        last_backup=last_backup,
        stale=stale,
        history=current.history[-5:],
        last_completed_step=_last_completed(current.history),
    )


def _last_completed(history: list[dict]) -> str | None:
    """Name the command of the newest transition and when it finished."""
    if not history:
        return None
    last = history[-1]
    command = state_mod.COMMAND_FOR_PHASE.get(last.get("to"), last.get("to"))
    return f"{command} at {last.get('at')} (phase {last.get('to')})"


@dataclasses.dataclass
class RunbookSummary:
    """What the reports in report_dir prove, for the end of a demo or a change ticket."""

    rows_copied: dict[str, int] = dataclasses.field(default_factory=dict)  # newest full copy
    rows_verified: dict[str, int] = dataclasses.field(default_factory=dict)  # newest verify
    freezes: list[tuple[str, float]] = dataclasses.field(default_factory=list)  # (cmd, s)
    reports: int = 0
    failed: list[str] = dataclasses.field(default_factory=list)  # reports not ok/warning


def runbook_summary(report_dir: Path) -> RunbookSummary:
    """Read every report in report_dir, oldest first; never writes anything."""
    summary = RunbookSummary()
    for path in sorted(Path(report_dir).glob("migration_report_*.json")):
        try:
            report = json.loads(path.read_text())
        except (OSError, ValueError):
            summary.failed.append(path.name)
            continue
        summary.reports += 1
        command, facts = report.get("command"), report.get("facts") or {}
        if report.get("status") not in ("ok", "warning"):
            summary.failed.append(f"{path.name} ({command}: {report.get('status')})")
            continue
        if command == "migrate_data" and facts.get("tables"):
            summary.rows_copied = {t: c.get("rows_written", 0) for t, c in facts["tables"].items()}
        for step in report.get("steps", []):
            if step.get("name") == "verify" and isinstance(step["details"].get("tables"), dict):
                summary.rows_verified = {
                    t: c.get("target_rows", 0) for t, c in step["details"]["tables"].items()
                }
        if facts.get("write_freeze_seconds"):
            summary.freezes.append((command, float(facts["write_freeze_seconds"])))
    return summary
