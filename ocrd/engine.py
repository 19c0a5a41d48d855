"""The OCR engine whose handles must be released before anything is deleted.

An Engine is opened on the model dir, listed, and released around every
cycle that changes the disk (DESIGN §5). `none` has no engine: the handle
check still runs. The Aspose backend runs the library in a child process
(the engine host) and is not part of this release.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Protocol, runtime_checkable


class EngineError(Exception):
    """The engine failed to open, list or release."""


@runtime_checkable
class Engine(Protocol):
    """What ocrd needs from an OCR engine."""

    name: str

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


class NoEngine:
    """backend: none — nothing to release; the handle check still guards deletes."""

    name = "none"

    def __init__(self) -> None:
        self._dir: Path | None = None

    def open(self, model_dir: Path) -> None:
        self._dir = model_dir

    def list_local(self) -> list[str]:
        return []

    def local_path(self) -> str | None:
        return None if self._dir is None else str(self._dir)

    def release(self) -> None:
        self._dir = None


def aspose_installed() -> bool:
    """Whether `aspose-ocr-python-net` is importable (checked without importing it)."""
    try:
        return importlib.util.find_spec("aspose") is not None
    except (ImportError, ValueError):
        return False


def make_engine(backend: str) -> tuple[Engine, str | None]:
    """The engine for *backend*, and a warning to log when it fell back."""
    if backend == "none":
        return NoEngine(), None
    if backend == "aspose":
        raise EngineError(
            "engine.backend 'aspose' is not available in this version of ocrd (the engine "
            "host is not built yet); set engine.backend to 'none' or 'auto'"
        )
    reason = (
        "aspose-ocr-python-net is installed but this version of ocrd has no engine host yet"
        if aspose_installed()
        else "aspose-ocr-python-net is not installed"
    )
    return NoEngine(), f"engine.backend auto: {reason}; using 'none' (the handle check still runs)"
