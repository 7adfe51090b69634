"""Tag every query with the Django view that ran it, as sqlcommenter does.

An execute wrapper appends ``/*view='accounts.views.profile'*/`` to the SQL, so
pg_stat_statements (``manage.py db_top_queries``) and the slow-query log point back at the
code.  The tag lives in a ContextVar that ``QueryTagMiddleware`` sets per request (and
``query_tag()`` for commands and jobs), so it never leaks from one request to the next.

Only ``[A-Za-z0-9_.:-]`` survive in a tag: a ``%`` would be read as a parameter placeholder,
a ``*/`` would end the comment.  pg_stat_statements groups queries by their parse tree, which
ignores comments: a query run by two views is one entry, shown with the tag it had first.
"""

from __future__ import annotations

import contextlib
import contextvars
import re
from collections.abc import Iterator

_tag: contextvars.ContextVar[str | None] = contextvars.ContextVar("query_tag", default=None)
_UNSAFE = re.compile(r"[^A-Za-z0-9_.:-]")
TAG_COMMENT = re.compile(r"/\*view='([A-Za-z0-9_.:-]*)'\*/")


def safe_tag(name: str) -> str:
    return _UNSAFE.sub("_", name)[:200]


@contextlib.contextmanager
def query_tag(name: str) -> Iterator[None]:
    """Tag the queries of this block (a management command, a job)."""
    token = _tag.set(safe_tag(name))
    try:
        yield
    finally:
        _tag.reset(token)


def view_name(view_func) -> str:
    """module.qualname of a view (the class for class-based views), as a safe tag."""
    view = getattr(view_func, "view_class", view_func)
    return safe_tag(f"{view.__module__}.{getattr(view, '__qualname__', type(view).__name__)}")


class QueryTagMiddleware:
    """Tag the queries of each request with its view."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        token = _tag.set(None)  # the queries of the middlewares before the view: untagged
        try:
            return self.get_response(request)
        finally:
            _tag.reset(token)

    def process_view(self, request, view_func, view_args, view_kwargs):
        _tag.set(view_name(view_func))


def tag_queries(execute, sql, params, many, context):
    tag = _tag.get()
    if tag:
        sql = f"{sql} /*view='{tag}'*/"
    return execute(sql, params, many, context)


def install(sender, connection, **kwargs) -> None:
    """connection_created receiver: the tag goes first, so the slow-query log sees it too."""
    if tag_queries not in connection.execute_wrappers:
        connection.execute_wrappers.insert(0, tag_queries)
