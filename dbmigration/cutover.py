"""Phase 7: switch the application to PostgreSQL under a short write freeze.

Freeze on -> drain in-flight requests -> final ``migrate_data --sync`` catch-up -> verify
-> flip the active backend in the state file -> freeze off.  The freeze is lifted in a
``finally``: whatever fails, the application is back to writing, on SQLite, with the
state file untouched (it is written only as the last step, atomically).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from django.conf import settings

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
    """Whether the state records a migrate_data run that verified (and what it says)."""
    info = state.extra.get("migrate_data") or {}
    verified = info.get("verified") if isinstance(info, dict) else None
    if verified is True or (isinstance(verified, dict) and verified.get("ok")):
        return True, "migrate_data verified"
    if isinstance(verified, dict):
        return False, f"migrate_data verification failed: {verified.get('summary', verified)}"
    return False, "no verified migrate_data run is recorded in the state file"


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


def default_catch_up(progress: Progress) -> Any:
    """Run the copy helper's incremental sync (SQLite -> PostgreSQL) and return its result."""
    from dbmigration import sync

    return sync.sync_data(progress=progress)


def default_verify(progress: Progress) -> Any:
    """Verify every table (counts, range checksums); raise VerificationError on a mismatch."""
    from dbmigration import verify

    result = verify.verify_all(progress=progress)
    if not getattr(result, "ok", True):
        raise VerificationError(f"PostgreSQL differs from SQLite after the catch-up: {result}")
    return result


def switch_to_postgresql(
    *,
    state_file: Path | None = None,
    report_dir: Path | None = None,
    log_dir: Path | None = None,
    drain_seconds: float = 2.0,
    freeze_max_seconds: float = fz.DEFAULT_MAX_SECONDS,
    progress: Progress = None,
    catch_up: Callable[[Progress], Any] = default_catch_up,
    verify: Callable[[Progress], Any] = default_verify,
) -> SwitchResult:
    """Cut over to PostgreSQL; on any failure the application stays on SQLite, unfrozen."""
    state_file = Path(state_file or settings.STATE_FILE)
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
            caught_up = catch_up(note)
            step.details = {"result": _summary(caught_up)}
        with run.step("verify") as step:
            note("verifying PostgreSQL against SQLite")
            verified = verify(note)
            step.details = {"result": _summary(verified)}
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


def _summary(result: Any) -> Any:
    """A JSON-friendly summary of an engine result for the report."""
    if result is None:
        return None
    if dataclasses.is_dataclass(result):
        try:
            data = dataclasses.asdict(result)
        except Exception:  # values that do not copy (model classes, connections): keep text
            return str(result)[:2000]
        return {k: v for k, v in data.items() if not isinstance(v, list) or len(v) < 200}
    return str(result)[:2000]
