# ruff: noqa: DJ008  (test corpus: no model here is ever shown to a person)
"""Every key, relation and table shape (see tests/test_corpus_relations.py).

Installed only by tests/settings.py.  Each model is one shape the engine must plan, copy,
verify, sync and carry back exactly: key kinds, relation kinds, odd table and column names,
generated columns, database defaults and indexes only PostgreSQL can judge.
"""

import uuid

from django.contrib.contenttypes.fields import GenericForeignKey, GenericRelation
from django.contrib.contenttypes.models import ContentType
from django.db import models
from django.db.models.functions import Lower, Now

# --- key kinds ---------------------------------------------------------------------------


class AutoKey(models.Model):
    id = models.AutoField(primary_key=True)
    name = models.CharField(max_length=50)


class BigAutoKey(models.Model):
    id = models.BigAutoField(primary_key=True)
    name = models.CharField(max_length=50)


class SmallAutoKey(models.Model):
    id = models.SmallAutoField(primary_key=True)
    name = models.CharField(max_length=50)


class UUIDKey(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4)
    name = models.CharField(max_length=50)


class CharKey(models.Model):
    code = models.CharField(max_length=20, primary_key=True)
    name = models.CharField(max_length=50)


class CompositeKey(models.Model):
    """Django 5.2's composite primary key, with a foreign key as one of its parts."""

    pk = models.CompositePrimaryKey("owner", "slot")
    owner = models.ForeignKey(AutoKey, on_delete=models.CASCADE)
    slot = models.CharField(max_length=20)
    note = models.TextField(blank=True)


class CompositeUUIDKey(models.Model):
    pk = models.CompositePrimaryKey("tenant", "number")
    tenant = models.UUIDField()
    number = models.IntegerField()
    amount = models.DecimalField(max_digits=12, decimal_places=2)


# --- relation kinds ----------------------------------------------------------------------


class ToFieldTarget(models.Model):
    code = models.CharField(max_length=20, unique=True)


class ToFieldChild(models.Model):
    target = models.ForeignKey(ToFieldTarget, to_field="code", on_delete=models.CASCADE)
    to_uuid = models.ForeignKey(UUIDKey, null=True, on_delete=models.SET_NULL)
    to_char = models.ForeignKey(CharKey, null=True, on_delete=models.SET_NULL)
    computed = models.ForeignKey("Computed", null=True, on_delete=models.SET_NULL)


class Node(models.Model):
    """A self foreign key (a tree)."""

    parent = models.ForeignKey("self", null=True, on_delete=models.CASCADE)
    name = models.CharField(max_length=50)


class CycleA(models.Model):
    b = models.ForeignKey("CycleB", null=True, on_delete=models.SET_NULL, related_name="+")


class CycleB(models.Model):
    a = models.ForeignKey(CycleA, null=True, on_delete=models.SET_NULL, related_name="+")


class Profile(models.Model):
    owner = models.OneToOneField(AutoKey, on_delete=models.CASCADE)
    bio = models.TextField()


class Tag(models.Model):
    name = models.CharField(max_length=30, unique=True)


class Article(models.Model):
    title = models.CharField(max_length=100)
    tags = models.ManyToManyField(Tag, related_name="articles")
    readers = models.ManyToManyField(AutoKey, through="Reading", related_name="articles")
    notes = GenericRelation("Note")


class Reading(models.Model):
    article = models.ForeignKey(Article, on_delete=models.CASCADE)
    reader = models.ForeignKey(AutoKey, on_delete=models.CASCADE)
    minutes = models.PositiveIntegerField()


class Note(models.Model):
    """A generic foreign key (contenttypes)."""

    content_type = models.ForeignKey(ContentType, on_delete=models.CASCADE)
    object_id = models.CharField(max_length=64)
    target = GenericForeignKey("content_type", "object_id")
    text = models.TextField()


class Place(models.Model):
    name = models.CharField(max_length=50)


class Restaurant(Place):
    """Multi-table inheritance: a parent link as the primary key."""

    serves_pizza = models.BooleanField(default=False)


class Stamped(models.Model):
    created = models.DateTimeField(db_default=Now())
    label = models.CharField(max_length=20, db_default="new")

    class Meta:
        abstract = True


class Event(Stamped):
    """An abstract base's columns, and database defaults."""

    kind = models.CharField(max_length=20)


class RecentEvent(Event):
    """A proxy: no table of its own, never copied."""

    class Meta:
        proxy = True


class LooseLink(models.Model):
    """A foreign key without a database constraint: a dangling value is legal data."""

    place = models.ForeignKey(Place, null=True, on_delete=models.DO_NOTHING, db_constraint=False)


# --- table shapes ------------------------------------------------------------------------


class Computed(models.Model):
    """Stored generated columns: PostgreSQL computes them again on its side."""

    a = models.IntegerField()
    b = models.IntegerField()
    total = models.GeneratedField(
        expression=models.F("a") + models.F("b"),
        output_field=models.IntegerField(),
        db_persist=True,
    )
    name = models.CharField(max_length=50)
    lowered = models.GeneratedField(
        expression=Lower("name"), output_field=models.CharField(max_length=50), db_persist=True
    )
    # a bigint column, but PostgreSQL multiplies two int4 in int4: only it can judge
    product = models.GeneratedField(
        expression=models.F("a") * models.F("b"),
        output_field=models.BigIntegerField(),
        db_persist=True,
    )


class Select(models.Model):
    """A mixed-case, reserved-word table name and reserved-word column names."""

    order = models.IntegerField(db_column="order")
    group = models.CharField(max_length=20, db_column="Group")
    spaced = models.CharField(max_length=20, db_column="with space")

    class Meta:
        db_table = "Select"


class SpacedParent(models.Model):
    name = models.CharField(max_length=20)

    class Meta:
        db_table = "spaced table"


class SpacedChild(models.Model):
    parent = models.ForeignKey(SpacedParent, on_delete=models.CASCADE, db_column="Parent Id")

    class Meta:
        db_table = "Spaced Child"


class Indexed(models.Model):
    """Functional, partial and unique indexes (a functional unique only PostgreSQL judges)."""

    kind = models.CharField(max_length=20)
    rank = models.IntegerField(null=True)
    active = models.BooleanField(default=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(Lower("kind"), name="corpus_indexed_lower_kind_uniq"),
            models.UniqueConstraint(
                fields=["rank"], condition=models.Q(active=True), name="corpus_indexed_rank_active"
            ),
        ]
        indexes = [models.Index(Lower("kind"), "rank", name="corpus_indexed_lower_rank")]
