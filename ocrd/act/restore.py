"""Restore a required model from its source: copy to a hidden name, verify, then put in place.

The copy is flushed and its pin checked before anything under the model's
name changes; a corrupt model is quarantined, never overwritten, and the
new file appears with link(2), which never replaces what appeared meanwhile.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat

from ocrd.act.fs import ActionError, Changed, check_unchanged, hidden_name, rename_noreplace
from ocrd.act.landing import Chaser, copy_into
from ocrd.act.trash import quarantine
from ocrd.act.twophase import Leased, exclusive, lease_holders
from ocrd.core.model import Action
from ocrd.core.names import TMP_PREFIX
from ocrd.observe.hashing import Progress
from ocrd.openfile import NotRegularError, give_to_owner_of, open_regular

RESTORE_MARGIN = 64 * 1024 * 1024  # free space kept beyond the restored file


def _copy_verified(
    source: str, dir_fd: int, tmp: str, expected: str | None, progress: Progress | None
) -> tuple[int, str]:
    """Copy *source* to *tmp* (in *dir_fd*) and hash what landed, in one pass; flushed.

    Returns (bytes, sha256 of the copy); a copy that is not the pin raises.
    """
    try:
        # Non-blocking open, then fstat: a FIFO or a device as the source is refused,
        # never read (a FIFO nobody writes to would hang the cycle with the lock held).
        src_fd = open_regular(source, follow=True)
    except NotRegularError as exc:
        raise ActionError(f"source {exc}; point `source` at the model file itself") from None
    try:
        st = os.fstat(src_fd)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(src_fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        # Read and write: the hash is taken of what landed, read back behind the copy.
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        dst_fd = os.open(tmp, flags, 0o600, dir_fd=dir_fd)
        try:
            with Chaser(dst_fd) as chaser:

                def step(done: int) -> None:
                    if progress is not None:
                        progress(tmp, done, st.st_size)  # may raise: the daemon is stopping

                total = copy_into(src_fd, dst_fd, chaser, step)
                os.fchmod(dst_fd, stat.S_IMODE(st.st_mode) & 0o755 | 0o400)
                give_to_owner_of(dst_fd, os.fstat(dir_fd))
                os.fsync(dst_fd)
                sha, hashed = chaser.finish()
            if hashed != total:
                raise ActionError(f"the copy of {source} was {hashed} bytes, not {total}")
        finally:
            os.close(dst_fd)
    finally:
        os.close(src_fd)
    if expected is not None and sha != expected:
        raise ActionError(
            f"source {source} has sha256 {sha[:12]}…, not the pinned "
            f"{expected[:12]}…; nothing replaced"
        )
    return total, sha


def restore(
    root: str,
    action: Action,
    *,
    now: float,
    dir_fd: int,
    progress: Progress | None = None,
) -> tuple[int, str, str | None]:
    """Fetch, verify, then put a required model in place: (bytes, sha256, trash id of old).

    Everything in the model dir is relative to *dir_fd*; the copy goes to a
    hidden `.ocrd-tmp-*` name that recovery removes after a crash.
    """
    assert action.source is not None
    size = os.stat(action.source).st_size
    vfs = os.fstatvfs(dir_fd)
    free = vfs.f_bavail * vfs.f_frsize
    if free < size + RESTORE_MARGIN:
        raise ActionError(
            f"not enough free space in the model dir: {free} bytes free, "
            f"{size} + {RESTORE_MARGIN} needed"
        )
    tmp = hidden_name(TMP_PREFIX)
    target = action.name
    old_id = None
    try:
        total, sha = _copy_verified(action.source, dir_fd, tmp, action.sha256, progress)
        os.fsync(dir_fd)
        if action.entry is not None:
            check_unchanged(root, action.entry, dir_fd=dir_fd)
            # As for a prune: a lease on the corrupt copy, taken up to now, keeps it.
            ident = (action.entry.device, action.entry.inode)
            try:
                lock_fd = exclusive(dir_fd, action.name, ident)
            except BlockingIOError:
                raise Leased(lease_holders(ident)) from None
            try:
                old_id = quarantine(
                    root,
                    action.name,
                    reason="corrupt; replaced by restore",
                    size=action.entry.size,
                    sha256=action.entry.sha256,
                    now=now,
                    dir_fd=dir_fd,
                )
            finally:
                if lock_fd is not None:
                    os.close(lock_fd)
        try:
            # Atomic, and never replaces what appeared meanwhile.
            os.link(tmp, target, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
        except FileExistsError:
            raise Changed("an entry appeared under this name meanwhile") from None
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK):
                raise
            try:
                rename_noreplace(tmp, target, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            except FileExistsError:
                raise Changed("an entry appeared under this name meanwhile") from None
        os.fsync(dir_fd)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=dir_fd)
    return total, sha, old_id
