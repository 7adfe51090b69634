"""The PROP.ie admin, and the audit trail as a compliance officer reads it.

The audit log (django-auditlog's LogEntry) can be filtered by actor, object type, object
and date range and exported as CSV with the same filters; the History page of every audited
object (users, organisations, memberships, KYC checks) shows its audit entries.
"""

import csv
import datetime
import ipaddress
import json

from auditlog.admin import LogEntryAdmin
from auditlog.filters import ResourceTypeFilter
from auditlog.mixins import AuditlogHistoryAdminMixin
from auditlog.models import LogEntry
from django.contrib import admin
from django.contrib.admin.options import IncorrectLookupParameters
from django.contrib.auth.admin import UserAdmin as DjangoUserAdmin
from django.contrib.contenttypes.models import ContentType
from django.core.exceptions import PermissionDenied
from django.db.models import Q
from django.http import HttpResponseBadRequest, StreamingHttpResponse
from django.urls import path, reverse
from django.utils import timezone
from django.utils.http import urlencode

from accounts.changelist import EstimatedCountPaginator, IndexedValuesFilter
from accounts.models import KycVerification, LoginEvent, Membership, Organisation, User


class AuditHistoryMixin(AuditlogHistoryAdminMixin):
    """The History page shows the object's audit entries (every change, not only the admin's)."""

    auditlog_history_template = "admin/accounts/audit_history.html"
    auditlog_history_per_page = 50

    def history_view(self, request, object_id, extra_context=None):
        changelist = reverse("admin:auditlog_logentry_changelist")
        content_type = ContentType.objects.get_for_model(self.model)
        query = urlencode({"resource_type": content_type.pk, "object": object_id})
        links = {"audit_for_object": f"{changelist}?{query}"}
        if self.model is User:
            links["audit_by_actor"] = f"{changelist}?{urlencode({'actor': object_id})}"
        return self.auditlog_history_view(request, object_id, {**links, **(extra_context or {})})


class LargeTableAdmin(admin.ModelAdmin):
    """A changelist that answers at millions of rows: no COUNT(*) or facet counts per page.

    Filters and searches of these admins are backed by indexes (models' Meta.indexes and
    migration 0006); a date hierarchy is not, as it lists dates with a DISTINCT over every row,
    so dates are filtered by range instead.
    """

    paginator = EstimatedCountPaginator
    show_full_result_count = False
    show_facets = admin.ShowFacets.NEVER


class MembershipInline(admin.TabularInline):
    model = Membership
    extra = 0
    autocomplete_fields = ["organisation"]


class KycInline(admin.TabularInline):
    model = KycVerification
    fk_name = "user"
    extra = 0
    fields = ["document_type", "status", "reviewer", "reviewed_at"]
    readonly_fields = ["reviewed_at"]
    autocomplete_fields = ["reviewer"]


class InputFilter(admin.ListFilter):
    """A filter typed into boxes (an id, a date) rather than picked from a list of links."""

    template = "admin/accounts/input_filter.html"
    fields: tuple[tuple[str, str, str], ...] = ()  # (parameter, label, input type)

    def __init__(self, request, params, model, model_admin):
        super().__init__(request, params, model, model_admin)
        for name, _label, _type in self.fields:
            if name in params:
                value = params.pop(name)[-1].strip()
                if value:
                    self.used_parameters[name] = value

    def has_output(self):
        return True

    def expected_parameters(self):
        return [name for name, _label, _type in self.fields]

    def choices(self, changelist):
        mine = {*self.expected_parameters(), "p", "e"}
        yield {
            "fields": [
                {"name": n, "label": label, "type": t, "value": self.used_parameters.get(n, "")}
                for n, label, t in self.fields
            ],
            "hidden": [
                (name, value)
                for name, values in self.request.GET.lists()
                if name not in mine
                for value in values
            ],
            "clear_url": changelist.get_query_string(remove=self.expected_parameters())
            if self.used_parameters
            else None,
        }


class DateRangeFilter(InputFilter):
    """Rows from one day to another, both included, in the site's time zone."""

    title = "date range"
    field = "timestamp"
    fields = (("date_from", "From", "date"), ("date_to", "To (included)", "date"))

    def queryset(self, request, queryset):
        bounds = {"date_from": f"{self.field}__gte", "date_to": f"{self.field}__lt"}
        for name, lookup in bounds.items():
            if name not in self.used_parameters:
                continue
            try:
                day = datetime.date.fromisoformat(self.used_parameters[name])
            except ValueError as exc:
                raise IncorrectLookupParameters(f"{name} must be a date (YYYY-MM-DD)") from exc
            if name == "date_to":
                day += datetime.timedelta(days=1)
            start = timezone.make_aware(datetime.datetime.combine(day, datetime.time.min))
            queryset = queryset.filter(**{lookup: start})
        return queryset


class CreatedRangeFilter(DateRangeFilter):
    title = "created between"
    field = "created_at"


class FailureReasonFilter(IndexedValuesFilter):
    title = "failure reason"
    field = "failure_reason"


class DocumentCountryFilter(IndexedValuesFilter):
    title = "document country"
    field = "document_country"


@admin.register(User)
class UserAdmin(AuditHistoryMixin, LargeTableAdmin, DjangoUserAdmin):
    ordering = ["-created_at"]
    list_display = [
        "email",
        "first_name",
        "last_name",
        "role",
        "status",
        "kyc_status",
        "created_at",
    ]
    list_filter = ["status", "kyc_status", "role", "is_staff", "created_at", CreatedRangeFilter]
    # icontains on PostgreSQL is served by trigram indexes (migration 0006)
    search_fields = ["email", "first_name", "last_name", "phone"]
    search_help_text = "An email address (exact), or part of an email, a name or a phone number."
    readonly_fields = ["id", "created_at", "updated_at", "deleted_at", "last_login"]
    autocomplete_fields = ["invited_by", "organisation"]
    inlines = [MembershipInline, KycInline]
    fieldsets = [
        (None, {"fields": ["id", "email", "password"]}),
        ("Person", {"fields": ["first_name", "last_name", "phone"]}),
        ("Account", {"fields": ["status", "kyc_status", "role", "organisation", "invited_by"]}),
        ("Data", {"fields": ["preferences", "metadata"], "classes": ["collapse"]}),
        (
            "Permissions",
            {"fields": ["is_active", "is_staff", "is_superuser", "groups", "user_permissions"]},
        ),
        ("Dates", {"fields": ["last_login", "created_at", "updated_at", "deleted_at"]}),
    ]
    add_fieldsets = [(None, {"classes": ["wide"], "fields": ["email", "password1", "password2"]})]

    def get_queryset(self, request):
        # admins see soft-deleted users too (filter on deleted_at to find them)
        return User.all_objects.all()

    def get_search_results(self, request, queryset, search_term):
        term = search_term.strip()
        if "@" in term and not any(c.isspace() for c in term):
            # an address: the unique index finds it (stored lower-case); its trigrams are in
            # every row's email ("@ex", "xam", ".ie"), which costs a trigram search seconds
            return queryset.filter(email=term.lower()), False
        return super().get_search_results(request, queryset, search_term)


@admin.register(Organisation)
class OrganisationAdmin(AuditHistoryMixin, LargeTableAdmin):
    list_display = ["name", "kind", "county", "cro_number", "psra_licence", "created_at"]
    list_filter = ["kind", "county"]
    search_fields = ["name", "cro_number", "vat_number", "psra_licence", "eircode"]
    readonly_fields = ["id", "created_at", "updated_at", "deleted_at"]
    inlines = [MembershipInline]

    def get_queryset(self, request):
        return Organisation.all_objects.all()


@admin.register(Membership)
class MembershipAdmin(AuditHistoryMixin, LargeTableAdmin):
    list_display = ["user", "organisation", "role", "title", "created_at"]
    list_filter = ["role"]
    list_select_related = ["user", "organisation"]
    search_fields = ["user__email", "organisation__name"]
    search_help_text = "A user's email (a term with @) or an organisation's name."
    autocomplete_fields = ["user", "organisation"]

    def get_search_results(self, request, queryset, search_term):
        # one side per search: an OR across the two joined tables cannot use either index
        term = search_term.strip()
        if not term:
            return queryset, False
        if "@" in term:
            return queryset.filter(user__email__icontains=term), False
        return queryset.filter(organisation__name__icontains=term), False


@admin.register(KycVerification)
class KycVerificationAdmin(AuditHistoryMixin, LargeTableAdmin):
    list_display = ["user", "document_type", "status", "reviewer", "reviewed_at", "created_at"]
    list_filter = [
        "status",
        "document_type",
        DocumentCountryFilter,
        "created_at",
        CreatedRangeFilter,
    ]
    list_select_related = ["user", "reviewer"]
    search_fields = ["user__email"]
    autocomplete_fields = ["user", "reviewer"]
    readonly_fields = ["id", "created_at", "updated_at"]


@admin.register(LoginEvent)
class LoginEventAdmin(LargeTableAdmin):
    list_display = ["created_at", "email_attempted", "user", "ip_address", "success"]
    list_filter = ["success", FailureReasonFilter, "created_at", CreatedRangeFilter]
    search_fields = ["=email_attempted", "=ip_address"]
    search_help_text = "An email address as typed (any case), or an IP address."
    list_select_related = ["user"]

    def get_search_results(self, request, queryset, search_term):
        # exact matches, each served by an index (a substring search would read every row)
        term = search_term.strip()
        if not term:
            return queryset, False
        try:
            address = ipaddress.ip_address(term)
        except ValueError:
            return queryset.filter(email_attempted__iexact=term), False
        return queryset.filter(ip_address=str(address)), False

    def has_change_permission(self, request, obj=None):
        return False  # append-only

    def has_add_permission(self, request):
        return False


# --- the audit log for a compliance officer ---------------------------------------------


class ActorFilter(admin.SimpleListFilter):
    """Who acted: each user with entries, or "system" (no user: commands, signals, logins)."""

    title = "actor"
    parameter_name = "actor"
    SYSTEM = "system"

    def lookups(self, request, model_admin):
        actors = (
            LogEntry.objects.filter(actor__isnull=False)
            .values_list("actor_id", "actor__email")
            .distinct()
            .order_by("actor__email")
        )
        return [(self.SYSTEM, "system (no user)"), *((str(pk), email) for pk, email in actors)]

    def queryset(self, request, queryset):
        if self.value() == self.SYSTEM:
            return queryset.filter(actor__isnull=True)
        if self.value():
            return queryset.filter(actor_id=self.value())
        return queryset


class ObjectFilter(InputFilter):
    """One object: its id, or words of its name as the entry recorded it."""

    title = "object"
    fields = (("object", "Id or name", "search"),)

    def queryset(self, request, queryset):
        value = self.used_parameters.get("object")
        if not value:
            return queryset
        return queryset.filter(Q(object_pk=value) | Q(object_repr__icontains=value))


CSV_COLUMNS = (
    "timestamp",
    "actor",
    "action",
    "object_type",
    "object_id",
    "object",
    "changes",
    "remote_addr",
    "correlation_id",
)
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _cell(value) -> str:
    """A CSV cell a spreadsheet shows as text: a leading =, +, - or @ would run as a formula."""
    text = "" if value is None else str(value)
    return "'" + text if text.startswith(FORMULA_STARTS) else text


def audit_rows(entries):
    """The CSV rows of entries: what happened, to what, by whom, when (UTC, ISO 8601)."""
    actions = dict(LogEntry.Action.choices)
    for entry in entries:
        actor = entry.actor.email if entry.actor else entry.actor_email or "system"
        yield [
            _cell(v)
            for v in (
                entry.timestamp.astimezone(datetime.UTC).isoformat(),
                actor,
                actions.get(entry.action, entry.action),
                f"{entry.content_type.app_label}.{entry.content_type.model}",
                entry.object_pk,
                entry.object_repr,
                json.dumps(entry.changes_dict, ensure_ascii=False, sort_keys=True),
                entry.remote_addr,
                entry.cid,
            )
        ]


class _Echo:
    """A file for csv.writer that hands each line back, so the export streams."""

    def write(self, value):
        return value


admin.site.unregister(LogEntry)


@admin.register(LogEntry)
class AuditEntryAdmin(LogEntryAdmin):
    """auditlog's list, with filters a compliance officer asks for and a CSV export."""

    list_filter = [ActorFilter, ResourceTypeFilter, ObjectFilter, DateRangeFilter, "action"]
    change_list_template = "admin/accounts/audit_change_list.html"

    def get_urls(self):
        export = path(
            "export.csv",
            self.admin_site.admin_view(self.export_csv),
            name="auditlog_logentry_export",
        )
        return [export, *super().get_urls()]

    def export_csv(self, request):
        """The list as filtered and searched on the page, every row (not one page), as CSV."""
        if not self.has_view_permission(request):
            raise PermissionDenied
        try:
            entries = self.get_changelist_instance(request).get_queryset(request)
        except IncorrectLookupParameters as exc:
            return HttpResponseBadRequest(f"Cannot export: {exc or 'a filter is not valid'}.")
        entries = entries.select_related("actor", "content_type")
        writer = csv.writer(_Echo())

        def lines():
            yield writer.writerow(CSV_COLUMNS)
            for row in audit_rows(entries.iterator(chunk_size=2000)):
                yield writer.writerow(row)

        stamp = timezone.now().strftime("%Y%m%dT%H%M%SZ")
        return StreamingHttpResponse(
            lines(),
            content_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": f'attachment; filename="audit_log_{stamp}.csv"'},
        )
