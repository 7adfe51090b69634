from django.apps import AppConfig
from django.db.backends.signals import connection_created


class PropcoreConfig(AppConfig):
    name = "propcore"
    verbose_name = "propcore"

    def ready(self) -> None:
        from propcore import query_timing, routers

        routers.connect_before_auditlog()

        connection_created.connect(query_timing.install, dispatch_uid="propcore.slow_query")
