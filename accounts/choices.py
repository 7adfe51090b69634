"""Value sets shared by the models, their CHECK constraints and PostgreSQL ENUM types."""

from django.db import models


class UserStatus(models.TextChoices):
    PENDING = "pending", "Pending verification"
    ACTIVE = "active", "Active"
    SUSPENDED = "suspended", "Suspended"
    CLOSED = "closed", "Closed"


class KycStatus(models.TextChoices):
    NOT_STARTED = "not_started", "Not started"
    PENDING = "pending", "Pending review"
    VERIFIED = "verified", "Verified"
    REJECTED = "rejected", "Rejected"
    EXPIRED = "expired", "Expired"


class UserRole(models.TextChoices):
    BUYER = "buyer", "Buyer"
    DEVELOPER = "developer", "Property developer"
    AGENT = "agent", "Estate agent"
    SOLICITOR = "solicitor", "Solicitor"
    ADMIN = "admin", "Platform administrator"


class OrganisationKind(models.TextChoices):
    DEVELOPER = "developer", "Property developer"
    ESTATE_AGENT = "estate_agent", "Estate agency"
    SOLICITOR = "solicitor", "Solicitors' firm"


class MembershipRole(models.TextChoices):
    OWNER = "owner", "Owner"
    ADMIN = "admin", "Administrator"
    MEMBER = "member", "Member"
    VIEWER = "viewer", "Viewer"


class KycDocumentType(models.TextChoices):
    PASSPORT = "passport", "Passport"
    DRIVING_LICENCE = "driving_licence", "Driving licence"
    PUBLIC_SERVICES_CARD = "public_services_card", "Public Services Card"
    UTILITY_BILL = "utility_bill", "Utility bill (proof of address)"
    BANK_STATEMENT = "bank_statement", "Bank statement (source of funds)"


# PostgreSQL ENUM type name -> the choices it holds (see migration 0002)
POSTGRES_ENUMS = {
    "user_status": UserStatus,
    "kyc_status": KycStatus,
    "user_role": UserRole,
}
