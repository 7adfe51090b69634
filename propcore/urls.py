from django.contrib import admin
from django.urls import include, path

from propcore.health import HealthView

urlpatterns = [
    path("admin/", admin.site.urls),
    path("health/", HealthView.as_view(), name="health"),
    path("api/", include("accounts.api")),
]
