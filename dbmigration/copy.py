"""Stream every planned table from SQLite into PostgreSQL with COPY, exactly or not at all.

Each table is truncated and loaded in its own transaction, so a half table is never kept;
indexes and constraints are dropped first and rebuilt after (schema_rebuild.py), refused
rows are found before COPY sees them (rejections.py) and finished tables are marked
(done_marks.py), so an interrupted run redoes only the rest.
"""

from __future__ import annotations

import dataclasses
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from django.core.management.color import no_style
from django.db import connections, transaction

from dbmigration.casts import (
    REPAIR_RULES,
    TargetColumn,
)
from dbmigration.copy_lines import BINARY_HEADER, BINARY_TRAILER, LinePlan, line_plan
from dbmigration.done_marks import done_tables, read_marks, target_identity, write_marks
from dbmigration.errors import DataError, SourceError, TargetError
from dbmigration.plan import Plan, PlannedTable, build_plan, qi
from dbmigration.rejections import (
    MAX_REFUSED_RETRIES,
    RejectedRow,
    RejectionSink,
    RepairedRow,
    RowConverter,
    RowRejected,
    cascade_rejections,
    check_rejections,
    refused_row,
    relational_rejections,
)
from dbmigration.rows import (
    BATCH_ROWS,
    Progress,
    chunks,
    count_rows,
    fetch_row,
    param,
    plain_key,
    read_rows,
)
from dbmigration.schema_rebuild import (
    Rebuilder,
    SchemaObject,
    droppable,
    postgresql_duplicates,
    rebuild,
    schema_snapshot,
    still_missing,
)
from dbmigration.source_scan import plan_targets, quarantine_scan, scan_table, source_tables
from dbmigration.sqlite_source import content_sha256, open_readonly


@dataclasses.dataclass
class TableResult:
    table: str
    label: str
    status: str = "pending"  # copied | already-done | failed | not-copied
    rows_read: int = 0
    rows_written: int = 0
    rows_rejected: int = 0
    rows_repaired: int = 0
    rows_in_python: int = 0  # converted value by value (the others: by the C formatter)
    seconds: float = 0.0

    @property
    def rows_per_second(self) -> float:
        return round(self.rows_read / self.seconds, 1) if self.seconds else 0.0


@dataclasses.dataclass
class CopyResult:
    tables: list[TableResult]
    rejections: list[RejectedRow]
    repairs: list[RepairedRow]
    source_sha256: str
    reject_file: Path | None = None
    rebuilt: list[str] = dataclasses.field(default_factory=list)  # indexes/constraints
    schema_problems: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    rejected_total: int = 0

    @property
    def rows_written(self) -> int:
        return sum(t.rows_written for t in self.tables)

    @property
    def rejected_pks(self) -> dict[str, set]:
        found: dict[str, set] = {}
        for r in self.rejections:
            found.setdefault(r.table, set()).add(r.pk)
        return found


def copy_data(
    *,
    sqlite_path: Path,
    alias: str = "postgresql",
    tables: Iterable[str] | None = None,
    quarantine: bool = False,
    repairs: Iterable[str] = (),
    reject_file: Path | None = None,
    state_file: Path | None = None,
    progress: Progress | None = None,
    source_sha256: str | None = None,
) -> CopyResult:
    """Copy the planned tables; raise DataError (nothing of a bad table kept) on rejections.

    ``source_sha256``: the file's hash when the caller has just computed it.
    """
    started = time.perf_counter()
    repairs = frozenset(repairs)
    unknown = repairs - set(REPAIR_RULES)
    if unknown:
        raise DataError(
            f"Unknown repair rule(s) {', '.join(sorted(unknown))}; known: "
            + ", ".join(f"{k} ({v})" for k, v in REPAIR_RULES.items())
        )
    plan = build_plan(only=tables)
    sha = source_sha256 or content_sha256(sqlite_path)
    with connections[alias].cursor() as cur:
        target = target_identity(cur)
    marks = read_marks(state_file, target=target)
    done = done_tables(state_file, source_sha256=sha, target=target)
    marks = {
        "target": target,
        "source_sha256": sha,
        "done": done,
        "pending_ddl": marks.get("pending_ddl", []),
        "schema_before": marks.get("schema_before", []),
    }
    todo = [t for t in plan.tables if t.db_table not in done]
    results = {
        t.db_table: TableResult(
            table=t.db_table,
            label=t.label,
            status="already-done" if t.db_table in done else "pending",
            rows_written=done.get(t.db_table, 0),
        )
        for t in plan.tables
    }
    result = CopyResult(tables=list(results.values()), rejections=[], repairs=[], source_sha256=sha)
    targets = plan_targets(plan, alias)
    missing = [t.db_table for t in plan.tables if not targets[t.db_table]]
    if missing:
        raise TargetError(
            f"PostgreSQL has no table(s) {', '.join(missing)}; run 'manage.py migrate "
            f"--database {alias}' (migration_prepare does it) first."
        )
    # every offending row goes to the file too: the report keeps only the first thousand
    sink = RejectionSink(reject_file)
    conn = open_readonly(sqlite_path, raw_text=True)
    try:
        present = source_tables(conn)
        absent = [t.db_table for t in plan.tables if t.db_table not in present]
        if absent:
            raise SourceError(f"SQLite database {sqlite_path} has no table(s) {', '.join(absent)}.")
        run = _Run(conn, connections[alias], plan, targets, repairs, sink, results, result, marks)
        run.state_file, run.progress, run.sqlite_path = state_file, progress, sqlite_path
        run.quarantine = quarantine
        todo_plan = Plan(tables=todo, deferred_fks=[])
        find_broken: Callable[[], list[RejectedRow]] | None = None
        if todo and quarantine:
            found = relational_rejections(conn, todo_plan, source_tables=present)
            run.skip = quarantine_scan(conn, todo_plan, targets, repairs, found, sink)
        elif todo:
            # CHECK constraints stay during the load (rebuilt from the catalog's text they
            # would not always print the same), so their rows must be known first
            if any(check_rejections(conn, table) for table in todo):
                sink.extend(relational_rejections(conn, todo_plan, source_tables=present))
                for table in todo:
                    scan_table(conn, table, targets[table.db_table], repairs, sink, progress)
                    results[table.db_table].status = "not-copied"
                _fail(result, sink)

            # broken keys and duplicates make a foreign key or unique key fail to build
            # after the load; only then are their rows looked up on SQLite, to be listed
            def find_broken() -> list[RejectedRow]:
                return relational_rejections(conn, todo_plan, source_tables=present, checks=False)

        if todo or marks["pending_ddl"]:
            _load(run, todo, find_broken)
        _count_rejected(result, sink)
    finally:
        conn.close()
        sink.close()
    result.reject_file = reject_file if sink.total else None
    result.seconds = round(time.perf_counter() - started, 3)
    return result


@dataclasses.dataclass
class _Run:
    """What the steps of one copy_data run share."""

    conn: Any  # the SQLite source, read-only, text as bytes
    pg: Any  # the target's Django connection
    plan: Plan
    targets: dict[str, dict[str, TargetColumn]]
    repairs: frozenset[str]
    sink: RejectionSink
    results: dict[str, TableResult]
    result: CopyResult
    marks: dict  # done markers and pending DDL, mirrored in the state file
    skip: dict[str, set] = dataclasses.field(default_factory=dict)  # quarantined raw pks
    quarantine: bool = False
    refused: list[RejectedRow] = dataclasses.field(default_factory=list)  # by COPY, set aside
    state_file: Path | None = None
    progress: Progress | None = None
    sqlite_path: Path | None = None
    sizes: dict[str, int] = dataclasses.field(default_factory=dict)  # rows per table to load
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)  # state file
    abort: threading.Event = dataclasses.field(default_factory=threading.Event)

    def save_marks(self) -> None:
        with self.lock:
            write_marks(self.state_file, self.marks)


def _count_rejected(result: CopyResult, sink: RejectionSink) -> None:
    result.rejections, result.rejected_total = sink.rows, sink.total
    per_table: dict[str, set] = {}
    for row in sink.rows:
        per_table.setdefault(row.table, set()).add(repr(row.pk))
    for table in result.tables:
        table.rows_rejected = len(per_table.get(table.table, ()))


def _fail(result: CopyResult, sink: RejectionSink) -> None:
    _count_rejected(result, sink)
    result.reject_file = sink.path if sink.total else None
    raise RowsRejected(result)


class RowsRejected(DataError):
    """Rows PostgreSQL would refuse or change; result.rejections lists each one."""

    def __init__(self, result: CopyResult):
        self.result = result
        first = result.rejections[:5]
        lines = "\n".join(
            f"  {r.table} pk={r.pk!r} column {r.column}: {r.reason} ({r.excerpt})" for r in first
        )
        more = result.rejected_total - len(first)
        super().__init__(
            f"{result.rejected_total} source row(s) cannot be copied exactly; nothing of their "
            f"tables was kept and the phase did not advance:\n{lines}"
            + (f"\n  ... and {more} more" if more > 0 else "")
            + (f"\nEvery row is listed in {result.reject_file}." if result.reject_file else "")
            + "\nFix them in SQLite, or run again with --quarantine (set them aside in a "
            "reject file) or --repair RULE (e.g. strip-nul)."
        )


def _load(
    run: _Run, todo: list[PlannedTable], find_broken: Callable[[], list[RejectedRow]] | None
) -> None:
    """Drop what slows the load, copy each table in its own transaction, rebuild, check."""
    pg, marks = run.pg, run.marks
    pending = {SchemaObject(**o) for o in marks["pending_ddl"]}
    # objects an interrupted run dropped are rebuilt now, even on tables outside --tables
    # all copied tables, not just --tables: a foreign key from any of them blocks TRUNCATE
    names = sorted({t.db_table for t in build_plan().tables} | {p.table for p in pending})
    with pg.cursor() as cur:
        current = schema_snapshot(cur, names)
    # after an interruption the catalog lacks what we dropped: trust what we saved then
    saved = {SchemaObject(**o) for o in marks.get("schema_before", [])}
    before = saved if pending and saved else current
    drop = set(pending)
    if todo:
        drop |= set(droppable(before, loaded={t.db_table for t in todo}))
    drop = sorted(drop, key=lambda o: (o.kind, o.table, o.name))
    # remember before dropping: an interrupted run must still rebuild them
    marks["pending_ddl"] = [dataclasses.asdict(o) for o in drop]
    marks["schema_before"] = [dataclasses.asdict(o) for o in sorted(before, key=str)]
    run.save_marks()
    with pg.cursor() as cur:
        for obj in drop:
            if obj in current:
                cur.execute(obj.drop_sql)
    sizes = run.sizes = {t.db_table: count_rows(run.conn, t.db_table) for t in todo}
    if run.progress:  # announce every table first, so an overall bar knows its total
        for table in todo:
            run.progress(table.db_table, 0, sizes[table.db_table])
    early = Rebuilder(pg.alias)
    try:
        # biggest first, so the two lanes end close together
        failed = _load_in_lanes(run, sorted(todo, key=lambda t: -sizes[t.db_table]), early, drop)
        run.save_marks()
        if run.refused and not failed:
            _set_aside(run, run.refused)  # and the rows pointing at them: keys build next
        if not failed:  # every table is in: foreign keys can build too, and the data-only
            early.submit(drop, stage=1)  # steps run meanwhile
            _reset_and_refresh(pg, run.plan)
    except BaseException:
        run.save_marks()  # whatever finished counts, whatever stopped us
        early.finish(abandon=True)
        raise
    early.finish()
    broken: list[RejectedRow] = []
    if not failed:
        try:
            _restore(pg, marks, run.state_file, drop, run.plan, refreshed=True)
        except TargetError:
            # a key did not build: rows with broken keys or duplicates, listed from SQLite
            broken = find_broken() if find_broken is not None else []
            if not broken:
                # or duplicates only PostgreSQL sees (a functional unique index): ask it
                broken = postgresql_duplicates(pg, run.plan, still_missing(pg, drop))
            if not broken:
                raise
            if run.quarantine:  # set them aside with the rows pointing at them, build again
                _set_aside(run, broken)
                broken = []
                _restore(pg, marks, run.state_file, drop, run.plan, refreshed=True)
    elif find_broken is not None:
        broken = find_broken()  # a run with bad values reports broken keys as well
    if broken:
        # nothing of a table with broken keys is kept, as with a bad value
        run.sink.extend(broken)
        failed = True
        tables = sorted({row.table for row in broken})
        with pg.cursor() as cur:
            cur.execute(f"TRUNCATE {', '.join(qi(t) for t in tables)}")
        for name in tables:
            run.results[name].status = "failed"
    if failed:
        # a run that found bad rows marks nothing done: the tables copied before the bad
        # one stay in PostgreSQL but are redone by the next run, like everything else
        for table in todo:
            marks["done"].pop(table.db_table, None)
            if run.results[table.db_table].status == "copied":
                run.results[table.db_table].status = "copied-not-kept"
        _restore(pg, marks, run.state_file, drop, run.plan, best_effort=True)
        _fail(run.result, run.sink)
    with pg.cursor() as cur:
        after = schema_snapshot(cur, names)
    run.result.rebuilt = [f"{o.table}.{o.name}" for o in drop]
    run.result.schema_problems = sorted(
        [f"missing after the load: {o.table} {o.kind} {o.name}" for o in before - after]
        + [f"not made by migrations: {o.table} {o.kind} {o.name}" for o in after - before]
    )
    if run.result.schema_problems:
        raise TargetError(
            "The schema after the load differs from the one Django's migrations made:\n  "
            + "\n  ".join(run.result.schema_problems)
        )


def _set_aside(run: _Run, rows: list[RejectedRow]) -> None:
    """Quarantine rows already loaded, with the rows pointing at them: delete them from
    PostgreSQL, list them in the reject file."""
    by_table: dict[str, set] = {}
    for row in rows:
        by_table.setdefault(row.table, set()).add(row.raw_pk)
    rows = rows + cascade_rejections(run.conn, run.plan, by_table)
    gone: dict[str, list] = {}
    for row in rows:
        gone.setdefault(row.table, []).append(row.raw_pk)
        if row.values is None:
            row.values = fetch_row(run.conn, run.plan.table(row.table), row.raw_pk)
    lite = connections["sqlite"]
    with transaction.atomic(using=run.pg.alias), run.pg.cursor() as cur:
        for name, raw_keys in gone.items():
            table = run.plan.table(name)
            for chunk in chunks(raw_keys, 500):
                keys = [table.python_key(param(raw), lite) for raw in chunk]
                cur.execute(
                    f"DELETE FROM {qi(name)} WHERE {table.key_in(len(keys), '%s')}",
                    table.key_params(keys, run.pg),
                )
                run.results[name].rows_written -= cur.rowcount
                if name in run.marks["done"]:
                    run.marks["done"][name] -= cur.rowcount
    run.sink.extend(rows)
    run.save_marks()


LANES = 2  # tables loading at once: PostgreSQL parses each COPY on one core


def _load_in_lanes(run: _Run, queue: list[PlannedTable], early, drop) -> bool:
    """Load the queued tables on LANES threads, each with its own PostgreSQL and SQLite
    connections; return whether a table had rejected rows.

    After a rejection the other tables are only scanned, so every bad row is reported.
    When one lane fails, the other finishes its table and stops.
    """
    from concurrent.futures import ThreadPoolExecutor

    lock, stop = threading.Lock(), threading.Event()
    rejected = threading.Event()

    def lane() -> None:
        conn = open_readonly(run.sqlite_path, raw_text=True)
        try:
            while not stop.is_set():
                with lock:
                    if not queue:
                        return
                    table = queue.pop(0)
                result = run.results[table.db_table]
                if rejected.is_set():  # keep reporting every bad row, but write nothing more
                    targets = run.targets[table.db_table]
                    scan_table(conn, table, targets, run.repairs, run.sink, run.progress)
                    result.status = "not-copied"
                    continue
                try:
                    _copy_table(run, table, conn)
                except _TableRejected:
                    rejected.set()
                    result.status = "failed"
                    continue
                run.marks["done"][table.db_table] = result.rows_written
                if result.seconds >= 1:  # a small table's marker waits for the next save
                    run.save_marks()
                # its own keys and indexes build while the next tables load
                early.submit([o for o in drop if o.table == table.db_table])
        except BaseException:
            stop.set()
            raise
        finally:
            conn.close()
            connections[run.pg.alias].close()  # this thread's connection

    with ThreadPoolExecutor(max_workers=LANES) as pool:
        lanes = [pool.submit(lane) for _ in range(LANES)]
        try:
            for future in lanes:
                future.result()
        except BaseException as exc:
            stop.set()
            if not any(f.done() and f.exception() is exc for f in lanes):
                run.abort.set()  # Ctrl-C or SIGTERM here: the tables in flight stop too
            for future in lanes:  # the other lane ends cleanly first
                future.exception()
            raise
    return rejected.is_set()


def _restore(
    pg, marks, state_file, drop, plan, *, best_effort: bool = False, refreshed: bool = False
) -> None:
    """Rebuild dropped indexes/constraints, reset sequences, refresh materialized views.

    ``best_effort`` (a run already failing on bad rows): what cannot be rebuilt yet stays
    recorded as pending for the next run, instead of hiding the rows' report.
    ``refreshed``: the caller already reset the sequences and refreshed the views.
    """
    with pg.cursor() as cur:
        present = schema_snapshot(cur, {o.table for o in drop})
    missing = [o for o in drop if o not in present]
    try:
        rebuild(pg.alias, missing)
    except Exception as exc:
        if not best_effort:
            detail = getattr(getattr(exc, "diag", None), "message_detail", None)
            raise TargetError(
                f"Rebuilding indexes/constraints after the load failed: {exc}"
                + (f" ({detail})" if detail else "")
                + ". Fix that data in SQLite (or use --quarantine) and run again; the "
                "next run rebuilds what is still missing."
            ) from exc
    with pg.cursor() as cur:
        present = schema_snapshot(cur, {o.table for o in drop})
    still = [o for o in drop if o not in present]
    marks["pending_ddl"] = [dataclasses.asdict(o) for o in still]
    if not still:
        marks.pop("schema_before", None)
    write_marks(state_file, marks)
    if not refreshed:
        _reset_and_refresh(pg, plan)


def _reset_and_refresh(pg, plan: Plan) -> None:
    """Sequences above max(pk); materialized views over the loaded data."""
    with pg.cursor() as cur:
        for statement in pg.ops.sequence_reset_sql(no_style(), plan.models):
            cur.execute(statement)
        # views built over empty tables by migrate would keep showing nothing
        cur.execute("SELECT schemaname, matviewname FROM pg_matviews WHERE ispopulated")
        for schema, view in cur.fetchall():
            cur.execute(f"REFRESH MATERIALIZED VIEW {qi(schema)}.{qi(view)}")


class _TableRejected(Exception):
    pass


@dataclasses.dataclass
class _Chunk:
    data: Any  # converted rows (Python path) or COPY text bytes (C formatter)
    read: int
    written: int
    rejected: list[RejectedRow]
    repaired: list[RepairedRow]
    in_python: int = 0  # rows converted value by value in Python
    text: bytes = b""  # COPY text of those rows when data is in the binary format
    keys: list | None = None  # raw keys of the rows in data, in order (Python path only)


def _convert_rows(rc: RowConverter, batch, skip, emit, keys: list | None = None) -> _Chunk:
    """Convert a batch; good rows go to emit(row) (their keys to keys), bad ones into
    the chunk."""
    rejected: list[RejectedRow] = []
    repaired: list[RepairedRow] = []
    written = 0
    key_of = rc.table.key_of
    for raw in batch:
        if skip is not None and key_of(raw) in skip:
            continue
        try:
            row = rc.convert(raw)
        except RowRejected as exc:
            rejected.extend(exc.rows)
            continue
        if rc.log.applied:
            repaired.extend(
                RepairedRow(rc.table.db_table, plain_key(key_of(raw)), column, rule)
                for column, rule in rc.log.applied
            )
        emit(row)
        if keys is not None:
            keys.append(key_of(raw))
        written += 1
    return _Chunk(None, len(batch), written, rejected, repaired, in_python=len(batch))


def _python_chunks(conn, rc: RowConverter, skip) -> Iterator[_Chunk]:
    for batch in read_rows(conn, rc.table):
        rows: list = []
        keys: list = []
        chunk = _convert_rows(rc, batch, skip, rows.append, keys)
        chunk.data, chunk.keys = rows, keys
        yield chunk


def _formatted_chunks(
    sqlite_path: Path, rc: RowConverter, lines: LinePlan, skip
) -> Iterator[_Chunk]:
    """Batches read and printed in C; the rows it hands back take the Python path."""
    from psycopg._copy_base import TextFormatter  # the row formatter COPY itself uses
    from psycopg.adapt import Transformer

    formatter = TextFormatter(Transformer())
    uri = f"{Path(sqlite_path).resolve().as_uri()}?mode=ro"  # as open_readonly opens it
    for made in lines.read(uri, skip=skip, batch_rows=BATCH_ROWS):
        rows: list = []
        chunk = _convert_rows(rc, made.fallback, None, rows.append)
        text = b"".join([*(formatter.write_row(row) for row in rows), formatter.end()])
        chunk.data, chunk.text = (made.data, text) if lines.binary else (made.data + text, b"")
        formatted = made.read - len(made.fallback) - made.skipped
        chunk.read, chunk.written = made.read, formatted + chunk.written
        yield chunk


def _copy_table(run: _Run, table: PlannedTable, conn) -> None:
    """Load one table; if PostgreSQL refuses a value the C formatter let through, redo the
    table value by value in Python, which finds and names the row: refused (nothing of the
    table kept), or under --quarantine set aside and the table loaded again without it."""
    lines = line_plan(table, run.targets[table.db_table])
    if table.composite and run.skip.get(table.db_table):
        lines = None  # the C reader skips rows by a one-column key only
    rejected_before = run.sink.total
    refused = None
    try:
        _load_table(run, table, lines, conn)
        return
    except TargetError as exc:
        if lines is None or run.sink.total != rejected_before or not _value_refused(exc):
            raise
    except _CopyRefused as exc:
        refused = exc.row
    for _ in range(MAX_REFUSED_RETRIES):
        try:
            if refused is None:
                _load_table(run, table, None, conn)  # names the row if PostgreSQL refuses again
                return
            if not run.quarantine:
                run.sink.extend([refused])
                raise _TableRejected(table.db_table)
            # set aside, with the rows pointing at it (before the foreign keys build)
            run.refused.append(refused)
            run.skip.setdefault(table.db_table, set()).add(refused.raw_pk)
            refused = None
        except _CopyRefused as exc:
            refused = exc.row
    raise TargetError(
        f"PostgreSQL refused more than {MAX_REFUSED_RETRIES} rows of {table.db_table} that "
        "the checks before COPY let through; nothing of this table was kept."
    )


class _CopyRefused(Exception):
    """PostgreSQL refused one row of a COPY (named by its line); nothing of the table kept."""

    def __init__(self, row: RejectedRow):
        super().__init__(row.reason)
        self.row = row


def _value_refused(exc: BaseException) -> bool:
    """Did PostgreSQL refuse a value (SQLSTATE class 22), rather than fail otherwise?"""
    import psycopg

    causes = (exc.__cause__, getattr(exc.__cause__, "__cause__", None))
    return any(isinstance(c, psycopg.errors.DataError) for c in causes)


def _copy_sql(table: PlannedTable, *, binary: bool) -> str:
    # FREEZE: rows written frozen, so the index builds after skip visibility checks; safe as
    # the table was emptied in the same transaction and nothing else reads it meanwhile
    cols = ", ".join(qi(c) for c in table.column_names)
    options = "FORMAT BINARY, FREEZE" if binary else "FREEZE"
    return f"COPY {qi(table.db_table)} ({cols}) FROM STDIN ({options})"


def _load_table(run: _Run, table: PlannedTable, lines: LinePlan | None, conn) -> None:
    """Truncate and load one table in one transaction; roll it back on any rejection."""
    started = time.perf_counter()
    pg = connections[run.pg.alias]  # this thread's connection
    sink, progress = run.sink, run.progress
    out, skip = run.results[table.db_table], run.skip.get(table.db_table)
    rc = RowConverter(table, run.targets[table.db_table], repairs=run.repairs)
    total = run.sizes[table.db_table]
    if lines is not None:
        chunks = _formatted_chunks(run.sqlite_path, rc, lines, skip)
    else:
        chunks = _python_chunks(conn, rc, skip)
    rejected_here = False
    repaired: list[RepairedRow] = []
    read = written = in_python = 0
    binary = lines is not None and lines.binary
    copied_keys: list = []  # Python path: line N of the COPY is copied_keys[N - 1]
    try:
        with (
            transaction.atomic(using=pg.alias),
            pg.cursor() as cur,
            # rows the Python path converted, as text, for a second COPY after a binary one
            tempfile.SpooledTemporaryFile(max_size=16 << 20) as spool,
        ):
            cur.execute(f"TRUNCATE {qi(table.db_table)}")
            with cur.cursor.copy(_copy_sql(table, binary=binary)) as cp:
                if binary:
                    cp.write(BINARY_HEADER)
                for chunk in chunks:
                    if chunk.rejected:
                        sink.extend(chunk.rejected)
                        rejected_here = True
                    repaired.extend(chunk.repaired)
                    if not rejected_here:
                        if type(chunk.data) is bytes:
                            cp.write(chunk.data)
                        else:
                            for row in chunk.data:
                                cp.write_row(row)
                            if chunk.keys is not None:
                                copied_keys += chunk.keys
                        spool.write(chunk.text)
                        written += chunk.written
                    read += chunk.read
                    in_python += chunk.in_python
                    if progress:
                        progress(table.db_table, read, total)
                    if run.abort.is_set():
                        raise KeyboardInterrupt(f"stopped during {table.db_table}")
                if rejected_here:
                    raise _TableRejected(table.db_table)
                if binary:
                    cp.write(BINARY_TRAILER)
            if spool.tell():
                spool.seek(0)
                with cur.cursor.copy(_copy_sql(table, binary=False)) as cp:
                    while block := spool.read(1 << 20):
                        cp.write(block)
    except _TableRejected:
        out.rows_read, out.seconds = read, round(time.perf_counter() - started, 3)
        raise
    except Exception as exc:
        import psycopg
        from django.db import DatabaseError

        if isinstance(exc, psycopg.Error | DatabaseError):
            refused = refused_row(table, exc, copied_keys if lines is None else None, conn)
            if refused is not None:
                out.rows_read, out.seconds = read, round(time.perf_counter() - started, 3)
                raise _CopyRefused(refused) from exc
            raise TargetError(
                f"PostgreSQL refused {table.db_table}: {exc}. Nothing of this table was kept."
            ) from exc
        raise
    finally:
        chunks.close()
    out.status = "copied"
    out.rows_read, out.rows_written = read, written
    out.rows_in_python = in_python
    out.rows_repaired = len({r.pk for r in repaired})
    out.seconds = round(time.perf_counter() - started, 3)
    run.result.repairs.extend(repaired)
