from django.apps import AppConfig
from django.contrib.admin.apps import AdminConfig
from django.db.backends.signals import connection_created


class PropcoreConfig(AppConfig):
    name = "propcore"
    verbose_name = "propcore"

    def ready(self) -> None:
        from propcore import query_tags, query_timing, routers

        routers.connect_before_auditlog()

        connection_created.connect(query_timing.install, dispatch_uid="propcore.slow_query")
        connection_created.connect(query_tags.install, dispatch_uid="propcore.query_tags")


class ConsoleAdminConfig(AdminConfig):
    """Django's admin with the "Database migration" section (propcore/admin_console.py)."""

    default_site = "propcore.admin_console.ConsoleAdminSite"
