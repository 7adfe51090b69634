"""Which models django-auditlog records, and which fields it masks or leaves out."""

from auditlog.registry import auditlog

from accounts.models import KycVerification, Membership, Organisation, User

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
