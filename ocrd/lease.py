"""Leases for OCR workers: hold a shared `flock` on a model for as long as you use it.

    from ocrd.lease import lease

    with lease("/var/lib/ocrd/models/Qwen2.5-3B-Instruct-GGUF"):
        api = AsposeAI()
        ...                     # ocrd never deletes or quarantines the model meanwhile

    @lease("/var/lib/ocrd/models/en_ocr_v1.bin")
    def recognize(...): ...

The lock is shared, so leases never wait for each other; it needs only read
access (for a directory model, the lock is on the directory). The one wait
there can be is ocrd's own exclusive check, the instant before it removes a
target nobody holds: then the model is gone, and lease() raises
FileNotFoundError rather than hand back a lock on a deleted file. When lease()
returns, the path names the very file (or directory) locked, and it stays
there until the lease ends. Standard library only: no other ocrd module.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator

RETRY_S = 0.01


def acquire(path: str | os.PathLike[str], *, timeout: float = 5.0) -> int:
    """A descriptor holding a shared flock on *path*, which still names what it locked.

    Retries for up to *timeout* seconds while the path is moved away and back
    (ocrd putting a leased model back); raises FileNotFoundError when it is gone.
    """
    deadline = time.monotonic() + timeout
    while True:
        # O_NONBLOCK: opening a FIFO must not hang; reads are not made through it.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            locked = os.fstat(fd)
            try:
                now = os.stat(path)
            except FileNotFoundError:
                now = None
        except BaseException:
            os.close(fd)
            raise
        if now is not None and (now.st_dev, now.st_ino) == (locked.st_dev, locked.st_ino):
            return fd
        os.close(fd)
        if time.monotonic() >= deadline:
            raise FileNotFoundError(2, "removed before the lease was taken", str(path))
        time.sleep(RETRY_S)


@contextlib.contextmanager
def lease(path: str | os.PathLike[str], *, timeout: float = 5.0) -> Iterator[int]:
    """Hold a lease on *path* for the block (or, as a decorator, for each call).

    Yields the locked descriptor; the lease ends when the block does.
    """
    fd = acquire(path, timeout=timeout)
    try:
        yield fd
    finally:
        os.close(fd)
