"""Every Django value field class (see tests/test_corpus_fields.py)."""
