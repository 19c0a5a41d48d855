"""A storm of new files under a running daemon: time to converge and number of cycles."""

from __future__ import annotations

import os
import time
from pathlib import Path

from _common import (
    Row,
    daemon,
    log,
    main,
    make_entries,
    median,
    prune_policy,
    scratch_dir,
    wait_until,
    write_policy,
)

NAME = "storm"
FILES = 10_000


def write_storm(models: Path, files: int) -> tuple[float, float]:
    """Create ``files`` empty files, every other one ``old_*``; return (first, last) write times."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    first = time.monotonic()
    for i in range(files):
        name = f"old_s{i:06d}.bin" if i % 2 == 0 else f"new_s{i:06d}.bin"
        os.close(os.open(models / name, flags, 0o644))
    return first, time.monotonic()


def no_old_left(models: Path) -> bool:
    """True when no ``old_*`` entry is left at the top level."""
    with os.scandir(models) as it:
        return not any(e.name.startswith("old_") for e in it)


def one_storm(work: Path, n: int, files: int) -> tuple[float, int]:
    """Fresh dir and daemon: (s from last write to converged, cycles since first write)."""
    models = work / f"models-{n}"
    make_entries(models, 20, 0)  # keepers: an emptied dir would look suspicious
    policy = write_policy(
        work / f"policy-{n}.yaml",
        models,
        work / f"state-{n}",
        prune=prune_policy(),
        reconcile={"debounce": "200ms"},
    )
    with daemon(policy) as d:
        first, last = write_storm(models, files)
        done = wait_until(lambda: no_old_left(models), timeout=120.0, interval=0.01)
        # the cycle that pruned the last file logs cycle.finished after its last model.pruned
        d.wait_for("model.pruned", n=files // 2, since=first, timeout=60.0)
        last_prune = max(t for t, e in d.lines if e.get("event") == "model.pruned")
        d.wait_for("cycle.finished", since=last_prune, timeout=60.0)
        cycles = d.count("cycle.finished", since=first)
    return done - last, cycles


def run(quick: bool) -> list[Row]:
    """Median over several storms, each against a fresh daemon."""
    runs = 5  # cheap enough to keep full size and 5 runs in --quick too
    files = FILES
    lags, cycles = [], []
    with scratch_dir("ocrd-bench-storm-") as work:
        for n in range(runs):
            lag, c = one_storm(work, n, files)
            lags.append(lag)
            cycles.append(c)
            log(f"{NAME} run {n + 1}/{runs}: converged {lag:.3f}s after last write, {c} cycles")
    lag, c = median(lags), median(cycles)
    what = f"{files:,} files, half old_*, debounce 200ms, {runs} runs"
    return [
        Row(
            NAME,
            f"last write -> all old_* gone ({what})",
            lag,
            "s",
            "<= 5 s",
            lag <= 5.0,
            note="polled every 10 ms",
        ),
        Row(
            NAME,
            "cycle.finished lines, first write -> end",
            float(c),
            "",
            "<= 10",
            c <= 10,
            note=f"max {max(cycles)}",
        ),
    ]


if __name__ == "__main__":
    main(run, "storm: 10,000 new files under a running daemon")
