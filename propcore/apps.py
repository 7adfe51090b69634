from django.apps import AppConfig
from django.contrib.admin.apps import AdminConfig
from django.db.backends.signals import connection_created


class PropcoreConfig(AppConfig):
    name = "propcore"
    verbose_name = "propcore"

    def ready(self) -> None:
        from propcore import middleware, query_tags, query_timing, routers

        routers.connect_before_auditlog()

        connection_created.connect(query_timing.install, dispatch_uid="propcore.slow_query")
        connection_created.connect(query_tags.install, dispatch_uid="propcore.query_tags")
        # a write the SQLite fence refuses is no key collision (sessions would retry for ever)
        connection_created.connect(
            middleware.install_fence_wrapper, dispatch_uid="propcore.fence_refusal"
        )


class ConsoleAdminConfig(AdminConfig):
    """Django's admin with the "Database migration" section (propcore/admin_console.py)."""

    default_site = "propcore.admin_console.ConsoleAdminSite"
