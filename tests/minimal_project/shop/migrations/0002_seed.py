from django.db import migrations


def seed_categories(apps, schema_editor):
    # through the default manager, as many projects' data migrations do: during
    # migration_prepare this must land on PostgreSQL, never on the SQLite source
    Category = apps.get_model("shop", "Category")
    Category.objects.create(name="General")


class Migration(migrations.Migration):
    dependencies = [("shop", "0001_initial")]

    operations = [migrations.RunPython(seed_categories, migrations.RunPython.noop)]
