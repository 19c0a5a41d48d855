"""Daemon reaction time: a prunable file appears; how long until it is gone."""

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
    percentile,
    prune_policy,
    scratch_dir,
    wait_until,
    write_policy,
)

NAME = "reaction"


def trial(models: Path, n: int) -> float:
    """Create one ``old_*`` file; seconds until ``os.path.exists`` says it is gone (1 ms polls)."""
    path = models / f"old_trial_{n:04d}.bin"
    start = time.monotonic()
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    gone = wait_until(lambda: not os.path.exists(path), timeout=30.0, interval=0.001)
    return gone - start


def run(quick: bool) -> list[Row]:
    """``trials`` reaction times against one daemon with a 200 ms debounce."""
    trials = 20 if quick else 100
    with scratch_dir("ocrd-bench-reaction-") as work:
        models = work / "models"
        make_entries(models, 20, 0)  # some keepers: an emptied dir would look suspicious
        policy = write_policy(
            work / "policy.yaml",
            models,
            work / "state",
            prune=prune_policy(),
            reconcile={"debounce": "200ms"},
        )
        times: list[float] = []
        with daemon(policy) as d:
            for n in range(trials):
                since = time.monotonic()
                times.append(trial(models, n))
                d.wait_for("cycle.finished", since=since, timeout=30.0)  # start each from idle
            lo, hi = min(times) * 1000, max(times) * 1000
            log(f"{NAME}: {trials} trials, min {lo:.0f} ms max {hi:.0f} ms")
    p50, p95 = median(times), percentile(times, 95)
    return [
        Row(
            NAME,
            f"create -> gone p50 ({trials} trials, debounce 200ms)",
            p50 * 1000,
            "ms",
            "-",
            None,
        ),
        Row(
            NAME,
            f"create -> gone p95 ({trials} trials, debounce 200ms)",
            p95 * 1000,
            "ms",
            "<= 300 ms",
            p95 <= 0.300,
        ),
    ]


if __name__ == "__main__":
    main(run, "reaction: time from a prunable file appearing to its removal")
