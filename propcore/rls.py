"""Who is asking, told to PostgreSQL per transaction, for the row-level security policies.

The policies (accounts/migrations/0004_row_level_security.py) read
``nullif(current_setting('app.user_id', true), '')`` and ``current_setting('app.role', true)``.
Both are set with ``set_config(..., true)``: transaction-local, so a pooled connection can
never carry one request's identity into the next one (a session-level setting would: the
django-rls leak).  Nothing set means no rows.

- ``RlsIdentityMiddleware`` runs each request inside one transaction on the default
  database, with the session's user (and ``app.role = 'staff'`` for an authenticated staff
  user) set at its start.  With read replicas it is the request's own transaction
  (``propcore.replicas.request_transaction``): a request that has not written reads from a
  replica, in a transaction there that carries the same identity (the session, the user
  row, the view's reads) and ends with this one.
- ``db_identity()`` does the same for jobs and commands, which state their identity.
- ``RlsModelBackend`` finds the user logging in through ``accounts_login_user_id()``, a
  SECURITY DEFINER function: before login no row of accounts_user is visible.
"""

from __future__ import annotations

import contextlib
import uuid

from django.contrib.auth import SESSION_KEY
from django.contrib.auth.backends import ModelBackend
from django.db import DEFAULT_DB_ALIAS, connections, transaction
from django.http import FileResponse, StreamingHttpResponse

from propcore.replicas import carry_settings, request_transaction

STAFF = "staff"


def set_identity(*, user_id: uuid.UUID | str | None, role: str = "", using: str) -> None:
    """Set app.user_id / app.role for the current transaction of ``using`` (PostgreSQL only)."""
    connection = connections[using]
    if connection.vendor != "postgresql":
        return
    if not connection.in_atomic_block:
        raise RuntimeError("set_identity() needs a transaction: the setting would outlive it")
    values = {"app.user_id": str(user_id) if user_id else "", "app.role": role}
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT set_config('app.user_id', %s, true), set_config('app.role', %s, true)",
            list(values.values()),
        )
    carry_settings(using, values)  # the request's replica reads see the same identity


@contextlib.contextmanager
def db_identity(*, user_id: uuid.UUID | str | None = None, role: str = "", using=DEFAULT_DB_ALIAS):
    """A transaction in which the policies see ``user_id`` (and ``role``): for jobs and commands."""
    with transaction.atomic(using=using):
        set_identity(user_id=user_id, role=role, using=using)
        yield


def _as_uuid(value) -> uuid.UUID | None:
    try:
        return uuid.UUID(str(value)) if value else None
    except ValueError:
        return None


class RlsIdentityMiddleware:
    """Run the rest of the request in one transaction that carries the user's identity."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        using = DEFAULT_DB_ALIAS
        if connections[using].vendor != "postgresql":
            return self.get_response(request)
        with request_transaction(using):
            # the session names the user; it must be set before request.user loads the row
            session_user = (
                _as_uuid(request.session.get(SESSION_KEY)) if hasattr(request, "session") else None
            )
            set_identity(user_id=session_user, using=using)
            user = getattr(request, "user", None)
            if user is not None and user.is_authenticated:
                set_identity(user_id=user.pk, role=STAFF if user.is_staff else "", using=using)
            elif session_user:
                set_identity(user_id=None, using=using)  # the session no longer holds
            response = self.get_response(request)
            if response.status_code >= 500:
                transaction.set_rollback(True, using=using)
            elif _streams_from_code(response):
                # the body is made after this transaction ends: give it one of its own, with
                # the identity the view ended with (on the primary: no routing context then)
                with connections[using].cursor() as cursor:
                    cursor.execute(
                        "SELECT current_setting('app.user_id', true), "
                        "current_setting('app.role', true)"
                    )
                    user_id, role = cursor.fetchone()
                response.streaming_content = _with_identity(
                    response.streaming_content, user_id=user_id, role=role or "", using=using
                )
            return response


def _streams_from_code(response) -> bool:
    """A streaming body made by the view's generator (not a file, not async)."""
    return (
        isinstance(response, StreamingHttpResponse)
        and not isinstance(response, FileResponse)
        and not response.is_async
    )


def _with_identity(content, *, user_id: str | None, role: str, using: str):
    with db_identity(user_id=user_id or None, role=role, using=using):
        yield from content


class RlsModelBackend(ModelBackend):
    """Django's backend, finding the user by email through a SECURITY DEFINER function."""

    def authenticate(self, request, username=None, password=None, **kwargs):
        connection = connections[DEFAULT_DB_ALIAS]
        if connection.vendor != "postgresql" or username is None or password is None:
            return super().authenticate(request, username, password, **kwargs)
        with transaction.atomic():
            with connection.cursor() as cursor:
                cursor.execute("SELECT accounts_login_user_id(%s)", [username])
                user_id = cursor.fetchone()[0]
            if user_id is None:
                # as Django does: spend the hashing time so a missing address is not faster
                return super().authenticate(request, username, password, **kwargs)
            set_identity(user_id=user_id, using=DEFAULT_DB_ALIAS)
            user = super().authenticate(request, username, password, **kwargs)
            if user is None:
                # keep nothing of the attempt's identity
                transaction.set_rollback(True)
            return user
