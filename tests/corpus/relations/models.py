"""Every key, relation and table shape (see tests/test_corpus_relations.py)."""
