"""Run every benchmark (``--quick`` passed through) and print one summary table."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import PYTHON, Row, log, table

BENCHMARKS = ("startup", "hashing", "restore", "handles", "reaction", "storm", "idle", "bigdir")
HERE = Path(__file__).resolve().parent


def run_one(name: str, quick: bool) -> list[Row]:
    """Run ``bench/NAME.py`` in its own process; its rows, or one error row."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        argv = [PYTHON, str(HERE / f"{name}.py"), "--json", out.name] + (
            ["--quick"] if quick else []
        )
        start = time.monotonic()
        proc = subprocess.run(argv, check=False)
        log(f"run_all: {name} took {time.monotonic() - start:.0f} s (exit {proc.returncode})")
        data = Path(out.name).read_text()
    if not data:
        return [Row(name, "error", None, "", "-", False, note=f"exit {proc.returncode}, no rows")]
    return [Row(**row) for row in json.loads(data)]


def main() -> None:
    """Parse ``--quick`` and ``--only``, run, print the summary; always exit 0."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="pass --quick to every benchmark")
    parser.add_argument("--only", nargs="*", choices=BENCHMARKS, help="run only these")
    args = parser.parse_args()
    rows: list[Row] = []
    for name in args.only or BENCHMARKS:
        rows.extend(run_one(name, args.quick))
    print(f"\n## Summary ({'quick' if args.quick else 'full'} run)\n")
    print(table(rows))
    notes = [f"- {r.benchmark} / {r.figure}: {r.note}" for r in rows if r.note]
    if notes:
        print("\nNotes:\n" + "\n".join(notes))
    missed = [f"- {r.benchmark}: {r.figure}" for r in rows if r.met is False]
    print("\nNot met:\n" + ("\n".join(missed) if missed else "- none"))
    sys.exit(0)


if __name__ == "__main__":
    main()
