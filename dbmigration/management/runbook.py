"""What the runbook commands share, written once: their common options (one name, one
default, shown in --help, for one idea) and the wiring around the engine call (the progress
renderer, a report for a refusal, the engine's exceptions turned into exit codes)."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator

from django.core.management.base import CommandError

from dbmigration import conf
from dbmigration.errors import MigrationError, NotConfirmed, PhaseError
from dbmigration.management.progress import ProgressRenderer
from dbmigration.reports import refusals_recorded
from dbmigration.state import StateError, read_state, why_precious

# newest verified backups kept per kind (SQLite, PostgreSQL) after a backup; "all" keeps every
# one. Three: the last good one, the one before it, and the one a rollback or restore kept.
DEFAULT_KEEP = 3
DEFAULT_LOCK_TIMEOUT = 5.0


KEEP_ALL = 0  # what --keep all parses to (a count must be at least 1)


def keep_count(text: str) -> int:
    """Parse --keep: a number of backups, or "all" (KEEP_ALL)."""
    if text.strip().lower() == "all":
        return KEEP_ALL
    try:
        keep = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of backups or 'all'") from None
    if keep < 1:
        raise argparse.ArgumentTypeError("must be at least 1 (or 'all'): never delete every backup")
    return keep


def resolve_keep(given: int | None) -> int | None:
    """What the engine's retention gets: the default when --keep was not given, None for all."""
    if given is None:
        return DEFAULT_KEEP
    return None if given == KEEP_ALL else given


def add_keep(parser) -> None:
    # the parser's default stays None so a command can tell an explicit --keep (pgBackRest
    # backups refuse one: their repository has its own retention); resolve_keep applies it
    parser.add_argument(
        "--keep",
        type=keep_count,
        metavar="N",
        help="After a good backup, delete all but the newest N verified backups of each kind; "
        f"'all' keeps every one (default: {DEFAULT_KEEP}).",
    )


def add_lock_timeout(parser, *, default: float = DEFAULT_LOCK_TIMEOUT, waits_for: str) -> None:
    parser.add_argument(
        "--lock-timeout",
        type=float,
        default=default,
        metavar="SECONDS",
        help=f"Seconds to wait for {waits_for} before giving up (default: %(default)s).",
    )


def add_noinput(
    parser, *, help: str = "Do not ask for the typed confirmation (for scripts)."
) -> None:
    parser.add_argument(
        "--noinput", "--no-input", action="store_false", dest="interactive", help=help
    )


def precious_reason(state_file, backend: str) -> str | None:
    """Why replacing this store would lose what the application keeps there (None: nothing)."""
    try:
        return why_precious(read_state(state_file), backend)
    except StateError as exc:
        raise CommandError(str(exc), returncode=PhaseError.returncode) from exc


def confirm_by_typing(
    stdout,
    *,
    name: str,
    kind: str,
    refusing: str,
    reason: str,
    interactive: bool,
    warning: str,
    to: str = "continue",
    cancelled: str,
) -> None:
    """Go on only once the operator has typed ``name`` at a terminal; never under --noinput."""
    if not interactive:
        raise CommandError(
            f"{refusing} under --noinput: {reason}. Run the command at a terminal and type "
            f"the {kind} to confirm.",
            returncode=NotConfirmed.returncode,
        )
    stdout.write(warning)
    if input(f"    Type the {kind} '{name}' to {to}: ") != name:
        raise CommandError(f"Cancelled: {cancelled}", returncode=NotConfirmed.returncode)


def add_json(parser, *, what: str = "the result") -> None:
    parser.add_argument(
        "--json", action="store_true", help=f"Print {what} as one JSON document, nothing else."
    )


def add_database(parser, *, default: str, help: str, choices: list[str] | None = None) -> None:
    """--database names the database a command works on, as in Django's own commands."""
    kwargs = {"choices": choices} if choices else {}
    parser.add_argument(
        "--database", default=default, help=f"{help} (default: %(default)s).", **kwargs
    )


@contextlib.contextmanager
def engine_errors(*, then: str = "", also: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """Turn the engine's exceptions into one line and their exit code (no traceback);
    ``then`` says what the failure left behind."""
    try:
        yield
    except (MigrationError, *also) as exc:
        message = f"{exc} {then}".strip()
        code = getattr(exc, "returncode", PhaseError.returncode)  # StateError: out of order
        raise CommandError(message, returncode=code) from exc


@contextlib.contextmanager
def runbook_run(
    command: str,
    *,
    stdout,
    verbosity: int,
    then: str = "",
    also: tuple[type[BaseException], ...] = (),
) -> Iterator[ProgressRenderer]:
    """The frame of one runbook step: live progress while it runs, a report even for a
    refusal, and the exit code of what went wrong."""
    renderer = ProgressRenderer(stdout, verbosity=verbosity)
    with (
        engine_errors(then=then, also=also),
        renderer,
        refusals_recorded(command, report_dir=conf.report_dir(), log_dir=conf.log_dir()),
    ):
        yield renderer
