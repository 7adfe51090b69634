"""Transaction pooling through a real PgBouncer (Debian's pgbouncer) started by the test.

PgBouncer sits in front of a database of this test's own on the shared server; two logical
databases share it: ``wide`` (20 server connections, for the 150-client test) and ``narrow``
(one server connection, so two clients are served by the same server connection in turn,
which makes anything that outlives a transaction visible to the other client).
"""

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import psycopg
import pytest
from django.db import connections

from propcore.pooling import apply_pooling

# No django_db mark: the test has its own database, and its threads open connections to an
# alias added here, which TransactionTestCase would refuse.
pytestmark = pytest.mark.slow

CLIENTS = 150
WIDE_POOL = 20


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
DBNAME = f"propcore_pgbouncer_{os.getpid()}"


@pytest.fixture(scope="module")
def pgbouncer():
    """Start PgBouncer (transaction mode) on a free port before a new database; yield the port."""
    with psycopg.connect(ADMIN, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{DBNAME}"')
        admin.execute(f'CREATE DATABASE "{DBNAME}"')
    dbname = DBNAME
    root = Path(tempfile.mkdtemp(prefix="propcore_pgbouncer_"))
    port = _free_port()
    (root / "userlist.txt").write_text('"postgres" ""\n')
    (root / "pgbouncer.ini").write_text(
        f"""[databases]
wide = host=127.0.0.1 port=5432 dbname={dbname} user=postgres pool_size={WIDE_POOL}
narrow = host=127.0.0.1 port=5432 dbname={dbname} user=postgres pool_size=1

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
pool_mode = transaction
max_client_conn = {CLIENTS + 20}
auth_type = trust
auth_file = {root / "userlist.txt"}
ignore_startup_parameters = extra_float_digits,options
"""
    )
    command = ["/usr/sbin/pgbouncer", str(root / "pgbouncer.ini")]
    if os.geteuid() == 0:  # PgBouncer refuses to run as root
        shutil.chown(root, "postgres")
        for child in root.iterdir():
            shutil.chown(child, "postgres")
        command = ["runuser", "-u", "postgres", "--", *command]
    log = (root / "pgbouncer.log").open("wb")
    process = subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        for _ in range(100):
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                assert process.poll() is None, (root / "pgbouncer.log").read_text()
                time.sleep(0.1)
        yield port
    finally:
        os.killpg(process.pid, signal.SIGTERM)  # the process group this test started
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()
        shutil.rmtree(root, ignore_errors=True)
        with psycopg.connect(ADMIN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{DBNAME}" WITH (FORCE)')


def _pgbouncer_alias(port: int, dbname: str) -> dict:
    """A DATABASES entry through PgBouncer, as settings.py builds it in pgbouncer mode."""
    base = {**connections.settings["postgresql"], "HOST": "127.0.0.1", "PORT": port, "NAME": dbname}
    return apply_pooling(base, "pgbouncer", pool_min=1, pool_max=1, timeout=1.0)


def _connect(port: int, dbname: str, **options) -> psycopg.Connection:
    return psycopg.connect(
        host="127.0.0.1", port=port, dbname=dbname, user="postgres", autocommit=True, **options
    )


def test_pgbouncer_settings_are_what_transaction_pooling_needs():
    config = apply_pooling({"OPTIONS": {}}, "pgbouncer", pool_min=1, pool_max=5, timeout=1.0)
    assert "pool" not in config["OPTIONS"]
    assert config["OPTIONS"]["prepare_threshold"] is None
    assert config["DISABLE_SERVER_SIDE_CURSORS"] is True
    native = apply_pooling({"OPTIONS": {}}, "native", pool_min=1, pool_max=5, timeout=1.0)
    assert native["OPTIONS"]["pool"]["max_size"] == 5 and native["CONN_MAX_AGE"] == 0


def test_150_concurrent_django_connections_are_served(pgbouncer, django_db_blocker):
    connections.settings["via_pgbouncer"] = _pgbouncer_alias(pgbouncer, "wide")
    all_connected = threading.Barrier(CLIENTS, timeout=60)
    answers, errors = [], []

    def client(n: int) -> None:
        try:
            connection = connections["via_pgbouncer"]
            connection.ensure_connection()
            all_connected.wait()  # 150 client connections open at the same time
            with connection.cursor() as cursor:
                cursor.execute("SELECT %s::int + 0 FROM pg_sleep(0.01)", [n])
                answers.append(cursor.fetchone()[0])
            connection.close()
        except Exception as exc:  # collected, asserted below with the message
            errors.append(repr(exc))

    try:
        with django_db_blocker.unblock():
            threads = [threading.Thread(target=client, args=(n,)) for n in range(CLIENTS)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=120)
    finally:
        del connections.settings["via_pgbouncer"]
    assert errors == []
    assert sorted(answers) == list(range(CLIENTS))
    with _connect(5432, DBNAME) as direct:
        servers = direct.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND client_port IS NOT NULL AND pid <> pg_backend_pid()"
        ).fetchone()[0]
    assert servers <= WIDE_POOL  # 150 clients, at most 20 server connections


def _same_query_from_two_clients(port: int, options: dict) -> None:
    """Each client runs one parametrised query often enough for psycopg to prepare it."""
    with (
        _connect(port, "narrow", **options) as first,
        _connect(port, "narrow", **options) as second,
    ):
        for _ in range(3):
            for client in (first, second):
                for n in range(10):
                    assert client.execute("SELECT %s::int", [n]).fetchone() == (n,)


def test_prepared_statements_break_without_prepare_threshold_none(pgbouncer):
    # the control: psycopg's default prepares after 5 runs, and the shared server connection
    # already has (or lacks) the other client's statement
    with pytest.raises(psycopg.Error, match="prepared statement"):
        _same_query_from_two_clients(pgbouncer, {})


def test_no_prepared_statement_errors_with_the_pgbouncer_options(pgbouncer):
    options = _pgbouncer_alias(pgbouncer, "narrow")["OPTIONS"]
    _same_query_from_two_clients(pgbouncer, {"prepare_threshold": options["prepare_threshold"]})


def test_transaction_local_settings_do_not_leak_to_the_next_client(pgbouncer):
    show = "SELECT coalesce(current_setting('app.user_id', true), '')"
    with _connect(pgbouncer, "narrow") as first, _connect(pgbouncer, "narrow") as second:
        with first.transaction():
            first.execute("SELECT set_config('app.user_id', '42', true)")
            assert first.execute(show).fetchone() == ("42",)
        assert second.execute(show).fetchone() == ("",)
        # the control: a session-level setting stays on the one server connection they share
        first.execute("SELECT set_config('app.user_id', '42', false)")
        assert second.execute(show).fetchone() == ("42",)
        first.execute("RESET app.user_id")
