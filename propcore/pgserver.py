"""Find the PostgreSQL server propcore talks to, the same way everywhere.

Order: ``POSTGRES_URL`` if set; else a server answering on 127.0.0.1:5432; else a
private throwaway cluster under ``var/`` started from the installed binaries;
else a clear error naming what to install.  No Django imports: settings use it.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

from dbmigration.pgurl import BadPostgresUrl, check_postgres_url  # noqa: F401 (re-exported)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5432
DEFAULT_DATABASE = "propcore"


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server could be found or started."""


def port_answers(host: str, port: int, *, timeout: float = 0.5) -> bool:
    """Return True when something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def redact_url(url: str) -> str:
    """Return the URL with any password replaced by ***, safe to print or log."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


def find_pg_bin(name: str) -> str | None:
    """Locate a PostgreSQL server binary (initdb, pg_ctl) on PATH or in Debian's layout."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)
    return candidates[0] if candidates else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((DEFAULT_HOST, 0))
        return sock.getsockname()[1]


def _as_postgres_user(cmd: list[str]) -> list[str]:
    # initdb and postgres refuse to run as root.
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *cmd]
    return cmd


def start_private_cluster(root: Path, *, database: str = DEFAULT_DATABASE) -> str:
    """Start (or reuse) a throwaway cluster under root and return its URL."""
    initdb, pg_ctl = find_pg_bin("initdb"), find_pg_bin("pg_ctl")
    if not (initdb and pg_ctl):
        raise PostgresUnavailable(
            "No PostgreSQL server answers on 127.0.0.1:5432, POSTGRES_URL is not set, and no "
            "PostgreSQL binaries (initdb, pg_ctl) are installed. Install them, e.g. "
            "'apt-get install postgresql', or set POSTGRES_URL to a running server."
        )
    root.mkdir(parents=True, exist_ok=True)
    data_dir, port_file = root / "data", root / "port"
    if port_file.exists():
        port = int(port_file.read_text())
        if port_answers(DEFAULT_HOST, port):
            return f"postgres://postgres@{DEFAULT_HOST}:{port}/{database}"
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
    if not (data_dir / "PG_VERSION").exists():
        subprocess.run(
            _as_postgres_user(
                [initdb, "-D", str(data_dir), "-U", "postgres", "-A", "trust", "-E", "UTF8"]
            ),
            check=True,
            capture_output=True,
        )
    port = _free_port()
    subprocess.run(
        _as_postgres_user(
            [
                pg_ctl,
                "-D",
                str(data_dir),
                "-l",
                str(root / "server.log"),
                "-w",
                "-o",
                f"-p {port} -k {root} -c listen_addresses={DEFAULT_HOST}",
                "start",
            ]
        ),
        check=True,
        capture_output=True,
    )
    port_file.write_text(str(port))
    return f"postgres://postgres@{DEFAULT_HOST}:{port}/{database}"


def resolve_postgres_url(*, environ: dict | None = None, private_root: Path) -> str:
    """Return the URL of the PostgreSQL server to use, starting one if needed."""
    environ = os.environ if environ is None else environ
    if environ.get("POSTGRES_URL"):
        return check_postgres_url(environ["POSTGRES_URL"])
    if port_answers(DEFAULT_HOST, DEFAULT_PORT):
        return f"postgres://postgres@{DEFAULT_HOST}:{DEFAULT_PORT}/{DEFAULT_DATABASE}"
    return start_private_cluster(private_root)


def database_name(url: str) -> str:
    """The database a URL names (the default one when it names none)."""
    return unquote(urlsplit(url).path.lstrip("/")) or DEFAULT_DATABASE


def _maintenance_connection(url: str):
    """Connect to the server's 'postgres' database; return (connection, target database name)."""
    import psycopg

    parts = urlsplit(url)
    name = database_name(url)
    maintenance = urlunsplit(parts._replace(path="/postgres"))
    return psycopg.connect(maintenance, autocommit=True, connect_timeout=10), name


def drop_database(url: str) -> None:
    """Drop the database named in url (closing other sessions on it) if it exists."""
    from psycopg import sql

    conn, name = _maintenance_connection(url)
    with conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


def ensure_database(url: str) -> bool:
    """Create the database named in url if it does not exist; return True if created."""
    from psycopg import sql

    conn, name = _maintenance_connection(url)
    with conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone()
        if exists:
            return False
        conn.execute(
            sql.SQL("CREATE DATABASE {} ENCODING 'UTF8' TEMPLATE template0").format(
                sql.Identifier(name)
            )
        )
        return True
