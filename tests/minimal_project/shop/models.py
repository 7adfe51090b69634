"""One small app: a category written by a data migration, products with a TimeField, a
search index PostgreSQL derives (skipped by its field type) and a cache skipped by setting."""

from django.contrib.postgres.search import SearchVectorField
from django.db import models


class Category(models.Model):
    name = models.CharField(max_length=50, unique=True)

    def __str__(self) -> str:
        return self.name


class Product(models.Model):
    category = models.ForeignKey(Category, on_delete=models.PROTECT)
    name = models.CharField(max_length=100)
    price = models.DecimalField(max_digits=8, decimal_places=2)
    opens_at = models.TimeField()  # a TimeField made migration_prepare refuse (issue 9, item 2)
    tags = models.ManyToManyField("Tag", blank=True)
    status = models.CharField(max_length=20, default="new")

    def __str__(self) -> str:
        return self.name

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["name"],
                condition=models.Q(price__gt=0),
                name="shop_product_priced_name_unique",
            ),
            # PostgreSQL prints `IN (...)` back as `= ANY (ARRAY[...])` with other casts once
            # re-created from its own definition (Wagtail's unique_in_progress_workflow)
            models.UniqueConstraint(
                fields=["category"],
                condition=models.Q(status__in=["featured", "spotlight"]),
                name="shop_product_one_featured_per_category",
            ),
        ]


class Tag(models.Model):
    label = models.CharField(max_length=30)

    def __str__(self) -> str:
        return self.label


class SearchEntry(models.Model):
    product = models.OneToOneField(Product, on_delete=models.CASCADE)
    body = SearchVectorField(null=True)  # tsvector on PostgreSQL, plain text on SQLite

    def __str__(self) -> str:
        return f"search entry of {self.product_id}"


class PriceCache(models.Model):
    product = models.ForeignKey(Product, on_delete=models.CASCADE)
    blob = models.TextField()

    def __str__(self) -> str:
        return f"price cache of {self.product_id}"
