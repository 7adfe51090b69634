"""Cutover safety in every application process: the write freeze and the active-backend reload.

``CutoverMiddleware`` (first in MIDDLEWARE after SecurityMiddleware) does two cheap things
per request, one ``os.stat`` each:

1. Reload: when the state file changed and names another active backend, it re-points
   ``DATABASES['default']`` (process-wide) and, in each thread at its next request, closes
   that thread's connections and drops its ``default`` wrapper, so the next query opens the
   new backend.  Re-pointing only at request start (outside any transaction) is what makes
   it safe: no request ever sees two backends.  SIGHUP forces the same re-read.
2. Write freeze: while ``write_freeze.json`` holds (a lease its owner renews; void as soon as
   the owner dies, see dbmigration/freeze.py), POST/PUT/PATCH/DELETE answer 503 with
   Retry-After; reads go on, and a read that tries to write (a session save, an audit
   entry) is refused at the SQL level and answered 503 too.
3. Fence refusals: a write the database fence refused (dbmigration/fence.py: a request that
   passed step 2 before the freeze and wrote after the fence) answers 503 + Retry-After,
   wherever it was raised.  Django turns an exception raised in another middleware (the
   session save in SessionMiddleware, code after the view) into a 500 response before it
   reaches us, so ``got_request_exception`` marks the request and the 500 becomes a 503.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

from django.conf import settings
from django.core.signals import got_request_exception
from django.db import DatabaseError, IntegrityError, OperationalError, connections
from django.http import HttpResponse

from dbmigration.fence import (
    FENCE_MARK,
    describe_sqlite_fence,
    is_fence_refusal,
    lift_orphaned_sqlite_fence,
)
from dbmigration.freeze import Freeze, freeze_path_for, read_freeze
from dbmigration.state import StateError, read_active_backend

logger = logging.getLogger("propcore.cutover")

WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
WRITE_SQL = ("INSERT", "UPDATE", "DELETE", "REPLACE", "CREATE", "DROP", "ALTER", "TRUNCATE")


class WritesFrozen(DatabaseError):
    """A statement that would write was refused: the write freeze is on."""


def _stat_key(path: Path) -> tuple | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def _close_default_pool() -> None:
    """Close the pool 'default' used on PostgreSQL; checked-out connections close on return."""
    from django.db.backends.postgresql.base import DatabaseWrapper

    pool = DatabaseWrapper._connection_pools.pop("default", None)
    if pool is not None:
        pool.close(timeout=0)


class BackendWatcher:
    """Which backend this process uses, kept in step with the state file."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._local = threading.local()
        self._key: tuple | None = ("unread",)
        self._force = False
        self.generation = 0
        self.backend: str = settings.ACTIVE_BACKEND
        self.error: str | None = None  # set when the state file cannot be read
        self.reloads = 0

    def request_reload(self) -> None:
        """Force a re-read at the next request (safe to call from a signal handler)."""
        self._force = True

    def poll(self) -> str:
        """Re-read the state file if it changed; re-point 'default' when the backend moved."""
        path = Path(settings.STATE_FILE)
        key = _stat_key(path)
        if key == self._key and not self._force:
            return self.backend
        with self._lock:
            self._force = False
            self._key = key
            try:
                wanted = read_active_backend(path)
            except StateError as exc:
                self.error = str(exc)  # keep the backend we have; writes are refused
                return self.backend
            self.error = None
            if wanted != self.backend:
                self._repoint(wanted)
        return self.backend

    def _repoint(self, backend: str) -> None:
        default = connections.settings["default"]
        new = dict(connections.settings[backend])
        new["TEST"] = {**default.get("TEST", {}), "MIRROR": backend}
        default.clear()
        default.update(new)  # in place: settings.DATABASES and connections share this dict
        if self.backend == "postgresql":
            _close_default_pool()
        logger.warning("active backend changed: %s -> %s", self.backend, backend)
        self.backend = backend
        settings.ACTIVE_BACKEND = backend
        self.generation += 1
        self.reloads += 1

    def refresh_thread(self) -> bool:
        """Give this thread fresh connections if the backend moved since its last request."""
        if getattr(self._local, "generation", 0) == self.generation:
            return False
        opened = connections.all(initialized_only=True)
        if any(conn.in_atomic_block for conn in opened):
            return False  # never inside a transaction; retried at the next request
        for conn in opened:
            conn.close()
        with contextlib.suppress(AttributeError):
            del connections["default"]
        self._local.generation = self.generation
        return True

    def thread_backend(self) -> str:
        """The backend this thread's 'default' connection points at now."""
        vendor = connections["default"].vendor
        return "postgresql" if vendor == "postgresql" else "sqlite"


watcher = BackendWatcher()


def process_backend() -> str:
    """The backend this process uses now (the engine's health checks ask: DBMIGRATION)."""
    return watcher.backend


_signal_installed = False


def install_sighup() -> bool:
    """Make SIGHUP force a state re-read (main thread only; chains an earlier handler)."""
    global _signal_installed
    if _signal_installed or threading.current_thread() is not threading.main_thread():
        return _signal_installed
    previous = signal.getsignal(signal.SIGHUP)

    def _on_hup(signum, frame):
        watcher.request_reload()
        if callable(previous):
            previous(signum, frame)

    signal.signal(signal.SIGHUP, _on_hup)
    _signal_installed = True
    return True


@contextlib.contextmanager
def _wrapped(connection, wrapper):
    """Like connection.execute_wrapper, but removes exactly ours on the way out.

    Django's pops the last wrapper, which is the slow-query logger's when the connection
    was opened during the request: ours then stayed and refused writes after the freeze.
    """
    connection.execute_wrappers.append(wrapper)
    try:
        yield
    finally:
        connection.execute_wrappers.remove(wrapper)


def _frozen_response(freeze: Freeze, what: str) -> HttpResponse:
    body = {
        "error": "write_freeze",
        "detail": f"{what} refused: the database is being switched ({freeze.reason}). "
        "Reads still work; retry shortly.",
        "since": freeze.started_iso,
    }
    response = HttpResponse(json.dumps(body), status=503, content_type="application/json")
    response["Retry-After"] = str(freeze.retry_after())
    return response


class FenceRefused(OperationalError):
    """A write the SQLite fence refused (its trigger's RAISE reads as a constraint failure)."""


def fence_refusal_is_no_integrity_error(execute, sql, params, many, context):
    """Execute wrapper: raise a SQLite fence refusal as FenceRefused, not IntegrityError.

    Code that takes an IntegrityError for a key collision retries: the session store's
    create() draws another key and saves again, for ever, when the fence refuses the insert.
    """
    try:
        return execute(sql, params, many, context)
    except IntegrityError as exc:
        if FENCE_MARK not in str(exc):
            raise
        raise FenceRefused(str(exc)) from exc


def install_fence_wrapper(sender, connection, **kwargs) -> None:
    """connection_created receiver (propcore.apps): every SQLite connection, every process."""
    if connection.vendor != "sqlite":
        return
    if fence_refusal_is_no_integrity_error not in connection.execute_wrappers:
        connection.execute_wrappers.append(fence_refusal_is_no_integrity_error)


FENCE_REFUSED = "_propcore_fence_refused"  # request attribute set by _note_fence_refusal


def _note_fence_refusal(sender, request=None, **kwargs) -> None:
    """Mark the request when the exception Django is turning into a 500 is a fence refusal."""
    exc = sys.exception()  # sent from inside Django's except block
    if request is not None and exc is not None and is_fence_refusal(exc):
        setattr(request, FENCE_REFUSED, True)


got_request_exception.connect(_note_fence_refusal, dispatch_uid="propcore.fence_refusal")


_orphan_checked = 0.0  # monotonic time of this process's last look for an orphaned fence


def _lift_orphaned_fence() -> None:
    """A refusal on the active SQLite may come from a fence a killed switch left: lift it
    (at most once a second per process; fence.py says why that is safe)."""
    global _orphan_checked
    if watcher.backend != "sqlite" or time.monotonic() - _orphan_checked < 1.0:
        return
    _orphan_checked = time.monotonic()
    try:
        lifted = lift_orphaned_sqlite_fence(
            Path(connections.settings["sqlite"]["NAME"]), state_file=Path(settings.STATE_FILE)
        )
    except Exception:  # never turn a 503 into a 500; the next refusal tries again
        logger.exception("could not check SQLite for an orphaned write fence")
        return
    if lifted is not None:
        logger.warning("lifted the orphaned %s", describe_sqlite_fence(lifted))


def _fence_response(request) -> HttpResponse:
    _lift_orphaned_fence()  # then the retry succeeds
    freeze = read_freeze(freeze_path_for(settings.STATE_FILE))
    if freeze is None:  # the switch is over: the retry goes to the new active store
        now = time.time()
        freeze = Freeze("the database was switched", now, now + 1, "", "")
    return _frozen_response(freeze, f"{request.method} request")


class CutoverMiddleware:
    """Reload the active backend when the state file changes; honour the write freeze."""

    def __init__(self, get_response):
        self.get_response = get_response
        install_sighup()

    def __call__(self, request):
        watcher.poll()
        watcher.refresh_thread()
        freeze = read_freeze(freeze_path_for(settings.STATE_FILE))
        if freeze is None and watcher.error is None:
            return self._refused_by_fence(request, self.get_response(request))
        if freeze is None:  # unreadable state file: we cannot know where writes belong
            now = time.time()
            freeze = Freeze("state file unreadable", now, now + 60, "", "")
        if request.method in WRITE_METHODS:
            return _frozen_response(freeze, f"{request.method} request")
        refused: list[str] = []

        def refuse_writes(execute, sql, params, many, context):
            if sql.lstrip()[:8].upper().startswith(WRITE_SQL):
                refused.append(sql[:60])
                raise WritesFrozen("writes are frozen during the database switch")
            return execute(sql, params, many, context)

        with contextlib.ExitStack() as stack:
            for alias in connections:
                stack.enter_context(_wrapped(connections[alias], refuse_writes))
            response = self.get_response(request)
        if refused:
            return _frozen_response(freeze, "a write during a read request")
        return self._refused_by_fence(request, response)

    @staticmethod
    def _refused_by_fence(request, response):
        """The 500 of a fence refusal raised outside the view (another middleware): a 503."""
        if not getattr(request, FENCE_REFUSED, False):
            return response
        logger.warning("write refused by the fence outside the view: answered 503, not 500")
        return _fence_response(request)

    def process_exception(self, request, exception):
        """A write the database fence refused (a straggler on the store being left): 503."""
        return _fence_response(request) if is_fence_refusal(exception) else None
