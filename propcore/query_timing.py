"""Slow-query logging on every alias, through ``connection.execute_wrapper``.

Installed on each new connection (``connection_created``); logs alias, duration
and the SQL text, never parameter values (they may hold personal data).
Note: psycopg's ``cursor.copy()`` bypasses execute wrappers, so bulk COPY is not timed here.
"""

from __future__ import annotations

import collections
import logging
import sys
import threading
import time

from django.conf import settings

logger = logging.getLogger("propcore.slow_query")

# (monotonic time, alias, ms) of recent slow queries in this process, for health checks
RECENT_SLOW_QUERIES: collections.deque = collections.deque(maxlen=1000)
_lock = threading.Lock()


class SlowQueryLogger:
    """An execute wrapper that logs queries slower than SLOW_QUERY_MS."""

    def __init__(self, alias: str):
        self.alias = alias

    def __call__(self, execute, sql, params, many, context):
        start = time.perf_counter()
        try:
            return execute(sql, params, many, context)
        finally:
            elapsed_ms = (time.perf_counter() - start) * 1000
            if elapsed_ms >= settings.SLOW_QUERY_MS:
                with _lock:
                    RECENT_SLOW_QUERIES.append((time.monotonic(), self.alias, elapsed_ms))
                logger.warning(
                    "slow query on %s: %.0f ms: %s",
                    self.alias,
                    elapsed_ms,
                    sql,
                    extra={"alias": self.alias, "duration_ms": elapsed_ms},
                )


def slow_queries_since(seconds: float) -> int:
    """Count slow queries this process logged in the last `seconds`."""
    cutoff = time.monotonic() - seconds
    with _lock:
        return sum(1 for at, _alias, _ms in RECENT_SLOW_QUERIES if at >= cutoff)


# the runbook's bulk statements (COPY, index builds, view refreshes) are slow by design and
# timed in the run's own log; a slow-query WARNING in their output would only alarm
BULK_COMMANDS = frozenset(
    {"migration_prepare", "migrate_data", "switch_to_postgresql", "rollback_to_sqlite",
     "db_backup", "db_restore", "refresh_analytics"}
)  # fmt: skip


def install(sender, connection, **kwargs) -> None:
    """connection_created receiver: add the wrapper once per connection wrapper."""
    if len(sys.argv) > 1 and sys.argv[1] in BULK_COMMANDS:
        return
    if not any(isinstance(w, SlowQueryLogger) for w in connection.execute_wrappers):
        connection.execute_wrappers.append(SlowQueryLogger(connection.alias))
