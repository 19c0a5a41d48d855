"""ocrd apply/plan on a huge model dir vs ``find -delete`` on an identical copy."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from _common import (
    Row,
    copy_tree,
    fs_type,
    log,
    main,
    make_entries,
    median,
    ocrd,
    prune_policy,
    remove_tree,
    scratch_dir,
    tool,
    write_policy,
)

NAME = "bigdir"


def time_find(model_dir: Path) -> float:
    """Wall time of the baseline: ``find DIR -maxdepth 1 -name 'old_*' -delete``."""
    start = time.perf_counter()
    subprocess.run(
        [tool("find"), str(model_dir), "-maxdepth", "1", "-name", "old_*", "-delete"], check=True
    )
    return time.perf_counter() - start


# The syscalls ocrd's rules make it do, and nothing else: list the dir, lstat
# each candidate (the scan: its age decides), lstat it again right before
# acting (the re-check that skips a model replaced since the scan), then unlink
# it or rename it into a quarantine dir. No policy, no plan, no logs, no
# start-up beyond a bare interpreter: the floor under ocrd, not a competitor.
BARE_LOOP = """
import os, sys
root, action = sys.argv[1], sys.argv[2]
fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
old = [e for e in os.scandir(fd) if e.name.startswith("old_")]
seen = [(e.name, e.stat(follow_symlinks=False)) for e in old]
if action == "quarantine":
    os.mkdir(".q", dir_fd=fd)
    dest = os.open(".q", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
for name, st in seen:
    if os.lstat(name, dir_fd=fd).st_ino != st.st_ino:
        continue
    if action == "quarantine":
        os.rename(name, name, src_dir_fd=fd, dst_dir_fd=dest)
    else:
        os.unlink(name, dir_fd=fd)
"""


def time_bare(model_dir: Path, action: str) -> float:
    """Wall time of BARE_LOOP (a fresh Python, like ocrd) on *model_dir*."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", BARE_LOOP, str(model_dir), action], check=True)
    return time.perf_counter() - start


def count_old(model_dir: Path) -> int:
    """How many ``old_*`` entries are still at the top level."""
    with os.scandir(model_dir) as it:
        return sum(1 for e in it if e.name.startswith("old_"))


def compare_apply(
    work: Path, template: Path, action: str, runs: int
) -> tuple[float, float, float, str]:
    """Median seconds of ``ocrd apply``, ``find -delete`` and BARE_LOOP on identical copies."""
    models, baseline_dir, bare_dir, state = (
        work / "models",
        work / "baseline",
        work / "bare",
        work / "state",
    )
    policy = write_policy(
        work / f"policy-{action}.yaml", models, state, prune=prune_policy(action=action)
    )
    ocrd_times: list[float] = []
    find_times: list[float] = []
    bare_times: list[float] = []
    note = ""
    for i in range(runs):
        for d in (models, baseline_dir, bare_dir, state):
            remove_tree(d)
        copy_tree(template, models)
        copy_tree(template, baseline_dir)
        copy_tree(template, bare_dir)
        state.mkdir()
        bare_times.append(time_bare(bare_dir, action))
        # alternate the order so neither side always runs on a warmer cache
        if i % 2 == 0:
            elapsed, result = ocrd(policy, "apply", check=False)
            find_times.append(time_find(baseline_dir))
        else:
            find_times.append(time_find(baseline_dir))
            elapsed, result = ocrd(policy, "apply", check=False)
        ocrd_times.append(elapsed)
        left = count_old(models)
        if result.returncode != 0 or left:
            note = f"apply exited {result.returncode}, {left} old_* left"
        log(
            f"{NAME} {action} run {i + 1}/{runs}: ocrd {elapsed:.3f}s find {find_times[-1]:.3f}s "
            f"bare loop {bare_times[-1]:.3f}s"
        )
    return median(ocrd_times), median(find_times), median(bare_times), note


def time_plan(work: Path, template: Path, runs: int) -> tuple[float, str]:
    """Median seconds of ``ocrd plan`` on the untouched template dir."""
    state = work / "plan-state"
    state.mkdir(exist_ok=True)
    policy = write_policy(work / "policy-plan.yaml", template, state, prune=prune_policy())
    times = []
    note = ""
    for _ in range(runs):
        elapsed, result = ocrd(policy, "plan", check=False)
        times.append(elapsed)
        if result.returncode != 0:
            note = f"plan exited {result.returncode}"
    return median(times), note


def run(quick: bool) -> list[Row]:
    """Build the template dir once, then time delete, quarantine and plan."""
    total = 10_000 if quick else 100_000
    runs = 3 if quick else 5
    with scratch_dir("ocrd-bench-bigdir-") as work:
        template = work / "template"
        make_entries(template, total, total // 2)
        fs = fs_type(work)
        what = f"{total:,} entries, {total // 2:,} old_*, {fs} ({work.parent}), {runs} runs"
        rows = []
        for action, limit in (("delete", 2.0), ("quarantine", 3.0)):
            o, f, b, note = compare_apply(work, template, action, runs)
            rows.append(
                Row(
                    NAME,
                    f"apply {action} ({what})",
                    o,
                    "s",
                    f"<= {limit:g}x find",
                    o / f <= limit,
                    f,
                    "find -delete",
                    note,
                )
            )
            bare = "unlink" if action == "delete" else "rename into a dir"
            rows.append(
                Row(
                    NAME,
                    f"apply {action} vs ocrd's syscalls in a bare loop (lstat x2, {bare})",
                    o,
                    "s",
                    "-",
                    None,
                    b,
                    "bare loop",
                )
            )
        p, note = time_plan(work, template, runs)
        rows.append(Row(NAME, f"plan ({total:,} entries)", p, "s", "<= 1.0 s", p <= 1.0, note=note))
    return rows


if __name__ == "__main__":
    main(run, "bigdir: ocrd apply/plan on a 100k-entry model dir")
