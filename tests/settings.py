"""Test settings: propcore's own, plus the test-only corpus apps the engine must migrate exactly."""

from propcore.settings import *  # noqa: F403
from propcore.settings import INSTALLED_APPS

INSTALLED_APPS = [
    *INSTALLED_APPS,
    "tests.corpus.fields.apps.CorpusFieldsConfig",
    "tests.corpus.relations.apps.CorpusRelationsConfig",
]
