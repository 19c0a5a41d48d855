"""One ocrd per model dir: an flock on `model_dir/.ocrd-lock` holding the pid."""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from ocrd.core.errors import LockedError
from ocrd.core.names import LOCK


class DirLock:
    """Exclusive, non-blocking; released when the process ends, even by SIGKILL."""

    def __init__(self, model_dir: Path) -> None:
        self.path = model_dir / LOCK
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise LockedError(
                f"another ocrd (pid {holder}) is managing {self.path.parent}; stop it first, "
                "or run read-only commands (plan, list) instead"
            ) from None
        os.ftruncate(fd, 0)
        # On a full disk the lock holds all the same: the pid is only a note for people.
        with contextlib.suppress(OSError):
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> DirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
