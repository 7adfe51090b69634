from django.apps import AppConfig


class AccountsConfig(AppConfig):
    name = "accounts"
    verbose_name = "PROP.ie accounts"

    def ready(self) -> None:
        from accounts import audit  # noqa: F401  (registers models with auditlog)
