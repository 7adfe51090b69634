"""The write freeze as a lease: a flag file every application process honours during cutover.

While ``write_freeze.json`` (next to the state file) holds a live freeze, the middleware
answers write requests with 503 + Retry-After and reads go on.  The file names its owner
(host, pid namespace, pid and the process's start time) and a lease that a heartbeat thread
in the owner renews every second.  A freeze is *void* - ignored by the middleware, taken over
by the next command - as soon as:

- its owner's process is gone on this host (the pid is dead, a zombie, or reused by a process
  that started at another time), or
- the lease was not renewed for ``lease_seconds`` (the owner hangs, is stopped, or runs on
  another host and died), or
- ``max_seconds`` passed since it started (a living owner stuck for ever cannot freeze the
  site for ever).

So a ``kill -9`` of the owner blocks writes for at most a few seconds, with no manual action.
The file is written atomically (temp file, fsync, rename); changes to it are serialised by a
``flock`` on its directory.  No Django imports: the middleware reads it on every request, so
reading stays one ``open`` when there is no freeze.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import getpass
import json
import math
import os
import socket
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

from dbmigration.errors import MigrationError
from dbmigration.state import write_file_atomic

FREEZE_FILENAME = "write_freeze.json"
DEFAULT_MAX_SECONDS = 600.0  # a freeze whose living owner hangs longer than this lifts anyway
LEASE_SECONDS = 5.0  # a freeze not renewed for this long is void
HEARTBEAT_SECONDS = 1.0  # how often the owner renews its lease
UNKNOWN_RETRY_SECONDS = 5  # Retry-After when the owner gave no estimate (or overran it)


class FreezeError(MigrationError):
    """A write freeze is already held, or was lost while we needed it."""

    returncode = 8


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


HOST = socket.gethostname()
PID_NAMESPACE = _pid_namespace()  # a pid means the same process only within one namespace


def process_start(pid: int) -> str | None:
    """The start time of process pid (clock ticks since boot); None when gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    fields = stat.rsplit(b")", 1)[1].split()  # after "(comm)": field 3 (state) onwards
    if fields[0] in (b"Z", b"X"):  # killed but not yet reaped: dead all the same
        return None
    return fields[19].decode()  # field 22, starttime


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process, alive
    return True


def process_alive(*, host: str, pid: int, pid_started: str, pid_namespace: str) -> bool | None:
    """Whether that process lives; None when it runs on another host or pid namespace."""
    if not pid or host != HOST or pid_namespace != PID_NAMESPACE:
        return None
    if pid_started:
        return process_start(pid) == pid_started
    return _pid_alive(pid)


def this_process() -> dict:
    """This process as an owner is recorded (the freeze's fields; the fence keeps them too)."""
    return {
        "owner": f"{getpass.getuser()}@{HOST} pid {os.getpid()}",
        "host": HOST,
        "pid": os.getpid(),
        "pid_started": process_start(os.getpid()) or "",
        "pid_namespace": PID_NAMESPACE,
    }


@dataclasses.dataclass
class Freeze:
    reason: str
    started_at: float  # unix time
    expires_at: float  # unix time: started_at + max_seconds, void after it whatever happens
    owner: str  # user@host pid N, for the operator
    token: str  # identifies the holder, so only it renews and lifts its own freeze
    host: str = ""
    pid: int = 0
    pid_started: str = ""  # the owner's process start time (Linux /proc), "" when unknown
    pid_namespace: str = ""
    renewed_at: float = 0.0  # last heartbeat (unix time)
    lease_seconds: float = LEASE_SECONDS
    expected_end: float = 0.0  # when the owner expects to lift it (0: no estimate)
    replaced: str = ""  # the void freeze this one took over, described

    def __post_init__(self) -> None:
        if not self.renewed_at:
            self.renewed_at = self.started_at

    @property
    def started_iso(self) -> str:
        return datetime.fromtimestamp(self.started_at, UTC).isoformat()

    def age(self, now: float | None = None) -> float:
        return round((time.time() if now is None else now) - self.started_at, 1)

    def owner_alive(self) -> bool | None:
        """Whether the owner process lives; None when it runs elsewhere (only the lease tells)."""
        return process_alive(
            host=self.host, pid=self.pid, pid_started=self.pid_started,
            pid_namespace=self.pid_namespace,
        )  # fmt: skip

    def void_reason(self, now: float | None = None) -> str | None:
        """Why this freeze no longer holds, or None while it does."""
        now = time.time() if now is None else now
        if now >= self.expires_at:
            limit = self.expires_at - self.started_at
            return f"it outlived its limit of {limit:g} s (--freeze-timeout)"
        if self.owner_alive() is False:
            return f"its owner ({self.owner}) is gone"
        silent = now - self.renewed_at
        if silent >= self.lease_seconds:
            return f"its owner ({self.owner}) stopped renewing it {silent:.0f} s ago"
        return None

    def expired(self, now: float | None = None) -> bool:
        return self.void_reason(now) is not None

    def retry_after(self, now: float | None = None) -> int:
        """Seconds a client should wait: the owner's estimate of the time left, 1 to 60."""
        now = time.time() if now is None else now
        left = self.expected_end - now if self.expected_end > now else UNKNOWN_RETRY_SECONDS
        return max(1, min(60, math.ceil(min(left, self.expires_at - now))))

    def expect(self, seconds: float) -> None:
        """Record that the owner expects to lift the freeze in seconds (sent as Retry-After)."""
        self.expected_end = time.time() + seconds

    def describe(self, now: float | None = None) -> str:
        """One line for people: what, who, since when, and whether it still holds."""
        void = self.void_reason(now)
        text = (
            f"write freeze by {self.owner} ({self.reason}), {self.age(now):g} s old, "
            f"last renewed {(time.time() if now is None else now) - self.renewed_at:.0f} s ago"
        )
        return f"{text}; void: {void}" if void else text

    def summary(self, now: float | None = None) -> dict:
        """The facts an operator or a health probe shows (JSON-ready)."""
        now = time.time() if now is None else now
        return {
            "reason": self.reason,
            "owner": self.owner,
            "since": self.started_iso,
            "age_seconds": self.age(now),
            "renewed_seconds_ago": round(now - self.renewed_at, 1),
            "void": self.void_reason(now),
        }


def freeze_path_for(state_file: Path) -> Path:
    """The freeze flag lives next to the state file (same directory, same lifetime)."""
    return Path(state_file).parent / FREEZE_FILENAME


def inspect_freeze(path: Path) -> Freeze | None:
    """The freeze on disk, live or void (see Freeze.void_reason); None when there is none."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError:
        text = ""
    try:
        data = json.loads(text)
        known = {f.name for f in dataclasses.fields(Freeze)}
        return Freeze(**{k: v for k, v in data.items() if k in known})
    except (ValueError, TypeError):
        # unreadable: fail safe, frozen - but as a lease renewed when the file was written
        try:
            written = path.stat().st_mtime
        except FileNotFoundError:
            return None
        return Freeze(
            "unreadable freeze file", written, written + DEFAULT_MAX_SECONDS, "unknown", ""
        )


def read_freeze(path: Path) -> Freeze | None:
    """Return the freeze at path while it holds; None when there is none or it is void."""
    freeze = inspect_freeze(path)
    return None if freeze is None or freeze.expired() else freeze


@contextlib.contextmanager
def _locked(path: Path):
    """Serialise changes to the flag between processes (flock on its directory)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _write(path: Path, freeze: Freeze) -> None:
    write_file_atomic(path, json.dumps(dataclasses.asdict(freeze), indent=2))


class _Heartbeat(threading.Thread):
    """Renews one freeze's lease every HEARTBEAT_SECONDS until stopped or the freeze is lost."""

    def __init__(self, path: Path, freeze: Freeze) -> None:
        super().__init__(name=f"freeze-lease-{freeze.token[:6]}", daemon=True)
        self.path, self.freeze = path, freeze
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(HEARTBEAT_SECONDS):
            try:
                if not self._renew():
                    return
            except OSError:
                pass  # a full disk, say: try again; the lease lapses if it lasts

    def _renew(self) -> bool:
        with _locked(self.path):
            current = inspect_freeze(self.path)
            if self.stopped.is_set() or current is None or current.token != self.freeze.token:
                return False  # lifted, or taken over: never write it back
            now = time.time()
            if now >= self.freeze.expires_at:
                return False  # past its limit: let it lapse
            self.freeze.renewed_at = now
            _write(self.path, self.freeze)
            return True


_heartbeats: dict[str, _Heartbeat] = {}


def freeze_on(
    path: Path,
    *,
    reason: str,
    max_seconds: float = DEFAULT_MAX_SECONDS,
    lease_seconds: float = LEASE_SECONDS,
    expected_seconds: float | None = None,
) -> Freeze:
    """Set the write freeze and renew it from a heartbeat thread until freeze_off.

    A void freeze (owner gone, lease lapsed, past its limit) is taken over and described in
    the new freeze's ``replaced``; a live one makes this raise FreezeError.
    """
    path = Path(path)
    with _locked(path):
        current = inspect_freeze(path)
        void = current.void_reason() if current is not None else None
        if current is not None and void is None:
            raise FreezeError(
                f"Writes are already frozen since {current.started_iso} by {current.owner} "
                f"({current.reason}); that process is alive and renews its lease. Wait for it "
                "to finish (migration_status shows it), or stop that process: its freeze lifts "
                f"within {current.lease_seconds:g} s."
            )
        now = time.time()
        freeze = Freeze(
            reason=reason,
            started_at=now,
            expires_at=now + max_seconds,
            token=os.urandom(8).hex(),
            **this_process(),
            renewed_at=now,
            lease_seconds=lease_seconds,
            expected_end=now + expected_seconds if expected_seconds else 0.0,
            replaced=f"{current.describe(now)}" if current is not None else "",
        )
        _write(path, freeze)
    heartbeat = _Heartbeat(path, freeze)
    _heartbeats[freeze.token] = heartbeat
    heartbeat.start()
    return freeze


def still_held(path: Path, freeze: Freeze, *, margin: float = 1.0) -> bool:
    """True when our freeze is still the one on disk and holds for at least `margin` s more."""
    current = inspect_freeze(path)
    return (
        current is not None
        and current.token == freeze.token
        and current.void_reason(time.time() + margin) is None
    )


def _stop_heartbeat(token: str) -> None:
    heartbeat = _heartbeats.pop(token, None)
    if heartbeat is not None:
        heartbeat.stopped.set()
        if heartbeat is not threading.current_thread():
            heartbeat.join()


def freeze_off(path: Path, freeze: Freeze | None = None) -> float | None:
    """Lift the freeze (ours, or any when freeze is None); return how long it lasted."""
    path = Path(path)
    if freeze is not None:
        _stop_heartbeat(freeze.token)
    with _locked(path):
        current = inspect_freeze(path)
        if current is None:
            return None
        if freeze is not None and current.token not in ("", freeze.token):
            return None  # someone else's freeze: not ours to lift
        path.unlink(missing_ok=True)
    _stop_heartbeat(current.token)
    started = freeze.started_at if freeze is not None else current.started_at
    return round(time.time() - started, 3)


def clear_void(path: Path) -> Freeze | None:
    """Remove the freeze at path if it is void (its owner gone); return what was removed."""
    path = Path(path)
    with _locked(path):
        current = inspect_freeze(path)
        if current is None or current.void_reason() is None:
            return None
        path.unlink(missing_ok=True)
    return current


def pause_point(name: str) -> None:
    """Test-only: stop here while PROPCORE_TEST_PAUSE_AT names this point (kill -9 tests).

    Never set in production; the tests that set it kill the paused process.
    """
    if os.environ.get("PROPCORE_TEST_PAUSE_AT") == name:
        time.sleep(3600)


@contextlib.contextmanager
def write_freeze(
    path: Path,
    *,
    reason: str,
    max_seconds: float = DEFAULT_MAX_SECONDS,
    lease_seconds: float = LEASE_SECONDS,
    expected_seconds: float | None = None,
):
    """Hold the write freeze for the duration of the block; always lift it."""
    freeze = freeze_on(
        path,
        reason=reason,
        max_seconds=max_seconds,
        lease_seconds=lease_seconds,
        expected_seconds=expected_seconds,
    )
    try:
        yield freeze
    finally:
        freeze_off(path, freeze)
