"""A second, minimal Django project that uses the engine: nothing of propcore's settings.

Everything it writes goes under $MINIMAL_DIR; its PostgreSQL database is $MINIMAL_PG_NAME on
the local server (tests/test_minimal_project.py gives each run its own).  The three steps of
the README's "Using the engine in your own Django project" are marked below.
"""

import os
from pathlib import Path

from dbmigration.state import read_active_backend

DIR = Path(os.environ["MINIMAL_DIR"])
SECRET_KEY = "minimal-project-test-only"
USE_TZ = True
TIME_ZONE = "UTC"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# step 1: the engine is an installed app
INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "dbmigration",
    "tests.minimal_project.shop",
]

# step 2: the source as alias "sqlite", the target as alias "postgresql", and "default"
# following the active backend the engine's state file names
DATABASES = {
    "sqlite": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": DIR / "shop.sqlite3",
        "OPTIONS": {"timeout": 5},
    },
    "postgresql": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": os.environ["MINIMAL_PG_NAME"],
        "USER": "postgres",
        "HOST": "127.0.0.1",
        "PORT": 5432,
    },
}

# step 3: the engine's own settings (every key: dbmigration/conf.py)
DBMIGRATION = {
    "STATE_DIR": DIR / "migration",
    "MODEL_POLICIES": {
        # a cache the project refills itself: never copied, verified or carried back
        "shop.PriceCache": {"policy": "skip", "rebuild": ["refill_price_cache"]},
    },
}

DATABASES["default"] = DATABASES[read_active_backend(DBMIGRATION["STATE_DIR"] / "state.json")]
