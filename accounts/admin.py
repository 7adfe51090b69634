from django.contrib import admin
from django.contrib.auth.admin import UserAdmin as DjangoUserAdmin

from accounts.models import KycVerification, LoginEvent, Membership, Organisation, User


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


@admin.register(User)
class UserAdmin(DjangoUserAdmin):
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
    list_filter = ["status", "kyc_status", "role", "is_staff", "created_at"]
    search_fields = ["email", "first_name", "last_name", "phone"]
    readonly_fields = ["id", "created_at", "updated_at", "deleted_at", "last_login"]
    autocomplete_fields = ["invited_by", "organisation"]
    date_hierarchy = "created_at"
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


@admin.register(Organisation)
class OrganisationAdmin(admin.ModelAdmin):
    list_display = ["name", "kind", "county", "cro_number", "psra_licence", "created_at"]
    list_filter = ["kind", "county"]
    search_fields = ["name", "cro_number", "vat_number", "psra_licence", "eircode"]
    readonly_fields = ["id", "created_at", "updated_at", "deleted_at"]
    inlines = [MembershipInline]

    def get_queryset(self, request):
        return Organisation.all_objects.all()


@admin.register(Membership)
class MembershipAdmin(admin.ModelAdmin):
    list_display = ["user", "organisation", "role", "title", "created_at"]
    list_filter = ["role"]
    search_fields = ["user__email", "organisation__name"]
    autocomplete_fields = ["user", "organisation"]


@admin.register(KycVerification)
class KycVerificationAdmin(admin.ModelAdmin):
    list_display = ["user", "document_type", "status", "reviewer", "reviewed_at", "created_at"]
    list_filter = ["status", "document_type", "document_country"]
    search_fields = ["user__email"]
    autocomplete_fields = ["user", "reviewer"]
    readonly_fields = ["id", "created_at", "updated_at"]
    date_hierarchy = "created_at"


@admin.register(LoginEvent)
class LoginEventAdmin(admin.ModelAdmin):
    list_display = ["created_at", "email_attempted", "user", "ip_address", "success"]
    list_filter = ["success", "failure_reason"]
    search_fields = ["email_attempted", "ip_address"]
    date_hierarchy = "created_at"
    list_select_related = ["user"]
    show_full_result_count = False  # append-only and large: avoid COUNT(*) on every page

    def has_change_permission(self, request, obj=None):
        return False  # append-only

    def has_add_permission(self, request):
        return False
