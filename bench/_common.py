"""Shared helpers for the ocrd benchmarks: timing, statistics, policies, daemons, output.

Every benchmark script exposes ``run(quick: bool) -> list[Row]`` and calls
:func:`main` so that it can be run alone (prints a table) or by ``run_all.py``
(``--json PATH`` writes the rows for the summary).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = REPO / ".venv" / "bin"
OCRD = str(VENV_BIN / "ocrd")
PYTHON = str(VENV_BIN / "python")
SCRATCH = "/tmp"  # noqa: S108 - scratch dirs live on the disk's filesystem here
CACHE_DIR = Path("/var/tmp/ocrd-bench")  # noqa: S108 - a fixed, documented data cache


@dataclass
class Row:
    """One line of a benchmark's result table."""

    benchmark: str
    figure: str
    value: float | None
    unit: str
    target: str
    met: bool | None
    baseline: float | None = None
    baseline_name: str = ""
    note: str = ""

    @property
    def ratio(self) -> float | None:
        """value / baseline, when both are known and the baseline is not zero."""
        if self.value is None or not self.baseline:
            return None
        return self.value / self.baseline


@dataclass
class Daemon:
    """A running ``ocrd run`` whose stdout log lines are collected with arrival times."""

    proc: subprocess.Popen[str]
    lines: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    _queue: queue.Queue[tuple[float, dict[str, Any]]] = field(default_factory=queue.Queue)
    _thread: threading.Thread | None = None

    def start_reader(self) -> None:
        """Read stdout in a thread so the daemon never blocks on a full pipe."""

        def pump() -> None:
            assert self.proc.stdout is not None
            for raw in self.proc.stdout:
                now = time.monotonic()
                try:
                    event = json.loads(raw)
                except ValueError:
                    event = {"event": "<non-json>", "raw": raw.rstrip()}
                self._queue.put((now, event))

        self._thread = threading.Thread(target=pump, daemon=True)
        self._thread.start()

    def drain(self) -> None:
        """Move lines that arrived so far from the reader thread into ``lines``."""
        while True:
            try:
                self.lines.append(self._queue.get_nowait())
            except queue.Empty:
                return

    def count(self, event: str, since: float = 0.0) -> int:
        """Number of log lines with this event name that arrived at or after ``since``."""
        self.drain()
        return sum(1 for t, e in self.lines if t >= since and e.get("event") == event)

    def wait_for(self, event: str, n: int = 1, since: float = 0.0, timeout: float = 30.0) -> None:
        """Block until ``n`` lines of ``event`` arrived since ``since``; raise on timeout/exit."""
        deadline = time.monotonic() + timeout
        while self.count(event, since) < n:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}: {self.tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {n}x {event} within {timeout}s: {self.tail()}")
            time.sleep(0.005)

    def tail(self, n: int = 5) -> str:
        """The last log lines, for error messages."""
        self.drain()
        return " | ".join(json.dumps(e)[:200] for _, e in self.lines[-n:])


def clean_env() -> dict[str, str]:
    """The environment without any OCRD_* override that would change the policy, and
    without PYTHONDONTWRITEBYTECODE: an installed ocrd starts from compiled bytecode
    (pip compiles it), so a benchmark must too (see ensure_bytecode)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OCRD_")}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.pop("STATE_DIRECTORY", None)
    env.pop("RUNTIME_DIRECTORY", None)
    env.pop("NOTIFY_SOCKET", None)
    return env


def _yaml_scalar(value: Any) -> str:
    """A YAML scalar: JSON strings/numbers/booleans/lists are valid flow YAML."""
    return json.dumps(value)


def write_policy(path: Path, model_dir: Path, state_dir: Path, **sections: Any) -> Path:
    """Write a policy file; ``sections`` maps top-level keys to values or dicts of values.

    Defaults for benchmarks: backend none, json logs. Pass e.g.
    ``prune={"prefixes": ["old_"], "min_age": 0}``.
    """
    body: dict[str, Any] = {
        "model_dir": str(model_dir),
        "state_dir": str(state_dir),
        "engine": {"backend": "none"},
        "log": {"format": "json"},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(body.get(key), dict):
            body[key] = {**body[key], **value}
        else:
            body[key] = value
    out: list[str] = []
    for key, value in body.items():
        if isinstance(value, dict):
            out.append(f"{key}:")
            out.extend(f"  {k}: {_yaml_scalar(v)}" for k, v in value.items())
        else:
            out.append(f"{key}: {_yaml_scalar(value)}")
    path.write_text("\n".join(out) + "\n")
    return path


def prune_policy(**prune: Any) -> dict[str, Any]:
    """A ``prune`` section that prunes every ``old_*`` at once (overridable)."""
    base: dict[str, Any] = {
        "prefixes": ["old_"],
        "min_age": 0,
        "max_fraction": 1,
        "max_per_cycle": 1000000,
        "action": "delete",
    }
    base.update(prune)
    return base


def run_cmd(
    argv: Sequence[str], check: bool = False
) -> tuple[float, subprocess.CompletedProcess[bytes]]:
    """Run a command with stdout and stderr captured (read in full); return (seconds, result)."""
    start = time.perf_counter()
    result = subprocess.run(list(argv), capture_output=True, env=clean_env(), check=False)
    elapsed = time.perf_counter() - start
    if check and result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)} exited {result.returncode}: {result.stderr.decode()[-500:]}"
        )
    return elapsed, result


def ocrd(
    policy: Path, *args: str, check: bool = True
) -> tuple[float, subprocess.CompletedProcess[bytes]]:
    """Time one ``ocrd --config POLICY ARGS`` with its output read through pipes."""
    return run_cmd([OCRD, "--config", str(policy), *args], check=check)


def median(values: Sequence[float]) -> float:
    """The median."""
    return statistics.median(values)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), nearest-rank on the sorted values."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def make_entries(directory: Path, total: int, old: int) -> None:
    """Create ``total`` empty files in ``directory``, the first ``old`` named ``old_*``."""
    directory.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    for i in range(total):
        name = f"old_{i:07d}.bin" if i < old else f"keep_{i:07d}.bin"
        os.close(os.open(directory / name, flags, 0o644))


def copy_tree(template: Path, dest: Path) -> None:
    """An identical copy of ``template`` at ``dest`` (``cp -a``: same names, mtimes)."""
    subprocess.run([tool("cp"), "-a", str(template), str(dest)], check=True)


def remove_tree(path: Path) -> None:
    """Remove a benchmark scratch tree (never a real model dir)."""
    shutil.rmtree(path, ignore_errors=True)  # noqa: TID251 - bench scratch, not ocrd's models


def tool(name: str) -> str:
    """The absolute path of a system tool."""
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} not found on PATH")
    return found


@contextlib.contextmanager
def scratch_dir(prefix: str, base: str = SCRATCH) -> Iterator[Path]:
    """A temporary directory removed afterwards, whatever happens."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
    try:
        yield path
    finally:
        remove_tree(path)


@contextlib.contextmanager
def daemon(policy: Path, first_cycle_timeout: float = 60.0) -> Iterator[Daemon]:
    """Start ``ocrd run``, wait for its first ``cycle.finished``, and stop it afterwards."""
    proc = subprocess.Popen(
        [OCRD, "--config", str(policy), "run"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=clean_env(),
    )
    d = Daemon(proc)
    try:
        d.start_reader()
        d.wait_for("cycle.finished", timeout=first_cycle_timeout)
        yield d
    finally:
        stop_process(proc)


def stop_process(proc: subprocess.Popen[Any], timeout: float = 15.0) -> None:
    """SIGTERM, wait, then SIGKILL this one process if it is still there."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.001) -> float:
    """Poll until ``predicate()`` is true; return the monotonic time it was seen true."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return time.monotonic()
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout}s")
        time.sleep(interval)


def fs_type(path: Path) -> str:
    """The filesystem type holding ``path`` (e.g. ``ext4``, ``tmpfs``)."""
    out = subprocess.run([tool("df"), "--output=fstype", str(path)], capture_output=True, text=True)
    lines = out.stdout.split()
    return lines[-1] if len(lines) > 1 else "unknown"


def fmt(value: float | None, unit: str = "") -> str:
    """A compact human number with its unit."""
    if value is None:
        return "-"
    if unit == "s":
        return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.3f} s"
    if unit == "ms":
        return f"{value:.1f} ms"
    if unit == "%":
        return f"{value:.3f} %"
    if unit == "MB":
        return f"{value:.1f} MB"
    if isinstance(value, float) and not value.is_integer():
        return f"{value:.2f}{(' ' + unit) if unit else ''}"
    return f"{int(value)}{(' ' + unit) if unit else ''}"


def table(rows: Sequence[Row]) -> str:
    """A Markdown table of rows: benchmark, figure, value, baseline, ratio, target, met."""
    header = ["benchmark", "figure", "value", "baseline", "ratio", "target", "met"]
    body = []
    for r in rows:
        base = f"{fmt(r.baseline, r.unit)} ({r.baseline_name})" if r.baseline is not None else "-"
        ratio = f"{r.ratio:.2f}x" if r.ratio is not None else "-"
        met = "-" if r.met is None else ("yes" if r.met else "NO")
        body.append([r.benchmark, r.figure, fmt(r.value, r.unit), base, ratio, r.target, met])
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body, strict=False)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |"]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for b in body:
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(b, widths, strict=True)) + " |")
    return "\n".join(lines)


def ensure_bytecode() -> None:
    """Compile ocrd's modules, as pip does on install: where PYTHONDONTWRITEBYTECODE is
    set (some dev shells), every start would otherwise compile ~60 modules (~0.3 s)."""
    subprocess.run([PYTHON, "-m", "compileall", "-q", str(REPO / "ocrd")], check=False)


def main(run: Callable[[bool], list[Row]], description: str) -> None:
    """CLI wrapper: ``[--quick] [--json PATH]``; prints the table, always exits 0."""
    ensure_bytecode()
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="smaller, faster run")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args()
    print(f"# {description} ({'quick' if args.quick else 'full'})", flush=True)
    try:
        rows = run(args.quick)
    except Exception as exc:  # a benchmark reports; it never fails the caller
        traceback.print_exc()
        rows = [
            Row(description, "error", None, "", "-", False, note=f"{type(exc).__name__}: {exc}")
        ]
    for r in rows:
        if r.note:
            print(f"note: {r.figure}: {r.note}")
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows]))
    sys.exit(0)


def log(msg: str) -> None:
    """Progress on stderr (the table goes to stdout)."""
    print(msg, file=sys.stderr, flush=True)
