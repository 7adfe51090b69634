"""The PROP.ie schema: users, organisations, memberships, KYC checks, login events."""

import uuid

from django.contrib.auth.models import AbstractBaseUser, PermissionsMixin
from django.db import models
from django.db.models import F, Q
from django.db.models.functions import Upper
from django.utils import timezone

from accounts.choices import (
    KycDocumentType,
    KycStatus,
    MembershipRole,
    OrganisationKind,
    UserRole,
    UserStatus,
)
from accounts.managers import AllUsersManager, SoftDeleteManager, UserManager


def in_choices(field: str, choices) -> models.CheckConstraint:
    """A CHECK constraint holding field to its choices, on every engine."""
    return models.CheckConstraint(
        condition=Q(**{f"{field}__in": choices.values}), name=f"%(class)s_{field}_valid"
    )


class TimestampedModel(models.Model):
    created_at = models.DateTimeField(default=timezone.now, editable=False, db_index=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        abstract = True


class SoftDeleteModel(models.Model):
    deleted_at = models.DateTimeField(null=True, blank=True, editable=False)

    class Meta:
        abstract = True

    def delete(self, using=None, keep_parents=False):
        """Soft delete: mark the row, keep its data and its audit trail."""
        self.deleted_at = timezone.now()
        self.save(using=using, update_fields=["deleted_at", "updated_at"])
        return (0, {})

    def hard_delete(self, using=None, keep_parents=False):
        return super().delete(using=using, keep_parents=keep_parents)

    def restore(self, using=None):
        self.deleted_at = None
        self.save(using=using, update_fields=["deleted_at", "updated_at"])

    @property
    def is_deleted(self) -> bool:
        return self.deleted_at is not None


class Organisation(TimestampedModel, SoftDeleteModel):
    """A property developer, estate agency or solicitors' firm."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    name = models.CharField(max_length=200)
    kind = models.CharField(max_length=20, choices=OrganisationKind.choices)
    cro_number = models.CharField("CRO number", max_length=20, blank=True)
    vat_number = models.CharField("VAT number", max_length=20, blank=True)
    psra_licence = models.CharField("PSRA licence", max_length=20, blank=True)
    email = models.EmailField(blank=True)
    phone = models.CharField(max_length=32, blank=True)
    address_line1 = models.CharField(max_length=200, blank=True)
    address_line2 = models.CharField(max_length=200, blank=True)
    town = models.CharField(max_length=100, blank=True)
    county = models.CharField(max_length=50, blank=True)
    eircode = models.CharField(max_length=8, blank=True)
    website = models.URLField(blank=True)
    metadata = models.JSONField(default=dict, blank=True)

    objects = SoftDeleteManager()
    all_objects = models.Manager()

    class Meta:
        ordering = ["name"]
        indexes = [models.Index(fields=["kind", "name"], name="org_kind_name_idx")]
        constraints = [in_choices("kind", OrganisationKind)]

    def __str__(self) -> str:
        return self.name


class User(AbstractBaseUser, PermissionsMixin, TimestampedModel, SoftDeleteModel):
    """A PROP.ie account: buyer, developer, estate agent, solicitor or admin."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    email = models.EmailField(unique=True)
    first_name = models.CharField(max_length=150, blank=True)
    last_name = models.CharField(max_length=150, blank=True)
    phone = models.CharField(max_length=32, blank=True)
    status = models.CharField(max_length=20, choices=UserStatus.choices, default=UserStatus.PENDING)
    kyc_status = models.CharField(
        max_length=20, choices=KycStatus.choices, default=KycStatus.NOT_STARTED
    )
    role = models.CharField(max_length=20, choices=UserRole.choices, default=UserRole.BUYER)
    preferences = models.JSONField(default=dict, blank=True)
    metadata = models.JSONField(default=dict, blank=True)
    invited_by = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.SET_NULL, related_name="invitees"
    )
    organisation = models.ForeignKey(
        Organisation,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="primary_users",
        help_text="The organisation the user mainly acts for.",
    )
    organisations = models.ManyToManyField(
        Organisation, through="Membership", related_name="members", blank=True
    )
    is_staff = models.BooleanField(default=False)
    is_active = models.BooleanField(default=True)

    objects = UserManager()
    all_objects = AllUsersManager()

    USERNAME_FIELD = "email"
    EMAIL_FIELD = "email"
    REQUIRED_FIELDS: list[str] = []

    class Meta:
        ordering = ["-created_at"]
        indexes = [
            models.Index(fields=["status", "role"], name="user_status_role_idx"),
            models.Index(fields=["kyc_status"], name="user_kyc_status_idx"),
            models.Index(fields=["last_name", "first_name"], name="user_name_idx"),
            # the admin's filters, newest first (substring search: trigram indexes, 0006)
            models.Index(fields=["role", "-created_at"], name="user_role_created_idx"),
            models.Index(
                fields=["-created_at"], name="user_staff_created_idx", condition=Q(is_staff=True)
            ),
            models.Index(
                fields=["deleted_at"],
                name="user_deleted_idx",
                condition=Q(deleted_at__isnull=False),
            ),
        ]
        constraints = [
            in_choices("status", UserStatus),
            in_choices("kyc_status", KycStatus),
            in_choices("role", UserRole),
        ]

    def __str__(self) -> str:
        return self.email

    def save(self, *args, **kwargs):
        self.email = (self.email or "").strip().lower()
        super().save(*args, **kwargs)

    def clean(self):
        super().clean()
        self.email = (self.email or "").strip().lower()

    def get_full_name(self) -> str:
        return f"{self.first_name} {self.last_name}".strip()

    def get_short_name(self) -> str:
        return self.first_name


class Membership(TimestampedModel):
    """A user's role in an organisation."""

    user = models.ForeignKey(User, on_delete=models.CASCADE, related_name="memberships")
    organisation = models.ForeignKey(
        Organisation, on_delete=models.CASCADE, related_name="memberships"
    )
    role = models.CharField(
        max_length=20, choices=MembershipRole.choices, default=MembershipRole.MEMBER
    )
    title = models.CharField(max_length=100, blank=True, help_text="e.g. 'Negotiator'")

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["user", "organisation"], name="membership_unique"),
            in_choices("role", MembershipRole),
        ]
        # the admin's role filter, newest first (its list is ordered by -id)
        indexes = [models.Index(fields=["role", "-id"], name="membership_role_idx")]

    def __str__(self) -> str:
        return f"{self.user} @ {self.organisation} ({self.role})"


class KycVerification(TimestampedModel):
    """One know-your-customer check (anti-money-laundering) of a user."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    user = models.ForeignKey(User, on_delete=models.CASCADE, related_name="kyc_verifications")
    document_type = models.CharField(max_length=30, choices=KycDocumentType.choices)
    document_reference = models.CharField(max_length=100)
    document_country = models.CharField(max_length=2, default="IE")
    expires_on = models.DateField(null=True, blank=True)
    status = models.CharField(max_length=20, choices=KycStatus.choices, default=KycStatus.PENDING)
    reviewer = models.ForeignKey(
        User,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="kyc_reviews",
    )
    reviewed_at = models.DateTimeField(null=True, blank=True)
    notes = models.TextField(blank=True)
    risk_score = models.DecimalField(max_digits=5, decimal_places=2, null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        verbose_name = "KYC verification"
        indexes = [
            models.Index(fields=["status", "created_at"], name="kyc_status_created_idx"),
            models.Index(fields=["user", "-created_at"], name="kyc_user_created_idx"),
            # the admin's filters, newest first; the country's also lists its values
            models.Index(fields=["document_type", "created_at"], name="kyc_type_created_idx"),
            models.Index(fields=["document_country", "created_at"], name="kyc_country_created_idx"),
        ]
        constraints = [
            in_choices("status", KycStatus),
            in_choices("document_type", KycDocumentType),
        ]

    def __str__(self) -> str:
        return f"{self.get_document_type_display()} for {self.user_id} ({self.status})"


class LoginEvent(models.Model):
    """An append-only record of a sign-in attempt (high volume)."""

    id = models.BigAutoField(primary_key=True)
    user = models.ForeignKey(
        User, null=True, blank=True, on_delete=models.SET_NULL, related_name="login_events"
    )
    email_attempted = models.CharField(max_length=254, blank=True)
    ip_address = models.GenericIPAddressField(null=True, blank=True)
    user_agent = models.TextField(blank=True)
    success = models.BooleanField()
    failure_reason = models.CharField(max_length=50, blank=True)
    created_at = models.DateTimeField(default=timezone.now, editable=False)

    class Meta:
        ordering = ["-created_at"]
        indexes = [
            models.Index(fields=["user", "-created_at"], name="login_user_created_idx"),
            models.Index(fields=["created_at"], name="login_created_idx"),
            # security_scan: failures in a period (a small share of all events), and one
            # address's attempts in time order (password spraying); the admin filters
            # failures and finds an IP address through them too
            models.Index(
                fields=["created_at"], name="login_failed_created_idx", condition=Q(success=False)
            ),
            models.Index(fields=["ip_address", "created_at"], name="login_ip_created_idx"),
            # the admin's failure reason filter and exact email search, newest first
            models.Index(fields=["failure_reason", "created_at"], name="login_reason_created_idx"),
            models.Index(Upper("email_attempted"), F("created_at"), name="login_email_upper_idx"),
        ]

    def __str__(self) -> str:
        outcome = "ok" if self.success else "failed"
        return (
            f"{self.email_attempted or self.user_id} {outcome} at {self.created_at:%Y-%m-%d %H:%M}"
        )
