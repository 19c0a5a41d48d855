"""backend: none — no engine to release; the handle check still guards every delete."""

from __future__ import annotations

from pathlib import Path


class NoEngine:
    """Nothing to release or restart; lists nothing."""

    name = "none"
    hosted = False

    def __init__(self) -> None:
        self._dir: Path | None = None

    @property
    def pid(self) -> int | None:
        return None

    def alive(self) -> bool:
        return True

    def open(self, model_dir: Path) -> None:
        self._dir = model_dir

    def list_local(self) -> list[str]:
        return []

    def local_path(self) -> str | None:
        return None if self._dir is None else str(self._dir)

    def release(self) -> None:
        self._dir = None
