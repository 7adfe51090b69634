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

import configparser
from pathlib import Path

MODES = ("native", "pgbouncer")
PERSISTENT_CONN_MAX_AGE = 60  # seconds a thread keeps its connection (to PgBouncer, a replica)


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
    config = persistent_connections(config)
    config["OPTIONS"]["prepare_threshold"] = None
    config["DISABLE_SERVER_SIDE_CURSORS"] = True
    return config


def persistent_connections(config: dict) -> dict:
    """One connection per thread, kept between requests and checked before reuse.

    For PgBouncer (which pools) and for read replicas: a pool in front of a replica that
    died makes each request wait the pool's timeout, where a new connection is refused at
    once and the router moves on to another replica or the primary.
    """
    config = {**config, "OPTIONS": dict(config.get("OPTIONS") or {})}
    config["OPTIONS"].pop("pool", None)
    config["CONN_MAX_AGE"] = PERSISTENT_CONN_MAX_AGE
    config["CONN_HEALTH_CHECKS"] = True  # a restarted server must not fail the next request
    return config


def pgbouncer_server_connections(ini: Path) -> int:
    """The server connections a PgBouncer config opens per database: default + reserve pool."""
    # inline_comment_prefixes: PgBouncer reads ';' after a value as a comment, configparser not
    parser = configparser.ConfigParser(inline_comment_prefixes=(";", "#"), interpolation=None)
    parser.read_string(Path(ini).read_text())
    section = parser["pgbouncer"]
    # PgBouncer's own defaults when a key is left out
    return section.getint("default_pool_size", 20) + section.getint("reserve_pool_size", 0)
