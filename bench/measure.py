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
    peak_mb: float  # max of the child's own peak RSS (wait4) and its process tree's sampled sum
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


def tree_rss_kb(pid: int) -> int:
    """Sum of the resident memory of pid and all its descendants, in KiB."""
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        try:
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
                    break
        except OSError:
            continue
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
        peak_tree = [0]
        done = threading.Event()

        def sample() -> None:
            # several processes (workers, pgloader threads) count together
            while not done.wait(sample_every):
                peak_tree[0] = max(peak_tree[0], tree_rss_kb(proc.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _pid, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - started
        done.set()
        sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    tail = ""
    if log and log.exists():
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-tail_lines:])
    peak_kb = max(usage.ru_maxrss, peak_tree[0])  # Linux: ru_maxrss is in KiB
    return Measurement(
        command=[str(c) for c in command],
        seconds=round(seconds, 3),
        returncode=proc.returncode,
        peak_mb=round(peak_kb / 1024, 1),
        output_tail=tail,
    )
