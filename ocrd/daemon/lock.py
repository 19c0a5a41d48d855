"""One ocrd per model dir: an flock on `model_dir/.ocrd-lock` holding the pid."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from pathlib import Path

from ocrd.core.errors import LockedError
from ocrd.core.names import LOCK
from ocrd.openfile import describe_mode, give_to_owner_of, mount_id, owner_name

FLAGS = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY


def _dir_mount(path: Path) -> int | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return mount_id(fd)
    finally:
        os.close(fd)


class DirLock:
    """Exclusive, non-blocking; released when the process ends, even by SIGKILL.

    The lock file is opened without following a link and without blocking,
    and must be a regular file on the model dir's mount; anything else
    at its name is refused with a message, never used.
    """

    def __init__(self, model_dir: Path) -> None:
        self.path = model_dir / LOCK
        self._fd: int | None = None

    def _refuse(self, why: str, fix: str) -> LockedError:
        return LockedError(f"cannot lock {self.path.parent}: {self.path} {why}; {fix}")

    def _owner_fix(self) -> str:
        """Who should run ocrd here, or what to change, for a lock this user cannot open."""
        try:
            dir_owner = os.stat(self.path.parent).st_uid
        except OSError:
            return "check the permissions of the model dir"
        if os.geteuid() != dir_owner:
            return f"run ocrd as {owner_name(dir_owner)}, who owns the model dir"
        try:
            file_owner = os.lstat(self.path).st_uid
        except OSError:
            return "check the permissions of the model dir"
        return (
            f"it belongs to {owner_name(file_owner)} (an earlier run as that user?): "
            f"remove it, or chown it to {owner_name(dir_owner)}"
        )

    def _open(self) -> int:
        try:
            return os.open(self.path, FLAGS, 0o644)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise self._refuse(
                    "is a symbolic link, not ocrd's lock file",
                    "remove it (ocrd never follows links in the model dir)",
                ) from None
            if exc.errno == errno.EISDIR:
                raise self._refuse("is a directory, not ocrd's lock file", "remove it") from None
            if exc.errno in (errno.EACCES, errno.EPERM):
                why = f"cannot be opened ({exc.strerror})"
                raise self._refuse(why, self._owner_fix()) from None
            why = f"cannot be opened ({exc.strerror})"
            raise self._refuse(why, "check the model dir") from None

    def acquire(self) -> None:
        fd = self._open()
        try:
            st = os.fstat(fd)
            directory = os.stat(self.path.parent)
            if not stat.S_ISREG(st.st_mode):
                what = describe_mode(st.st_mode)
                raise self._refuse(f"is {what}, not ocrd's lock file", "remove it")
            if st.st_nlink != 1:
                # A hard link to a file elsewhere: writing the pid would overwrite it.
                why = f"has {st.st_nlink} names (a hard link to another file)"
                raise self._refuse(why, "remove it (ocrd makes its own)")
            # A file mounted over the name (bind mount) is another mount than the dir's.
            # (Not st_dev: on overlayfs a file and its directory report different ones.)
            dir_mount = _dir_mount(self.path.parent)
            if dir_mount is not None and mount_id(fd) not in (None, dir_mount):
                raise self._refuse("is a mount point", "unmount it")
            give_to_owner_of(fd, directory)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise LockedError(
                f"another ocrd (pid {holder}) is managing {self.path.parent}; stop it first, "
                "or run read-only commands (plan, list) instead"
            ) from None
        except BaseException:
            os.close(fd)
            raise
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
