"""dbmigration as a reusable app: one settings dict, per-model policies, no imports of propcore."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from django.contrib.postgres.search import SearchVectorField
from django.core.exceptions import ImproperlyConfigured
from django.db import models
from django.test import override_settings
from django.test.utils import isolate_apps

from dbmigration import conf
from dbmigration.plan import copied_models
from dbmigration.policies import policy_for, skipped_models

ENGINE = Path(__file__).resolve().parent.parent / "dbmigration"


def _imported_modules(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
    return found


def test_nothing_in_the_engine_imports_the_project():
    offenders = {
        str(path.relative_to(ENGINE)): sorted(
            m for m in _imported_modules(path) if m.split(".")[0] in ("propcore", "accounts")
        )
        for path in ENGINE.rglob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


# the copy's stages, lowest first: each may import only the ones before it (lazily or not);
# the runbook steps, last, are siblings: none imports another
COPY_LAYERS = [
    *("rows", "rejections", "schema_rebuild", "source_scan", "done_marks"),
    *("copy", "sync", ("migrate", "cutover", "rollback")),
]


def _layered(layers: list) -> list[tuple[str, set[str]]]:
    """Each module with the modules it must not import: its own layer's and the ones above."""
    groups = [layer if isinstance(layer, tuple) else (layer,) for layer in layers]
    return [
        (name, {f"dbmigration.{m}" for g in groups[i:] for m in g if m != name})
        for i, group in enumerate(groups)
        for name in group
    ]


def test_the_copy_stages_import_only_downwards():
    upward = {}
    for name, above in _layered(COPY_LAYERS):
        found = _imported_modules(ENGINE / f"{name}.py") & above
        if found:
            upward[name] = sorted(found)
    assert upward == {}


def test_the_layer_check_sees_an_upward_import():
    checked = dict(_layered(["rows", "sync", ("migrate", "cutover")]))
    assert checked["rows"] == {"dbmigration.sync", "dbmigration.migrate", "dbmigration.cutover"}
    assert checked["sync"] == {"dbmigration.migrate", "dbmigration.cutover"}
    assert checked["migrate"] == {"dbmigration.cutover"}


def test_paths_come_from_the_dict_then_the_top_level_setting_then_state_dir(tmp_path):
    with override_settings(DBMIGRATION={"STATE_DIR": tmp_path}):
        # propcore's own settings define STATE_FILE at the top level: it still counts
        assert conf.state_file().name == "state.json"
    with override_settings(
        DBMIGRATION={"STATE_DIR": tmp_path, "STATE_FILE": tmp_path / "s.json"},
        STATE_FILE=None,
        BACKUP_DIR=None,
    ):
        assert conf.state_file() == tmp_path / "s.json"
        assert conf.backup_dir() == tmp_path / "backups"
    with override_settings(DBMIGRATION={}, SQLITE_PATH=None, STATE_FILE=None):
        source = Path(conf.sqlite_path())
        assert conf.state_file() == source.resolve().parent / "dbmigration" / "state.json"
    with override_settings(DBMIGRATION={"POOL_MAX": 3}):
        assert conf.pool_max() == 3


def test_an_unknown_policy_is_refused_with_the_choices():
    policies = {"accounts.User": "convert-somehow"}
    with (
        override_settings(DBMIGRATION={"MODEL_POLICIES": policies}),
        pytest.raises(ImproperlyConfigured, match="unknown policy 'convert-somehow'"),
    ):
        conf.configured_policies()


@isolate_apps("tests.corpus.fields")
def test_a_search_vector_model_is_skipped_with_its_m2m_and_configuration_wins():
    class Tag(models.Model):  # noqa: DJ008
        class Meta:
            app_label = "fields"

    class Indexed(models.Model):  # noqa: DJ008
        body = SearchVectorField(null=True)
        tags = models.ManyToManyField(Tag)

        class Meta:
            app_label = "fields"

    through = Indexed._meta.get_field("tags").remote_field.through
    policy = policy_for(Indexed)
    assert policy.policy == conf.SKIP and "tsvector" in policy.reason
    assert policy_for(through).policy == conf.SKIP  # the m2m table follows its model
    assert policy_for(Tag).policy == conf.COPY
    assert [p.label for p in skipped_models([Indexed, through, Tag])] == ["fields.Indexed"]
    rebuild = {"policy": "copy"}
    with override_settings(DBMIGRATION={"MODEL_POLICIES": {"fields.Indexed": rebuild}}):
        assert policy_for(Indexed).policy == conf.COPY


def test_a_configured_skip_leaves_the_model_out_of_the_plan():
    from accounts.models import LoginEvent

    assert LoginEvent in copied_models()
    policies = {"accounts.LoginEvent": {"policy": "skip", "rebuild": "rebuild_login_events"}}
    with override_settings(DBMIGRATION={"MODEL_POLICIES": policies}):
        assert LoginEvent not in copied_models()
        (policy,) = skipped_models(copied_models() + [LoginEvent])
        assert policy.rebuild == ("rebuild_login_events",)
