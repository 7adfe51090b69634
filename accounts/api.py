"""The self-service JSON API: what the platform holds about the requesting user.

The views use plain querysets (``KycVerification.objects.all()``) on purpose: on PostgreSQL
the row-level security policies, not the view, keep every other user's rows out.  Each view
drops the staff role for its transaction, so a staff user also sees only their own rows here.
"""

from __future__ import annotations

import functools

from django.db import DEFAULT_DB_ALIAS
from django.http import JsonResponse
from django.urls import path
from django.views.decorators.http import require_GET

from accounts.models import KycVerification, LoginEvent, Membership, User
from propcore.rls import set_identity

HIDDEN_FIELDS = {"password"}
LOGIN_LIMIT = 100


def _row(obj) -> dict:
    """A model instance as JSON-ready values, by column name (foreign keys as ids)."""
    return {
        field.attname: field.value_from_object(obj)
        for field in obj._meta.concrete_fields
        if field.attname not in HIDDEN_FIELDS
    }


def self_service(view):
    """Session-authenticated GET; the transaction sees the user's own rows only."""

    @require_GET
    @functools.wraps(view)
    def wrapper(request, *args, **kwargs):
        if not request.user.is_authenticated:
            return JsonResponse({"error": "Sign in first."}, status=401)
        set_identity(user_id=request.user.pk, role="", using=DEFAULT_DB_ALIAS)
        return JsonResponse(view(request, *args, **kwargs))

    return wrapper


@self_service
def me(request) -> dict:
    return {"user": [_row(u) for u in User.objects.all()]}


@self_service
def my_kyc(request) -> dict:
    return {"kyc": [_row(k) for k in KycVerification.objects.all()]}


@self_service
def my_logins(request) -> dict:
    return {"logins": [_row(e) for e in LoginEvent.objects.all()[:LOGIN_LIMIT]]}


@self_service
def my_export(request) -> dict:
    """Everything held about the user, for a GDPR access request."""
    from auditlog.models import LogEntry

    return {
        "user": [_row(u) for u in User.all_objects.all()],
        "memberships": [_row(m) for m in Membership.objects.filter(user=request.user)],
        "kyc": [_row(k) for k in KycVerification.objects.all()],
        "logins": [_row(e) for e in LoginEvent.objects.all()],
        "audit_entries": [_row(e) for e in LogEntry.objects.all()],
    }


urlpatterns = [
    path("me/", me, name="api-me"),
    path("me/kyc/", my_kyc, name="api-me-kyc"),
    path("me/logins/", my_logins, name="api-me-logins"),
    path("me/export/", my_export, name="api-me-export"),
]
