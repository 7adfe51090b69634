"""Test settings: propcore's own, plus the test-only corpus apps the engine must migrate exactly."""

from propcore.settings import *  # noqa: F403
from propcore.settings import DATABASES, INSTALLED_APPS

INSTALLED_APPS = [
    *INSTALLED_APPS,
    "tests.corpus.fields.apps.CorpusFieldsConfig",
    "tests.corpus.relations.apps.CorpusRelationsConfig",
]

# Django's TestCase opens a transaction on every alias, and 'default' is a second connection
# to the SQLite test file: with "IMMEDIATE" its BEGIN would wait for the 'sqlite' alias's
# (which holds the write lock) and fail.  The test process keeps Django's deferred
# transactions (WAL stays on); tests/test_sqlite_writers.py runs propcore.settings' IMMEDIATE
# ones in real processes.
DATABASES = {
    alias: {
        **config,
        "OPTIONS": {k: v for k, v in config["OPTIONS"].items() if k != "transaction_mode"},
    }
    for alias, config in DATABASES.items()
}
