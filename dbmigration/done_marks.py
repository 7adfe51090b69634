"""Which tables a copy has finished, so an interrupted run redoes only the rest.

Markers live in the state file's ``extra["migrate_data"]``, keyed by the target's
identity, and are written only after a table's transaction committed.
"""

from __future__ import annotations

from pathlib import Path

from dbmigration import state as state_mod
from dbmigration.preflight import identity_row

STATE_KEY = "migrate_data"


def target_identity(cursor) -> str:
    """The target database's identity: the cluster's system identifier and the database's
    oid.  A recreated database or another server gets another one."""
    system, oid = identity_row(cursor)
    return f"{system}/{oid}"


def read_marks(state_file: Path | None, *, target: str | None = None) -> dict:
    """The copy's marks; with ``target``, only if they were made on that target database
    (done tables and saved index definitions mean nothing for another one)."""
    if state_file is None:
        return {}
    marks = dict(state_mod.read_state(state_file).extra.get(STATE_KEY, {}))
    if target is not None and marks.get("target") != target:
        return {}
    return marks


def write_marks(state_file: Path | None, marks: dict) -> None:
    if state_file is None:
        return
    state = state_mod.read_state(state_file)
    state.extra[STATE_KEY] = marks
    state_mod.write_state(state_file, state)


def done_tables(
    state_file: Path | None, *, source_sha256: str, target: str | None = None
) -> dict[str, int]:
    """Return {table: rows} copied from this exact source file (other sources don't count),
    into the ``target`` database when given."""
    marks = read_marks(state_file, target=target)
    if marks.get("source_sha256") != source_sha256:
        return {}
    return dict(marks.get("done", {}))
