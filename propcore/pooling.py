"""How the app's PostgreSQL aliases pool their connections: Django's own pool or PgBouncer.

``POSTGRES_POOLING=native`` (the default) gives each process a psycopg pool sized by the
profile.  ``POSTGRES_POOLING=pgbouncer`` means POSTGRES_URL points at a PgBouncer in
transaction mode (deploy/pgbouncer.ini), where a server connection changes hands after every
transaction, so nothing may outlive one:

- no server-side cursors (a named cursor lives across fetches, so across transactions);
- no prepared statements (psycopg prepares a query after 5 runs; PgBouncer 1.18 cannot carry
  them: "prepared statement _pg3_N does not exist"), so ``prepare_threshold=None``;
- no Django pool on top of PgBouncer's: the process keeps one client connection per thread
  (CONN_MAX_AGE) and PgBouncer does the pooling.
"""

from __future__ import annotations

MODES = ("native", "pgbouncer")
PGBOUNCER_CONN_MAX_AGE = 60  # seconds a thread keeps its (cheap) client connection to PgBouncer


class UnknownPoolingMode(ValueError):
    """POSTGRES_POOLING names no mode."""


def apply_pooling(config: dict, mode: str, *, pool_min: int, pool_max: int, timeout: float) -> dict:
    """Return a Django DATABASES entry set up for one pooling mode."""
    if mode not in MODES:
        raise UnknownPoolingMode(
            f"POSTGRES_POOLING={mode!r} is not a pooling mode; set it to one of {', '.join(MODES)}."
        )
    config = {**config, "OPTIONS": dict(config.get("OPTIONS") or {})}
    if mode == "native":
        config["CONN_MAX_AGE"] = 0  # required by Django's pool
        config["OPTIONS"]["pool"] = {"min_size": pool_min, "max_size": pool_max, "timeout": timeout}
        return config
    config["OPTIONS"].pop("pool", None)
    config["OPTIONS"]["prepare_threshold"] = None
    config["DISABLE_SERVER_SIDE_CURSORS"] = True
    config["CONN_MAX_AGE"] = PGBOUNCER_CONN_MAX_AGE
    config["CONN_HEALTH_CHECKS"] = True  # PgBouncer restarts must not fail the next request
    return config
