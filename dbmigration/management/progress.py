"""The one progress renderer every long command shares.

The engine reports ``(stage, item, done, total)`` through a progress callback (``total`` 0:
not known yet) and short step messages through ``note``; this module draws both:

- on a terminal: rich bars, one per item and one overall, with rows/s and time left;
- otherwise (a pipe, a log, cron): a plain line every few seconds, naming the stage, the
  item, how far it got, the rate and the time left, and one line per step message; a
  ticker repeats the current position while a step runs without reporting (a backup, a
  schema build), so a reader of the log never sees a long silence;
- at ``--verbosity 0``: nothing.

The interval is ``DBMIGRATION["PROGRESS_SECONDS"]`` (5 s by default).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

DEFAULT_SECONDS = 5.0


def progress_seconds() -> float:
    """How often the plain renderer writes a line (settings may shorten it, e.g. in tests)."""
    from django.conf import settings

    return float(getattr(settings, "DBMIGRATION", {}).get("PROGRESS_SECONDS", DEFAULT_SECONDS))


def _is_tty(stream) -> bool:
    out = getattr(stream, "_out", stream)  # Django's OutputWrapper keeps the real stream here
    isatty = getattr(out, "isatty", None)
    return bool(isatty and isatty())


def _eta(done: int, total: int, rate: float) -> str:
    if not (total and rate and done < total):
        return ""
    left = (total - done) / rate
    return f", {left:.0f} s left" if left < 120 else f", {left / 60:.0f} min left"


class ProgressRenderer:
    """Draw the engine's progress on a command's stream; use as a context manager."""

    def __init__(
        self,
        stream,
        *,
        verbosity: int = 1,
        interval: float | None = None,
        tty: bool | None = None,
    ):
        self.stream = stream
        self.enabled = verbosity > 0
        self.every_note = verbosity > 1
        self.interval = progress_seconds() if interval is None else interval
        self.tty = _is_tty(stream) if tty is None else tty
        self._lock = threading.Lock()
        self._started: dict[tuple[str, str], tuple[float, int]] = {}  # (stage, item) -> t0, done0
        self._current: tuple[str, str, int, int] | None = None
        self._step: tuple[str, float] | None = None  # the last message and when it came
        self._last_line = float("-inf")  # the first report is a line, however young the clock
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        self._bars = None

    # --- the callbacks the engine receives --------------------------------------------

    def __call__(self, stage: str, item: str, done: int, total: int) -> None:
        """The progress channel: stage (copy, verify, backup...), item (a table), done/total."""
        if not self.enabled:
            return
        with self._lock:
            key = (stage, item)
            if key not in self._started:
                self._started[key] = (time.monotonic(), done)
            self._current = (stage, item, done, total)
            if self._bars is not None:
                self._bars.update(f"{stage}: {item}", done, total)
            elif time.monotonic() - self._last_line >= self.interval:
                self._write(self._position())

    def stage(self, stage: str) -> Callable[[str, int, int], None]:
        """A callback for engine code that reports (item, done, total) within one stage."""
        return lambda item, done, total: self(stage, item, done, total)

    def note(self, message: str) -> None:
        """A step message from the engine ("snapshot taken", "write freeze on"): a line at
        most every interval at verbosity 1 (the ticker repeats the latest), each at 2+."""
        if not self.enabled:
            return
        with self._lock:
            self._step = (message, time.monotonic())
            self._current = None  # a new step: the last item's position is history
            if self._bars is not None:
                self._bars.console.print(message)
            elif self.every_note or time.monotonic() - self._last_line >= self.interval:
                self._write(message)

    # --- drawing ------------------------------------------------------------------------

    def _position(self) -> str:
        stage, item, done, total = self._current
        t0, done0 = self._started[(stage, item)]
        elapsed = time.monotonic() - t0
        rate = (done - done0) / elapsed if elapsed > 0 else 0.0
        count = f"{done:,}/{total:,}" if total else f"{done:,}"
        speed = f" ({rate:,.0f} rows/s{_eta(done, total, rate)})" if rate else ""
        return f"{stage}: {item} {count}{speed}"

    def _write(self, line: str) -> None:
        self._last_line = time.monotonic()
        self.stream.write(line)
        flush = getattr(self.stream, "flush", None)
        if flush:
            flush()

    def _tick(self) -> None:
        """Between reports, say what is still running, every interval (plain output only)."""
        while not self._stop.wait(self.interval):
            with self._lock:
                if time.monotonic() - self._last_line < self.interval:
                    continue
                if self._current is not None:
                    self._write(self._position())
                elif self._step is not None:
                    message, since = self._step
                    self._write(f"... {time.monotonic() - since:.0f} s since: {message}")

    def __enter__(self) -> ProgressRenderer:
        if not self.enabled:
            return self
        if self.tty:
            self._bars = _Bars(self.stream)
            self._bars.__enter__()
        elif self.interval > 0:  # 0: every report is a line already, nothing to repeat
            self._ticker = threading.Thread(target=self._tick, name="progress", daemon=True)
            self._ticker.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
        if self._bars is not None:
            self._bars.__exit__(*exc)


class _Bars:
    """Rich progress bars: one per item and one overall, with rows/s and time left."""

    def __init__(self, stream):
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self.console = Console(file=getattr(stream, "_out", stream))
        self.progress = Progress(
            TextColumn("{task.description:<40}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]:>14}"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self.tasks: dict[str, int] = {}
        self.done: dict[str, int] = {}

    def __enter__(self):
        self.progress.__enter__()
        self.overall = self.progress.add_task("overall", total=0, rate="")
        return self

    def __exit__(self, *exc):
        self.progress.__exit__(*exc)

    def update(self, name: str, done: int, total: int) -> None:
        if name not in self.tasks:
            self.tasks[name] = self.progress.add_task(name, total=total or None, rate="")
            overall = self.progress.tasks[self.overall]
            self.progress.update(self.overall, total=(overall.total or 0) + total)
        task = self.tasks[name]
        self.progress.update(task, completed=done, total=total or None)
        speed = self.progress.tasks[task].speed
        self.progress.update(task, rate=f"{speed:,.0f} rows/s" if speed else "")
        self.done[name] = min(done, total) if total else 0
        self.progress.update(self.overall, completed=sum(self.done.values()))
        speed = self.progress.tasks[self.overall].speed
        self.progress.update(self.overall, rate=f"{speed:,.0f} rows/s" if speed else "")
