"""The queries that cost the most, from pg_stat_statements (``manage.py db_top_queries``)."""

from __future__ import annotations

import dataclasses

import psycopg

from dbmigration.errors import TargetError
from dbmigration.preflight import conninfo_from_settings
from propcore.query_tags import TAG_COMMENT

ORDERS = {
    "total": "total_exec_time",
    "mean": "mean_exec_time",
    "calls": "calls",
    "rows": "rows",
}
NOT_LOADED = (
    "pg_stat_statements is not loaded on this server: add shared_preload_libraries = "
    "'pg_stat_statements' to postgresql.conf and restart PostgreSQL"
)


class StatementsUnavailable(TargetError):
    """pg_stat_statements is not loaded, or the extension cannot be created."""


@dataclasses.dataclass
class QueryStat:
    queryid: int
    calls: int
    total_ms: float
    mean_ms: float
    rows: int
    view: str  # the view tag of the first query text seen ('' when untagged)
    query: str


def _connect(settings_dict: dict) -> psycopg.Connection:
    return psycopg.connect(**conninfo_from_settings(settings_dict), autocommit=True)


def _ensure_extension(conn: psycopg.Connection) -> None:
    loaded = conn.execute(
        "SELECT 'pg_stat_statements' = ANY(string_to_array(current_setting("
        "'shared_preload_libraries'), ', '))"
    ).fetchone()[0]
    if not loaded:
        raise StatementsUnavailable(NOT_LOADED + ".")
    try:
        conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
    except psycopg.Error as exc:
        raise StatementsUnavailable(
            f"cannot create the pg_stat_statements extension ({exc.diag.message_primary}); "
            "run CREATE EXTENSION pg_stat_statements as a superuser."
        ) from None


def top_queries(settings_dict: dict, *, limit: int = 10, order: str = "total") -> list[QueryStat]:
    """The top `limit` statements of this database by total or mean time, calls or rows."""
    column = ORDERS[order]
    with _connect(settings_dict) as conn:
        _ensure_extension(conn)
        rows = conn.execute(
            "SELECT queryid, calls, total_exec_time, mean_exec_time, rows, query "
            "FROM pg_stat_statements WHERE dbid = (SELECT oid FROM pg_database "
            f"WHERE datname = current_database()) ORDER BY {column} DESC LIMIT %s",
            [limit],
        ).fetchall()
    return [
        QueryStat(queryid, calls, round(total, 3), round(mean, 3), nrows, _view_of(query), query)
        for queryid, calls, total, mean, nrows, query in rows
    ]


def reset(settings_dict: dict) -> None:
    """Forget every statement's counters (all databases of the server)."""
    with _connect(settings_dict) as conn:
        _ensure_extension(conn)
        conn.execute("SELECT pg_stat_statements_reset()")


def _view_of(query: str) -> str:
    match = TAG_COMMENT.search(query or "")
    return match[1] if match else ""
