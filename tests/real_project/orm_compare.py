"""Every object of every copied model, read through the ORM on both aliases, compared.

Run inside the project (``django shell -c``): ``print(json.dumps(compare()))``.
"""

from __future__ import annotations

from django.apps import apps
from django.db.models.fields.files import FieldFile

from dbmigration import conf
from dbmigration.policies import policy_for


def _value(field, obj):
    value = field.value_from_object(obj)
    if field.get_internal_type() == "JSONField":
        # jsonb orders keys its own way; the data is the same when the parsed values are
        value = field.get_prep_value(value)
    if isinstance(value, FieldFile):
        value = value.name
    if isinstance(value, memoryview):
        value = bytes(value)
    return value


def _objects(model, alias: str) -> dict:
    fields = model._meta.concrete_fields
    return {
        repr(obj.pk): [_value(f, obj) for f in fields]
        for obj in model._base_manager.using(alias).order_by("pk")
    }


def compared_models() -> list:
    """The models the engine copies: concrete, managed, not skipped by a policy."""
    found = []
    for model in apps.get_models(include_auto_created=True):
        opts = model._meta
        if opts.proxy or not opts.managed or opts.swapped:
            continue
        if policy_for(model).policy == conf.SKIP:
            continue
        found.append(model)
    return found


def compare() -> dict:
    """Per model label: objects on each alias and the primary keys whose fields differ."""
    result = {}
    for model in compared_models():
        source = _objects(model, conf.SOURCE_ALIAS)
        target = _objects(model, conf.TARGET_ALIAS)
        differing = sorted(
            pk for pk in source.keys() | target.keys() if source.get(pk) != target.get(pk)
        )
        result[model._meta.label] = {
            "sqlite": len(source),
            "postgresql": len(target),
            "differing": differing[:5],
        }
    return result
