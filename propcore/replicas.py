"""Read replicas: reads go to a streaming standby, writes and transactions to the primary.

The model is GitLab's database load balancer:

- Reads round-robin over the replicas *in rotation*; one request keeps the replica it got
  first, so it never reads from two points in time.
- A replica leaves rotation when it is more than MAX_LAG_BYTES (8 MB) or MAX_LAG_SECONDS
  (60 s) behind the primary, or does not answer.  Lag is measured at most every
  CHECK_INTERVAL seconds per process (one thread measures; the others use the last result),
  never per query.  With no replica in rotation, reads go to the primary.
- Writes, ``select_for_update()`` and every read inside ``atomic()`` go to the primary,
  except the request's own transaction (``request_transaction()``, opened by the row-level
  security middleware): a request that has not written reads from a replica inside a
  transaction of its own there, which carries the same transaction-local settings
  (``carry_settings()``: ``app.user_id``/``app.role``) and ends with the primary's, so
  nothing outlives the request on the replica's kept connection.  A setting changed inside
  the view's own ``atomic()`` block keeps the rest of the request on the primary.
- Read-your-writes: once a request wrote, its later reads use the primary.  At the end of
  that request the primary's WAL position (``pg_current_wal_lsn()``) goes into a cookie;
  the user's next requests read from a replica only once that replica has replayed past it
  (``pg_last_wal_replay_lsn()``), then the cookie is dropped when every replica in rotation
  has caught up (clearing it when one had caught up gave GitLab stale reads, #413203).
- A read that fails on a replica in the middle of a request (the replica died, or recovery
  cancelled the query) does not become a 500: when the request has written nothing, the
  middleware runs the view once more with every read on the primary, and logs it.
- The state of one request lives in a ContextVar (``routing_context()``), not a
  thread-local, so it neither leaks to the next request on the thread nor breaks in async
  code.  ``use_primary()`` forces fresh reads for a block.

Configuration (propcore/settings.py): ``POSTGRES_REPLICA_URLS`` adds aliases ``replica1``,
``replica2``...; ``REPLICA_ROUTING`` holds the primary alias, the replica aliases and the
thresholds.  Explicit ``using=`` is never rerouted: the migration runbook names its aliases.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import itertools
import logging
import re
import threading
import time
from collections.abc import Iterator

import psycopg
from django.conf import settings
from django.db import InterfaceError, OperationalError, connections, transaction

from dbmigration.preflight import conninfo_from_settings

DEFAULTS = {
    "PRIMARY": "default",
    "ALIASES": [],
    "MAX_LAG_BYTES": 8 * 1024 * 1024,
    "MAX_LAG_SECONDS": 60.0,
    "CHECK_INTERVAL": 5.0,
    "CONNECT_TIMEOUT": 2,
}
LSN_COOKIE = "propcore_replica_lsn"
LSN_COOKIE_MAX_AGE = 300  # seconds: past it, a replica still behind is out of rotation anyway
logger = logging.getLogger(__name__)
# not 0.0: time.monotonic() may count from boot, and a machine up for less than
# CHECK_INTERVAL would then never measure its replicas
NEVER = float("-inf")
_LSN = re.compile(r"^([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})$")


def parse_lsn(text: str | None) -> int | None:
    """A WAL position ('16/B374D848') as a byte offset; None for anything else."""
    match = _LSN.match(text or "")
    return (int(match[1], 16) << 32) + int(match[2], 16) if match else None


def format_lsn(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def routing() -> dict:
    return {**DEFAULTS, **getattr(settings, "REPLICA_ROUTING", {})}


# --- per-request state -------------------------------------------------------------------


@dataclasses.dataclass
class RoutingContext:
    """What one request (or one block of work) has done and needs."""

    min_lsn: int | None = None  # the user's last write: read only from replicas past it
    wrote: bool = False  # this request wrote: its reads stay on the primary
    replica: str | None = None  # the replica this request reads from
    retried: bool = False  # a failed replica read already sent this request to the primary
    caught_up: dict[str, bool] = dataclasses.field(default_factory=dict)
    # the request's own transaction on the primary (request_transaction()): how deep its
    # atomic block is, the transaction-local settings made in it, and the transactions
    # opened on replicas to carry them
    request_depth: int | None = None
    local_settings: dict[str, str] = dataclasses.field(default_factory=dict)
    replica_transactions: dict[str, transaction.Atomic] = dataclasses.field(default_factory=dict)
    stay_on_primary: bool = False  # a replica cannot carry this request's settings


_context: contextvars.ContextVar[RoutingContext | None] = contextvars.ContextVar(
    "replica_routing_context", default=None
)
_primary_only: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "replica_primary_only", default=False
)


@contextlib.contextmanager
def routing_context(min_lsn: int | None = None) -> Iterator[RoutingContext]:
    """Track writes and stickiness for one request (the middleware opens one per request)."""
    token = _context.set(RoutingContext(min_lsn=min_lsn))
    try:
        yield _context.get()
    finally:
        _context.reset(token)


@contextlib.contextmanager
def use_primary() -> Iterator[None]:
    """Read from the primary inside this block (reads that must see the latest data)."""
    token = _primary_only.set(True)
    try:
        yield
    finally:
        _primary_only.reset(token)


# --- the replicas' lag, measured per process -----------------------------------------------


@dataclasses.dataclass
class ReplicaState:
    alias: str
    in_rotation: bool = False
    lag_bytes: int | None = None
    lag_seconds: float | None = None
    replay_lsn: int | None = None
    error: str = ""
    checked_at: float = 0.0


def _connect(alias: str) -> psycopg.Connection:
    info = conninfo_from_settings(connections.settings[alias])
    info.setdefault("connect_timeout", routing()["CONNECT_TIMEOUT"])
    return psycopg.connect(**info, autocommit=True)


class ReplicaSet:
    """Which replicas are in rotation, re-measured at most every CHECK_INTERVAL seconds."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._states: dict[str, ReplicaState] = {}
        self._checked_at = NEVER
        self._turn = itertools.count()

    def reset(self) -> None:
        """Forget every measurement (tests; a settings change)."""
        with self._lock:
            self._states, self._checked_at = {}, NEVER

    def states(self) -> list[ReplicaState]:
        self._refresh_if_due()
        return [self._states[a] for a in routing()["ALIASES"] if a in self._states]

    def in_rotation(self) -> list[str]:
        return [s.alias for s in self.states() if s.in_rotation]

    def next_replica(self, candidates: list[str]) -> str:
        return candidates[next(self._turn) % len(candidates)]

    def mark_out(self, alias: str, error: Exception) -> None:
        """Take a replica out of rotation until the next lag check finds it well."""
        state = self._states.get(alias)  # no lock: a measurement may be holding it
        if state is not None:
            state.in_rotation, state.error = False, _error_line(error)

    def replayed_past(self, alias: str, lsn: int) -> bool:
        """Has this replica replayed the WAL up to lsn?  The last measurement, else one query."""
        state = self._states.get(alias)
        if state and state.replay_lsn is not None and state.replay_lsn >= lsn:
            return True
        try:
            with connections[alias].cursor() as cursor:
                cursor.execute("SELECT pg_last_wal_replay_lsn()::text")
                replayed = parse_lsn(cursor.fetchone()[0])
        except Exception:  # a replica that cannot answer is not caught up
            return False
        return replayed is not None and replayed >= lsn

    def _refresh_if_due(self) -> None:
        config = routing()
        if time.monotonic() - self._checked_at < config["CHECK_INTERVAL"]:
            return
        # one thread measures; the others go on with the last measurement (if any)
        if not self._lock.acquire(blocking=not self._states):
            return
        try:
            if time.monotonic() - self._checked_at >= config["CHECK_INTERVAL"]:
                self._states = self._measure(config)
                self._checked_at = time.monotonic()
        finally:
            self._lock.release()

    def _measure(self, config: dict) -> dict[str, ReplicaState]:
        try:
            with _connect(config["PRIMARY"]) as conn:
                primary_lsn = parse_lsn(
                    conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()[0]
                )
        except Exception:
            primary_lsn = None  # the replicas' own lag still counts; bytes are unknown
        return {alias: self._measure_one(alias, primary_lsn, config) for alias in config["ALIASES"]}

    def _measure_one(self, alias: str, primary_lsn: int | None, config: dict) -> ReplicaState:
        state = ReplicaState(alias, checked_at=time.time())
        try:
            with _connect(alias) as conn:
                replay, since_replay = conn.execute(
                    "SELECT pg_last_wal_replay_lsn()::text, "
                    "EXTRACT(EPOCH FROM now() - pg_last_xact_replay_timestamp())::float8"
                ).fetchone()
        except Exception as exc:
            state.error = _error_line(exc)
            return state
        state.replay_lsn = parse_lsn(replay)
        if state.replay_lsn is None:
            state.error = "not a streaming replica (pg_last_wal_replay_lsn() is null)"
            return state
        if primary_lsn is not None:
            state.lag_bytes = max(0, primary_lsn - state.replay_lsn)
        # an idle primary writes nothing to replay: time since the last replay is lag only
        # while there is WAL left to replay
        state.lag_seconds = 0.0 if not state.lag_bytes else float(since_replay or 0.0)
        state.in_rotation = (state.lag_bytes or 0) <= config["MAX_LAG_BYTES"] and (
            state.lag_seconds <= config["MAX_LAG_SECONDS"]
        )
        return state


replicas = ReplicaSet()


def _error_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def replica_status() -> list[dict]:
    """Each replica's lag and whether it is in rotation (the health check's hook)."""
    return [dataclasses.asdict(s) for s in replicas.states()]


# --- the request's transaction, carried to its replica -------------------------------------


@contextlib.contextmanager
def request_transaction(using: str) -> Iterator[None]:
    """One transaction on ``using`` for the request; its reads may still go to a replica.

    Inside a routing context and on the primary, reads in this block (not in a nested
    ``atomic()``) go to a replica, in a transaction there that carries the settings made
    with ``carry_settings()``.  Every replica transaction ends here, with the primary's:
    committed, or rolled back when the block raised or was marked for rollback.
    """
    context = _context.get()
    carries = (
        context is not None
        and context.request_depth is None
        and bool(routing()["ALIASES"])
        and using == routing()["PRIMARY"]
    )
    with transaction.atomic(using=using):
        if not carries:
            yield
            return
        context.request_depth = len(connections[using].atomic_blocks)
        ok = False
        try:
            yield
            ok = not transaction.get_rollback(using=using)
        finally:
            end_replica_transactions(context, commit=ok)
            context.request_depth, context.local_settings = None, {}


def carry_settings(using: str, values: dict[str, str]) -> None:
    """Settings just made with ``set_config(..., true)`` on ``using``: set them on the replica too.

    Only for the request's own transaction on the primary.  Made inside a nested
    ``atomic()`` they would be undone on the primary alone by a rollback to its savepoint,
    so the rest of that request reads the primary instead.
    """
    context = _context.get()
    if context is None or context.request_depth is None or using != routing()["PRIMARY"]:
        return
    if len(connections[using].atomic_blocks) != context.request_depth:
        context.stay_on_primary = True
        return
    context.local_settings.update(values)
    for alias in list(context.replica_transactions):
        try:
            _set_local(alias, values)
        except Exception as exc:  # a replica that cannot take them serves no more reads
            replicas.mark_out(alias, exc)
            context.stay_on_primary = True
            end_replica_transactions(context, commit=False)
            return


def end_replica_transactions(context: RoutingContext, *, commit: bool) -> None:
    """End the request's transactions on replicas; a replica that cannot is disconnected."""
    while context.replica_transactions:
        alias, block = context.replica_transactions.popitem()
        try:
            if not commit:
                transaction.set_rollback(True, using=alias)
            block.__exit__(None, None, None)
        except Exception:  # read-only: nothing is lost; the closed connection holds nothing
            _disconnect(alias)


def _begin(context: RoutingContext | None, alias: str) -> bool:
    """Open the request's transaction on a replica, with its settings; False if it cannot."""
    if context is None or context.request_depth is None or alias in context.replica_transactions:
        return True
    block = transaction.atomic(using=alias)
    try:
        block.__enter__()
        context.replica_transactions[alias] = block
        if context.local_settings:
            _set_local(alias, context.local_settings)
    except Exception as exc:
        replicas.mark_out(alias, exc)
        if context.replica_transactions.pop(alias, None) is not None:
            with contextlib.suppress(Exception):
                transaction.set_rollback(True, using=alias)
                block.__exit__(None, None, None)
        _disconnect(alias)
        return False
    return True


def _set_local(alias: str, values: dict[str, str]) -> None:
    with connections[alias].cursor() as cursor:
        cursor.execute(
            "SELECT " + ", ".join(["set_config(%s, %s, true)"] * len(values)),
            [item for pair in values.items() for item in pair],
        )


def _disconnect(alias: str) -> None:
    """Close a replica connection whose transaction state is unknown, and forget that state."""
    connection = connections[alias]
    with contextlib.suppress(Exception):
        connection.close()
    if connection.in_atomic_block or connection.closed_in_transaction:
        connection.connection = None
        connection.in_atomic_block = connection.closed_in_transaction = False
        connection.needs_rollback, connection.atomic_blocks = False, []
        connection.savepoint_ids = []


# --- the router --------------------------------------------------------------------------


def _routing_applies(config: dict, hints: dict) -> bool:
    """Replicas are configured, the primary is PostgreSQL, and no other alias was asked for."""
    if not config["ALIASES"] or connections[config["PRIMARY"]].vendor != "postgresql":
        return False
    instance = hints.get("instance")
    db = getattr(getattr(instance, "_state", None), "db", None)
    return db is None or db == config["PRIMARY"] or db in config["ALIASES"]


def read_alias() -> str:
    """Where a read goes now: a replica in rotation, or the primary."""
    config = routing()
    primary = config["PRIMARY"]
    context = _context.get()
    if _primary_only.get() or _in_own_atomic_block(context, connections[primary]):
        return primary
    if context is not None and (context.wrote or context.stay_on_primary):
        return primary
    candidates = replicas.in_rotation()
    if context is not None and context.min_lsn is not None:
        candidates = [alias for alias in candidates if _caught_up(context, alias)]
    if context is not None and context.replica in candidates and _begin(context, context.replica):
        return context.replica
    while candidates:
        replica = replicas.next_replica(candidates)
        if _reachable(replica) and _begin(context, replica):
            if context is not None:
                context.replica = replica
            return replica
        candidates.remove(replica)
    return primary


def _in_own_atomic_block(context: RoutingContext | None, connection) -> bool:
    """Inside atomic() on the primary, other than the request's own transaction."""
    if not connection.in_atomic_block:
        return False
    own = context is not None and context.request_depth is not None
    return not own or len(connection.atomic_blocks) != context.request_depth


def _reachable(alias: str) -> bool:
    """Connect (or check the kept connection) now; a replica that fails leaves rotation.

    A replica that died since the last lag check costs one refused connection here, not an
    error for the user (a kept connection is checked once per request: CONN_HEALTH_CHECKS).
    """
    connection = connections[alias]
    try:
        connection.close_if_health_check_failed()
        connection.ensure_connection()
    except Exception as exc:
        replicas.mark_out(alias, exc)
        return False
    return True


def _caught_up(context: RoutingContext, alias: str) -> bool:
    if alias not in context.caught_up:
        context.caught_up[alias] = replicas.replayed_past(alias, context.min_lsn)
    return context.caught_up[alias]


class ReplicaRouter:
    """Reads to replicas in rotation; writes to the primary (after propcore.routers.AuditRouter)."""

    def db_for_read(self, model, **hints):
        config = routing()
        return read_alias() if _routing_applies(config, hints) else None

    def db_for_write(self, model, **hints):
        config = routing()
        if not _routing_applies(config, hints):
            return None
        context = _context.get()
        if context is not None:
            context.wrote = True
        return config["PRIMARY"]  # also for an object read from a replica

    def allow_relation(self, obj1, obj2, **hints):
        config = routing()
        same_data = {config["PRIMARY"], *config["ALIASES"]}
        if obj1._state.db in same_data and obj2._state.db in same_data:
            return True
        return None

    def allow_migrate(self, db, app_label, model_name=None, **hints):
        return False if db in routing()["ALIASES"] else None


# --- the middleware ----------------------------------------------------------------------


class ReplicaStickinessMiddleware:
    """One routing context per request; the write position of a writing request in a cookie.

    Goes before SessionMiddleware, so that the session's own save (a login) counts as a write.
    """

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        config = routing()
        if not config["ALIASES"]:
            return self.get_response(request)
        min_lsn = parse_lsn(request.COOKIES.get(LSN_COOKIE))
        with routing_context(min_lsn=min_lsn) as context:
            response = self.get_response(request)
        if context.wrote:
            lsn = _primary_lsn(config["PRIMARY"])
            if lsn is not None:
                response.set_cookie(
                    LSN_COOKIE, format_lsn(lsn), max_age=LSN_COOKIE_MAX_AGE, httponly=True
                )
        elif min_lsn is not None and _all_caught_up(context):
            response.delete_cookie(LSN_COOKIE)
        return response

    def process_exception(self, request, exception):
        """Run the view again on the primary, once, when a read on its replica failed.

        Only for a request that has written nothing through the router (a read-only view,
        or a form that failed before saving): running it again cannot write twice.  The
        retry stays inside the inner middlewares' work (the row-level security
        transaction on the primary is still open), so only the view runs again; the
        request's replica transactions are rolled back first.
        """
        context = _context.get()
        if not _replica_read_failed(context, exception):
            return None
        replica, context.replica, context.retried = context.replica, None, True
        end_replica_transactions(context, commit=False)
        if not _still_usable(replica):
            replicas.mark_out(replica, exception)
        logger.warning(
            "read replica %s failed during %s %s (%s); the request runs again on the primary",
            replica,
            request.method,
            request.path,
            _error_line(exception),
        )
        match = request.resolver_match
        with use_primary():
            response = match.func(request, *match.args, **match.kwargs)
            if callable(getattr(response, "render", None)):  # templates read too
                response = response.render()
        return response


def _replica_read_failed(context: RoutingContext | None, exception: Exception) -> bool:
    """The request's replica raised a connection or server error, and nothing was written."""
    if context is None or context.replica is None or context.wrote or context.retried:
        return False
    if not isinstance(exception, (OperationalError, InterfaceError)):
        return False
    return connections[context.replica].errors_occurred


def _still_usable(alias: str) -> bool:
    """A cancelled query leaves a working replica; a dead one is closed here."""
    connection = connections[alias]
    with contextlib.suppress(Exception):
        if connection.connection is not None and connection.is_usable():
            return True
    with contextlib.suppress(Exception):
        connection.close()
    return False


def _primary_lsn(primary: str) -> int | None:
    with connections[primary].cursor() as cursor:
        cursor.execute("SELECT pg_current_wal_lsn()::text")
        return parse_lsn(cursor.fetchone()[0])


def _all_caught_up(context: RoutingContext) -> bool:
    in_rotation = replicas.in_rotation()
    return bool(in_rotation) and all(_caught_up(context, alias) for alias in in_rotation)
