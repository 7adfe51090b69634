"""Findings in the admin: filterable, resolvable, never created or rescanned from here."""

from django.contrib import admin, messages
from django.utils import timezone

from security.models import SecurityFinding


@admin.register(SecurityFinding)
class SecurityFindingAdmin(admin.ModelAdmin):
    list_display = [
        "last_seen", "severity", "kind", "subject", "count", "window_start", "window_end",
        "resolved",
    ]  # fmt: skip
    list_filter = ["severity", "kind", "resolved", "subject_type", "last_seen", "window_start"]
    search_fields = ["subject", "detail"]
    date_hierarchy = "last_seen"
    ordering = ["resolved", "-last_seen"]
    readonly_fields = [
        "kind", "severity", "subject_type", "subject", "count", "window_start", "window_end",
        "first_seen", "last_seen", "detail", "evidence", "fingerprint", "key", "resolved_at",
    ]  # fmt: skip
    fields = [*readonly_fields[:11], "resolved", "resolution_note", "resolved_at"]
    actions = ["mark_resolved", "mark_unresolved"]

    def has_add_permission(self, request):
        return False  # findings come from security_scan

    @admin.action(description="Mark selected findings resolved", permissions=["change"])
    def mark_resolved(self, request, queryset):
        count = queryset.filter(resolved=False).update(resolved=True, resolved_at=timezone.now())
        self.message_user(request, f"{count} finding(s) marked resolved.", messages.SUCCESS)

    @admin.action(description="Mark selected findings unresolved", permissions=["change"])
    def mark_unresolved(self, request, queryset):
        count = queryset.filter(resolved=True).update(resolved=False, resolved_at=None)
        self.message_user(request, f"{count} finding(s) reopened.", messages.SUCCESS)
