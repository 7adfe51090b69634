"""Indexes for the admin's changelists at millions of rows (filters, searches, newest first).

Built CONCURRENTLY on PostgreSQL (live tables). PostgreSQL only: pg_trgm and GIN trigram
indexes on the user search's four columns, on the expression Django's icontains compares
(UPPER(col::text) LIKE UPPER('%term%')). The extension is created by the migrating (owner)
role; prepare's extension check lists it. The login table's failure and IP indexes are 0005's.
"""

import django.db.models.functions.text
from django.contrib.postgres.operations import TrigramExtension
from django.db import migrations, models

from accounts.pg_operations import AddIndexConcurrentlyOnPostgres, PostgresOnlySQL

USER_SEARCH_COLUMNS = ["email", "first_name", "last_name", "phone"]


class Migration(migrations.Migration):
    atomic = False  # CREATE INDEX CONCURRENTLY: the tables keep taking writes while it builds

    dependencies = [
        ("accounts", "0005_login_scan_indexes"),
    ]

    operations = [
        TrigramExtension(),
        AddIndexConcurrentlyOnPostgres(
            model_name="membership",
            index=models.Index(fields=["role", "-id"], name="membership_role_idx"),
        ),
        AddIndexConcurrentlyOnPostgres(
            model_name="kycverification",
            index=models.Index(fields=["document_type", "created_at"], name="kyc_type_created_idx"),
        ),
        AddIndexConcurrentlyOnPostgres(
            model_name="kycverification",
            index=models.Index(
                fields=["document_country", "created_at"], name="kyc_country_created_idx"
            ),
        ),
        AddIndexConcurrentlyOnPostgres(
            model_name="loginevent",
            index=models.Index(
                fields=["failure_reason", "created_at"], name="login_reason_created_idx"
            ),
        ),
        AddIndexConcurrentlyOnPostgres(
            model_name="loginevent",
            index=models.Index(
                django.db.models.functions.text.Upper("email_attempted"),
                models.F("created_at"),
                name="login_email_upper_idx",
            ),
        ),
        AddIndexConcurrentlyOnPostgres(
            model_name="user",
            index=models.Index(fields=["role", "-created_at"], name="user_role_created_idx"),
        ),
        AddIndexConcurrentlyOnPostgres(
            model_name="user",
            index=models.Index(
                condition=models.Q(("is_staff", True)),
                fields=["-created_at"],
                name="user_staff_created_idx",
            ),
        ),
    ] + [
        PostgresOnlySQL(
            sql=(
                f"CREATE INDEX CONCURRENTLY user_{column}_trgm_idx ON accounts_user "
                f'USING gin (UPPER("{column}"::text) gin_trgm_ops)'
            ),
            reverse_sql=f"DROP INDEX CONCURRENTLY user_{column}_trgm_idx",
        )
        for column in USER_SEARCH_COLUMNS
    ]
