"""The handle check in a destructive cycle beside N service-shaped processes, vs fuser and lsof.

N helper processes are forked from one template that holds ~66 descriptors and
~266 mapped regions (a Python service's shape); forked, they share their
pages, so 1,000 cost little memory. None holds the three targets. The handle
check's cost is `ocrd apply` minus `ocrd plan` on a 3-model dir that the
policy deletes; `fuser` and `lsof -n -w` answer the same question about the
same three files while the same helpers live.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from _common import (
    Row,
    log,
    main,
    median,
    ocrd,
    prune_policy,
    run_cmd,
    scratch_dir,
    tool,
    wait_until,
    write_policy,
)

NAME = "handles"

# The template: open FDS files, map regions until maps has MAPS lines, fork N
# children that pause, print their pids, then wait for stdin to close.
TEMPLATE = """
import ctypes, os, signal, sys
work, n, fds, maps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
held = [os.open(os.path.join(work, f"f{i}"), os.O_RDWR | os.O_CREAT, 0o600) for i in range(fds)]
big = os.path.join(work, "mapped")
with open(big, "wb") as fh:
    fh.truncate(4096 * 2 * maps)
fd = os.open(big, os.O_RDWR)
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long]
i = 0
while True:
    with open("/proc/self/maps", "rb") as fh:
        if fh.read().count(b"\\n") >= maps:
            break
    # mmap(2) itself (Python's mmap dups the fd); every other page, so neighbouring
    # regions never merge into one line
    libc.mmap(None, 4096, 1, 1, fd, 4096 * 2 * i)  # PROT_READ, MAP_SHARED
    i += 1
os.close(fd)
kids = []
for _ in range(n):
    pid = os.fork()
    if pid == 0:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        while True:
            signal.pause()
    kids.append(pid)
print(" ".join(map(str, kids)), flush=True)
sys.stdin.read()
for pid in kids:
    os.kill(pid, signal.SIGKILL)
for pid in kids:
    os.waitpid(pid, 0)
"""
TARGETS = ("old_a.bin", "old_b.bin", "old_c.bin")


def shape(pids: list[int]) -> tuple[float, float]:
    """Median descriptors and maps lines of a sample of the helpers."""
    fds, maps = [], []
    for pid in pids[:: max(1, len(pids) // 20)]:
        fds.append(len(os.listdir(f"/proc/{pid}/fd")))
        with open(f"/proc/{pid}/maps", "rb") as fh:
            maps.append(fh.read().count(b"\n"))
    return median(fds), median(maps)


def measure(work: Path, n: int, runs: int) -> dict[str, float | str]:
    """Medians of apply, plan, fuser and lsof beside *n* helpers."""
    models, state, helpers = work / f"models-{n}", work / f"state-{n}", work / f"helpers-{n}"
    for d in (models, state, helpers):
        d.mkdir()
    policy = write_policy(work / f"policy-{n}.yaml", models, state, prune=prune_policy())
    argv = [sys.executable, "-c", TEMPLATE, str(helpers), str(n), "64", "266"]
    template = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert template.stdin is not None and template.stdout is not None
    times: dict[str, list[float]] = {"apply": [], "plan": [], "fuser": [], "lsof": []}
    note = ""
    try:
        pids = [int(p) for p in template.stdout.readline().split()]
        wait_until(lambda: all(os.path.exists(f"/proc/{p}") for p in pids), 30)
        fds, maps = shape(pids)
        paths = [str(models / t) for t in TARGETS]

        def make() -> None:
            for t in TARGETS:
                (models / t).write_bytes(b"m" * 4096)

        def apply() -> float:
            make()
            elapsed, result = ocrd(policy, "apply", check=False)
            nonlocal note
            if result.returncode != 0 or any(os.path.exists(p) for p in paths):
                note = f"apply exited {result.returncode}; targets left"
            return elapsed

        def plan() -> float:
            make()
            return ocrd(policy, "plan", check=False)[0]

        steps = {
            "apply": apply,
            "plan": plan,
            "fuser": lambda: run_cmd([tool("fuser"), *paths])[0],
            "lsof": lambda: run_cmd([tool("lsof"), "-n", "-w", *paths])[0],
        }
        make()
        for i in range(runs):
            order = list(steps)
            order = order[i % len(order) :] + order[: i % len(order)]
            for key in order:
                if key in ("fuser", "lsof"):
                    make()
                times[key].append(steps[key]())
            log(
                f"{NAME} N={n} run {i + 1}/{runs}: "
                + ", ".join(f"{k} {v[-1]:.3f}s" for k, v in times.items())
            )
    finally:
        template.stdin.close()
        template.wait(timeout=60)
    out: dict[str, float | str] = {k: median(v) for k, v in times.items()}
    out["check"] = float(out["apply"]) - float(out["plan"])
    out["shape"] = f"helpers hold a median of {fds:.0f} descriptors and {maps:.0f} maps lines"
    out["note"] = note
    return out


def run(quick: bool) -> list[Row]:
    """N small and big; the big N against fuser and lsof, and the growth factor."""
    small, big = (50, 250) if quick else (200, 1000)
    runs = 3 if quick else 5
    with scratch_dir("ocrd-bench-handles-") as work:
        a = measure(work, small, runs)
        b = measure(work, big, runs)
    check_a, check_b = float(a["check"]), float(b["check"])
    note = f"{b['shape']}; same user as ocrd (root); {b['note']}".rstrip("; ")
    what = f"handle check (apply - plan), {big:,} helpers"
    return [
        Row(NAME, f"handle check (apply - plan), {small:,} helpers", check_a, "s", "-", None),
        Row(NAME, what, check_b, "s", "<= 1.0x fuser", check_b <= float(b["fuser"]),
            float(b["fuser"]), "fuser", note),
        Row(NAME, what, check_b, "s", "<= 0.5x lsof -n -w", check_b <= 0.5 * float(b["lsof"]),
            float(b["lsof"]), "lsof -n -w"),
        Row(NAME, f"growth, {big:,} vs {small:,} helpers",
            check_b / check_a if check_a > 0 else None, "x", "<= 5.5x",
            check_a > 0 and check_b / check_a <= 5.5),
    ]  # fmt: skip


if __name__ == "__main__":
    main(run, "handles: the handle check beside N service-shaped processes")
