"""What security_scan found, kept so that an incident has a history."""

from django.db import models
from django.utils import timezone

from security.scan.findings import KINDS, SEVERITIES, SUBJECT_TYPES


class SecurityFinding(models.Model):
    """One incident or weakness; a re-scan updates it (last_seen, count) instead of adding one.

    Deliberately no foreign key to the user table: the health check reads findings as the
    application's role, and a table pointing at users must be under row-level security.
    """

    fingerprint = models.CharField(max_length=64, unique=True, editable=False)
    # kind|subject: the same problem on the same subject, across incidents
    key = models.CharField(max_length=300, db_index=True, editable=False)
    kind = models.CharField(max_length=40, choices=sorted(KINDS.items()))
    severity = models.CharField(max_length=10, choices=[(s, s) for s in SEVERITIES])
    subject_type = models.CharField(max_length=20, choices=[(s, s) for s in SUBJECT_TYPES])
    subject = models.CharField(max_length=300, help_text="An account, an IP address, a role...")
    count = models.PositiveIntegerField(default=1, help_text="Events (or occurrences) seen")
    window_start = models.DateTimeField()
    window_end = models.DateTimeField()
    first_seen = models.DateTimeField(default=timezone.now, help_text="First scan that saw it")
    last_seen = models.DateTimeField(default=timezone.now, help_text="Latest scan that saw it")
    detail = models.TextField()
    evidence = models.JSONField(default=dict, blank=True)
    resolved = models.BooleanField(default=False)
    resolved_at = models.DateTimeField(null=True, blank=True)
    resolution_note = models.TextField(blank=True)

    class Meta:
        ordering = ["-last_seen"]
        indexes = [
            models.Index(
                fields=["severity"], name="finding_open_idx", condition=models.Q(resolved=False)
            ),
        ]

    def __str__(self) -> str:
        return f"{KINDS.get(self.kind, self.kind)}: {self.subject}"

    def save(self, *args, **kwargs):
        if self.resolved and self.resolved_at is None:
            self.resolved_at = timezone.now()
        if not self.resolved:
            self.resolved_at = None
        super().save(*args, **kwargs)
