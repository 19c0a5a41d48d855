"""Write the quarantine, `model_dir/.ocrd-trash/`: the only writer of batches and records.

Quarantining is one rename per model into this cycle's batch, whose record
is durable before the first model moves. Restoring renames a model back
(never over an entry), purging removes it for good; a batch left with no
model is dropped. ocrd.observe.trash reads what this writes.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
import time
from typing import Any

from ocrd.act.fs import (
    NOW_SYNC,
    ActionError,
    Log,
    Sync,
    hidden_name,
    rename_noreplace,
    write_durably,
)
from ocrd.act.tree import remove_whole
from ocrd.act.twophase import Expect, TwoPhase
from ocrd.core.model import TrashItem
from ocrd.core.names import DELETING_PREFIX, RECORD, TRASH
from ocrd.observe.trash import read_batch
from ocrd.openfile import DIR_FLAGS, borrowed_dir, give_to_owner_of, mount_id


def open_trash(root_fd: int, *, create: bool) -> int:
    """`.ocrd-trash`, opened relative to the model dir (made first when *create*).

    It must be a real directory on the model dir's mount: a link, a file or a
    mount point there is never followed nor written into (ActionError).
    FileNotFoundError when there is none and *create* is false.
    """
    try:
        fd = os.open(TRASH, DIR_FLAGS, dir_fd=root_fd)
    except FileNotFoundError:
        if not create:
            raise
        with contextlib.suppress(FileExistsError):
            os.mkdir(TRASH, 0o700, dir_fd=root_fd)
        fd = open_trash(root_fd, create=False)
        try:
            give_to_owner_of(fd, os.fstat(root_fd))
            os.fsync(root_fd)
        except BaseException:
            os.close(fd)
            raise
        return fd
    except OSError as exc:
        if exc.errno in (errno.ENOTDIR, errno.ELOOP):
            raise ActionError(
                f"{TRASH} in the model dir is not a directory (a link or a file); ocrd never "
                "follows or writes into it: move it away"
            ) from None
        raise
    mine, theirs = os.fstat(root_fd), os.fstat(fd)
    if mine.st_dev != theirs.st_dev or mount_id(fd) not in (None, mount_id(root_fd)):
        os.close(fd)
        raise ActionError(
            f"{TRASH} in the model dir is a mount point; ocrd never writes into it: unmount it"
        )
    return fd


class QuarantineBatch:
    """One cycle's quarantine directory, `.ocrd-trash/<id>/`.

    Its record lists every model the cycle may move in and is durable before
    the first one moves, so quarantining a model is then a single rename: a
    model in the directory always has its record, and a listed model that is
    not there simply never moved (or was restored or purged since).
    """

    def __init__(self, root: str, root_fd: int, items: list[dict[str, Any]], *, now: float) -> None:
        """*items*: what may move in, each {name, reason, size, sha256} (see record_item)."""
        self.root, self.root_fd = root, root_fd
        self.id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now)) + "-" + secrets.token_hex(4)
        self.path = os.path.join(root, TRASH, self.id)
        self.moved = 0
        trash = open_trash(root_fd, create=True)
        try:
            os.mkdir(self.id, 0o700, dir_fd=trash)
            try:
                self._fd = os.open(self.id, DIR_FLAGS, dir_fd=trash)
                try:
                    give_to_owner_of(self._fd, os.fstat(trash))
                    write_durably(
                        RECORD, {"version": 2, "trashed_at": now, "items": items}, dir_fd=self._fd
                    )
                    os.fsync(self._fd)
                    os.fsync(trash)
                except BaseException:
                    os.close(self._fd)
                    raise
            except OSError:
                with contextlib.suppress(OSError):
                    remove_whole(trash, self.id)  # nothing moved in yet
                raise
        finally:
            os.close(trash)

    def move(self, root_fd: int, name: str, *, as_name: str | None = None) -> str:
        """Rename *name* from the model dir into the batch (as *as_name*); its trash id."""
        as_name = as_name or name
        os.rename(name, as_name, src_dir_fd=root_fd, dst_dir_fd=self._fd)
        self.moved += 1
        return f"{self.id}/{as_name}"

    def close(self, sync: Sync) -> None:
        """Flush the moves (or, if nothing moved, remove the batch again)."""
        os.close(self._fd)
        if self.moved:
            sync.dir(self.path)
        else:
            drop_if_empty(self.root, self.id, dir_fd=self.root_fd)


def record_item(name: str, reason: str, size: int, sha256: str | None) -> dict[str, Any]:
    """One model's line in a quarantine record."""
    return {"name": name, "reason": reason, "size": size, "sha256": sha256}


def quarantine(
    root: str,
    name: str,
    *,
    reason: str,
    size: int,
    sha256: str | None,
    now: float,
    as_name: str | None = None,
    dir_fd: int | None = None,
) -> str:
    """Move root/name into a quarantine batch of its own (recorded as *as_name*, its
    model's name, when it is under a hidden name now); returns its trash id."""
    listed = record_item(as_name or name, reason, size, sha256)
    with borrowed_dir(root, dir_fd) as fd:
        batch = QuarantineBatch(root, fd, [listed], now=now)
        try:
            item_id = batch.move(fd, name, as_name=as_name)
        finally:
            batch.close(NOW_SYNC)
        os.fsync(fd)
    return item_id


def drop_if_empty(root: str, batch_id: str, *, dir_fd: int | None = None) -> bool:
    """Remove a quarantine batch that holds no model any more (only its record).

    Two-phase like every removal: the batch leaves `.ocrd-trash` under a hidden
    name first and is looked at again there; a model that went in meanwhile
    sends it back instead.
    """
    with borrowed_dir(root, dir_fd) as fd:
        try:
            trash = open_trash(fd, create=False)
        except FileNotFoundError:
            return False
        try:
            try:
                batch = read_batch(os.path.join(root, TRASH, batch_id), parent_fd=trash)
            except FileNotFoundError:
                return False
            if batch.payloads:
                return False
            hidden = hidden_name(DELETING_PREFIX)
            os.rename(batch_id, hidden, src_dir_fd=trash, dst_dir_fd=fd)
            st = os.stat(hidden, dir_fd=fd, follow_symlinks=False)
            if read_batch(os.path.join(root, hidden), parent_fd=fd).payloads:
                rename_noreplace(hidden, batch_id, src_dir_fd=fd, dst_dir_fd=trash)
                return False
        finally:
            os.close(trash)
        remove_whole(fd, hidden, expect=(st.st_dev, st.st_ino))
        return True


class Purger:
    """Purging quarantined models for good, two-phase, then dropping emptied batches.

    The one purge path: the cycle's retention purge and `ocrd trash purge`
    both go through it. Each item is first moved out of its batch under a
    hidden name (TwoPhase); once the caller has built its handle index, each
    is removed, or put back into its batch when a process holds it.
    """

    def __init__(self, two: TwoPhase, *, log: Log) -> None:
        self.two, self.log = two, log
        self.emptied: set[str] = set()  # batches something was taken out of
        self.items: dict[int, str] = {}  # moved-out number -> trash id

    def move_out(self, number: int, item_id: str) -> None:
        """Phase 1 for one item (raises Changed, OSError)."""
        batch_id, name = item_id.split("/", 1)
        fd = self.two.batch_fd(batch_id)
        st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        expect = Expect(st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
        is_dir = stat.S_ISDIR(st.st_mode)
        self.two.move_out(number, back_fd=fd, name=name, expect=expect, is_dir=is_dir)
        self.items[number] = item_id

    def purged(self, number: int, *, model: str, reason: str, size: int) -> None:
        """Log an item phase 3 removed."""
        item_id = self.items.pop(number)
        self.emptied.add(item_id.split("/", 1)[0])
        self.log.info(
            "trash.purged",
            model=model,
            reason=reason,
            bytes=size,
            dest="deleted",
            trash_id=item_id,
        )

    def close(self) -> None:
        """Drop the batches left without models; a failure is logged, recovery retries."""
        for batch_id in sorted(self.emptied):
            try:
                drop_if_empty(self.two.root, batch_id, dir_fd=self.two.root_fd)
            except (OSError, ActionError) as exc:
                self.log.error("trash.cleanup_failed", error=str(exc))
        self.emptied.clear()


def restore_from_trash(
    root: str, item: TrashItem, *, as_name: str | None = None, dir_fd: int | None = None
) -> str:
    """Put a quarantined model back under its name (never over an existing entry)."""
    name = as_name or item.name
    batch_id, inside = item.id.split("/", 1)
    with borrowed_dir(root, dir_fd) as fd:
        trash = open_trash(fd, create=False)
        try:
            batch = os.open(batch_id, DIR_FLAGS, dir_fd=trash)
        finally:
            os.close(trash)
        try:
            rename_noreplace(inside, name, src_dir_fd=batch, dst_dir_fd=fd)
        except FileExistsError:
            raise ActionError(
                f"{name!r} already exists in the model dir; move it away first"
            ) from None
        finally:
            os.close(batch)
        os.fsync(fd)
        # The model is back: a batch that cannot be dropped now is dropped by recovery.
        with contextlib.suppress(OSError, ActionError):
            drop_if_empty(root, batch_id, dir_fd=fd)
    return name
