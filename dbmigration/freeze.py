"""The write freeze: a flag file every application process honours during cutover.

While ``write_freeze.json`` exists next to the state file (and has not expired), the
middleware answers write requests with 503 + Retry-After and reads go on.  The file is
written atomically (temp file, fsync, rename) and carries the reason, who set it, when,
and when it expires, so a freeze left behind by a killed command lifts itself.
No Django imports: the middleware reads it on every request, so it must stay cheap.
"""

from __future__ import annotations

import contextlib
import dataclasses
import getpass
import json
import os
import socket
import time
from datetime import UTC, datetime
from pathlib import Path

from dbmigration.errors import MigrationError
from dbmigration.state import write_file_atomic

FREEZE_FILENAME = "write_freeze.json"
DEFAULT_MAX_SECONDS = 600.0  # a freeze outliving this is a crashed command's leftover


class FreezeError(MigrationError):
    """A write freeze is already held, or was lost while we needed it."""

    returncode = 8


@dataclasses.dataclass
class Freeze:
    reason: str
    started_at: float  # unix time
    expires_at: float  # unix time; after it the application ignores the flag
    owner: str  # user@host pid, for the operator who finds a leftover
    token: str  # identifies the holder, so only it lifts its own freeze

    @property
    def started_iso(self) -> str:
        return datetime.fromtimestamp(self.started_at, UTC).isoformat()

    def expired(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) >= self.expires_at

    def retry_after(self, now: float | None = None) -> int:
        """Seconds a client should wait: the time left, at least 1, capped at a minute."""
        left = self.expires_at - (time.time() if now is None else now)
        return max(1, min(60, int(left)))


def freeze_path_for(state_file: Path) -> Path:
    """The freeze flag lives next to the state file (same directory, same lifetime)."""
    return Path(state_file).parent / FREEZE_FILENAME


def read_freeze(path: Path) -> Freeze | None:
    """Return the active freeze at path, or None when there is none or it has expired."""
    try:
        data = json.loads(Path(path).read_text())
        freeze = Freeze(**data)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError):
        # unreadable flag: fail safe, treat as frozen for a minute from now
        now = time.time()
        return Freeze("unreadable freeze file", now, now + 60, "unknown", "")
    return None if freeze.expired() else freeze


def freeze_on(path: Path, *, reason: str, max_seconds: float = DEFAULT_MAX_SECONDS) -> Freeze:
    """Set the write freeze; refuse when another live freeze is held."""
    path = Path(path)
    current = read_freeze(path)
    if current is not None:
        raise FreezeError(
            f"Writes are already frozen since {current.started_iso} by {current.owner} "
            f"({current.reason}). Wait for that command to finish, or remove {path} if it "
            "is a leftover."
        )
    now = time.time()
    freeze = Freeze(
        reason=reason,
        started_at=now,
        expires_at=now + max_seconds,
        owner=f"{getpass.getuser()}@{socket.gethostname()} pid {os.getpid()}",
        token=os.urandom(8).hex(),
    )
    write_file_atomic(path, json.dumps(dataclasses.asdict(freeze), indent=2))
    return freeze


def still_held(path: Path, freeze: Freeze, *, margin: float = 1.0) -> bool:
    """True when our freeze is still the one on disk and has at least `margin` s left."""
    current = read_freeze(path)
    return (
        current is not None
        and current.token == freeze.token
        and current.expires_at - time.time() >= margin
    )


def freeze_off(path: Path, freeze: Freeze | None = None) -> float | None:
    """Lift the freeze (ours, or any when freeze is None); return how long it lasted."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        data = {}
    if freeze is not None and data.get("token") not in (None, freeze.token):
        return None  # someone else's freeze: not ours to lift
    path.unlink(missing_ok=True)
    started = freeze.started_at if freeze is not None else data.get("started_at")
    return round(time.time() - started, 3) if started else None


@contextlib.contextmanager
def write_freeze(path: Path, *, reason: str, max_seconds: float = DEFAULT_MAX_SECONDS):
    """Hold the write freeze for the duration of the block; always lift it."""
    freeze = freeze_on(path, reason=reason, max_seconds=max_seconds)
    try:
        yield freeze
    finally:
        freeze_off(path, freeze)
