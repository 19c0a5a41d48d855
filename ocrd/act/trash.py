"""Write the quarantine, `model_dir/.ocrd-trash/`: the only writer of batches and records.

Quarantining is one rename per model into this cycle's batch, whose record
is durable before the first model moves. Restoring renames a model back
(never over an entry), purging removes it for good; a batch left with no
model is dropped. ocrd.observe.trash reads what this writes.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
import time
from typing import Any

from ocrd.act.fs import NOW_SYNC, ActionError, Log, Sync, fsync_dir, hidden_name, write_durably
from ocrd.act.tree import remove_path
from ocrd.act.twophase import Expect, TwoPhase
from ocrd.core.model import TrashItem
from ocrd.core.names import DELETING_PREFIX, RECORD, TRASH
from ocrd.observe.trash import read_batch
from ocrd.openfile import give_to_owner_of


def _trash_dir(root: str) -> str:
    path = os.path.join(root, TRASH)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        os.mkdir(path, 0o700)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            give_to_owner_of(fd, os.stat(root))
        finally:
            os.close(fd)
        fsync_dir(root)
        return path
    if not stat.S_ISDIR(st.st_mode):
        raise ActionError(f"{path} is not a directory; refusing to quarantine into it")
    return path


class QuarantineBatch:
    """One cycle's quarantine directory, `.ocrd-trash/<id>/`.

    Its record lists every model the cycle may move in and is durable before
    the first one moves, so quarantining a model is then a single rename: a
    model in the directory always has its record, and a listed model that is
    not there simply never moved (or was restored or purged since).
    """

    def __init__(self, root: str, items: list[dict[str, Any]], *, now: float) -> None:
        """*items*: what may move in, each {name, reason, size, sha256} (see record_item)."""
        trash = _trash_dir(root)
        self.id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now)) + "-" + secrets.token_hex(4)
        self.path = os.path.join(trash, self.id)
        self.moved = 0
        os.mkdir(self.path, 0o700)
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                give_to_owner_of(fd, os.stat(trash))
            finally:
                os.close(fd)
            write_durably(
                os.path.join(self.path, RECORD),
                {"version": 2, "trashed_at": now, "items": items},
            )
            fsync_dir(self.path)
            fsync_dir(trash)
            self._fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            with contextlib.suppress(OSError):
                remove_path(trash, self.id)  # nothing moved in yet
            raise

    def move(self, root_fd: int, name: str, *, as_name: str | None = None) -> str:
        """Rename *name* from the model dir into the batch (as *as_name*); its trash id."""
        as_name = as_name or name
        os.rename(name, as_name, src_dir_fd=root_fd, dst_dir_fd=self._fd)
        self.moved += 1
        return f"{self.id}/{as_name}"

    def close(self, root: str, sync: Sync) -> None:
        """Flush the moves (or, if nothing moved, remove the batch again)."""
        os.close(self._fd)
        if self.moved:
            sync.dir(self.path)
        else:
            drop_if_empty(root, self.id)


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
) -> str:
    """Move root/name into a quarantine batch of its own (recorded as *as_name*, its
    model's name, when it is under a hidden name now); returns its trash id."""
    listed = record_item(as_name or name, reason, size, sha256)
    batch = QuarantineBatch(root, [listed], now=now)
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        item_id = batch.move(root_fd, name, as_name=as_name)
    finally:
        os.close(root_fd)
        batch.close(root, NOW_SYNC)
    fsync_dir(root)
    return item_id


def drop_if_empty(root: str, batch_id: str) -> bool:
    """Remove a quarantine batch that holds no model any more (only its record)."""
    path = os.path.join(root, TRASH, batch_id)
    try:
        batch = read_batch(path)
    except FileNotFoundError:
        return False
    if batch.payloads:
        return False
    hidden = hidden_name(DELETING_PREFIX)
    os.rename(path, os.path.join(root, hidden))
    remove_path(root, hidden)
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
        self.two.move_out(number, back_fd=fd, name=name, expect=expect)
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
                drop_if_empty(self.two.root, batch_id)
            except OSError as exc:
                self.log.error("trash.cleanup_failed", error=str(exc))
        self.emptied.clear()


def restore_from_trash(root: str, item: TrashItem, *, as_name: str | None = None) -> str:
    """Put a quarantined model back under its name (never over an existing entry)."""
    name = as_name or item.name
    target = os.path.join(root, name)
    if os.path.lexists(target):
        raise ActionError(f"{name!r} already exists in the model dir; move it away first")
    batch_id = item.id.split("/", 1)[0]
    src = os.path.join(root, TRASH, item.id)
    os.rename(src, target)
    fsync_dir(root)
    drop_if_empty(root, batch_id)
    return name
