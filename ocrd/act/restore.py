"""Restore a required model from its source: fetched to a hidden name, verified, put in place.

The copy or download (ocrd.act.fetching) is flushed and its pin checked
before anything under the model's name changes; a corrupt model is
quarantined, never overwritten, and the new file appears with link(2),
which never replaces what appeared meanwhile.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable

from ocrd.act.fetching import Staged
from ocrd.act.fs import ActionError, Changed, check_unchanged, hidden_name, rename_noreplace
from ocrd.act.trash import quarantine
from ocrd.act.twophase import Leased, exclusive, lease_holders
from ocrd.core.model import Action
from ocrd.core.names import DOWNLOAD_PREFIX, TMP_PREFIX


def restore(
    root: str,
    action: Action,
    *,
    now: float,
    dir_fd: int,
    fetch: Callable[[Action, int], Staged],
) -> tuple[Staged, str | None]:
    """Fetch, verify, then put a required model in place: (what landed, trash id of old).

    *fetch* stages a verified copy under a hidden `.ocrd-tmp-*` name (a copy
    of a local source, or a download; recovery removes one a crash left);
    everything in the model dir is relative to *dir_fd*.
    """
    staged = fetch(action, dir_fd)
    tmp = staged.tmp
    old_id = None
    placed = False
    fd = -1
    try:
        fd = _open_staged(dir_fd, staged)
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
        _place(dir_fd, fd, staged, action.name)
        os.fsync(dir_fd)
        placed = True
    finally:
        if fd != -1:
            os.close(fd)
        # A download that could not be put in place stays for the next cycle (which
        # checks it again instead of fetching it again); a local copy is made anew.
        if placed or not tmp.startswith(DOWNLOAD_PREFIX):
            _forget(dir_fd, staged)
    return staged, old_id


def _open_staged(dir_fd: int, staged: Staged) -> int:
    """The staged file, opened (no link followed, never blocking) and checked to be
    what was verified: from here on it is linked into place through this descriptor,
    so what is under its hidden name later does not matter."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
    try:
        fd = os.open(staged.tmp, flags, dir_fd=dir_fd)
    except OSError as exc:
        raise ActionError(
            f"the verified copy {staged.tmp} is gone ({exc.strerror or exc}): it was made "
            "in a model dir that is not this one any more, or removed; fetched again"
        ) from None
    st = os.fstat(fd)
    if (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) != (
        *staged.ident,
        staged.size,
        staged.mtime_ns,
    ):
        os.close(fd)
        raise ActionError(f"{staged.tmp} changed after it was verified; fetched again")
    return fd


def _place(dir_fd: int, fd: int, staged: Staged, target: str) -> None:
    """Give the verified file (open as *fd*) the model's name: atomic, and never over
    an entry that appeared meanwhile."""
    try:
        # linkat(2) of the descriptor itself (through /proc/self/fd, as for O_TMPFILE):
        # the inode that was verified, whatever its hidden name holds by now.
        os.link(f"/proc/self/fd/{fd}", target, dst_dir_fd=dir_fd, follow_symlinks=True)
        return
    except FileExistsError:
        raise Changed("an entry appeared under this name meanwhile") from None
    except OSError as exc:
        if exc.errno not in (errno.ENOENT, errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK):
            raise
    # No /proc, or a filesystem without hard links: by name, then checked.
    try:
        rename_noreplace(staged.tmp, target, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except FileExistsError:
        raise Changed("an entry appeared under this name meanwhile") from None
    st = os.stat(target, dir_fd=dir_fd, follow_symlinks=False)
    if (st.st_dev, st.st_ino) != staged.ident:  # swapped in between: not ours, away with it
        hidden = hidden_name(TMP_PREFIX)
        rename_noreplace(target, hidden, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        raise ActionError(f"{staged.tmp} was swapped before it was put in place; not used")


def _forget(dir_fd: int, staged: Staged) -> None:
    """The hidden name goes once the model is in place (or could not be put there)."""
    with contextlib.suppress(OSError):
        st = os.stat(staged.tmp, dir_fd=dir_fd, follow_symlinks=False)
        if (st.st_dev, st.st_ino) == staged.ident:
            os.unlink(staged.tmp, dir_fd=dir_fd)
