"""Remove a directory tree through descriptors: no link followed, no mount crossed, no depth limit.

Like `rm -r --one-file-system`, done the way CPython's `shutil._rmtree_safe_fd`
does it (every step relative to an open directory), but iterative and
holding one directory open at a time, so a tree 100,000 levels deep costs
neither recursion nor descriptors. Going back up is `..` of the current
directory, checked to be the directory we came from (device and inode): a
tree moved or swapped underneath stops the removal instead of steering it.

A directory on another mount (another filesystem, or a bind mount of the
same one: its mount id differs) is never entered; it and what leads to it
are left and reported, as is anything that cannot be removed. The caller
decides what a leftover means; nothing here raises for one.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field

from ocrd.openfile import DIR_FLAGS, mount_id


@dataclass(slots=True)
class Removal:
    """What one removal left behind: relative paths, each with why."""

    left: list[tuple[str, str]] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not self.left

    def keep(self, path: str, why: str) -> None:
        self.left.append((path, why))

    def summary(self, limit: int = 5) -> str:
        shown = "; ".join(f"{path}: {why}" for path, why in self.left[:limit])
        more = len(self.left) - limit
        return shown + (f"; and {more} more" if more > 0 else "")


@dataclass(slots=True)
class _Level:
    """One directory on the way down: who it is, and its subdirectories still to do."""

    name: str  # its name in the directory above
    ident: tuple[int, int]  # (device, inode)
    subdirs: list[str]
    kept: bool = False  # something below it stays, so it stays too


def _error(exc: OSError) -> str:
    return exc.strerror or str(exc)


class _Walk:
    """The state of one removal: the one open directory and the levels above it.

    levels[0] is the directory the removal started in (never removed);
    levels[1] the tree's top; the last one is the current directory.
    """

    def __init__(
        self, parent: os.stat_result, top_fd: int, name: str, removal: Removal, *, remove: bool
    ) -> None:
        self.fd = top_fd
        self.removal = removal
        self.remove = remove  # False: only look (for mount points), change nothing
        st = os.fstat(top_fd)
        self.device = st.st_dev
        self.mount = mount_id(top_fd)
        self.levels = [
            _Level("", (parent.st_dev, parent.st_ino), []),
            _Level(name, (st.st_dev, st.st_ino), []),
        ]

    def path(self, name: str | None = None) -> str:
        parts = [level.name for level in self.levels[1:]]
        return "/".join(parts if name is None else [*parts, name])

    def keep(self, name: str | None, why: str) -> None:
        self.removal.keep(self.path(name), why)
        for level in self.levels:
            level.kept = True

    def empty_current(self) -> None:
        """Unlink every non-directory in the current directory; note its subdirectories."""
        level = self.levels[-1]
        if not self.remove and not os.access(".", os.W_OK, dir_fd=self.fd, effective_ids=True):
            self.keep(None, "this user may not remove what is in it (no write permission)")
        try:
            entries = list(os.scandir(self.fd))
        except OSError as exc:
            self.keep(None, f"cannot list: {_error(exc)}")
            return
        for entry in entries:
            try:
                is_dir = entry.is_dir(follow_symlinks=False)
            except OSError:
                is_dir = False
            if is_dir:
                level.subdirs.append(entry.name)
                continue
            if not self.remove:
                continue
            try:
                os.unlink(entry.name, dir_fd=self.fd)
            except FileNotFoundError:
                continue
            except IsADirectoryError:
                level.subdirs.append(entry.name)  # became a directory meanwhile
            except OSError as exc:
                self.keep(entry.name, _error(exc))

    def descend(self, name: str) -> bool:
        """Make *name* (a subdirectory of the current one) current; False if it must stay."""
        try:
            child = os.open(name, DIR_FLAGS, dir_fd=self.fd)
        except FileNotFoundError:
            return False
        except OSError as exc:
            if exc.errno not in (errno.ENOTDIR, errno.ELOOP):
                self.keep(name, f"cannot open: {_error(exc)}")
                return False
            if not self.remove:
                return False
            try:
                os.unlink(name, dir_fd=self.fd)  # swapped for a link or a file: remove that
            except FileNotFoundError:
                pass
            except OSError as again:
                self.keep(name, _error(again))
            return False
        st = os.fstat(child)
        if st.st_dev != self.device or (
            self.mount is not None and mount_id(child) not in (None, self.mount)
        ):
            os.close(child)
            self.keep(name, "a mount point (another filesystem or a bind mount); not entered")
            return False
        os.close(self.fd)
        self.fd = child
        self.levels.append(_Level(name, (st.st_dev, st.st_ino), []))
        return True

    def ascend(self) -> bool:
        """Make the parent current and remove the finished level; False when the way up moved."""
        done = self.levels.pop()
        parent_ident = self.levels[-1].ident
        try:
            parent = os.open("..", DIR_FLAGS, dir_fd=self.fd)
        except OSError as exc:
            self.levels.append(done)
            self.keep(None, f"cannot go back up: {_error(exc)}")
            return False
        st = os.fstat(parent)
        if (st.st_dev, st.st_ino) != parent_ident:
            os.close(parent)
            self.levels.append(done)
            self.keep(None, "moved while it was being removed; stopped")
            return False
        os.close(self.fd)
        self.fd = parent
        if done.kept or not self.remove:
            return True
        try:
            os.rmdir(done.name, dir_fd=self.fd)
        except FileNotFoundError:
            pass
        except OSError as exc:
            self.keep(done.name, _error(exc))
        return True


def _walk(
    parent_fd: int, name: str, *, remove: bool, expect: tuple[int, int] | None = None
) -> Removal:
    removal = Removal()
    st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
    if expect is not None and (st.st_dev, st.st_ino) != expect:
        # Not what was inspected (its holders checked) under this name any more.
        removal.keep(name, "replaced since it was checked; left alone")
        return removal
    if not stat.S_ISDIR(st.st_mode):
        if remove:
            try:
                os.unlink(name, dir_fd=parent_fd)
            except OSError as exc:
                removal.keep(name, _error(exc))
        return removal
    parent_st = os.fstat(parent_fd)
    try:
        top = os.open(name, DIR_FLAGS, dir_fd=parent_fd)
    except OSError as exc:
        removal.keep(name, f"cannot open: {_error(exc)}")
        return removal
    top_st = os.fstat(top)
    if (top_st.st_dev, top_st.st_ino) != (st.st_dev, st.st_ino):
        os.close(top)
        removal.keep(name, "replaced while it was being removed; left alone")
        return removal
    parent_mount = mount_id(parent_fd)
    if top_st.st_dev != parent_st.st_dev or (
        parent_mount is not None and mount_id(top) not in (None, parent_mount)
    ):
        os.close(top)
        removal.keep(name, "a mount point (another filesystem or a bind mount); not entered")
        return removal
    walk = _Walk(parent_st, top, name, removal, remove=remove)
    try:
        walk.empty_current()
        while len(walk.levels) > 1:
            level = walk.levels[-1]
            if level.subdirs:
                if walk.descend(level.subdirs.pop()):
                    walk.empty_current()
                continue
            if not walk.ascend():
                break
    finally:
        os.close(walk.fd)
    return removal


def remove_at(parent_fd: int, name: str, *, expect: tuple[int, int] | None = None) -> Removal:
    """Remove *name* in the directory *parent_fd* and all below it; see the module docstring.

    A file, link or other non-directory is unlinked. *expect*: the (device,
    inode) that was inspected under *name*; anything else there is left alone.
    Returns what was left (empty when *name* is gone); raises only for *name*
    itself not existing.
    """
    return _walk(parent_fd, name, remove=True, expect=expect)


def mounts_at(parent_fd: int, name: str) -> Removal:
    """What a removal of *name* would have to leave for being a mount point (or
    unreadable), found by the same walk without changing anything."""
    return _walk(parent_fd, name, remove=False)


class Leftover(OSError):
    """A tree that could not be removed whole: what stays, and why."""


def remove_whole(parent_fd: int, name: str, *, expect: tuple[int, int] | None = None) -> None:
    """remove_at(), raising Leftover naming what stays."""
    removal = remove_at(parent_fd, name, expect=expect)
    if not removal.complete:
        raise Leftover(f"could not remove all of {name}: {removal.summary()}")


def refuse_mounts_at(parent_fd: int, name: str) -> None:
    """Raise Leftover when the tree *name* holds a mount point (checked before anything
    of it is touched: a model with a mount inside stays whole)."""
    found = mounts_at(parent_fd, name)
    if not found.complete:
        raise Leftover(
            f"{name} holds what ocrd will not remove: {found.summary()}; "
            "unmount it (or fix its permissions) and the next cycle removes the model"
        )


def _in(root: str, name: str, what: Callable[[int, str], None]) -> None:
    fd = os.open(root, DIR_FLAGS)
    try:
        what(fd, name)
    finally:
        os.close(fd)


def remove_path(root: str, name: str) -> None:
    """remove_whole() for *name* in the directory *root* (opened without following a link)."""
    _in(root, name, remove_whole)
