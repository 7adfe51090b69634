from django.apps import AppConfig


class AccountsConfig(AppConfig):
    name = "accounts"
    verbose_name = "PROP.ie accounts"

    def ready(self) -> None:
        from accounts import audit  # noqa: F401  (registers models with auditlog)
        from propcore.routers import connect_after_auditlog

        connect_after_auditlog()
