"""The schema child (dbmigration/schema_child.py) builds the target as the project deploys it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

ROOT = Path(__file__).resolve().parent.parent
SERVER = "postgresql://postgres@127.0.0.1:5432"


@pytest.fixture
def target_name():
    name = f"schema_child_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(f"{SERVER}/postgres", autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield name
    finally:
        with psycopg.connect(f"{SERVER}/postgres", autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def test_the_child_creates_the_projects_database_cache_table(tmp_path, target_name):
    """No migration makes a DatabaseCache table; without it cached views fail after a switch."""
    target = {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": target_name,
        "USER": "postgres",
        "HOST": "127.0.0.1",
        "PORT": 5432,
    }
    payload = {
        "target": target,
        "target_alias": "postgresql",
        "source_alias": "sqlite",
        "source_path": str(tmp_path / "shop.sqlite3"),
    }
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.real_project.cache_settings",
        "MINIMAL_DIR": str(tmp_path),
        "MINIMAL_PG_NAME": target_name,
        "PYTHONPATH": str(ROOT),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "dbmigration.schema_child"],
        input=json.dumps(payload),
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    applied = json.loads(proc.stdout.strip().splitlines()[-1])["migrations_applied"]
    assert any(name.startswith("shop.") for name in applied)
    with psycopg.connect(f"{SERVER}/{target_name}") as conn:
        (exists,) = conn.execute(
            "SELECT to_regclass('public.project_cache') IS NOT NULL"
        ).fetchone()
    assert exists
