"""Keep audit entries in the database of the row they describe.

django-auditlog writes its LogEntry with a plain ``create()``, which the default
router sends to ``default``.  A ``save(using="sqlite")`` would then log into
another database, and (when ``default`` is the same SQLite file) wait on the
lock that the delete's own transaction holds.  Signals know the alias, so we note
it just before auditlog's receivers run and forget it just after.
"""

from __future__ import annotations

import contextvars

from django.db.models import signals

_audit_alias: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "audit_alias", default=None
)
AUDIT_MODELS = {("auditlog", "logentry"), ("contenttypes", "contenttype")}


def _remember(sender, using=None, **kwargs):
    _audit_alias.set(using)


def _forget(sender, action=None, **kwargs):
    if action is None or action.startswith("post_"):
        _audit_alias.set(None)


def connect_before_auditlog() -> None:
    """Call before models are registered with auditlog."""
    # post_* too: a cascading delete sends every pre_delete, then every post_delete, and the
    # first post_delete's _forget would send the other rows' entries to 'default'
    for signal in (
        signals.pre_save,
        signals.pre_delete,
        signals.post_save,
        signals.post_delete,
        signals.m2m_changed,
    ):
        signal.connect(_remember, dispatch_uid=f"propcore.audit_alias.{id(signal)}")


def connect_after_auditlog() -> None:
    """Call after models are registered with auditlog."""
    for signal in (signals.post_save, signals.post_delete, signals.m2m_changed):
        signal.connect(_forget, dispatch_uid=f"propcore.audit_forget.{id(signal)}")


class AuditRouter:
    """Route audit entries (and the content types they point at) to the audited row's database."""

    def _route(self, model):
        if (model._meta.app_label, model._meta.model_name) in AUDIT_MODELS:
            return _audit_alias.get()
        return None

    db_for_write = db_for_read = lambda self, model, **hints: self._route(model)  # noqa: E731
