"""db_top_queries on a private cluster, first without pg_stat_statements, then with it."""

import json

import pytest
from django.core.management import CommandError, call_command
from django.db import connections
from django.http import HttpResponse
from django.test import RequestFactory

from dbmigration import health
from propcore import query_stats
from propcore.query_tags import QueryTagMiddleware, query_tag, view_name
from tests.clusters import PrivateCluster

pytestmark = pytest.mark.slow

ALIAS = "scale_stats"


@pytest.fixture(scope="module")
def cluster(django_db_blocker):
    """A private server (no pg_stat_statements yet) behind the alias scale_stats."""
    with PrivateCluster("propcore_stats_") as private:
        connections.settings[ALIAS] = private.django_alias(connections.settings["postgresql"])
        with django_db_blocker.unblock():
            yield private
            connections[ALIAS].close()
        del connections.settings[ALIAS]


def test_without_pg_stat_statements_the_command_says_what_to_do(cluster):
    with pytest.raises(CommandError, match="shared_preload_libraries") as failure:
        call_command("db_top_queries", "--database", ALIAS)
    assert failure.value.returncode == 3


def test_top_queries_name_the_view_that_ran_them(cluster, settings, caplog):
    cluster.configure(shared_preload_libraries="pg_stat_statements")
    cluster.configure(**{"pg_stat_statements.max": 100})
    cluster.restart()
    connections[ALIAS].close()
    query_stats.reset(connections.settings[ALIAS])

    def busy_view(request):
        with connections[ALIAS].cursor() as cursor:
            for n in range(25):
                cursor.execute("SELECT count(*) FROM generate_series(1, %s)", [1000 + n])
        return HttpResponse("ok")

    settings.SLOW_QUERY_MS = 0.0  # every query is "slow": the log must carry the tag too
    with caplog.at_level("WARNING", logger="propcore.slow_query"):
        QueryTagMiddleware(lambda request: _dispatch(request, busy_view))(RequestFactory().get("/"))
    tag = view_name(busy_view)
    assert any(f"/*view='{tag}'*/" in r.getMessage() for r in caplog.records)
    with query_tag("command:nightly"), connections[ALIAS].cursor() as cursor:
        cursor.execute("SELECT 1")

    stats = query_stats.top_queries(connections.settings[ALIAS], limit=50, order="calls")
    busiest = stats[0]
    assert busiest.view == tag and busiest.calls == 25 and busiest.rows == 25
    assert "command:nightly" in [s.view for s in stats]

    out = _command("--json", "--order", "total", "--limit", "50")
    assert tag in [row["view"] for row in json.loads(out)]
    _command("--reset")
    assert tag not in [row["view"] for row in json.loads(_command("--json"))]


def _dispatch(request, view):
    """What Django's handler does between the middlewares and the view."""
    middleware = QueryTagMiddleware(None)
    middleware.process_view(request, view, (), {})
    return view(request)


def _command(*args: str) -> str:
    from io import StringIO

    out = StringIO()
    call_command("db_top_queries", "--database", ALIAS, *args, stdout=out)
    return out.getvalue()


def test_health_warns_when_pg_stat_statements_evicts_entries(cluster):
    port = cluster.port  # pg_stat_statements loaded with room for 100 entries (test above)
    postgresql = connections.settings["postgresql"]
    saved = postgresql["HOST"], postgresql["PORT"], postgresql["NAME"]
    postgresql["HOST"], postgresql["PORT"], postgresql["NAME"] = "127.0.0.1", port, "postgres"
    try:
        first = health.run_check("query_stats")
        assert first.status == health.OK, first.message
        with connections[ALIAS].cursor() as cursor:
            for width in range(1, 151):  # 150 different statements: more than fit
                cursor.execute("SELECT " + ", ".join(["1"] * width))
        evicting = health.run_check("query_stats")
        assert evicting.status == health.DEGRADED, evicting.message
        assert evicting.details["evicted_since_last_check"] > 0
        assert health.run_check("query_stats").status == health.OK  # no new evictions
    finally:
        postgresql["HOST"], postgresql["PORT"], postgresql["NAME"] = saved
