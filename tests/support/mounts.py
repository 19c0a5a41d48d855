"""tmpfs mounts for the tests that need a filesystem of their own (root only)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

MOUNT, UMOUNT = shutil.which("mount"), shutil.which("umount")
CAN_MOUNT = os.geteuid() == 0 and MOUNT is not None and UMOUNT is not None


def mount_tmpfs(path: Path, size: str, *, mode: str | None = None) -> None:
    """Mount a fresh tmpfs of *size* at *path*; CalledProcessError (with stderr) if it fails."""
    assert MOUNT is not None, "mount is not installed"
    options = f"size={size}" + (f",mode={mode}" if mode else "")
    subprocess.run(
        [MOUNT, "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
        check=True,
        capture_output=True,
        text=True,
    )


def unmount(path: Path, *, check: bool = True) -> None:
    """Unmount lazily: a process killed a moment ago may still hold a file there open."""
    assert UMOUNT is not None, "umount is not installed"
    subprocess.run([UMOUNT, "--lazy", str(path)], check=check, capture_output=True)


@contextlib.contextmanager
def mounted_tmpfs(path: Path, size: str, *, mode: str | None = None) -> Iterator[Path]:
    """A fresh tmpfs of *size* mounted at *path* (created), unmounted afterwards."""
    path.mkdir(parents=True, exist_ok=True)
    mount_tmpfs(path, size, mode=mode)
    try:
        yield path
    finally:
        unmount(path)
