"""The migration state file: which phase the runbook is in and which backend is active.

One small JSON file under ``database/``, written atomically (temp file, fsync,
rename) with a history of transitions.  Settings read the active backend from it,
so this module must not import Django.
"""

from __future__ import annotations

import dataclasses
import getpass
import json
import os
import socket
import tempfile
from datetime import UTC, datetime
from pathlib import Path

BACKENDS = ("sqlite", "postgresql")
PHASES = ("nothing", "prepared", "data_migrated", "switched", "rolled_back")

# phase -> phases it may move to.  Rollback is possible once something was prepared (on a
# fresh install there is nothing to roll back), and after a rollback the next step is a new
# prepare: a rollback must never be a way around migration_prepare and its backup.
TRANSITIONS: dict[str, tuple[str, ...]] = {
    "nothing": ("prepared",),
    "prepared": ("prepared", "data_migrated", "rolled_back"),
    "data_migrated": ("prepared", "data_migrated", "switched", "rolled_back"),
    "switched": ("switched", "rolled_back"),
    "rolled_back": ("prepared", "rolled_back"),
}

# what an operator runs to reach each phase
COMMAND_FOR_PHASE = {
    "prepared": "migration_prepare",
    "data_migrated": "migrate_data",
    "switched": "switch_to_postgresql",
    "rolled_back": "rollback_to_sqlite",
}


class StateError(Exception):
    """The state file forbids the requested step, or cannot be read."""


@dataclasses.dataclass
class MigrationState:
    phase: str = "nothing"
    active_backend: str = "sqlite"
    # facts about the SQLite source when it was prepared / copied (sha256, data_version, ...)
    source_fingerprint: dict = dataclasses.field(default_factory=dict)
    last_report: str | None = None
    last_backup: str | None = None
    extra: dict = dataclasses.field(default_factory=dict)
    history: list[dict] = dataclasses.field(default_factory=list)

    @classmethod
    def from_dict(cls, data: dict) -> MigrationState:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def read_state(path: Path) -> MigrationState:
    """Read the state file; a missing file means nothing has happened yet."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return MigrationState()
    except (OSError, ValueError) as exc:
        raise StateError(
            f"State file {path} is unreadable ({exc}); restore it from git "
            "history or a backup, or delete it to start over."
        ) from exc
    state = MigrationState.from_dict(data)
    if state.phase not in PHASES or state.active_backend not in BACKENDS:
        raise StateError(
            f"State file {path} holds an unknown phase or backend: "
            f"{state.phase!r}/{state.active_backend!r}."
        )
    return state


def read_active_backend(path: Path, *, environ: dict | None = None) -> str:
    """Return the active backend: DATABASE_ACTIVE overrides the state file."""
    environ = os.environ if environ is None else environ
    override = environ.get("DATABASE_ACTIVE")
    if override:
        if override not in BACKENDS:
            raise StateError(
                f"DATABASE_ACTIVE={override!r} is not a backend; set it to "
                f"{' or '.join(BACKENDS)}, or unset it to follow the state file."
            )
        return override
    return read_state(path).active_backend


def write_file_atomic(path: Path, text: str) -> None:
    """Write text so that readers see the old or the new file, never half (fsync + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a power cut
    finally:
        os.close(dir_fd)


def write_state(path: Path, state: MigrationState) -> None:
    """Write the state file atomically."""
    write_file_atomic(path, json.dumps(dataclasses.asdict(state), indent=2, sort_keys=True))


# the one command that moves the runbook forward from each phase (none: PostgreSQL is live)
NEXT_COMMAND: dict[str, str | None] = {
    "nothing": "migration_prepare",
    "prepared": "migrate_data",
    "data_migrated": "switch_to_postgresql",
    "switched": None,
    "rolled_back": "migration_prepare",
}


def require_phase(state: MigrationState, target: str) -> None:
    """Raise StateError naming the one command to run next unless state may move to target."""
    if target in TRANSITIONS[state.phase]:
        return
    command = COMMAND_FOR_PHASE.get(target, target)
    following = NEXT_COMMAND.get(state.phase)
    if following is None:
        raise StateError(
            f"Cannot run {command} now: PostgreSQL is live (phase '{state.phase}'), the "
            "migration is done. Nothing more is needed; to go back to SQLite run "
            "rollback_to_sqlite."
        )
    raise StateError(
        f"Cannot run {command} now: the migration is in phase '{state.phase}'. "
        f"Run {following} next."
    )


def why_precious(state: MigrationState, backend: str) -> str | None:
    """Say why replacing or dropping backend's database would lose data (None: it would not)."""
    if backend == "sqlite":
        if state.active_backend == "sqlite":
            return "the application runs on it: writes made since the backup would be lost"
        return None  # after the switch rollback carries every PostgreSQL row back into it
    if state.active_backend == "postgresql":
        return (
            "the application runs on it (phase switched): every write since the switch lives there"
        )
    if state.phase == "data_migrated":
        return "it holds the migrated, verified copy that switch_to_postgresql would go live on"
    return None


def transition(
    path: Path, target: str, *, note: str = "", active_backend: str | None = None, **fields
) -> MigrationState:
    """Move the state file to target (checked), record who/when, and return the new state."""
    state = read_state(path)
    require_phase(state, target)
    before = state.phase
    state.phase = target
    if active_backend is not None:
        state.active_backend = active_backend
    for name, value in fields.items():
        setattr(state, name, value)
    state.history.append(
        {
            "from": before,
            "to": target,
            "at": datetime.now(UTC).isoformat(),
            "by": f"{getpass.getuser()}@{socket.gethostname()}",
            "active_backend": state.active_backend,
            "note": note,
        }
    )
    write_state(path, state)
    return state


# --- added for prepare (issue 3) -----------------------------------------------------

# the fingerprint keys that must be equal for a prepare to still hold: the schema and the
# applied migrations.  Rows may change (the site keeps writing); --sync and the switch's
# catch-up carry them.
FINGERPRINT_KEYS = ("schema_sha256", "migrations")


def stale_reasons(state: MigrationState, current: dict) -> list[str]:
    """Return why the prepare no longer holds for current (empty list: still fresh)."""
    prepared = state.source_fingerprint or {}
    if not prepared:
        return ["no source fingerprint recorded; run migration_prepare"]
    return [
        f"{key} changed since migration_prepare"
        for key in FINGERPRINT_KEYS
        if key in prepared and prepared.get(key) != current.get(key)
    ]


def is_prepare_stale(state: MigrationState, current: dict) -> bool:
    """Return True when the source changed since migration_prepare recorded its fingerprint."""
    return bool(stale_reasons(state, current))
