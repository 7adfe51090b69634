"""0001 and 0002 squashed, as squashmigrations makes it: a database migrated with it records
the replaced names too (issue 9, item 11)."""

import django.contrib.postgres.search
import django.db.models.deletion
from django.db import migrations, models


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
    replaces = [("shop", "0001_initial"), ("shop", "0002_seed")]

    initial = True

    dependencies = []

    operations = [
        migrations.CreateModel(
            name="Category",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
                ("name", models.CharField(max_length=50, unique=True)),
            ],
        ),
        migrations.CreateModel(
            name="Tag",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
                ("label", models.CharField(max_length=30)),
            ],
        ),
        migrations.CreateModel(
            name="Product",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
                ("name", models.CharField(max_length=100)),
                ("price", models.DecimalField(decimal_places=2, max_digits=8)),
                ("opens_at", models.TimeField()),
                (
                    "category",
                    models.ForeignKey(
                        on_delete=django.db.models.deletion.PROTECT, to="shop.category"
                    ),
                ),
                ("tags", models.ManyToManyField(blank=True, to="shop.tag")),
            ],
        ),
        migrations.CreateModel(
            name="PriceCache",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
                ("blob", models.TextField()),
                (
                    "product",
                    models.ForeignKey(
                        on_delete=django.db.models.deletion.CASCADE, to="shop.product"
                    ),
                ),
            ],
        ),
        migrations.CreateModel(
            name="SearchEntry",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
                ("body", django.contrib.postgres.search.SearchVectorField(null=True)),
                (
                    "product",
                    models.OneToOneField(
                        on_delete=django.db.models.deletion.CASCADE, to="shop.product"
                    ),
                ),
            ],
        ),
        migrations.AddConstraint(
            model_name="product",
            constraint=models.UniqueConstraint(
                condition=models.Q(("price__gt", 0)),
                fields=("name",),
                name="shop_product_priced_name_unique",
            ),
        ),
        migrations.RunPython(
            code=seed_categories,
            reverse_code=unseed_categories,
        ),
    ]
