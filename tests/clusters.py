"""Private PostgreSQL clusters for tests that need a server configured differently from the
shared one (password auth, SSL only, preloaded libraries), and the certificates they use.

    hba = ["hostssl all all 127.0.0.1/32 trust"]
    with PrivateCluster("propcore_x_", conf={"ssl": True}, hba=hba) as cluster:
        psycopg.connect(cluster.url())

Everything lives in one temporary directory owned by the postgres user (the server refuses to
run as root); settings go into postgresql.conf, so ``restart()`` keeps them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg

from propcore.pgserver import find_pg_bin

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def as_postgres(*cmd: str) -> subprocess.CompletedProcess:
    """Run a server binary as the postgres user when we are root (initdb and postgres refuse)."""
    if os.geteuid() == 0:
        cmd = ("runuser", "-u", "postgres", "--", *cmd)
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)


def give_to_postgres(*paths: Path, mode: int | None = None) -> None:
    for path in paths:
        if mode is not None:
            os.chmod(path, mode)
        if os.geteuid() == 0:
            shutil.chown(path, "postgres")


def conf_value(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, int | float):
        return str(value)
    return "'" + str(value).replace("'", "''") + "'"


class PrivateCluster:
    """One throwaway cluster: initdb, extra settings, pg_hba lines, start/stop, its log."""

    def __init__(
        self,
        prefix: str = "propcore_pg_",
        *,
        conf: dict | None = None,
        hba: list[str] | None = None,
        superuser_password: str | None = None,
        port: int | None = None,
        tls: bool = False,
    ):
        self.root = Path(tempfile.mkdtemp(prefix=prefix))
        self.root.chmod(0o755)
        give_to_postgres(self.root)
        self.data, self.log = self.root / "data", self.root / "server.log"
        self.port = port or free_port()
        self.conf = {
            "port": self.port,
            "listen_addresses": HOST,
            "unix_socket_directories": str(self.root),
            "fsync": False,
        }
        # tls: SSL on, with a certificate for localhost/127.0.0.1 signed by a test CA whose
        # certificate (self.certs["ca"]) clients pass as sslrootcert
        self.certs = make_certificates(self.root / "certs") if tls else {}
        if tls:
            self.conf.update(
                ssl=True, ssl_cert_file=str(self.certs["cert"]), ssl_key_file=str(self.certs["key"])
            )
        self.conf.update(conf or {})
        # local (socket) connections stay trusted: the test's own setup and teardown use them
        self.hba = ["local all all trust", *(hba or [f"host all all {HOST}/32 trust"])]
        self.superuser_password = superuser_password

    # --- lifecycle ------------------------------------------------------------------------

    def init(self) -> PrivateCluster:
        args = ["-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8"]
        if self.superuser_password:
            pwfile = self.root / "pw"
            pwfile.write_text(self.superuser_password)
            give_to_postgres(pwfile, mode=0o600)
            args += ["--pwfile", str(pwfile)]
        as_postgres(find_pg_bin("initdb"), *args)
        (self.data / "pg_hba.conf").write_text("\n".join(self.hba) + "\n")
        self.configure(**self.conf)
        return self

    def configure(self, **settings) -> None:
        """Append settings to postgresql.conf (the last line wins); restart() applies them."""
        with (self.data / "postgresql.conf").open("a") as conf_file:
            for key, value in settings.items():
                conf_file.write(f"{key} = {conf_value(value)}\n")

    def include(self, conf_file: Path) -> None:
        """Append a copy of conf_file (e.g. deploy/'s documented settings) to postgresql.conf."""
        with (self.data / "postgresql.conf").open("a") as conf_file_out:
            conf_file_out.write(f"# --- {conf_file} ---\n{conf_file.read_text()}\n")

    def start(self) -> None:
        try:
            as_postgres(
                find_pg_bin("pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "start"
            )
        except subprocess.CalledProcessError:
            tail = "\n".join(self.log_text().splitlines()[-5:])
            raise RuntimeError(
                f"the private cluster in {self.root} did not start:\n{tail}"
            ) from None

    def stop(self, mode: str = "fast") -> None:
        if (self.data / "postmaster.pid").exists():
            as_postgres(find_pg_bin("pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def restart(self) -> None:
        self.stop()
        self.start()

    def remove(self) -> None:
        """Stop at once and delete everything."""
        try:
            self.stop("immediate")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PrivateCluster:
        try:
            self.init().start()
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    # --- talking to it ----------------------------------------------------------------------

    def url(
        self, *, user: str = "postgres", password: str = "", database: str = "postgres", **query
    ) -> str:
        """postgres://... over TCP on 127.0.0.1; query holds libpq options (sslmode=...)."""
        auth = f"{user}:{password}" if password else user
        tail = "&".join(f"{k}={v}" for k, v in query.items())
        return f"postgres://{auth}@{HOST}:{self.port}/{database}" + (f"?{tail}" if tail else "")

    def admin_conninfo(self, database: str = "postgres") -> dict:
        """The superuser over the Unix socket (trusted whatever the host lines say)."""
        return {"host": str(self.root), "port": self.port, "user": "postgres", "dbname": database}

    def sql(self, query: str, *params, database: str = "postgres"):
        """Run one statement as the superuser; return its rows, if any."""
        with psycopg.connect(**self.admin_conninfo(database), autocommit=True) as conn:
            cur = conn.execute(query, params or None)
            return cur.fetchall() if cur.description else None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def django_alias(self, base: dict, *, database: str = "postgres") -> dict:
        """A copy of a DATABASES entry pointing here, without a pool (closed per test)."""
        config = {**base, "HOST": HOST, "PORT": self.port, "NAME": database, "CONN_MAX_AGE": 0}
        config["OPTIONS"] = {k: v for k, v in config.get("OPTIONS", {}).items() if k != "pool"}
        return config


# --- a primary and its streaming standby ----------------------------------------------------


def start_server(data: Path, port: int, sockets: Path) -> None:
    """Start the cluster in data on port (its log beside it), sockets in sockets."""
    as_postgres(
        find_pg_bin("pg_ctl"), "-D", str(data), "-l", str(data.parent / f"{port}.log"), "-w",
        "-o", f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1 -c fsync=off", "start",
    )  # fmt: skip


@contextlib.contextmanager
def streaming_pair(prefix: str):
    """A private primary and a streaming standby on free ports; yield (root, ports), then
    stop both and remove them."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    root.chmod(0o755)
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
    primary, standby = root / "primary", root / "standby"
    p_port, s_port = free_port(), free_port()
    try:
        as_postgres(find_pg_bin("initdb"), "-D", str(primary), "-U", "postgres", "-A", "trust")
        start_server(primary, p_port, root)
        as_postgres(
            find_pg_bin("pg_basebackup"), "-h", "127.0.0.1", "-p", str(p_port), "-U",
            "postgres", "-D", str(standby), "-R", "-X", "stream",
        )  # fmt: skip
        start_server(standby, s_port, root)
        url = f"host=127.0.0.1 port={p_port} user=postgres dbname=postgres"
        with psycopg.connect(url, autocommit=True) as conn:
            for _ in range(100):
                if conn.execute("SELECT count(*) FROM pg_stat_replication").fetchone()[0]:
                    break
                time.sleep(0.1)
        yield root, p_port, s_port
    finally:
        for data in (standby, primary):
            if (data / "postmaster.pid").exists():
                as_postgres(find_pg_bin("pg_ctl"), "-D", str(data), "-m", "immediate", "stop")
        shutil.rmtree(root, ignore_errors=True)


# --- certificates ------------------------------------------------------------------------------


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, text=True, timeout=60)


def make_certificates(directory: Path, *, names: tuple[str, ...] = ("localhost", HOST)) -> dict:
    """A throwaway CA and a server certificate it signed for names (DNS names or IPs).

    Returns the paths: ca (what clients pass as sslrootcert), cert and key (the server's; the
    key owned by postgres with mode 0600, as the server demands).
    """
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o755)  # the server (postgres) reads its files from here
    ca_key, ca, key, csr, cert = (
        directory / n for n in ("ca.key", "ca.crt", "server.key", "server.csr", "server.crt")
    )
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
        "/CN=propcore test CA", "-keyout", str(ca_key), "-out", str(ca),
    )  # fmt: skip
    _openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={names[0]}",
        "-keyout", str(key), "-out", str(csr),
    )  # fmt: skip
    san = ",".join(
        f"IP:{n}" if n.replace(".", "").isdigit() or ":" in n else f"DNS:{n}" for n in names
    )
    extensions = directory / "server.ext"
    extensions.write_text(f"subjectAltName={san}\n")
    _openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
        "-CAcreateserial", "-days", "2", "-extfile", str(extensions), "-out", str(cert),
    )  # fmt: skip
    give_to_postgres(key, mode=0o600)
    give_to_postgres(cert, ca, mode=0o644)
    return {"ca": ca, "cert": cert, "key": key}
