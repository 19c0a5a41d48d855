"""The daemon's status document: built and written after every cycle, read by `ocrd status`.

One builder (document(), line(), degraded()) and one reader (read(),
summary()): the schema lives here and nowhere else.
"""

from __future__ import annotations

import json
import os
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ocrd import statefile
from ocrd.core.model import ReportKind
from ocrd.core.render import human_bytes
from ocrd.daemon.backoff import Backoff
from ocrd.daemon.view import ViewGuard
from ocrd.observe.handles import DeletedHeld, pinned_bytes
from ocrd.openfile import NotRegularError, open_regular

if TYPE_CHECKING:  # `ocrd status` reads the file without importing the cycle's machinery
    from ocrd.cycle import CycleResult

STATUS_NAME = "status.json"
RUNTIME_DEFAULT = Path("/run/ocrd")
SCHEMA = 1
MAX_ERRORS = 20
LINE_MAX = 400  # characters of the one-line STATUS= text
LISTED_REPORTS = (ReportKind.WAITING, ReportKind.MISSING, ReportKind.CORRUPT, ReportKind.HELD)


@dataclass(slots=True)
class State:
    """What the daemon reports about itself besides the policy and the engine."""

    view: ViewGuard  # whether the model dir's view is trusted, and why not
    started_at: float = field(default_factory=time.time)
    loaded_at: float = field(default_factory=time.time)
    last: CycleResult | None = None
    last_finished: float | None = None
    errors: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=MAX_ERRORS))
    rejected: dict[str, Any] | None = None  # the last policy edit that was refused
    cycle: Backoff = field(default_factory=Backoff)  # cycles that raised, in a row
    deleted_held: list[DeletedHeld] = field(default_factory=list)

    def note_error(self, where: str, error: str) -> None:
        self.errors.append({"at": time.time(), "where": where, "error": error})


def degraded(state: State) -> list[str]:
    """Why the daemon is degraded, most important first (empty: healthy)."""
    reasons = []
    if state.rejected:
        reasons.append("the last policy edit was rejected; the previous policy is in force")
    if state.view.suspicious:
        reasons.append(f"suspicious view: {state.view.suspicious}")
    if state.cycle.failing:
        reasons.append(f"{state.cycle.failures} cycle(s) failed in a row")
    if state.last is not None:
        # Skipped actions are retried next cycle; a held-back cycle is the suspicious view.
        reasons += state.last.reasons(unfinished=False)
    return reasons


def line(state: State) -> str:
    """The one-line STATUS= text for systemd."""
    last = state.last
    if last is None:
        base = "no cycle yet"
    else:
        pending = len(last.plan.actions) - len(last.outcome.done)
        base = (
            f"models={last.plan.models} pending={pending} busy={len(last.outcome.busy)} "
            f"done={len(last.outcome.done)}"
        )
    reasons = degraded(state)
    if reasons:
        base += f" degraded: {reasons[0]}"
    elif state.errors:
        base += f" last error: {state.errors[-1]['error']}"
    return " ".join(base.split())[:LINE_MAX]


def _last_cycle(state: State, last: CycleResult) -> dict[str, Any]:
    """The status document's fields about the last cycle."""
    counts: dict[str, int] = {}
    for c in last.plan.classified:
        counts[c.cls.value] = counts.get(c.cls.value, 0) + 1
    done = {(a.kind, a.name) for a in last.outcome.done}
    doc: dict[str, Any] = {
        "last_cycle": {
            "finished_at": state.last_finished,
            "duration_ms": last.duration_ms,
            "planned": len(last.plan.actions),
            "done": len(last.outcome.done),
            "failed": len(last.outcome.failed),
            "skipped": len(last.outcome.skipped),
            "bytes_freed": last.outcome.bytes_freed,
            "held_back": last.held_back,
        },
        "counts": counts,
        "pending": [
            {"action": a.kind.value, "model": a.name, "reason": a.reason}
            for a in last.plan.actions
            if (a.kind, a.name) not in done
        ],
        "busy": [{"model": r.name, "reason": r.reason} for r in last.outcome.busy],
    }
    for kind in LISTED_REPORTS:
        doc[kind.value] = [
            {"model": r.name, "reason": r.reason} for r in last.plan.reports if r.kind is kind
        ]
    return doc


def document(
    state: State,
    *,
    word: str,
    policy_path: Path,
    digest: str,
    model_dir: Path,
    watch: str,
    engine: str,
    handles: tuple[int, int],
    notify_dropped: int = 0,
    downloads: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The whole status document (schema 1); *word* is "running" or "stopped"."""
    reasons = degraded(state)
    doc: dict[str, Any] = {
        "schema": SCHEMA,
        "state": word,
        "pid": os.getpid(),
        "started_at": state.started_at,
        "updated_at": time.time(),
        "policy": {
            "path": str(policy_path),
            "digest": digest,
            "loaded_at": state.loaded_at,
            "rejected": state.rejected,
        },
        "model_dir": str(model_dir),
        "watch": watch,
        "engine": engine,
        "suspicious": state.view.suspicious,
        "errors": list(state.errors),
        "degraded_reasons": reasons,
        "last_cycle": None,
        "degraded": bool(reasons),
    }
    if state.last is not None:
        doc.update(_last_cycle(state, state.last))
    doc["handles"] = {"inspected": handles[0], "processes": handles[1]}
    doc["deleted_held"] = [row.as_dict() for row in state.deleted_held]
    doc["pinned_bytes"] = pinned_bytes(state.deleted_held)
    doc["notify_dropped"] = notify_dropped
    doc["downloads"] = list(downloads or [])
    return doc


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
            fd = open_regular(path)  # a FIFO or a link in its place is no status file
            with os.fdopen(fd, encoding="utf-8") as fh:
                mtime = os.fstat(fd).st_mtime
                data = json.load(fh)
        except (OSError, NotRegularError, ValueError):
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


def _size(n: Any) -> str:
    return human_bytes(n) if isinstance(n, int) else "?"


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
    for row in doc.get("downloads", []) or []:
        done, total = row.get("done") or 0, row.get("total")
        share = f" ({100 * done // total}%)" if isinstance(total, int) and total > 0 else ""
        of = f" of {_size(total)}" if isinstance(total, int) else ""
        lines.append(
            f"downloading: {row.get('model')} from {row.get('source')}: {_size(done)}{of}{share}"
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
