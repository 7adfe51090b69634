"""Which models django-auditlog records, and which fields it masks or leaves out."""

from auditlog.models import LogEntry
from auditlog.registry import auditlog
from auditlog.signals import pre_log
from django.contrib.auth.hashers import is_password_usable
from django.db.models.signals import pre_save

from accounts.models import KycVerification, Membership, Organisation, User


def _note_hash_upgrade(sender, instance, update_fields=None, **kwargs):
    # Django's check_password() re-hashes an outdated hash at login with _password cleared and
    # save(update_fields=["password"]): "Password hash upgrades shouldn't be considered
    # password changes."  (set_unusable_password() saves the same way but is a change.)
    # Connected before auditlog's own pre_save, so it runs first.
    instance._audit_hash_upgrade = (
        update_fields == frozenset({"password"})
        and instance._password is None
        and is_password_usable(instance.password)
    )


def _skip_hash_upgrade(sender, instance, action, **kwargs):
    """Keep a login's automatic re-hash out of the trail: the password did not change."""
    return not (action == LogEntry.Action.UPDATE and getattr(instance, "_audit_hash_upgrade", 0))


pre_save.connect(_note_hash_upgrade, sender=User, dispatch_uid="accounts.audit.hash_upgrade")
pre_log.connect(_skip_hash_upgrade, sender=User, dispatch_uid="accounts.audit.skip_hash_upgrade")

auditlog.register(
    User,
    exclude_fields=["last_login", "updated_at"],
    mask_fields=["password"],  # the hash never shows in full in the trail
    m2m_fields={"groups", "user_permissions"},
)
auditlog.register(Organisation, exclude_fields=["updated_at"])
auditlog.register(Membership, exclude_fields=["updated_at"])
auditlog.register(
    KycVerification,
    exclude_fields=["updated_at"],
    mask_fields=["document_reference"],  # passport / licence numbers
)
