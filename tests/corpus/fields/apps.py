from django.apps import AppConfig


class CorpusFieldsConfig(AppConfig):
    """Every Django value field class, filled with boundary and hostile values by the tests."""

    name = "tests.corpus.fields"
    label = "corpus_fields"
    default_auto_field = "django.db.models.BigAutoField"
