"""Encrypted connections on a private cluster that accepts only hostssl, with a certificate the
test makes: verify-full works, a plain connection is refused, a wrong name fails verification.
"""

from __future__ import annotations

from io import StringIO

import psycopg
import pytest
from django.core.management import CommandError, call_command

from dbmigration.errors import TargetError
from tests.clusters import PrivateCluster
from tests.test_settings import PROD, manage_py

pytestmark = pytest.mark.slow

OTHER_ADDRESS = "127.0.0.2"  # also loopback, but not a name the certificate holds


@pytest.fixture(scope="module")
def tls_cluster():
    # TCP only with TLS: a connection without it finds no pg_hba.conf line
    with PrivateCluster(
        "propcore_tls_",
        tls=True,
        conf={"listen_addresses": f"127.0.0.1,{OTHER_ADDRESS}"},
        hba=["hostssl all all 127.0.0.0/8 trust"],
    ) as cluster:
        yield cluster, cluster.certs


def _verified_url(cluster, certs, **query) -> str:
    return cluster.url(sslmode="verify-full", sslrootcert=str(certs["ca"]), **query)


def _db_test_postgresql(url: str) -> tuple[str, CommandError | None]:
    out = StringIO()
    try:
        call_command("db_test_postgresql", "--url", url, "--pool-max", "5", stdout=out)
    except CommandError as exc:
        return out.getvalue(), exc
    return out.getvalue(), None


def test_the_prod_app_connects_with_verify_full_and_the_server_sees_tls(tls_cluster, tmp_path):
    cluster, certs = tls_cluster
    query = (
        "from django.db import connections; c = connections['postgresql'].cursor(); "
        "c.execute('SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()'); "
        "print(*c.fetchone(), connections['postgresql'].settings_dict['OPTIONS']['sslmode'])"
    )
    result = manage_py(
        "shell",
        "-c",
        query,
        **{**PROD, "POSTGRES_URL": _verified_url(cluster, certs)},
        PROPCORE_DATABASE_DIR=str(tmp_path),
    )
    assert result.returncode == 0, result.stderr
    ssl, version, sslmode = result.stdout.split()[-3:]  # shell prints "N objects imported" first
    assert ssl == "True" and version.startswith("TLSv1"), result.stdout
    assert sslmode == "verify-full"


def test_db_test_postgresql_reports_ssl_in_use_over_verify_full(tls_cluster):
    cluster, certs = tls_cluster
    out, err = _db_test_postgresql(_verified_url(cluster, certs))
    assert err is None, out
    assert "ssl: ok - SSL in use (TLSv1" in out


def test_a_plain_connection_is_refused(tls_cluster):
    cluster, _ = tls_cluster
    with pytest.raises(psycopg.OperationalError, match="no encryption"):
        psycopg.connect(cluster.url(sslmode="disable"))
    out, err = _db_test_postgresql(cluster.url(sslmode="disable"))
    assert err is not None and err.returncode == TargetError.returncode
    failed = [line for line in out.splitlines() if "FAILED" in line]
    assert len(failed) == 1, out
    assert "accepts only encrypted connections" in failed[0]
    assert "Fix: add sslmode=verify-full" in failed[0]


@pytest.mark.parametrize(
    ("how", "meaning", "fix"),
    [
        (
            "wrong_name",
            "certificate issued for another name",
            "connect with a name the certificate",
        ),
        ("no_root", "no CA file to check its certificate against", "add sslrootcert="),
        ("other_ca", "the CA in sslrootcert did not sign", "point sslrootcert at the CA"),
    ],
)
def test_a_failed_verification_is_one_clear_line(tls_cluster, how, meaning, fix):
    cluster, certs = tls_cluster
    url = {
        "wrong_name": _verified_url(cluster, certs).replace("127.0.0.1", OTHER_ADDRESS),
        "no_root": cluster.url(sslmode="verify-full", sslrootcert="/nonexistent/ca.crt"),
        "other_ca": cluster.url(
            sslmode="verify-full", sslrootcert="/etc/ssl/certs/ca-certificates.crt"
        ),
    }[how]
    out, err = _db_test_postgresql(url)
    assert err is not None and err.returncode == TargetError.returncode
    failed = [line for line in out.splitlines() if "FAILED" in line]
    assert len(failed) == 1, out
    assert failed[0].strip().startswith("connect: FAILED - PostgreSQL at postgres@")
    assert meaning in failed[0] and f"Fix: {fix}" in failed[0]
    assert "connection to server at" not in failed[0]  # libpq's prefix is cut


def test_a_server_without_tls_is_one_clear_line():
    with PrivateCluster("propcore_notls_") as plain:
        out, err = _db_test_postgresql(plain.url(sslmode="require"))
    assert err is not None and err.returncode == TargetError.returncode
    failed = [line for line in out.splitlines() if "FAILED" in line]
    assert len(failed) == 1 and "does not offer SSL" in failed[0], out
    assert "Fix: turn ssl on at the server" in failed[0]
