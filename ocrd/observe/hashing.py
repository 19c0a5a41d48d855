"""sha256 of pinned models, streamed in large blocks, and the cache that makes
an unchanged multi-GB file cost one read: keyed by (device, inode, size,
mtime_ns), kept as JSON in the state dir."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

from ocrd import statefile
from ocrd.openfile import NotRegularError, open_regular

BLOCK = 4 * 1024 * 1024
CACHE_FILE = "hashes.json"

# progress(name, bytes_done, bytes_total)
Progress = Callable[[str, int, int], None]


def sha256_file(
    path: str, *, dir_fd: int | None = None, name: str = "", progress: Progress | None = None
) -> tuple[str, os.stat_result, os.stat_result]:
    """Stream *path* (relative to *dir_fd*) through sha256: (hex digest, fstat before, after).

    The file is opened without following a link and without blocking (a FIFO
    put in its place is NotRegularError); the two fstat results let the caller
    trust the digest only for the file it meant, unchanged while it was read.
    *progress* is called after every block; it may raise to stop the hash
    (the daemon does on SIGTERM), and it keeps the systemd watchdog fed.
    """
    digest = hashlib.sha256()
    fd = open_regular(path, dir_fd=dir_fd)
    with os.fdopen(fd, "rb", buffering=0) as fh:
        before = os.fstat(fd)
        total = before.st_size
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        buf = bytearray(BLOCK)
        view = memoryview(buf)
        done = 0
        while True:
            n = fh.readinto(buf)
            if not n:
                break
            digest.update(view[:n])
            done += n
            if progress is not None:
                progress(name, done, total)
        after = os.fstat(fd)
    return digest.hexdigest(), before, after


class HashCache:
    """sha256 by (device, inode, size, mtime_ns), kept as JSON in the state dir."""

    def __init__(self, state_dir: Path | None) -> None:
        self.path = None if state_dir is None else state_dir / CACHE_FILE
        self._data: dict[str, str] = {}
        self._seen: set[str] = set()
        self._dirty = False
        self.error: str | None = None  # the last write's error, if it failed
        self.unreadable: str | None = None  # why the cache on disk could not be read
        if self.path is not None:
            try:
                fd = open_regular(self.path)  # never block on a FIFO put in its place
                with os.fdopen(fd, encoding="utf-8") as fh:
                    loaded = json.load(fh)
                if isinstance(loaded, dict) and loaded.get("version") == 1:
                    self._data = {str(k): str(v) for k, v in loaded["hashes"].items()}
            except FileNotFoundError:
                self._data = {}
            except (OSError, NotRegularError) as exc:
                why = exc.strerror if isinstance(exc, OSError) else f"it is {exc.kind}"
                self.unreadable = f"the hash cache {self.path} cannot be read ({why})"
                self._data = {}
            except (ValueError, KeyError, AttributeError):
                self._data = {}  # garbled: rebuilt from the next hashes

    @staticmethod
    def key(st: os.stat_result) -> str:
        return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"

    def get(self, st: os.stat_result) -> str | None:
        key = self.key(st)
        self._seen.add(key)
        return self._data.get(key)

    def put(self, st: os.stat_result, sha: str) -> None:
        """Remember a digest, on disk at once: a hash is costly (a multi-GB model takes
        seconds), so a daemon stopped or killed later in the same scan (a watchdog, a
        SIGTERM) never hashes this file again. A write error is kept in `error`."""
        key = self.key(st)
        self._seen.add(key)
        self._data[key] = sha
        self._dirty = True
        if self.path is not None:
            self.error = statefile.write_json(
                self.path, {"version": 1, "hashes": self._data}, mode=0o640
            )

    def save(self) -> str | None:
        """Keep the entries used since loading; returns an error text instead of raising."""
        if self.path is None:
            return None
        data = {k: v for k, v in self._data.items() if k in self._seen}
        if not self._dirty and data == self._data:
            return None
        error = statefile.write_json(self.path, {"version": 1, "hashes": data}, mode=0o640)
        if error:
            return error
        self._data, self._dirty = data, False
        return None
