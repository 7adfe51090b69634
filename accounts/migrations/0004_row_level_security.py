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
# jobs and commands acting for nobody in particular (db_identity(role="system")): they may
# read and write the rows that belong to no user (entries without an actor, unknown logins)
STAFF_OR_SYSTEM = "current_setting('app.role', true) IN ('staff', 'system')"
# The user ids a transaction may see, as a range: [me, me] for a user, every id for staff,
# NULL (nothing) without an identity.  A range keeps the policy one index condition; the
# obvious "user_id = me OR staff" has an OR the planner cannot use an index for, and every
# query without its own WHERE (the API's KycVerification.objects.all()) scanned the whole
# table (10.5 ms p50 at 20k users instead of 0.2 ms: bench/rls.py).  Plain SQL functions,
# so the planner inlines them.
VISIBLE = "{column} BETWEEN accounts_visible_user_low() AND accounts_visible_user_high()"
LOWEST, HIGHEST = "00000000-0000-0000-0000-000000000000", "ffffffff-ffff-ffff-ffff-ffffffffffff"


def _bound(extreme: str) -> str:
    return f"SELECT CASE WHEN {STAFF} THEN '{extreme}'::uuid ELSE {ME} END"


# (signature, CREATE statement, whether every role may execute it)
FUNCTIONS = [
    (
        "accounts_visible_user_low()",
        "CREATE FUNCTION accounts_visible_user_low() RETURNS uuid LANGUAGE sql STABLE "
        f"AS $$ {_bound(LOWEST)} $$",
        True,
    ),
    (
        "accounts_visible_user_high()",
        "CREATE FUNCTION accounts_visible_user_high() RETURNS uuid LANGUAGE sql STABLE "
        f"AS $$ {_bound(HIGHEST)} $$",
        True,
    ),
    # SECURITY DEFINER functions run as their owner (BYPASSRLS): each answers one narrow
    # question that the login or a policy cannot answer under the policies themselves.
    (
        "accounts_login_user_id(text)",
        """CREATE FUNCTION accounts_login_user_id(p_email text) RETURNS uuid
           LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public AS $$
             SELECT id FROM accounts_user WHERE email = lower(p_email) AND deleted_at IS NULL
           $$""",
        False,
    ),
    (
        # a policy on accounts_membership cannot query accounts_membership (recursion);
        # an array, so "organisation_id = ANY (...)" stays an index condition
        "accounts_my_organisation_ids()",
        f"""CREATE FUNCTION accounts_my_organisation_ids() RETURNS uuid[]
           LANGUAGE sql STABLE SECURITY DEFINER SET search_path = public AS $$
             SELECT coalesce(array_agg(organisation_id), '{{}}') FROM accounts_membership
              WHERE user_id = {ME}
           $$""",
        False,
    ),
]
# (command, USING, WITH CHECK): INSERT has only a check, DELETE only a USING
STAFF_WRITES = [("INSERT", None, STAFF), ("UPDATE", STAFF, STAFF), ("DELETE", STAFF, None)]


def _visible(column):
    return VISIBLE.format(column=column)


# (table, policy, command, USING, WITH CHECK).  Permissive policies add up (OR), so each
# table has one SELECT policy on its user column; staff writes have policies of their own
# where users may only read.
POLICIES = [
    ("accounts_user", "user_visible", "ALL", _visible("id"), _visible("id")),
    ("accounts_kycverification", "kyc_visible", "ALL", _visible("user_id"), _visible("user_id")),
    ("accounts_loginevent", "login_visible", "ALL", _visible("user_id"), _visible("user_id")),
    # attempts on unknown addresses belong to nobody: staff, and the system recording them
    # (Django inserts with RETURNING, so a writer must be able to read what it wrote)
    (
        "accounts_loginevent",
        "login_unattributed",
        "ALL",
        f"user_id IS NULL AND {STAFF_OR_SYSTEM}",
        f"user_id IS NULL AND {STAFF_OR_SYSTEM}",
    ),
    ("accounts_membership", "membership_visible", "SELECT", _visible("user_id"), None),
    (
        "accounts_membership",
        "membership_colleagues",
        "SELECT",
        "organisation_id = ANY (accounts_my_organisation_ids())",
        None,
    ),
    *[
        ("accounts_membership", f"membership_staff_{command.lower()}", command, using, check)
        for command, using, check in STAFF_WRITES
    ],
    ("accounts_user_groups", "user_groups_visible", "SELECT", _visible("user_id"), None),
    *[
        ("accounts_user_groups", f"user_groups_staff_{command.lower()}", command, using, check)
        for command, using, check in STAFF_WRITES
    ],
    ("accounts_user_user_permissions", "user_perms_visible", "SELECT", _visible("user_id"), None),
    *[
        (
            "accounts_user_user_permissions",
            f"user_perms_staff_{command.lower()}",
            command,
            using,
            check,
        )
        for command, using, check in STAFF_WRITES
    ],
    # audit entries: read your own (staff: all); written with you as actor, or by the system;
    # never changed or deleted through the application
    ("auditlog_logentry", "audit_visible", "SELECT", _visible("actor_id"), None),
    (
        "auditlog_logentry",
        "audit_unattributed",
        "SELECT",
        f"actor_id IS NULL AND {STAFF_OR_SYSTEM}",
        None,
    ),
    (
        "auditlog_logentry",
        "audit_insert",
        "INSERT",
        None,
        f"actor_id IS NULL OR actor_id = {ME} OR {STAFF}",
    ),
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
        # SECURITY DEFINER ones only for the roles db_roles grants them to
        sql=[create] + ([] if public else [f"REVOKE ALL ON FUNCTION {signature} FROM PUBLIC"]),
        reverse_sql=f"DROP FUNCTION {signature}",
    )
    for signature, create, public in FUNCTIONS
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
