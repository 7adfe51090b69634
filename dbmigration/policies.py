"""Per-model policies: which models the runbook copies, and which it leaves to be rebuilt.

Some tables hold data each engine derives on its own, with column types that differ by
vendor on purpose: a search index is ``tsvector`` on PostgreSQL and plain text (or an FTS
virtual table) on SQLite.  Copying it would either fail ("syntax error in tsvector") or
carry one engine's format into the other.  Such a model is *skipped*: the plan leaves it
out, so copy, verify, --sync, switch and rollback never touch it, and the project refills
it on the new engine with its own command (Wagtail: ``update_index``).

The policy is discovered from the model's fields where the metadata shows it (a field
class in DERIVED_FIELDS) and configured where it cannot be, in
``DBMIGRATION["MODEL_POLICIES"]`` (see conf.py), which always wins.
"""

from __future__ import annotations

from django.apps import apps
from django.db import models

from dbmigration import conf

# field classes (by name, anywhere in the field's class hierarchy) whose column holds data
# the database derives, in a vendor-specific type
DERIVED_FIELDS = {
    "SearchVectorField": "a tsvector search index PostgreSQL derives from other columns",
}


def _owner(model: type[models.Model]) -> type[models.Model]:
    """An auto-created many-to-many table follows the model that declares the field."""
    declared_by = model._meta.auto_created  # Django sets it to that model's class
    return declared_by if isinstance(declared_by, type) else model


def policy_for(model: type[models.Model]) -> conf.ModelPolicy:
    """The configured policy, else the one the fields show, else COPY."""
    owner = _owner(model)
    configured = conf.configured_policies()
    label = owner._meta.label
    if label.lower() in configured:
        return configured[label.lower()]
    for field in owner._meta.local_concrete_fields:
        for cls in type(field).__mro__:
            if cls.__name__ in DERIVED_FIELDS:
                return conf.ModelPolicy(
                    label=label,
                    policy=conf.SKIP,
                    reason=f"{field.name} is {DERIVED_FIELDS[cls.__name__]}",
                )
    return conf.ModelPolicy(label=label, policy=conf.COPY)


def refill_reminders(*, state: str) -> list[str]:
    """One line per skipped model for the engine just made active: its state, its refill."""
    return [
        f"{p.label} {state}; refill it with: "
        + (" ".join(p.rebuild) if p.rebuild else "the project's own rebuild command")
        for p in skipped_models(apps.get_models(include_auto_created=True))
    ]


def skipped_models(candidates) -> list[conf.ModelPolicy]:
    """The policies of the candidate models that are skipped, one per owning model."""
    found = {}
    for model in candidates:
        opts = model._meta
        if opts.proxy or not opts.managed or opts.swapped:
            continue  # never copied anyway
        policy = policy_for(model)
        if policy.policy == conf.SKIP:
            found[policy.label] = policy
    return sorted(found.values(), key=lambda p: p.label)
