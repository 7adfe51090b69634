"""Running processes follow the state file; switch_to_postgresql refuses, plans and switches."""

import os
import signal

import pytest
from django.db import connections
from django.http import HttpResponse
from django.urls import path

from accounts.models import Organisation
from dbmigration.state import MigrationState, write_state
from propcore import middleware


def count_view(request):
    return HttpResponse(f"{connections['default'].vendor}:{Organisation.objects.count()}")


urlpatterns = [path("count/", count_view)]


@pytest.fixture
def state_file(settings, tmp_path):
    settings.STATE_FILE = tmp_path / "state.json"
    settings.REPORT_DIR = tmp_path / "reports"
    settings.LOG_DIR = tmp_path / "logs"
    settings.BACKUP_DIR = tmp_path / "backups"
    return settings.STATE_FILE


@pytest.fixture
def restore_default():
    """Put the test run's 'default' connection back after a test re-pointed it."""
    saved_settings = dict(connections.settings["default"])
    saved_wrapper = connections["default"]
    saved_backend = middleware.watcher.backend
    yield
    for conn in connections.all(initialized_only=True):
        conn.close()
    middleware._close_default_pool()
    connections.settings["default"].clear()
    connections.settings["default"].update(saved_settings)
    connections["default"] = saved_wrapper
    middleware.watcher.backend = saved_backend
    middleware.watcher.generation += 1  # other threads' wrappers are refreshed too
    middleware.watcher._local.generation = middleware.watcher.generation


def set_active(state_file, backend):
    write_state(state_file, MigrationState(phase="switched", active_backend=backend))


@pytest.mark.urls(__name__)
@pytest.mark.django_db(databases="__all__", transaction=True)
def test_running_process_follows_state_file(client, state_file, restore_default):
    Organisation.objects.using("postgresql").create(name="On PG", kind="developer")
    set_active(state_file, "sqlite")
    assert client.get("/count/").content == b"sqlite:0"
    set_active(state_file, "postgresql")
    assert client.get("/count/").content == b"postgresql:1"
    assert middleware.watcher.backend == "postgresql"
    set_active(state_file, "sqlite")
    assert client.get("/count/").content == b"sqlite:0"


@pytest.mark.django_db(databases="__all__", transaction=True)
def test_sighup_forces_reread(state_file, restore_default, monkeypatch):
    set_active(state_file, "sqlite")
    middleware.watcher.poll()
    assert middleware.install_sighup()
    # the override changes what the process should use without touching the file
    monkeypatch.setenv("DATABASE_ACTIVE", "postgresql")
    assert middleware.watcher.poll() == "sqlite"  # unchanged file: no re-read
    os.kill(os.getpid(), signal.SIGHUP)
    assert middleware.watcher.poll() == "postgresql"
    assert middleware.watcher.refresh_thread()
    assert connections["default"].vendor == "postgresql"


@pytest.mark.urls(__name__)
@pytest.mark.django_db(databases="__all__", transaction=True)
def test_unreadable_state_file_refuses_writes(client, state_file):
    state_file.write_text("{not json")
    response = client.post("/count/")
    assert response.status_code == 503
    assert client.get("/count/").status_code == 200
