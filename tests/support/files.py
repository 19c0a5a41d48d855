"""Model files on disk: making them, their digests, what ocrd may leave behind."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

from ocrd.core.names import DELETING_PREFIX, TMP_PREFIX


def make_model(root: Path, name: str, data: bytes = b"model", *, age: float = 0.0) -> Path:
    """A file model under *root*, with its mtime *age* seconds in the past."""
    path = root / name
    path.write_bytes(data)
    if age:
        past = time.time() - age
        os.utime(path, (past, past))
    return path


def sha256(data: bytes) -> str:
    """The hex sha256 of *data*, as a policy pins it."""
    return hashlib.sha256(data).hexdigest()


def leftovers(root: Path) -> list[str]:
    """ocrd's half-done work in *root*: `.ocrd-tmp-*` restores and `.ocrd-deleting-*` trees."""
    return sorted(n for n in os.listdir(root) if n.startswith((TMP_PREFIX, DELETING_PREFIX)))


def digest(path: Path) -> str:
    """The hex sha256 of the file at *path*: a policy's digest as ocrd logs it."""
    return sha256(path.read_bytes())


def make_deep(top: Path, depth: int, *, files: bool = False) -> None:
    """A chain of *depth* directories `d` below *top* (each holding a file `f` if *files*),
    built by descriptor: the whole path outgrows PATH_MAX."""
    top.mkdir()
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(depth):
        os.mkdir("d", dir_fd=fd)
        child = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = child
        if files:
            os.close(os.open("f", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
    os.close(fd)
