"""Every Django value field class (see tests/test_corpus_fields.py).

ImageField needs Pillow, which is not installed: its storage is FileField's (a path as text).
"""

import json
import uuid

from django.core.serializers.json import DjangoJSONEncoder
from django.db import models


class TaggedDecoder(json.JSONDecoder):
    """Reads back what TaggedEncoder wrote: {"$set": [...]} becomes a frozenset."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, object_hook=self.hook, **kwargs)

    @staticmethod
    def hook(obj):
        return frozenset(obj["$set"]) if set(obj) == {"$set"} else obj


class TaggedEncoder(DjangoJSONEncoder):
    def default(self, o):
        if isinstance(o, frozenset):
            return {"$set": sorted(o)}
        return super().default(o)


class TaggedJSONField(models.JSONField):
    """A JSONField subclass with its own encoder and decoder."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("encoder", TaggedEncoder)
        kwargs.setdefault("decoder", TaggedDecoder)
        super().__init__(*args, **kwargs)


class Stream:
    """A value object like Wagtail's StreamValue: not JSON serializable itself."""

    def __init__(self, blocks):
        self.blocks = list(blocks)

    def __eq__(self, other):
        return isinstance(other, Stream) and self.blocks == other.blocks

    def __repr__(self):
        return f"Stream({self.blocks!r})"


class StreamField(models.Field):
    """Built like Wagtail's StreamField: a plain Field that says it is a JSONField, with its
    own from_db_value and get_prep_value, and no `encoder`/`decoder` attributes."""

    def get_internal_type(self):
        return "JSONField"

    def from_db_value(self, value, expression, connection):
        return self.to_python(value)

    def to_python(self, value):
        if value is None or isinstance(value, Stream):
            return value
        return Stream(json.loads(value))

    def get_prep_value(self, value):
        if value is None:
            return None
        return json.dumps(value.blocks, cls=DjangoJSONEncoder)


class Pair(tuple):
    pass


class PairField(models.Field):
    """A custom field with its own internal type: two integers stored as "a,b" text."""

    def db_type(self, connection):
        return "text"

    def from_db_value(self, value, expression, connection):
        return self.to_python(value)

    def to_python(self, value):
        if value is None or isinstance(value, tuple):
            return value
        left, right = value.split(",")
        return Pair((int(left), int(right)))

    def get_prep_value(self, value):
        return None if value is None else f"{value[0]},{value[1]}"


class EveryField(models.Model):
    """One column of every value field class; every column nullable except the key and
    the non-null twin of BooleanField, so a test can set one column at a time."""

    big = models.BigIntegerField(null=True)
    integer = models.IntegerField(null=True)
    small = models.SmallIntegerField(null=True)
    positive_big = models.PositiveBigIntegerField(null=True)
    positive = models.PositiveIntegerField(null=True)
    positive_small = models.PositiveSmallIntegerField(null=True)
    floating = models.FloatField(null=True)
    decimal = models.DecimalField(max_digits=30, decimal_places=10, null=True)
    char = models.CharField(max_length=200, null=True)
    text = models.TextField(null=True)
    slug = models.SlugField(max_length=200, null=True)
    email = models.EmailField(null=True)
    url = models.URLField(max_length=300, null=True)
    file_path = models.FilePathField(path="/tmp", max_length=200, null=True)
    file = models.FileField(max_length=200, null=True)
    image = models.FileField(max_length=200, null=True)  # ImageField's storage, no Pillow
    ip = models.GenericIPAddressField(null=True)
    flag = models.BooleanField(default=False)
    maybe = models.BooleanField(null=True)
    date = models.DateField(null=True)
    datetime = models.DateTimeField(null=True)
    time = models.TimeField(null=True)
    duration = models.DurationField(null=True)
    uuid = models.UUIDField(null=True)
    binary = models.BinaryField(null=True)
    json = models.JSONField(null=True)
    tagged = TaggedJSONField(null=True)
    stream = StreamField(null=True)
    pair = PairField(null=True)

    def __str__(self):
        return f"EveryField {self.pk}"


class UUIDKeyed(models.Model):
    """A UUID primary key, for values that travel as keys."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4)
    label = models.CharField(max_length=50, blank=True)

    def __str__(self):
        return self.label
