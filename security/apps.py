from django.apps import AppConfig


class SecurityConfig(AppConfig):
    name = "security"
    verbose_name = "Threat detection"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from security import checks  # noqa: F401  (registers the SECURITY_SCAN checks)
