"""Opening a file that must be a regular file, without ever blocking on what it really is.

A path checked with stat() and then opened can be swapped in between; and
opening a FIFO blocks until a writer comes, a device may read forever. So:
open non-blocking (a FIFO then opens at once), look at what was opened with
fstat(), refuse anything but a regular file with an error naming the path,
and only then switch the descriptor back to blocking reads.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import pwd
import stat
from collections.abc import Iterator

from ocrd.core.errors import OcrdError

# A directory of ocrd's, opened for the *at() calls below it: never through a link.
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISLNK, "a symbolic link"),
)


class NotRegularError(OcrdError):
    """A path that must be a regular file is something else."""

    def __init__(self, path: str, kind: str) -> None:
        self.path, self.kind = path, kind
        super().__init__(f"{path} is {kind}, not a regular file")


def describe_mode(mode: int) -> str:
    """What a st_mode is, in words: "a FIFO (named pipe)", "a directory", "a regular file"…"""
    for test, kind in KINDS:
        if test(mode):
            return kind
    return "a regular file" if stat.S_ISREG(mode) else "a special file"


def open_regular(
    path: str | os.PathLike[str],
    *,
    dir_fd: int | None = None,
    follow: bool = False,
    write: bool = False,
) -> int:
    """A descriptor of *path*, which is a regular file (else NotRegularError; OSError as is).

    *follow*: a final symlink is followed (a policy file may be one, as a
    Kubernetes ConfigMap mounts it); else a link is refused (ELOOP surfaces
    as NotRegularError "a symbolic link"). No O_CREAT: create files elsewhere.
    """
    flags = os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY | (os.O_RDWR if write else os.O_RDONLY)
    if not follow:
        flags |= os.O_NOFOLLOW
    shown = os.fspath(path)
    try:
        fd = os.open(path, flags, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP and not follow:  # O_NOFOLLOW met a link
            raise NotRegularError(shown, "a symbolic link") from None
        if exc.errno == errno.ENXIO:  # a FIFO opened to write with no reader, or a socket
            raise NotRegularError(shown, "a FIFO or socket") from None
        raise
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularError(shown, describe_mode(mode))
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_regular(
    path: str | os.PathLike[str],
    *,
    limit: int,
    dir_fd: int | None = None,
    follow: bool = False,
) -> bytes:
    """Up to *limit* + 1 bytes of the regular file *path* (the caller checks the size)."""
    fd = open_regular(path, dir_fd=dir_fd, follow=follow)
    with os.fdopen(fd, "rb") as fh:
        return fh.read(limit + 1)


def owner_name(uid: int) -> str:
    """A user's name for messages ("uid 1234" when it has none)."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def give_to_owner_of(fd: int, directory: os.stat_result) -> None:
    """Make what ocrd just created (open as *fd*) belong to the owner of the directory it
    is in, when ocrd runs as root: a root `ocrd apply` must not leave files the service
    user cannot open. Does nothing for any other user (they cannot chown)."""
    if os.geteuid() != 0:
        return
    st = os.fstat(fd)
    if (st.st_uid, st.st_gid) != (directory.st_uid, directory.st_gid):
        os.fchown(fd, directory.st_uid, directory.st_gid)


def make_dirs(path: str | os.PathLike[str], mode: int = 0o750) -> None:
    """mkdir -p that, as root, gives each directory it creates to the owner of the one
    above it (so a root run leaves nothing the service user cannot enter)."""
    target = os.path.abspath(os.fspath(path))
    missing: list[str] = []
    current = target
    while not os.path.isdir(current):
        missing.append(current)
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, mode)
        except FileExistsError:
            continue
        if os.geteuid() == 0:
            above = os.stat(os.path.dirname(directory))
            os.chown(directory, above.st_uid, above.st_gid, follow_symlinks=False)


def mount_id(fd: int) -> int | None:
    """The id of the mount *fd* lives on (/proc/self/fdinfo), None where the kernel hides it."""
    try:
        with open(f"/proc/self/fdinfo/{fd}", "rb") as fh:
            for line in fh:
                if line.startswith(b"mnt_id:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _owner_near(path: str) -> str | None:
    """The owner of *path*, else of the nearest directory above it that exists."""
    current = path
    while current:
        try:
            return owner_name(os.lstat(current).st_uid)
        except OSError:
            parent = os.path.dirname(current)
            if parent == current:
                return None
            current = parent
    return None


def explain_os_error(exc: OSError) -> str:
    """An OSError as one line for an operator: the path, what went wrong, how to fix it."""
    path = os.fsdecode(exc.filename) if exc.filename is not None else None
    what = exc.strerror or str(exc)
    where = f"{path}: " if path else ""
    code = exc.errno
    if code in (errno.EACCES, errno.EPERM):
        owner = _owner_near(path) if path else None
        who = f"as {owner} (its owner)" if owner else "as its owner"
        fix = f"run ocrd {who} or as root, or fix its permissions"
    elif code == errno.EROFS:
        fix = "the file system is read-only: remount it read-write or point ocrd elsewhere"
    elif code in (errno.ENOSPC, errno.EDQUOT):
        fix = "the file system is full: free some space"
    elif code == errno.ELOOP:
        fix = "it is a symbolic link, which ocrd does not follow there: put the real file there"
    elif code in (errno.ENOTDIR, errno.EISDIR):
        fix = "it is not the kind of file ocrd expects there: move it away"
    elif code == errno.EBUSY:
        fix = "it is a mount point or busy: unmount it, or wait and retry"
    elif code == errno.ENOENT:
        fix = "it does not exist (any more): create it or fix the policy"
    else:
        fix = "check the path and its file system"
    return f"{where}{what}; {fix}"


@contextlib.contextmanager
def borrowed_dir(path: str, dir_fd: int | None) -> Iterator[int]:
    """*dir_fd* when the caller has the directory open (left open), else *path* opened
    for the block (never through a final link) and closed after it."""
    if dir_fd is not None:
        yield dir_fd
        return
    fd = os.open(path, DIR_FLAGS)
    try:
        yield fd
    finally:
        os.close(fd)
