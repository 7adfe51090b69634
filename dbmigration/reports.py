"""Log and JSON report writers shared by every runbook command.

Each run writes ``<log_dir>/migration_<timestamp>.log`` (every step with timings) and
``<report_dir>/migration_report_<timestamp>.json`` (machine-readable).  The engine
records into a ``RunReport``; it never prints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

logger = logging.getLogger("dbmigration")


def error_text(exc: BaseException) -> str:
    """What a report says about the exception that ended a step or a run."""
    if isinstance(exc, KeyboardInterrupt):  # the SIGTERM handlers raise it as "signal N"
        return f"interrupted by {'SIGTERM' if 'signal' in str(exc) else 'Ctrl-C'}"
    return str(exc) or type(exc).__name__


@dataclasses.dataclass
class StepResult:
    name: str
    status: str = "running"  # ok | warning | failed | skipped
    seconds: float = 0.0
    details: dict = dataclasses.field(default_factory=dict)
    warnings: list[str] = dataclasses.field(default_factory=list)
    error: str | None = None


@dataclasses.dataclass
class RunReport:
    """One command run: its steps, its facts, and where it was written."""

    command: str
    started_at: str = dataclasses.field(default_factory=lambda: datetime.now(UTC).isoformat())
    status: str = "running"
    steps: list[StepResult] = dataclasses.field(default_factory=list)
    facts: dict[str, Any] = dataclasses.field(default_factory=dict)
    log_path: Path | None = None
    report_path: Path | None = None
    _log: logging.Logger | None = dataclasses.field(default=None, repr=False)

    @classmethod
    def open(cls, command: str, *, report_dir: Path, log_dir: Path) -> RunReport:
        """Start a run: create the log file now, so every step lands in it as it happens."""
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        report_dir.mkdir(parents=True, exist_ok=True)
        log_dir.mkdir(parents=True, exist_ok=True)
        run = cls(
            command=command,
            log_path=log_dir / f"migration_{stamp}.log",
            report_path=report_dir / f"migration_report_{stamp}.json",
        )
        run._log = logging.getLogger(f"dbmigration.run.{stamp}")
        run._log.propagate = False
        run._log.setLevel(logging.DEBUG)
        handler = logging.FileHandler(run.log_path, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        run._log.addHandler(handler)
        run.log(f"{command} started")
        return run

    def log(self, message: str, *, level: int = logging.INFO) -> None:
        if self._log is not None:
            self._log.log(level, message)
        logger.log(level, message)

    @contextlib.contextmanager
    def step(self, name: str):
        """Time a step; an exception marks it failed (and propagates)."""
        result = StepResult(name=name)
        self.steps.append(result)
        self.log(f"step {name}: start")
        start = time.perf_counter()
        try:
            yield result
        except BaseException as exc:
            result.status = "failed"
            result.error = error_text(exc)
            raise
        else:
            if result.status == "running":
                result.status = "warning" if result.warnings else "ok"
        finally:
            result.seconds = round(time.perf_counter() - start, 3)
            self.log(
                f"step {name}: {result.status} in {result.seconds:.3f}s"
                + (f" ({result.error})" if result.error else "")
            )
            for warning in result.warnings:
                self.log(f"step {name}: warning: {warning}", level=logging.WARNING)

    def to_dict(self) -> dict:
        return {
            "command": self.command,
            "started_at": self.started_at,
            "finished_at": datetime.now(UTC).isoformat(),
            "status": self.status,
            "steps": [dataclasses.asdict(s) for s in self.steps],
            "facts": self.facts,
            "log_path": str(self.log_path) if self.log_path else None,
        }

    def finish(self, status: str) -> Path:
        """Write the JSON report and close the log; return the report's path."""
        self.status = status
        self.log(f"{self.command} finished: {status}")
        self.report_path.write_text(json.dumps(self.to_dict(), indent=2, default=str))
        if self._log is not None:
            for handler in list(self._log.handlers):
                handler.close()
                self._log.removeHandler(handler)
        return self.report_path
