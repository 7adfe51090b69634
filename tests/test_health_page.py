"""/health/ for monitors and people: stable JSON keys, readable names, 500 only when down."""

import dataclasses
import json
import logging
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from asgiref.sync import async_to_sync
from django.db import connections

from propcore.health import HEALTH_CHECKS, Database, HealthView, Migration

pytestmark = pytest.mark.django_db(databases="__all__", transaction=True)

CHECK_KEYS = {"database_sqlite", "database_postgresql", "database_default"} | {
    options["check"] for _, options in HEALTH_CHECKS if "check" in options
}


def test_health_is_200_with_json_when_databases_answer(client):
    response = client.get("/health/", {"format": "json"})
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["status"] in ("ok", "degraded")
    for alias in ("sqlite", "postgresql"):
        check = body["checks"][f"database_{alias}"]
        assert check["status"] == "ok", check
        assert check["label"] == f"Database {alias}"


def test_json_keys_are_stable_and_details_are_values(client):
    first = client.get("/health/", {"format": "json"}).json()
    second = client.get("/health/", {"format": "json"}).json()
    assert set(first["checks"]) == set(second["checks"]) == CHECK_KEYS
    active = first["checks"]["active_backend"]
    assert active["label"] == "Active backend"
    assert active["details"]["backend"] == "sqlite"
    assert isinstance(active["details"]["ms"], float)  # latency is a value, not in the key
    assert re.fullmatch(r"sqlite answers in [\d.]+ ms", active["message"])
    assert isinstance(active["seconds"], float)
    backup = first["checks"]["backup_age"]
    assert backup["label"] == "Backup age"
    assert backup["status"] == "degraded"
    assert backup["message"].startswith("no verified backup")  # no "Warning: " prefix


def test_html_page_shows_readable_names_and_details_not_reprs(client):
    response = client.get("/health/", HTTP_ACCEPT="text/html")
    assert response.status_code == 200
    page = response.content.decode()
    for label in ("Active backend", "Backup age", "Connection pool", "Database postgresql"):
        assert f">{label}</td>" in page, label
    assert "sqlite answers in" in page
    assert "Migration(" not in page and "Database(alias" not in page
    assert "{&#x27;" not in page and "{'" not in page  # nested details shown as JSON, not repr


def test_text_format_names_each_check_once_per_line(client):
    response = client.get("/health/", {"format": "text"})
    lines = response.content.decode().splitlines()
    assert lines[0] == "status: degraded"
    assert any(line.startswith("Backup age: degraded - no verified backup") for line in lines)
    assert len(lines) == 1 + len(CHECK_KEYS)


def test_a_degraded_check_logs_one_line_without_a_traceback(client, caplog):
    with caplog.at_level(logging.WARNING, logger="health_check"):
        client.get("/health/", {"format": "json"})
    records = [r for r in caplog.records if r.name == "health_check"]
    assert records, "the degraded backup check should still be logged"
    assert all(r.exc_info is None for r in records)
    assert any("Backup age failed: Warning: no verified backup" in r.getMessage() for r in records)


@pytest.fixture
def postgres_down():
    """Point the postgresql alias at a port nobody listens on, then put it back."""
    connection = connections["postgresql"]
    connection.close_pool()
    saved = connection.settings_dict["PORT"], connection.settings_dict["OPTIONS"]["pool"]
    connection.settings_dict["PORT"] = 1
    connection.settings_dict["OPTIONS"]["pool"] = {**saved[1], "timeout": 1.0}
    yield
    connection.close_pool()
    connection.settings_dict["PORT"], connection.settings_dict["OPTIONS"]["pool"] = saved


def test_health_is_500_when_postgresql_is_down(client, postgres_down):
    response = client.get("/health/", {"format": "json"})
    assert response.status_code == 500
    body = response.json()
    assert body["status"] == "down"
    assert body["checks"]["database_postgresql"]["status"] == "down"
    assert body["checks"]["database_sqlite"]["status"] == "ok"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_first_request_after_start_logs_no_traceback_and_no_pool_warning(tmp_path, pg):
    """A fresh server on PostgreSQL: the first /health/ must not see its own pool warm-up."""
    port = _free_port()
    env = {
        "PATH": "/usr/bin:/bin",
        "PROPCORE_DATABASE_DIR": str(tmp_path),
        "POSTGRES_URL": f"postgres://postgres@127.0.0.1:5432/{pg.settings_dict['NAME']}",
        "DATABASE_ACTIVE": "postgresql",
        "DJANGO_SETTINGS_MODULE": "tests.settings",
    }
    root = Path(__file__).resolve().parent.parent
    args = [sys.executable, "manage.py", "runserver", f"127.0.0.1:{port}", "--noreload"]
    server = subprocess.Popen(
        args, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health/?format=json") as r:
                    body = json.loads(r.read())
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.2)
    finally:
        server.terminate()
        output = server.communicate(timeout=20)[0]
    assert body["checks"]["pool"]["status"] == "ok", body["checks"]["pool"]
    assert "Traceback" not in output, output


@dataclasses.dataclass(repr=False)
class SlowProbe(Database):
    """A probe that holds a pooled PostgreSQL connection for half a second."""

    def run(self):
        with connections[self.alias].cursor() as cursor:
            cursor.execute("SELECT pg_sleep(0.5)")
        connections[self.alias].close()  # back to the pool


@pytest.fixture
def pool_of_one():
    connection = connections["postgresql"]
    connection.close_pool()
    saved = connection.settings_dict["OPTIONS"]["pool"]
    connection.settings_dict["OPTIONS"]["pool"] = {**saved, "min_size": 1, "max_size": 1}
    yield
    connection.close_pool()
    connection.settings_dict["OPTIONS"]["pool"] = saved


def test_pool_check_runs_after_the_probes_that_use_the_pool(rf, pool_of_one):
    """Probes queue on a one-connection pool; the pool check must not report their queue."""
    view = HealthView.as_view(
        checks=[
            (SlowProbe, {"alias": "postgresql"}),
            (Database, {"alias": "postgresql"}),
            (Migration, {"check": "pool"}),
        ]
    )
    response = async_to_sync(view)(rf.get("/health/", {"format": "json"}))
    pool = json.loads(response.content)["checks"]["pool"]
    assert pool["status"] == "ok", pool
    assert pool["details"]["postgresql"]["requests_waiting"] == 0


@pytest.mark.parametrize(
    ("query", "accept", "content_type"),
    [
        ({"format": "json"}, "*/*", "application/json"),
        ({"format": "text"}, "*/*", "text/plain; charset=utf-8"),
        ({"format": "atom"}, "*/*", "application/atom+xml; charset=utf-8"),
        ({"format": "rss"}, "*/*", "application/rss+xml; charset=utf-8"),
        (
            {"format": "openmetrics"},
            "*/*",
            "application/openmetrics-text",
        ),
        ({}, "application/json", "application/json"),
        ({}, "text/plain", "text/plain; charset=utf-8"),
        ({"format": "nonsense"}, "text/html", "text/html; charset=utf-8"),
    ],
)
def test_every_format_answers(client, query, accept, content_type):
    response = client.get("/health/", query, HTTP_ACCEPT=accept)
    assert response.status_code == 200, response.content[:500]
    assert response["Content-Type"].startswith(content_type)
    assert b"Backup age" in response.content or b"backup_age" in response.content


def test_unsupported_media_type_is_406(client):
    assert client.get("/health/", HTTP_ACCEPT="image/png").status_code == 406
