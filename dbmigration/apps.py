from django.apps import AppConfig


class DbmigrationConfig(AppConfig):
    name = "dbmigration"
    verbose_name = "SQLite -> PostgreSQL migration"
