"""Wagtail's own test project (wagtail.test.settings, from its wheel) with the engine added.

This is what a Wagtail user following the README's "Using the engine in your own Django
project" writes: the project's settings unchanged, plus the three marked steps.  Everything
it writes goes under $REAL_PROJECT_DIR; its PostgreSQL database is $REAL_PROJECT_PG_NAME on
the local server (tests/test_real_project.py gives each run its own).
"""

import os
from pathlib import Path

from wagtail.test.settings import *  # noqa: F403
from wagtail.test.settings import INSTALLED_APPS

from dbmigration.state import read_active_backend

DIR = Path(os.environ["REAL_PROJECT_DIR"])

# step 1: the engine is an installed app
INSTALLED_APPS = [*INSTALLED_APPS, "dbmigration"]

# step 2: the source as alias "sqlite", the target as alias "postgresql", and "default"
# following the active backend the engine's state file names
DATABASES = {
    "sqlite": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": DIR / "wagtail.sqlite3",
        "OPTIONS": {"timeout": 5},
    },
    "postgresql": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": os.environ["REAL_PROJECT_PG_NAME"],
        "USER": "postgres",
        "HOST": "127.0.0.1",
        "PORT": 5432,
    },
}

# step 3: the engine's own settings (every key: dbmigration/conf.py)
DBMIGRATION = {
    "STATE_DIR": DIR / "migration",
    "MODEL_POLICIES": {
        # the search index: its models are defined per vendor when Wagtail loads (text and an
        # FTS5 table on SQLite, tsvector on PostgreSQL), so the field types cannot show it
        "wagtailsearch.IndexEntry": {"policy": "skip", "rebuild": ["update_index"]},
        "wagtailsearch.SQLiteFTSIndexEntry": {"policy": "skip", "rebuild": ["update_index"]},
    },
}

DATABASES["default"] = DATABASES[read_active_backend(DBMIGRATION["STATE_DIR"] / "state.json")]
