"""Indexes for security_scan: failures in a period, and one address's attempts in order.

Built CONCURRENTLY on PostgreSQL: the login table is the largest and keeps taking writes.
"""

from django.db import migrations, models

from accounts.pg_operations import AddIndexConcurrentlyOnPostgres


class Migration(migrations.Migration):
    atomic = False  # CREATE INDEX CONCURRENTLY cannot run inside a transaction

    dependencies = [
        ("accounts", "0004_row_level_security"),
    ]

    operations = [
        AddIndexConcurrentlyOnPostgres(
            model_name="loginevent",
            index=models.Index(
                condition=models.Q(("success", False)),
                fields=["created_at"],
                name="login_failed_created_idx",
            ),
        ),
        AddIndexConcurrentlyOnPostgres(
            model_name="loginevent",
            index=models.Index(fields=["ip_address", "created_at"], name="login_ip_created_idx"),
        ),
    ]
