"""A Django project driven as an operator drives it: every command in its own process, with
the project's settings module, its own directory and its own PostgreSQL database, dropped
when the test ends (the minimal project, Wagtail's test site, propcore's own commands)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
from psycopg import sql

ROOT = Path(__file__).resolve().parent.parent
SERVER = "postgresql://postgres@127.0.0.1:5432"
MAINTENANCE = f"{SERVER}/postgres"


class Subproject:
    """Run `python -m django ...` for one project; call it like the shell would."""

    def __init__(self, *, env: dict[str, str], pg_name: str):
        self.env = env
        self.pg_name = pg_name
        self.source: Path | None = None  # the project's SQLite file, once the test knows it

    def __call__(self, *args: str, extra_env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "django", *args],
            cwd=ROOT,
            env={**self.env, **(extra_env or {})},
            capture_output=True,
            text=True,
            timeout=600,
        )

    @property
    def pg_url(self) -> str:
        return f"{SERVER}/{self.pg_name}"


def unique_db_name(prefix: str) -> str:
    """A PostgreSQL database name no other test run (or helper) uses."""
    return f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:8]}"


def drop_database(name: str) -> None:
    with psycopg.connect(MAINTENANCE, autocommit=True) as conn:
        drop = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
        conn.execute(drop.format(sql.Identifier(name)))


@contextlib.contextmanager
def subproject(settings_module: str, *, pg_name: str, env: dict[str, str]) -> Iterator[Subproject]:
    """A project under settings_module with env on top of ours; its database is dropped after."""
    full = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": settings_module,
        "PYTHONPATH": str(ROOT),
        **env,
    }
    full.pop("PROPCORE_TEST_SUFFIX", None)  # the subproject's names are its own
    try:
        yield Subproject(env=full, pg_name=pg_name)
    finally:
        drop_database(pg_name)


def must(proc: subprocess.CompletedProcess) -> str:
    """The command's stdout; fail with its exit code, stdout and stderr's end otherwise."""
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-3000:]}"
    return proc.stdout


def on_target(run: Subproject, query: str) -> list:
    with psycopg.connect(run.pg_url) as conn:
        return conn.execute(query).fetchall()
