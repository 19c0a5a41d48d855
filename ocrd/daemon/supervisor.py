"""Engine supervision between cycles: open with backoff, notice a dead host, replace it.

The cycle itself releases and reopens the engine around acting (ocrd.act);
this keeps a hosted engine up while the daemon waits: a host that died is
reaped (`engine.crashed`) and a fresh one started, with backoff when it
keeps failing to open.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ocrd.core.policy import Policy
from ocrd.daemon.backoff import Backoff
from ocrd.engine.auto import make_engine
from ocrd.engine.base import Engine, EngineError

ENGINE_CHECK = 30.0  # seconds between checks that a hosted engine is still alive


class EngineSupervisor:
    """The daemon's engine, and the backoff for opening it."""

    def __init__(self, engine: Engine, *, log: Any, note_error: Callable[[str, str], None]) -> None:
        self.engine = engine
        self.log = log
        self.note_error = note_error
        self.backoff = Backoff()

    def open(self, model_dir: Path) -> None:
        """Open the engine on *model_dir*; a failure is logged and retried later."""
        try:
            self.engine.open(model_dir)
        except Exception as exc:  # reported, never fatal
            delay = self.backoff.failed(str(exc), now=time.monotonic())
            self.log.error(
                "engine.unavailable", engine=self.engine.name, error=str(exc), retry_s=delay
            )
            self.note_error("engine", str(exc))
        else:
            self.backoff.succeeded()

    def release(self) -> None:
        """Release the engine; a failure is logged (the next release tries again)."""
        try:
            self.engine.release()
        except Exception as exc:  # shutting down or reloading anyway; say what happened
            self.log.error("engine.release_failed", engine=self.engine.name, error=str(exc))

    def check(self, model_dir: Path) -> None:
        """Notice a host that died between cycles (engine.crashed) and start a fresh one."""
        engine = self.engine
        if not engine.hosted or engine.alive():
            return
        if engine.pid is not None:
            try:
                engine.release()  # reaps it and logs engine.crashed
            except Exception as exc:  # the next check tries again
                self.log.error("engine.release_failed", engine=engine.name, error=str(exc))
                return
        if self.backoff.due(time.monotonic()):
            self.open(model_dir)

    def restart(self, new: Policy, *, backend_changed: bool) -> None:
        """After a reload that changed the engine's dir or settings: a fresh engine."""
        self.release()
        if backend_changed:
            try:
                self.engine, _ = make_engine(new, log=self.log)
            except EngineError as exc:
                self.log.error("engine.unavailable", error=str(exc))
        self.open(new.model_dir)

    def timeout(self, now: float) -> float | None:
        """Seconds until the engine wants looking at (None: it does not)."""
        waits = []
        if self.engine.hosted:
            waits.append(ENGINE_CHECK)
        if self.backoff.not_before is not None:
            waits.append(self.backoff.not_before - now)
        return min(waits) if waits else None
