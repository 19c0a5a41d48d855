"""The daemon's status file: written atomically after every cycle, read by `ocrd status`."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from ocrd import statefile

STATUS_NAME = "status.json"
RUNTIME_DEFAULT = Path("/run/ocrd")


def status_dir(state_dir: Path) -> Path:
    """$RUNTIME_DIRECTORY (set by systemd) when present, else the state dir."""
    runtime = os.environ.get("RUNTIME_DIRECTORY")
    return Path(runtime.split(":")[0]) if runtime else state_dir


def candidates(state_dir: Path) -> list[Path]:
    """Where a daemon may have written its status, most specific first."""
    found = [status_dir(state_dir) / STATUS_NAME]
    for path in (RUNTIME_DEFAULT / STATUS_NAME, state_dir / STATUS_NAME):
        if path not in found:
            found.append(path)
    return found


def write(path: Path, data: dict[str, Any]) -> str | None:
    """Replace *path* atomically with *data*; returns an error text instead of raising."""
    return statefile.write_json(path, data, durable=False, indent=1)


def read(state_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest readable status file among the candidates."""
    best: tuple[float, Path, dict[str, Any]] | None = None
    for path in candidates(state_dir):
        try:
            mtime = path.stat().st_mtime
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and (best is None or mtime > best[0]):
            best = (mtime, path, data)
    return None if best is None else (best[1], best[2])


def pid_alive(pid: Any) -> bool:
    return isinstance(pid, int) and pid > 0 and statefile.pid_alive(pid)


def _when(ts: Any) -> str:
    if not isinstance(ts, int | float):
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))


def summary(doc: dict[str, Any], *, running: bool, path: Path) -> str:
    """A few human lines from a status document."""
    state = "running" if running else "NOT RUNNING (stale status)"
    if running and doc.get("degraded"):
        state = "running, DEGRADED"
    lines = [
        f"ocrd: {state}, pid {doc.get('pid')}, since {_when(doc.get('started_at'))}",
        f"model_dir: {doc.get('model_dir')}  (watch: {doc.get('watch')}, "
        f"engine: {doc.get('engine')})",
        f"policy: {doc.get('policy', {}).get('path')} sha256 "
        f"{str(doc.get('policy', {}).get('digest'))[:12]}",
    ]
    last = doc.get("last_cycle")
    if last:
        lines.append(
            f"last cycle: {_when(last.get('finished_at'))}, {last.get('duration_ms')} ms, "
            f"planned {last.get('planned')}, done {last.get('done')}, "
            f"failed {last.get('failed')}, skipped {last.get('skipped')}"
        )
        counts = doc.get("counts", {})
        lines.append("models: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    for key in ("pending", "busy", "waiting", "missing", "corrupt", "held"):
        for item in doc.get(key, []) or []:
            lines.append(f"{key}: {item.get('model')} ({item.get('reason')})")
    handles = doc.get("handles") or {}
    if handles:
        lines.append(
            f"handle check: inspects {handles.get('inspected')} of "
            f"{handles.get('processes')} processes"
        )
    for row in doc.get("deleted_held", []) or []:
        lines.append(
            f"deleted but held: {row.get('path')} by pid {row.get('pid')} "
            f"({row.get('process')}, {row.get('how')}), {row.get('bytes')} bytes pinned"
        )
    for reason in doc.get("degraded_reasons", []):
        lines.append(f"degraded: {reason}")
    lines.append(f"status file: {path}")
    return "\n".join(lines)
