"""An idle daemon: CPU use, spurious cycles and memory."""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

from _common import (
    PYTHON,
    Row,
    daemon,
    log,
    main,
    make_entries,
    prune_policy,
    run_cmd,
    scratch_dir,
    write_policy,
)

NAME = "idle"
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` in seconds, from /proc/PID/stat."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw[raw.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # fields 14 and 15 of stat(5)


def rss_mb(pid: int) -> float:
    """VmRSS of ``pid`` in MB (10^6 bytes)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024 / 1e6
    return 0.0


def descendants(pid: int) -> list[int]:
    """``pid`` and every descendant, from /proc/PID/task/*/children."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*/children"):
            todo.extend(int(c) for c in task.read_text().split())
    return out


def idle_window(models: Path, work: Path, window: float) -> list[Row]:
    """CPU %, cycles and RSS of a backend-none daemon idling for ``window`` seconds."""
    policy = write_policy(
        work / "policy.yaml",
        models,
        work / "state",
        prune=prune_policy(),
        reconcile={"debounce": "200ms", "resync": "5m"},
    )
    with daemon(policy) as d:
        pid = d.proc.pid
        start, cpu0 = time.monotonic(), cpu_seconds(pid)
        time.sleep(window)  # the deliberate idle window
        cpu1, end = cpu_seconds(pid), time.monotonic()
        cycles = d.count("cycle.finished", since=start)
        rss = rss_mb(pid)
    pct = (cpu1 - cpu0) / (end - start) * 100
    what = f"{window:g} s window, 1,000 entries"
    return [
        Row(
            NAME,
            f"CPU of one core ({what})",
            pct,
            "%",
            "<= 0.1 %",
            pct <= 0.1,
            note=f"{(cpu1 - cpu0) * 1000:.0f} ms CPU in {end - start:.1f} s "
            f"(tick {1000 / TICKS:.0f} ms)",
        ),
        Row(
            NAME, "cycle.finished lines while idle (resync 5m)", float(cycles), "", "0", cycles == 0
        ),
        Row(NAME, "VmRSS, backend none", rss, "MB", "<= 60 MB", rss <= 60),
    ]


def aspose_rss(models: Path, work: Path, settle: float) -> Row:
    """VmRSS of the daemon plus its engine host with ``backend: aspose``."""
    name = "VmRSS daemon + engine host, backend aspose"
    if importlib.util.find_spec("aspose") is None:
        return Row(NAME, name, None, "MB", "-", None, note="aspose not importable: skipped")
    probe = run_cmd([PYTHON, "-c", "import aspose.ocr"])[1]
    if probe.returncode != 0:
        return Row(NAME, name, None, "MB", "-", None, note="import aspose.ocr failed: skipped")
    policy = write_policy(
        work / "policy-aspose.yaml",
        models,
        work / "state-aspose",
        prune=prune_policy(),
        engine={"backend": "aspose"},
    )
    with daemon(policy, first_cycle_timeout=120.0) as d:
        time.sleep(settle)  # let the host finish loading before sampling
        pids = descendants(d.proc.pid)
        total = sum(rss_mb(p) for p in pids)
        started = d.count("engine.started")
    return Row(
        NAME, name, total, "MB", "-", None, note=f"{len(pids)} processes, engine.started x{started}"
    )


def run(quick: bool) -> list[Row]:
    """Idle window with backend none, then the aspose memory figure."""
    window = 10.0 if quick else 60.0
    with scratch_dir("ocrd-bench-idle-") as work:
        models = work / "models"
        make_entries(models, 1000, 0)
        rows = idle_window(models, work, window)
        log(f"{NAME}: backend none done; trying aspose")
        rows.append(aspose_rss(models, work, settle=5.0))
    return rows


if __name__ == "__main__":
    main(run, "idle: an idle daemon's CPU, cycles and memory")
