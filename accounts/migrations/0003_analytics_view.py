"""PostgreSQL only: the dashboard analytics materialized view.

Users by day/status/role/KYC status and logins per day.  The unique index lets
``REFRESH MATERIALIZED VIEW CONCURRENTLY`` run without blocking readers.
"""

from django.db import migrations

from accounts.pg_operations import PostgresOnlySQL

VIEW = "accounts_daily_analytics"

CREATE_VIEW = f"""
CREATE MATERIALIZED VIEW {VIEW} AS
SELECT (created_at AT TIME ZONE 'UTC')::date AS day,
       'users'::text AS metric,
       status::text AS status,
       role::text AS role,
       kyc_status::text AS kyc_status,
       count(*) AS total
  FROM accounts_user
 WHERE deleted_at IS NULL
 GROUP BY 1, 2, 3, 4, 5
UNION ALL
SELECT (created_at AT TIME ZONE 'UTC')::date,
       'logins',
       CASE WHEN success THEN 'success' ELSE 'failure' END,
       '',
       '',
       count(*)
  FROM accounts_loginevent
 GROUP BY 1, 2, 3
WITH DATA
"""


class Migration(migrations.Migration):
    dependencies = [("accounts", "0002_postgres_enums_and_gin")]
    operations = [
        PostgresOnlySQL(sql=CREATE_VIEW, reverse_sql=f"DROP MATERIALIZED VIEW {VIEW}"),
        PostgresOnlySQL(
            sql=f"CREATE UNIQUE INDEX {VIEW}_key ON {VIEW} (day, metric, status, role, kyc_status)",
            reverse_sql=f"DROP INDEX {VIEW}_key",
        ),
    ]
