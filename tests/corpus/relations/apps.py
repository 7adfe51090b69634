from django.apps import AppConfig


class CorpusRelationsConfig(AppConfig):
    """Every key, relation and table shape: composite keys, generated columns, odd names."""

    name = "tests.corpus.relations"
    label = "corpus_relations"
    default_auto_field = "django.db.models.BigAutoField"
