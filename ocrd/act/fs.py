"""Filesystem primitives for the act room: flushes, hidden names, removal, the re-check.

A rename or unlink is atomic; what a crash may leave is only ever under one
of ocrd's own names (ocrd.core.names), which recovery finishes or rolls back.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import secrets
import stat
from typing import Any

from ocrd.core.model import Entry, Kind
from ocrd.observe.scan import kind_of, tree_stats
from ocrd.observe.walk import Incomplete
from ocrd.openfile import borrowed_dir, give_to_owner_of

Log = Any  # a structlog bound logger


class ActionError(Exception):
    """An action that could not be carried out, with a reason for the log."""


class Changed(Exception):
    """The target is not what the plan saw: skip it this cycle."""


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Sync:
    """Directory fsyncs, now or batched to the end of a cycle.

    A rename or unlink is atomic whether or not it is flushed: after a power
    loss each model is under one name or the other, never lost. So a cycle
    flushes each touched directory once at its end instead of once per model
    (50,000 fsyncs would dominate a big prune). File data that is about to
    appear under a model's name (restore) is always flushed first.
    """

    def __init__(self, *, batch: bool = False) -> None:
        self.batch = batch
        self.pending: set[str] = set()

    def dir(self, path: str) -> None:
        if self.batch:
            self.pending.add(path)
        else:
            fsync_dir(path)

    def flush(self) -> None:
        for path in sorted(self.pending):
            with contextlib.suppress(FileNotFoundError):
                fsync_dir(path)
        self.pending.clear()


NOW_SYNC = Sync()


RENAME_NOREPLACE = 1  # linux/fs.h
_libc = ctypes.CDLL(None, use_errno=True)


def rename_noreplace(src: str, dst: str, *, src_dir_fd: int, dst_dir_fd: int) -> None:
    """renameat2(RENAME_NOREPLACE): move *src* to *dst* unless *dst* exists (FileExistsError).

    os.rename() replaces whatever is at *dst*; putting a model back under its
    name must never replace a new entry that appeared there meanwhile.
    """
    result = _libc.renameat2(
        src_dir_fd, os.fsencode(src), dst_dir_fd, os.fsencode(dst), RENAME_NOREPLACE
    )
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), dst)


def hidden_name(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(8)}"


def write_durably(name: str, data: dict[str, Any], *, dir_fd: int) -> None:
    """Write *name* in the open directory *dir_fd* durably: a flushed temp file renamed
    over it (neither opened through a link)."""
    tmp = name + ".tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp, flags, 0o600, dir_fd=dir_fd)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        give_to_owner_of(fd, os.fstat(dir_fd))
        fh.write(json.dumps(data))  # dumps: CPython's C encoder; dump() streams in Python
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)


def check_unchanged(root: str, entry: Entry, *, dir_fd: int | None = None) -> None:
    """Raise Changed unless the entry still looks as it did in the snapshot.

    With *dir_fd* (the model dir, open) the entry is looked up relative to it;
    a directory is walked through descriptors (ocrd.observe.walk).
    """
    with borrowed_dir(root, dir_fd) as fd:
        _check_unchanged(fd, entry)


def _check_unchanged(dir_fd: int, entry: Entry) -> None:
    try:
        st = os.stat(entry.name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        raise Changed("vanished since the scan") from None
    if (
        entry.kind is Kind.FILE
        and st.st_ino == entry.inode
        and st.st_mtime_ns == entry.mtime_ns
        and st.st_size == entry.size
        and stat.S_ISREG(st.st_mode)
    ):
        return  # the common case, a plain file as scanned: one test, no name lookups
    if kind_of(st.st_mode) is not entry.kind or st.st_ino != entry.inode:
        raise Changed("replaced since the scan")
    if st.st_mtime_ns != entry.mtime_ns:
        raise Changed("modified since the scan")
    if entry.kind is Kind.FILE and st.st_size != entry.size:
        raise Changed("size changed since the scan")
    if entry.kind is Kind.DIR:
        try:
            size, newest = tree_stats(dir_fd, entry.name)
        except Incomplete as exc:
            raise Changed(f"cannot be looked into whole ({exc.strerror})") from None
        if size != entry.size or newest != entry.mtime:
            raise Changed("modified since the scan")
