"""Look below a directory through descriptors: no link followed, no mount entered, no depth limit.

The read-only twin of ocrd.act.tree: every step is relative to the one open
directory (openat/fstatat), the walk is iterative, and going back up is `..`
checked to be the directory we came from. A path is never opened whole, so
a tree deeper than PATH_MAX allows is walked like any other, and a link or
a swapped directory never steers the walk elsewhere.

What vanishes during the walk is passed over. A directory on another mount
(another filesystem, or a bind mount: its mount id differs) is seen but not
entered, as `du -x` does. What cannot be looked into (no permission, a
directory replaced or moved while walked) makes the walk Incomplete: a
caller that decides whether something may be deleted must not trust half
a tree.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field

from ocrd.openfile import DIR_FLAGS, mount_id


class Incomplete(OSError):
    """Part of a tree could not be looked at; what was seen is not the whole of it."""


@dataclass(slots=True)
class _Level:
    path: str  # relative to the directory the walk started from
    ident: tuple[int, int]
    subdirs: list[tuple[str, tuple[int, int]]] = field(default_factory=list)


def _ident(st: os.stat_result) -> tuple[int, int]:
    return (st.st_dev, st.st_ino)


def _incomplete(path: str, why: str) -> Incomplete:
    return Incomplete(errno.EIO, f"{path}: {why}")


def below(dir_fd: int, name: str) -> Iterator[tuple[str, os.stat_result]]:
    """(path relative to *dir_fd*, lstat) of everything below its directory *name*.

    Nothing is yielded when *name* is gone or no directory; raises Incomplete
    when part of the tree cannot be looked into.
    """
    try:
        fd = os.open(name, DIR_FLAGS, dir_fd=dir_fd)
    except (FileNotFoundError, NotADirectoryError):
        return
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return  # a symlink: nothing below it that is ours
        raise _incomplete(name, f"cannot open: {exc.strerror}") from None
    try:
        top = os.fstat(fd)
        device, mount = top.st_dev, mount_id(fd)
        levels = [_Level(name, _ident(top))]
        yield from _list(fd, levels[0])
        while levels:
            level = levels[-1]
            if not level.subdirs:
                levels.pop()
                if levels:
                    fd = _up(fd, levels[-1])
                continue
            child, ident = level.subdirs.pop()
            opened = _down(fd, level, child, ident, device, mount)
            if opened is None:
                continue
            os.close(fd)
            fd = opened
            levels.append(_Level(f"{level.path}/{child}", ident))
            yield from _list(fd, levels[-1])
    finally:
        os.close(fd)


def _list(fd: int, level: _Level) -> Iterator[tuple[str, os.stat_result]]:
    try:
        entries = list(os.scandir(fd))
    except OSError as exc:
        raise _incomplete(level.path, f"cannot list: {exc.strerror}") from None
    prefix = level.path + "/"
    for entry in entries:
        try:
            st = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise _incomplete(prefix + entry.name, exc.strerror or str(exc)) from None
        yield prefix + entry.name, st
        if stat.S_ISDIR(st.st_mode):
            level.subdirs.append((entry.name, _ident(st)))


def _down(
    fd: int,
    level: _Level,
    child: str,
    ident: tuple[int, int],
    device: int,
    mount: int | None,
) -> int | None:
    """The subdirectory *child* opened, or None when it is not to be entered."""
    path = f"{level.path}/{child}"
    try:
        opened = os.open(child, DIR_FLAGS, dir_fd=fd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno in (errno.ENOTDIR, errno.ELOOP):
            raise _incomplete(path, "replaced while it was looked into") from None
        raise _incomplete(path, f"cannot open: {exc.strerror}") from None
    st = os.fstat(opened)
    if _ident(st) != ident:
        os.close(opened)
        raise _incomplete(path, "replaced while it was looked into")
    if st.st_dev != device or (mount is not None and mount_id(opened) not in (None, mount)):
        os.close(opened)
        return None  # a mount point: seen, not entered
    return opened


def _up(fd: int, parent: _Level) -> int:
    """`..` of the current directory, checked to be *parent*; the current one is closed."""
    try:
        opened = os.open("..", DIR_FLAGS, dir_fd=fd)
    except OSError as exc:
        raise _incomplete(parent.path, f"cannot go back up: {exc.strerror}") from None
    if _ident(os.fstat(opened)) != parent.ident:
        os.close(opened)
        raise _incomplete(parent.path, "moved while it was looked into")
    os.close(fd)
    return opened
