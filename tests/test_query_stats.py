"""db_top_queries on a private cluster, first without pg_stat_statements, then with it."""

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command
from django.db import connections
from django.http import HttpResponse
from django.test import RequestFactory

from dbmigration import health
from propcore import query_stats
from propcore.pgserver import find_pg_bin
from propcore.query_tags import QueryTagMiddleware, query_tag, view_name
from tests.test_health import _free_port, _run

pytestmark = pytest.mark.slow

ALIAS = "scale_stats"


def _pg_ctl(data: Path, port: int, action: str, preload: str = "") -> None:
    options = f"-p {port} -k {data.parent} -c listen_addresses=127.0.0.1 -c fsync=off"
    if preload:
        options += f" -c shared_preload_libraries={preload}"
    _run(
        find_pg_bin("pg_ctl"), "-D", str(data), "-l", str(data.parent / "log"), "-w",
        "-o", options, action,
    )  # fmt: skip


@pytest.fixture(scope="module")
def cluster(django_db_blocker):
    """A private server (no pg_stat_statements yet) behind the alias scale_stats."""
    root = Path(tempfile.mkdtemp(prefix="propcore_stats_"))
    root.chmod(0o755)
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
    data, port = root / "data", _free_port()
    try:
        _run(find_pg_bin("initdb"), "-D", str(data), "-U", "postgres", "-A", "trust")
        _pg_ctl(data, port, "start")
        config = {**connections.settings["postgresql"], "HOST": "127.0.0.1", "PORT": port}
        config.update(NAME="postgres", CONN_MAX_AGE=0)
        config["OPTIONS"] = {k: v for k, v in config["OPTIONS"].items() if k != "pool"}
        connections.settings[ALIAS] = config
        with django_db_blocker.unblock():
            yield data, port
            connections[ALIAS].close()
        del connections.settings[ALIAS]
    finally:
        if (data / "postmaster.pid").exists():
            _run(find_pg_bin("pg_ctl"), "-D", str(data), "-m", "immediate", "stop")
        shutil.rmtree(root, ignore_errors=True)


def test_without_pg_stat_statements_the_command_says_what_to_do(cluster):
    with pytest.raises(CommandError, match="shared_preload_libraries") as failure:
        call_command("db_top_queries", "--database", ALIAS)
    assert failure.value.returncode == 3


def test_top_queries_name_the_view_that_ran_them(cluster, settings, caplog):
    data, port = cluster
    _pg_ctl(data, port, "restart", preload="pg_stat_statements -c pg_stat_statements.max=100")
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
    _, port = cluster  # pg_stat_statements loaded with room for 100 entries (test above)
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
