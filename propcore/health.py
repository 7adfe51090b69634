"""The checks behind /health/ (django-health-check 4.x: checks are passed to the view)."""

from django.conf import settings

# one database check per alias; any failure answers HTTP 500
HEALTH_CHECKS = [("health_check.checks.Database", {"alias": alias}) for alias in settings.DATABASES]
