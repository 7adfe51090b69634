"""PostgreSQL only: ENUM types for status/kyc_status/role, and GIN indexes on jsonb.

On SQLite these columns stay text and the CHECK constraints of 0001 guard them.
The value lists are frozen here (a migration must not follow later code changes);
adding a value later takes ALTER TYPE ... ADD VALUE in a new migration.
"""

from django.db import migrations

from accounts.pg_operations import PostgresOnlySQL

ENUMS = {
    "user_status": ["pending", "active", "suspended", "closed"],
    "kyc_status": ["not_started", "pending", "verified", "rejected", "expired"],
    "user_role": ["buyer", "developer", "agent", "solicitor", "admin"],
}
# (table, column, enum type)
ENUM_COLUMNS = [
    ("accounts_user", "status", "user_status"),
    ("accounts_user", "kyc_status", "kyc_status"),
    ("accounts_user", "role", "user_role"),
    ("accounts_kycverification", "status", "kyc_status"),
]
GIN_INDEXES = [
    ("user_preferences_gin", "accounts_user", "preferences"),
    ("user_metadata_gin", "accounts_user", "metadata"),
    ("org_metadata_gin", "accounts_organisation", "metadata"),
]


def _labels(values):
    return ", ".join(f"'{v}'" for v in values)


operations = [
    PostgresOnlySQL(
        sql=f"CREATE TYPE {name} AS ENUM ({_labels(values)})",
        reverse_sql=f"DROP TYPE {name}",
    )
    for name, values in ENUMS.items()
]
operations += [
    PostgresOnlySQL(
        sql=f'ALTER TABLE {table} ALTER COLUMN "{column}" TYPE {enum} USING "{column}"::{enum}',
        reverse_sql=(
            f'ALTER TABLE {table} ALTER COLUMN "{column}" TYPE varchar(20) USING "{column}"::text'
        ),
    )
    for table, column, enum in ENUM_COLUMNS
]
operations += [
    PostgresOnlySQL(
        sql=f'CREATE INDEX {name} ON {table} USING gin ("{column}" jsonb_path_ops)',
        reverse_sql=f"DROP INDEX {name}",
    )
    for name, table, column in GIN_INDEXES
]


class Migration(migrations.Migration):
    dependencies = [("accounts", "0001_initial")]
    operations = operations
