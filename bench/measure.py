"""Run one child process and measure its wall time and peak memory (nothing else mixed in)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import threading
import time
from pathlib import Path


@dataclasses.dataclass
class Measurement:
    command: list[str]
    seconds: float
    returncode: int
    peak_mb: float  # max of the child's sampled high-water mark and its tree's sampled sum
    output_tail: str = ""

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def _status_kb(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_rss_kb(pid: int) -> int:
    """Sum of the resident memory of pid and all its descendants, in KiB."""
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        total += _status_kb(current, "VmRSS:")
        todo.extend(_children(current))
    return total


def run_measured(
    command: list[str],
    *,
    env: dict | None = None,
    cwd: str | Path | None = None,
    log: Path | None = None,
    sample_every: float = 0.1,
    tail_lines: int = 15,
) -> Measurement:
    """Run command to completion; return wall seconds, exit code and peak RSS in MB."""
    out_path = log or Path(os.devnull)
    with open(out_path, "w") as out:
        started = time.perf_counter()
        proc = subprocess.Popen(command, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
        peak_tree, peak_own = [0], [0]
        done = threading.Event()

        def sample() -> None:
            # several processes (workers, pgloader threads) count together; the child's own
            # high-water mark catches a peak between two samples
            while not done.wait(sample_every):
                peak_tree[0] = max(peak_tree[0], tree_rss_kb(proc.pid))
                peak_own[0] = max(peak_own[0], _status_kb(proc.pid, "VmHWM:"))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _pid, status, _usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - started
        done.set()
        sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    tail = ""
    if log and log.exists():
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-tail_lines:])
    # not wait4's ru_maxrss: it also counts this process's memory, copied by the fork
    # before the child's exec
    peak_kb = max(peak_own[0], peak_tree[0])
    return Measurement(
        command=[str(c) for c in command],
        seconds=round(seconds, 3),
        returncode=proc.returncode,
        peak_mb=round(peak_kb / 1024, 1),
        output_tail=tail,
    )
