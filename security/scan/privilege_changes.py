"""Privilege changes, read from the django-auditlog trail (LogEntry.changes).

auditlog stores each change as ``{"field": [old, new]}`` with both values as text
("True", "admin", "verified").  Entries written without an actor come from a command, a
shell or a signal: they are reported too, since nobody accountable made the change.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from auditlog.models import LogEntry
from django.contrib.contenttypes.models import ContentType
from django.db.models import Q

from accounts.choices import KycStatus, UserRole
from accounts.models import KycVerification, User
from security.scan.findings import CRITICAL, WARNING, Finding

# (field on User, value that grants the privilege, kind, severity)
USER_GRANTS = [
    ("is_superuser", "True", "made_superuser", CRITICAL),
    ("is_staff", "True", "made_staff", WARNING),
    ("role", UserRole.ADMIN.value, "role_admin", WARNING),
]
APPROVED = KycStatus.VERIFIED.value


def _change(entry: LogEntry, field: str) -> tuple[str | None, str | None] | None:
    changes = entry.changes if isinstance(entry.changes, dict) else {}
    pair = changes.get(field)
    if isinstance(pair, list) and len(pair) == 2:
        return pair[0], pair[1]
    return None


def _is_reviewer(user: User | None, reviewer_group: str) -> bool:
    """KYC reviewers: active platform administrators (role 'admin'; the demo's reviewers)
    and members of the reviewer group."""
    if user is None or not user.is_active or user.deleted_at is not None:
        return False
    return user.role == UserRole.ADMIN or any(g.name == reviewer_group for g in user.groups.all())


def scan(*, database: str, since: datetime, until: datetime, options: dict) -> list[Finding]:
    """A user made staff or superuser, a role set to admin, KYC approved by a non-reviewer."""
    user_type = ContentType.objects.db_manager(database).get_for_model(User)
    kyc_type = ContentType.objects.db_manager(database).get_for_model(KycVerification)
    entries = list(
        LogEntry.objects.using(database)
        .filter(timestamp__gte=since, timestamp__lt=until)
        .filter(
            Q(
                content_type=user_type,
                changes__has_any_keys=[field for field, *_ in USER_GRANTS] + ["kyc_status"],
            )
            | Q(content_type=kyc_type, changes__has_key="status")
        )
        .select_related("content_type")
        .order_by("timestamp", "id")
    )
    actors = {
        user.pk: user
        for user in User.all_objects.using(database)
        .filter(pk__in={e.actor_id for e in entries if e.actor_id})
        .prefetch_related("groups")
    }
    kyc_owner = dict(
        KycVerification.objects.using(database)
        .filter(pk__in={e.object_pk for e in entries if e.content_type_id == kyc_type.pk})
        .values_list("pk", "user_id")
    )
    kyc_owner = {str(pk): str(user) for pk, user in kyc_owner.items()}
    emails = {
        str(pk): email
        for pk, email in User.all_objects.using(database)
        .filter(pk__in=set(kyc_owner.values()))
        .values_list("pk", "email")
    }
    found = []
    for entry in entries:
        actor = actors.get(entry.actor_id)
        by = actor.email if actor else (entry.actor_email or "no actor (a command or script)")
        if entry.content_type_id == user_type.pk:
            for field, value, kind, severity in USER_GRANTS:
                change = _change(entry, field)
                if change and change[1] == value and change[0] != value:
                    found.append(
                        _finding(entry, kind, severity, f"{field}: {change[0]} -> {value}, by {by}")
                    )
            subject_user = str(entry.object_pk)
            status = _change(entry, "kyc_status")
        else:
            subject_user = kyc_owner.get(str(entry.object_pk), "")
            status = _change(entry, "status")
        if not (status and status[1] == APPROVED and status[0] != APPROVED):
            continue
        reviewer = _is_reviewer(actor, options["KYC_REVIEWER_GROUP"])
        own = actor is not None and str(actor.pk).replace("-", "") == subject_user.replace("-", "")
        if reviewer and not own:
            continue
        why = "approved their own KYC" if own else "is not a KYC reviewer"
        change = f"{status[0]} -> {APPROVED}, by {by}, who {why}"
        applicant = emails.get(subject_user, entry.object_repr)
        found.append(_finding(entry, "kyc_forced", CRITICAL, change, subject=applicant))
    return found


def _finding(entry: LogEntry, kind: str, severity: str, change: str, subject="") -> Finding:
    what = f"{entry.content_type.model} {entry.object_repr}"
    return Finding(
        kind,
        severity,
        "object" if kind == "kyc_forced" else "user",
        (subject or entry.object_repr)[:300],
        1,
        entry.timestamp,
        entry.timestamp,
        f"{what}: {change} (audit entry {entry.pk})",
        evidence={
            "log_entry": entry.pk,
            "actor": str(entry.actor_id or ""),
            "object": entry.object_pk,
        },
        subject_key=f"{entry.content_type.model}:{entry.object_pk}",
        merge_within=timedelta(0),
    )
