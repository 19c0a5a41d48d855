"""What ocrd needs from an OCR engine, and the one error every backend raises."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable


class EngineError(Exception):
    """The engine failed to open, list or release."""


@runtime_checkable
class Engine(Protocol):
    """An OCR engine opened on the model dir and released around every destructive cycle.

    *hosted* engines run in a child process that may die between cycles: the
    daemon asks `alive()` now and then and opens a fresh one when it is not.
    """

    name: str
    hosted: bool

    @property
    def pid(self) -> int | None:
        """The process holding the engine's handles, when it runs in one of its own."""
        ...

    def alive(self) -> bool:
        """Whether the engine is up (an engine without a process of its own always is)."""
        ...

    def open(self, model_dir: Path) -> None:
        """Start (or restart) the engine pointed at *model_dir*."""

    def list_local(self) -> list[str]:
        """The models the engine itself sees, for the log next to ocrd's own listing."""
        ...

    def local_path(self) -> str | None:
        """Where the engine looks for models."""
        ...

    def release(self) -> None:
        """Drop every handle on model files; raise EngineError when that cannot be done."""
