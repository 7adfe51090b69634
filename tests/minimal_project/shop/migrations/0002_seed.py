from django.db import migrations


def seed_categories(apps, schema_editor):
    # through the default manager, as many projects' data migrations do: during
    # migration_prepare this must land on PostgreSQL, never on the SQLite source
    Category = apps.get_model("shop", "Category")
    Category.objects.create(name="General")


def unseed_categories(apps, schema_editor):
    # backwards, also through the default manager: rollback_to_sqlite --drop-postgres must
    # run it on PostgreSQL, never on the SQLite database the application is back on
    Category = apps.get_model("shop", "Category")
    Category.objects.filter(name="General").update(name="General (unseeded)")


class Migration(migrations.Migration):
    dependencies = [("shop", "0001_initial")]

    operations = [migrations.RunPython(seed_categories, unseed_categories)]
