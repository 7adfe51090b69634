from django.contrib import admin
from django.urls import path
from health_check.views import HealthCheckView

from propcore.health import HEALTH_CHECKS

urlpatterns = [
    path("admin/", admin.site.urls),
    path("health/", HealthCheckView.as_view(checks=HEALTH_CHECKS), name="health"),
]
