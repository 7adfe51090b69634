"""Phase 7: switch the application to PostgreSQL under a short write freeze.

Freeze on -> drain in-flight requests -> final ``migrate_data --sync`` catch-up -> verify
-> flip the active backend in the state file -> freeze off.  The freeze is lifted in a
``finally``: whatever fails, the application is back to writing, on SQLite, with the
state file untouched (it is written only as the last step, atomically).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import connections

from dbmigration import freeze as fz
from dbmigration.errors import PhaseError, VerificationError
from dbmigration.reports import RunReport
from dbmigration.state import MigrationState, read_state, transition

Progress = Callable[[str], None] | None
SWITCH_STEPS = (
    "check that migrate_data finished and verified",
    "write freeze on (writes answer 503, reads go on)",
    "drain: wait for in-flight write requests",
    "final catch-up: migrate_data --sync (changes since the last run)",
    "verify PostgreSQL against the frozen SQLite source",
    "flip the active backend to postgresql in the state file",
    "write freeze off (application processes reload on their next request)",
)


@dataclasses.dataclass
class SwitchPlan:
    phase: str
    active_backend: str
    steps: tuple[str, ...]
    problems: list[str]

    @property
    def ready(self) -> bool:
        return not self.problems


@dataclasses.dataclass
class SwitchResult:
    freeze_seconds: float
    catch_up: Any
    verification: Any
    state: MigrationState
    report_path: Path | None
    seconds: float


def migration_verified(state: MigrationState) -> tuple[bool, str]:
    """Whether migrate_data copied every table and its recorded run verified them."""
    from dbmigration.plan import build_plan

    marks = state.extra.get("migrate_data") or {}
    done = set(marks.get("done", {}))
    missing = [t.db_table for t in build_plan().tables if t.db_table not in done]
    if missing:
        return False, (
            f"migrate_data has not copied {len(missing)} table(s) ({', '.join(missing[:5])})"
        )
    try:
        report = json.loads(Path(state.last_report or "").read_text())
    except (OSError, ValueError):
        return False, f"the report of the last migrate_data run ({state.last_report}) is missing"
    steps = {step.get("name"): step for step in report.get("steps", [])}
    if report.get("command") != "migrate_data" or report.get("status") not in ("ok", "warning"):
        return False, f"the last recorded run ({state.last_report}) is not a finished migrate_data"
    if steps.get("verify", {}).get("status") != "ok":
        return False, "the last migrate_data run did not verify (was it run with --no-verify?)"
    return True, "migrate_data copied and verified every table"


def plan_switch(*, state_file: Path) -> SwitchPlan:
    """Check the preconditions and list the steps, changing nothing."""
    state = read_state(state_file)
    problems = []
    if state.phase == "switched" and state.active_backend == "postgresql":
        problems.append("Already switched: PostgreSQL is the active backend.")
    elif state.phase != "data_migrated":
        problems.append(
            f"The migration is in phase '{state.phase}'; switch_to_postgresql needs "
            "'data_migrated'. Run migration_prepare and migrate_data first."
        )
    else:
        ok, why = migration_verified(state)
        if not ok:
            problems.append(f"{why}. Run migrate_data (it verifies) before switching.")
    freeze = fz.read_freeze(fz.freeze_path_for(state_file))
    if freeze is not None:
        problems.append(f"A write freeze is already on ({freeze.reason}, by {freeze.owner}).")
    return SwitchPlan(state.phase, state.active_backend, SWITCH_STEPS, problems)


def catch_up(*, sqlite_path: Path, state_file: Path, progress: Progress) -> Any:
    """The final ``migrate_data --sync``: carry SQLite's changes since the last run."""
    from dbmigration.sync import sync_to_postgresql

    def per_table(table: str, number: int, total: int) -> None:
        if progress:
            progress(f"catch-up: {table} ({number}/{total})")

    return sync_to_postgresql(
        sqlite_path=sqlite_path, alias="postgresql", state_file=state_file, progress=per_table
    )


def verify_switch(*, sqlite_path: Path) -> Any:
    """Counts and range checksums of every table, FKs, sequences, migrations; raise if off."""
    from dbmigration.verify import Side, verify

    source, target = Side(sqlite_path=sqlite_path), Side(alias="postgresql")
    result = verify(source=source, target=target)
    if not result.ok:
        problems = "; ".join(result.problems(source, target)[:5])
        raise VerificationError(f"PostgreSQL differs from SQLite after the catch-up: {problems}")
    return result


def switch_to_postgresql(
    *,
    state_file: Path | None = None,
    report_dir: Path | None = None,
    log_dir: Path | None = None,
    drain_seconds: float = 2.0,
    freeze_max_seconds: float = fz.DEFAULT_MAX_SECONDS,
    sqlite_path: Path | None = None,
    progress: Progress = None,
) -> SwitchResult:
    """Cut over to PostgreSQL; on any failure the application stays on SQLite, unfrozen."""
    state_file = Path(state_file or settings.STATE_FILE)
    sqlite_path = Path(sqlite_path or connections.settings["sqlite"]["NAME"])
    plan = plan_switch(state_file=state_file)
    if not plan.ready:
        raise PhaseError(" ".join(plan.problems))
    note = progress or (lambda message: None)
    run = RunReport.open(
        "switch_to_postgresql",
        report_dir=Path(report_dir or settings.REPORT_DIR),
        log_dir=Path(log_dir or settings.LOG_DIR),
    )
    start = time.perf_counter()
    flag = fz.freeze_path_for(state_file)
    freeze = None
    frozen_for = 0.0
    try:
        with run.step("write_freeze_on") as step:
            freeze = fz.freeze_on(
                flag, reason="switch_to_postgresql", max_seconds=freeze_max_seconds
            )
            step.details = {"flag": str(flag), "expires_in_seconds": freeze_max_seconds}
            note("write freeze on")
        with run.step("drain") as step:
            time.sleep(drain_seconds)  # requests that began before the freeze finish writing
            step.details = {"seconds": drain_seconds}
        with run.step("catch_up") as step:
            note("final catch-up: migrate_data --sync")
            caught_up = catch_up(sqlite_path=sqlite_path, state_file=state_file, progress=note)
            note(f"catch-up carried {caught_up.changed} changed rows")
            step.details = {
                "changed": caught_up.changed,
                "rows_written": caught_up.rows_written,
                "rows_deleted": caught_up.rows_deleted,
                "tables": {
                    d.table: [len(d.inserted_pks), len(d.updated_pks), len(d.deleted_pks)]
                    for d in caught_up.diffs
                    if d.changed
                },
            }
        with run.step("verify") as step:
            note("verifying PostgreSQL against SQLite")
            verified = verify_switch(sqlite_path=sqlite_path)
            step.details = {"ok": verified.ok, "tables": len(verified.tables)}
        with run.step("flip_active_backend") as step:
            if not fz.still_held(flag, freeze):
                # the freeze expired or was removed: writes may have reached SQLite since
                raise fz.FreezeError(
                    "The write freeze expired or was lifted during the switch, so SQLite may "
                    "hold writes PostgreSQL lacks. Nothing was switched; run "
                    "switch_to_postgresql again (raise --freeze-timeout if it was too short)."
                )
            new_state = transition(
                state_file,
                "switched",
                active_backend="postgresql",
                note="switch_to_postgresql",
                last_report=str(run.report_path),
            )
            step.details = {"active_backend": "postgresql"}
            note("active backend is now postgresql")
    except BaseException as exc:
        run.facts["error"] = str(exc) or type(exc).__name__
        run.facts["active_backend"] = read_state(state_file).active_backend
        raise
    finally:
        if freeze is not None:
            frozen_for = fz.freeze_off(flag, freeze) or 0.0
            note(f"write freeze off after {frozen_for:.2f} s")
        run.facts["write_freeze_seconds"] = frozen_for
        run.facts["seconds"] = round(time.perf_counter() - start, 3)
        if run.status == "running" and "error" in run.facts:
            run.finish("failed")
    run.facts["active_backend"] = "postgresql"
    report_path = run.finish("ok")
    return SwitchResult(
        freeze_seconds=frozen_for,
        catch_up=caught_up,
        verification=verified,
        state=new_state,
        report_path=report_path,
        seconds=run.facts["seconds"],
    )
