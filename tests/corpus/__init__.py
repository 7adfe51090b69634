"""Test-only apps: a model for every field class and relation kind (see tests.settings)."""
