"""Write a file and hash what landed, in one pass.

A restore (and a download) writes the model into a hidden file; its sha256 is
taken of the bytes that landed there, read back with pread(2) by a thread
that follows the writer a block behind. hashlib and the syscalls release the
GIL, so on two cores the pass costs the slower of writing and hashing, not
their sum, and the pin is checked against what is on disk, not against what
was meant to be written.

Writes go through copy_file_range(2) when the source is a file (a reflink on
filesystems that share extents, a copy inside the kernel elsewhere), else
through read and write.
"""

from __future__ import annotations

import errno
import hashlib
import os
import threading
from collections.abc import Callable
from types import TracebackType

BLOCK = 4 * 1024 * 1024  # one pread of the hasher
COPY_STEP = 16 * 1024 * 1024  # one copy_file_range call: progress (and SIGTERM) between steps
# copy_file_range cannot serve this pair of files: fall back to read/write.
_NO_COPY_RANGE = frozenset({errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM})

# Called after every step with the bytes written so far; may raise to stop.
Step = Callable[[int], None]


class Chaser:
    """sha256 of a file's bytes as they land, hashed in a thread behind the writer.

    The writer says how far the file is written (`landed`); `finish` waits for
    the hash to catch up and returns it. `stop` (or leaving the `with` block
    on an exception) ends the thread without a digest.
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._digest = hashlib.sha256()
        self._landed = 0
        self._hashed = 0
        self._done = False
        self._stopped = False
        self._error: OSError | None = None
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="ocrd-hash", daemon=True)
        self._thread.start()

    def landed(self, end: int) -> None:
        """Bytes [0, *end*) of the file are written."""
        with self._cond:
            self._landed = end
            self._cond.notify()

    def finish(self) -> tuple[str, int]:
        """(sha256 hex digest, bytes hashed) once the hash has caught up with the writes."""
        with self._cond:
            self._done = True
            self._cond.notify()
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._digest.hexdigest(), self._hashed

    def stop(self) -> None:
        """End the thread; no digest."""
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join()

    def __enter__(self) -> Chaser:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._thread.is_alive():
            self.stop()

    def _run(self) -> None:
        buf = bytearray(BLOCK)
        view = memoryview(buf)
        while True:
            with self._cond:
                while not self._stopped and self._hashed >= self._landed and not self._done:
                    self._cond.wait()
                if self._stopped or (self._done and self._hashed >= self._landed):
                    return
                end = self._landed
            while self._hashed < end:
                want = min(BLOCK, end - self._hashed)
                try:
                    n = os.preadv(self._fd, [view[:want]], self._hashed)
                except OSError as exc:
                    self._error = exc
                    return
                if n == 0:  # shorter than the writer said: truncated under us
                    self._error = OSError(errno.EIO, "the file shrank while it was hashed")
                    return
                self._digest.update(view[:n])
                self._hashed += n


def copy_into(src_fd: int, dst_fd: int, chaser: Chaser, step: Step | None = None) -> int:
    """Copy *src_fd* from its start to *dst_fd* (opened for reading too); bytes copied.

    The chaser is told after every step how far the copy has landed; *step*
    (progress, SIGTERM) is called then too and may raise to stop the copy.
    """
    done = 0
    use_range = hasattr(os, "copy_file_range")
    while True:
        n = 0
        if use_range:
            try:
                n = os.copy_file_range(src_fd, dst_fd, COPY_STEP)
            except OSError as exc:
                if exc.errno not in _NO_COPY_RANGE or done:
                    raise
                use_range = False
        if not use_range:
            chunk = os.read(src_fd, BLOCK)
            n = len(chunk)
            view = memoryview(chunk)
            while view:
                view = view[os.write(dst_fd, view) :]
        if n == 0:
            return done
        done += n
        chaser.landed(done)
        if step is not None:
            step(done)
