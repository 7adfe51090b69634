"""A clean end for an application process: its database connections and pools closed.

gunicorn calls ``close_database_connections`` from ``worker_exit`` (deploy/gunicorn.conf.py),
so a worker that stops (SIGTERM, a rolling restart, max-requests) says goodbye to
PostgreSQL instead of leaving it to notice dead sockets, and Django's psycopg pool does not
keep its idle connections (min_size of them) until the process is gone.
"""

from __future__ import annotations

import os


def close_database_connections() -> list[str]:
    """Close this process's connections and pools; return the aliases whose pool was closed."""
    from django.db import connections

    closed = []
    for alias in connections:
        wrapper = connections[alias]
        wrapper.close()
        # Django keeps PostgreSQL pools per process and alias; reading .pool would create one
        if alias in getattr(type(wrapper), "_connection_pools", {}):
            wrapper.close_pool()
            closed.append(alias)
    return closed


def _graceful_sync_worker():
    from gunicorn.workers.sync import SyncWorker

    class GracefulSyncWorker(SyncWorker):
        """gunicorn's sync worker that stops listening the moment SIGTERM arrives.

        The listening socket stays open in the kernel while any process holds it: the master
        closes its copy on SIGTERM, but a worker busy with a slow request kept its own, so new
        connections were accepted into a backlog nobody would serve, then reset.  A busy
        worker now closes its copy at once and finishes the request in hand; an idle one is
        woken and exits.  During a rolling restart (SIGHUP) the master and the new workers
        keep the socket open, so nothing is refused then.
        """

        busy = False

        def handle(self, listener, client, addr):
            self.busy = True
            try:
                super().handle(listener, client, addr)
            finally:
                self.busy = False

        def handle_exit(self, sig, frame):
            super().handle_exit(sig, frame)
            if self.busy:  # the loop touches the listener again only after the request
                for listener in self.sockets:
                    listener.close()
            else:  # waiting in select(): wake it so that the loop sees alive is False
                os.write(self.PIPE[1], b".")

    return GracefulSyncWorker


def __getattr__(name: str):
    # gunicorn imports the worker class by name; gunicorn stays out of every other import
    if name == "GracefulSyncWorker":
        return _graceful_sync_worker()
    raise AttributeError(name)
