"""PostgreSQL only: row-level security on every table that holds a person's data.

ENABLE and FORCE (FORCE: the policies bind the tables' owner too; the runbook's owner role
has BYPASSRLS, superusers always bypass).  Every policy fails closed: it compares with
``nullif(current_setting('app.user_id', true), '')``, which is NULL when no identity is set
(''), after the transaction that set it, and so matches no row.  ``app.role = 'staff'`` is
set only for authenticated staff users (propcore/rls.py).

Organisations are not a person's data (registered firms: CRO, VAT, PSRA numbers) and stay
readable; their members are in accounts_membership, which is protected.

Every column the policies filter on is indexed already (primary keys, and the foreign-key
indexes Django makes); dbmigration/security.py checks it.  The values are frozen here: a
migration must not follow later code changes.
"""

from django.db import migrations

from accounts.pg_operations import PostgresOnlySQL

ME = "nullif(current_setting('app.user_id', true), '')::uuid"
STAFF = "current_setting('app.role', true) = 'staff'"

# SECURITY DEFINER functions run as their owner (BYPASSRLS): they answer one narrow question
# that a policy or the login cannot answer under the policies themselves.
FUNCTIONS = [
    (
        "accounts_login_user_id(text)",
        """CREATE FUNCTION accounts_login_user_id(p_email text) RETURNS uuid
           LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public AS $$
             SELECT id FROM accounts_user WHERE email = lower(p_email) AND deleted_at IS NULL
           $$""",
    ),
    (
        # a policy on accounts_membership cannot query accounts_membership (recursion)
        "accounts_my_organisation_ids()",
        f"""CREATE FUNCTION accounts_my_organisation_ids() RETURNS SETOF uuid
           LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public AS $$
             SELECT organisation_id FROM accounts_membership WHERE user_id = {ME}
           $$""",
    ),
]

# (table, policy, command, USING, WITH CHECK)
POLICIES = [
    ("accounts_user", "user_self", "ALL", f"id = {ME}", f"id = {ME}"),
    ("accounts_user", "user_staff", "ALL", STAFF, STAFF),
    ("accounts_kycverification", "kyc_self", "ALL", f"user_id = {ME}", f"user_id = {ME}"),
    ("accounts_kycverification", "kyc_staff", "ALL", STAFF, STAFF),
    ("accounts_loginevent", "login_self", "ALL", f"user_id = {ME}", f"user_id = {ME}"),
    # a failed attempt on an unknown address is recorded, and read only by staff
    ("accounts_loginevent", "login_unknown_insert", "INSERT", None, "user_id IS NULL"),
    ("accounts_loginevent", "login_staff", "ALL", STAFF, STAFF),
    ("accounts_membership", "membership_self", "SELECT", f"user_id = {ME}", None),
    (
        "accounts_membership",
        "membership_colleagues",
        "SELECT",
        "organisation_id IN (SELECT accounts_my_organisation_ids())",
        None,
    ),
    ("accounts_membership", "membership_staff", "ALL", STAFF, STAFF),
    ("accounts_user_groups", "user_groups_self", "SELECT", f"user_id = {ME}", None),
    ("accounts_user_groups", "user_groups_staff", "ALL", STAFF, STAFF),
    ("accounts_user_user_permissions", "user_perms_self", "SELECT", f"user_id = {ME}", None),
    ("accounts_user_user_permissions", "user_perms_staff", "ALL", STAFF, STAFF),
    ("auditlog_logentry", "audit_self", "SELECT", f"actor_id = {ME}", None),
    # changes a user makes are recorded with that user as actor; system changes without one
    (
        "auditlog_logentry",
        "audit_insert",
        "INSERT",
        None,
        f"actor_id IS NULL OR actor_id = {ME} OR {STAFF}",
    ),
    ("auditlog_logentry", "audit_staff", "ALL", STAFF, STAFF),
    ("django_admin_log", "admin_log_staff", "ALL", STAFF, STAFF),
]
TABLES = list(dict.fromkeys(table for table, *_ in POLICIES))


def _policy_sql(table, name, command, using, check):
    sql = f"CREATE POLICY {name} ON {table} FOR {command}"
    if using:
        sql += f" USING ({using})"
    if check:
        sql += f" WITH CHECK ({check})"
    return sql


operations = [
    PostgresOnlySQL(
        sql=f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY",
        reverse_sql=f"ALTER TABLE {table} DISABLE ROW LEVEL SECURITY, NO FORCE ROW LEVEL SECURITY",
    )
    for table in TABLES
]
operations += [
    PostgresOnlySQL(
        sql=[create, f"REVOKE ALL ON FUNCTION {signature} FROM PUBLIC"],
        reverse_sql=f"DROP FUNCTION {signature}",
    )
    for signature, create in FUNCTIONS
]
operations += [
    PostgresOnlySQL(
        sql=_policy_sql(table, name, command, using, check),
        reverse_sql=f"DROP POLICY {name} ON {table}",
    )
    for table, name, command, using, check in POLICIES
]


class Migration(migrations.Migration):
    dependencies = [
        ("accounts", "0003_analytics_view"),
        ("admin", "__first__"),
        ("auditlog", "__first__"),
    ]
    operations = operations
