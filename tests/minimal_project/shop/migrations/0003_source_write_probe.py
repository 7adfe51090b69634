"""A data migration that writes to the SQLite source alias by name when MINIMAL_WRITE_SOURCE is
set: migration_prepare opens the source read-only, so it must fail instead of writing."""

import os

from django.db import migrations


def write_to_source(apps, schema_editor):
    if os.environ.get("MINIMAL_WRITE_SOURCE"):
        Category = apps.get_model("shop", "Category")
        Category.objects.using("sqlite").create(name="written during prepare")


class Migration(migrations.Migration):
    dependencies = [("shop", "0002_seed")]

    operations = [migrations.RunPython(write_to_source, migrations.RunPython.noop)]
