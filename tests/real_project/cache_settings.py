"""The minimal project with a database cache, as Wagtail's test settings (and many sites) use.

tests/test_schema_child.py migrates a target with it: no migration creates the cache table.
"""

from tests.minimal_project.settings import *  # noqa: F403

CACHES = {
    "default": {
        "BACKEND": "django.core.cache.backends.db.DatabaseCache",
        "LOCATION": "project_cache",
    }
}
