"""Log and JSON report writers shared by every runbook command.

Each run writes ``<log_dir>/migration_<timestamp>.log`` (every step with timings) and
``<report_dir>/migration_report_<timestamp>.json`` (machine-readable).  The engine
records into a ``RunReport``; it never prints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import getpass
import json
import logging
import socket
import subprocess
import sys
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


def run_context() -> dict[str, Any]:
    """What an auditor asks first: which database, which tool, who ran what."""
    return {
        "target": _target(),
        "tool_version": _tool_version(),
        "git_commit": _git_commit(),
        "command_line": " ".join(sys.argv),
        "user": f"{getpass.getuser()}@{socket.gethostname()}",
    }


def _target() -> str | None:
    """user@host:port/dbname of the PostgreSQL target, never its password."""
    try:
        from django.db import connections

        cfg = connections.settings["postgresql"]
    except Exception:  # no Django settings, or no PostgreSQL alias: nothing to name
        return None
    return (
        f"{cfg.get('USER') or ''}@{cfg.get('HOST') or 'localhost'}:"
        f"{cfg.get('PORT') or 5432}/{cfg.get('NAME') or ''}"
    )


def _tool_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("propcore")
    except PackageNotFoundError:
        return "unknown"


def _git_commit() -> str | None:
    """The checkout's commit, when the code runs from one (a wheel install has none)."""
    try:
        found = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return found.stdout.strip() or None if found.returncode == 0 else None


@dataclasses.dataclass
class StepResult:
    name: str
    status: str = "running"  # ok | warning | failed | refused | skipped
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
    context: dict[str, Any] = dataclasses.field(default_factory=dict)
    exit_code: int | None = None  # 0 on success; the command's exit status otherwise
    error: str | None = None  # the one line the operator was shown, when the command failed
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
        run.context = run_context()
        run.log(
            f"{command} started: {run.context['command_line']} by {run.context['user']}, "
            f"target {run.context['target']}, propcore {run.context['tool_version']} "
            f"({run.context['git_commit'] or 'no git checkout'})"
        )
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
            self.exit_code = getattr(exc, "returncode", None) or self.exit_code
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
            "exit_code": self.exit_code,
            "error": self.error,
            **self.context,
            "steps": [dataclasses.asdict(s) for s in self.steps],
            "facts": self.facts,
            "log_path": str(self.log_path) if self.log_path else None,
        }

    def refuse(self, name: str, exc: BaseException) -> None:
        """Record a refusal as a step of its own, the same way in every command."""
        self.steps.append(StepResult(name=name, status="refused", error=error_text(exc)))
        self.exit_code = getattr(exc, "returncode", None) or 1
        self.log(f"step {name}: refused ({error_text(exc)})", level=logging.WARNING)

    def finish(self, status: str) -> Path:
        """Write the JSON report and close the log; return the report's path."""
        self.status = status
        error = self.error = self.facts.pop("error", None)
        if error and not any(s.status in ("failed", "refused") for s in self.steps):
            # a failure outside every step (a check before the first one) is a step too
            self.steps.append(StepResult(name="checks", status="failed", error=error))
        if status in ("ok", "warning"):
            self.exit_code = 0
        elif self.exit_code is None:
            self.exit_code = 1
        self._log_counts()
        self.log(f"{self.command} finished: {status} (exit code {self.exit_code})")
        self.report_path.write_text(json.dumps(self.to_dict(), indent=2, default=str))
        if self._log is not None:
            for handler in list(self._log.handlers):
                handler.close()
                self._log.removeHandler(handler)
        return self.report_path

    def _log_counts(self) -> None:
        """Per-table counts in the log as well as the report: one line per table."""
        sections = [("copy", self.facts.get("tables") or {})]
        sections += [(s.name, s.details.get("tables") or {}) for s in self.steps]
        for name, tables in sections:
            if not isinstance(tables, dict):
                continue
            for table, counts in tables.items():
                if isinstance(counts, dict):
                    numbers = ", ".join(
                        f"{k} {v:,}"
                        for k, v in counts.items()
                        if isinstance(v, int) and not isinstance(v, bool)
                    )
                    if numbers:
                        self.log(f"{name} {table}: {numbers}")


@contextlib.contextmanager
def refusals_recorded(command: str, *, report_dir: Path, log_dir: Path):
    """Give a refusal the engine raised before opening its run a report of its own, and
    stamp the command's exit code on the report of a run that failed; re-raise."""
    from dbmigration.errors import MigrationError

    report_dir, log_dir = Path(report_dir), Path(log_dir)
    before = set(report_dir.glob("migration_report_*.json")) if report_dir.exists() else set()
    try:
        yield
    except MigrationError as exc:
        written = sorted(set(report_dir.glob("migration_report_*.json")) - before)
        if not written:
            run = RunReport.open(command, report_dir=report_dir, log_dir=log_dir)
            run.refuse("checks", exc)
            run.finish("refused")
        else:
            report = json.loads(written[-1].read_text())
            report["exit_code"] = exc.returncode
            written[-1].write_text(json.dumps(report, indent=2, default=str))
        raise


@contextlib.contextmanager
def command_run(command: str, *, report_dir: Path, log_dir: Path):
    """A log and a report for a command whose engine keeps none (db_backup, db_restore)."""
    run = RunReport.open(command, report_dir=Path(report_dir), log_dir=Path(log_dir))
    try:
        yield run
    except BaseException as exc:
        failed = any(s.status == "failed" for s in run.steps)
        if not failed:
            run.refuse("checks", exc)
        run.exit_code = getattr(exc, "returncode", None) or run.exit_code or 1
        run.finish("failed" if failed else "refused")
        raise
    run.finish("warning" if any(s.warnings for s in run.steps) else "ok")
