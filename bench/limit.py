"""The physical limit, run as its own process: binary COPY from files, then rebuild the schema.

    python -m bench.limit --url URL --files DIR --schema schema.json [--workers 2]

The target must hold the migrated tables, emptied and stripped of indexes and keys
(bench/run.py prepares that, untimed).  Prints one JSON line with the phase times.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.pg import Schema, load_tables, rebuild_schema, reset_sequences  # noqa: E402


def run_limit(*, url: str, files: Path, schema: Schema, workers: int = 2) -> dict[str, float]:
    """Load every table's file, then rebuild keys, indexes, foreign keys and sequences."""
    tables = [t for t in schema.tables if (files / f"{t}.bin").exists()]
    started = time.perf_counter()
    load_tables(url, files, tables, workers=workers)
    loaded = time.perf_counter()
    rebuild_schema(url, schema, workers=workers)
    reset_sequences(url)
    finished = time.perf_counter()
    return {
        "copy_seconds": round(loaded - started, 3),
        "rebuild_seconds": round(finished - loaded, 3),
        "seconds": round(finished - started, 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="Target database URL (stripped tables).")
    parser.add_argument("--files", required=True, type=Path, help="Directory of <table>.bin.")
    parser.add_argument("--schema", required=True, type=Path, help="schema.json from bench.pg.")
    parser.add_argument("--workers", type=int, default=2, help="Parallel connections.")
    args = parser.parse_args(argv)
    schema = Schema.from_dict(json.loads(args.schema.read_text()))
    timings = run_limit(url=args.url, files=args.files, schema=schema, workers=args.workers)
    sys.stdout.write(json.dumps(timings) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
