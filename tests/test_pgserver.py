"""Finding PostgreSQL: POSTGRES_URL, then 127.0.0.1:5432, then a private cluster."""

import shutil
import subprocess
import tempfile
from pathlib import Path

import psycopg
import pytest

from propcore import pgserver


def test_postgres_url_wins(tmp_path):
    url = "postgres://app:pw@db.internal:6432/prop?sslmode=require"
    assert (
        pgserver.resolve_postgres_url(environ={"POSTGRES_URL": url}, private_root=tmp_path) == url
    )


def test_the_local_server_is_used_when_it_answers(tmp_path):
    # The machine's server must be up for the test suite at all: a missing one fails here.
    assert pgserver.port_answers("127.0.0.1", 5432), "PostgreSQL must answer on 127.0.0.1:5432"
    url = pgserver.resolve_postgres_url(environ={}, private_root=tmp_path)
    assert url == "postgres://postgres@127.0.0.1:5432/propcore"
    assert not (tmp_path / "data").exists()


def test_passwords_are_redacted():
    url = "postgres://app:s3cr3t@db:5432/prop?sslmode=require"
    assert pgserver.redact_url(url) == "postgres://app:***@db:5432/prop?sslmode=require"
    assert "s3cr3t" not in pgserver.redact_url(url)


@pytest.fixture
def private_root():
    # postgres (the server's user) must reach the directory: pytest's tmp_path is root-only.
    root = Path(tempfile.mkdtemp(prefix="propcore-pg-", dir="/tmp"))
    root.chmod(0o755)
    yield root / "cluster"
    pg_ctl = pgserver.find_pg_bin("pg_ctl")
    if (root / "cluster" / "data").exists():
        subprocess.run(
            pgserver._as_postgres_user([pg_ctl, "-D", str(root / "cluster" / "data"), "stop"]),
            capture_output=True,
        )
    shutil.rmtree(root, ignore_errors=True)


def test_a_private_cluster_starts_when_no_server_answers(private_root):
    url = pgserver.start_private_cluster(private_root)
    assert pgserver.ensure_database(url) is True
    assert pgserver.ensure_database(url) is False  # idempotent
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT current_database()").fetchone() == ("propcore",)
    # a second call reuses the running cluster
    assert pgserver.start_private_cluster(private_root) == url


def test_no_binaries_gives_a_message_that_names_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(pgserver, "find_pg_bin", lambda name: None)
    with pytest.raises(pgserver.PostgresUnavailable, match="apt-get install postgresql"):
        pgserver.start_private_cluster(tmp_path)


def test_ensure_postgres_recreate_drops_and_creates_the_database(settings):
    from io import StringIO

    import psycopg
    from django.core.management import call_command

    settings.POSTGRES_URL = "postgres://postgres@127.0.0.1:5432/propcore_ensure_test"
    pgserver.drop_database(settings.POSTGRES_URL)
    out = StringIO()
    call_command("ensure_postgres", stdout=out)
    assert "propcore_ensure_test (database created)" in out.getvalue()
    with psycopg.connect(settings.POSTGRES_URL, autocommit=True) as conn:
        conn.execute("CREATE TABLE marker (id int)")
    call_command("ensure_postgres", recreate=True, stdout=out)
    with psycopg.connect(settings.POSTGRES_URL) as conn:
        tables = conn.execute("SELECT count(*) FROM pg_tables WHERE tablename = 'marker'")
        assert tables.fetchone() == (0,)
    pgserver.drop_database(settings.POSTGRES_URL)


@pytest.mark.parametrize(
    "url",
    [
        "postgres://app:pw@db.internal:6432/prop?sslmode=require",
        "postgresql://postgres@127.0.0.1/propcore",
        "postgres://app:p%2Fw%40x@[::1]:5432/prop",
        "postgres:///propcore?host=/var/run/postgresql",
    ],
)
def test_a_well_formed_url_passes_unchanged(url):
    assert pgserver.check_postgres_url(url) == url


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("127.0.0.1:5432/x", "must start with postgres://"),
        ("postgresql:/127.0.0.1/x", "must start with postgres://"),
        ("mysql://app:s3cret@db/x", "must start with postgres://"),
        ("postgres://app:s3c/ret@db:5432/x", "must be percent-encoded"),
        ("postgres://app:s3c#ret@db:5432/x", "must be percent-encoded"),
        ("postgres://app:s3c?ret@db:5432/x", "must be percent-encoded"),
        ("postgres://app:s3cret@db:54x2/x", "port that is not a number"),
        ("postgres://app:s3cret@db:99999/x", "port that is not a number"),
        ("postgres://app:s3cret@db:5432", "names no database"),
        ("postgres://app:s3cret@db:5432/a/b", "holds a '/'"),
    ],
)
def test_a_malformed_url_is_refused_naming_the_problem_never_the_password(url, problem):
    with pytest.raises(pgserver.BadPostgresUrl) as exc:
        pgserver.check_postgres_url(url)
    message = str(exc.value)
    assert message.startswith("POSTGRES_URL ") and problem in message
    assert "s3c" not in message and "\n" not in message


def test_resolve_refuses_a_malformed_postgres_url(tmp_path):
    with pytest.raises(pgserver.BadPostgresUrl, match="POSTGRES_URL must start"):
        pgserver.resolve_postgres_url(
            environ={"POSTGRES_URL": "127.0.0.1:5432/x"}, private_root=tmp_path
        )


def test_db_test_postgresql_refuses_a_malformed_url_instead_of_checking_another_database():
    from io import StringIO

    from django.core.management import CommandError, call_command

    out = StringIO()
    with pytest.raises(CommandError, match="--url must start with postgres://") as exc:
        call_command("db_test_postgresql", "--url", "127.0.0.1:5432/x", stdout=out)
    assert exc.value.returncode == 78
    assert "All checks passed" not in out.getvalue() and out.getvalue() == ""
