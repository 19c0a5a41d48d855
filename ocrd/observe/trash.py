"""Read the quarantine, `model_dir/.ocrd-trash/`: batches, their records, the items.

One directory per cycle holds the models moved there and one record of them
(see ocrd.act.trash, the only writer). Reading never changes anything; a
record that cannot be read leaves its batch's models unlisted, never lost.
"""

from __future__ import annotations

import errno
import json
import operator
import os
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, NamedTuple

from ocrd.core.model import TrashItem
from ocrd.core.names import LEGACY_RECORD, RECORD, TRASH
from ocrd.openfile import (
    DIR_FLAGS,
    NotRegularError,
    borrowed_dir,
    describe_mode,
    mount_id,
    open_regular,
    owner_name,
)

_by_time_id = operator.attrgetter("trashed_at", "id")


class Batch(NamedTuple):
    """One directory of `.ocrd-trash/`: what its record lists and what is in it."""

    items: Mapping[str, TrashItem] | None  # by model name; None: no readable record
    payloads: frozenset[str]  # entries in the directory other than its record


# Parsed records by path, with the (inode, mtime_ns, size) they were parsed at.
# A record is written once (a new one is a new file), so a parse stays good
# while those match: a 50,000-model batch's 5 MB record is not parsed again
# on every cycle (and twice per cycle: by recovery and by the scan).
_records: dict[str, tuple[tuple[int, int, int], Mapping[str, TrashItem] | None]] = {}


RECORDS_KEPT = 256


def _record_items(batch_id: str, rec: Any) -> dict[str, TrashItem]:
    """The items of a parsed record: v2 (one per cycle) or v1 (one model per directory)."""
    if isinstance(rec, dict) and rec.get("version") == 2:
        at = float(rec["trashed_at"])
        listed = [(str(i["name"]), i) for i in rec["items"]]
    else:
        at = float(rec["trashed_at"])
        listed = [(str(rec["name"]), rec)]
    return {
        name: TrashItem(
            id=f"{batch_id}/{name}",
            name=name,
            trashed_at=at,
            reason=str(i["reason"]),
            size=int(i["size"]),
            sha256=i.get("sha256"),
        )
        for name, i in listed
    }


def read_batch(path: str, *, parent_fd: int | None = None) -> Batch:
    """Look at one quarantine directory (raises OSError if it cannot be listed).

    With *parent_fd* (`.ocrd-trash`, open) the directory is opened relative to
    it, by its last name only; either way a link is never followed into.
    A `record.json` counts as a (v1) record only if it reads as one: in a v2
    directory that lost its own record it may be a model of that name.
    """
    where = os.path.basename(path) if parent_fd is not None else path
    fd = os.open(where, DIR_FLAGS, dir_fd=parent_fd)
    try:
        contents = {entry.name for entry in os.scandir(fd)}
        own = {RECORD + ".tmp", LEGACY_RECORD + ".tmp"}
        items = None
        for record in (RECORD, LEGACY_RECORD):
            if record not in contents:
                continue
            items = _read_record(os.path.join(path, record), os.path.basename(path), fd)
            if items is not None or record == RECORD:
                own.add(record)
            break
    finally:
        os.close(fd)
    return Batch(items, frozenset(contents - own))


def _read_record(path: str, batch_id: str, batch_fd: int) -> Mapping[str, TrashItem] | None:
    """A record's items by name (None if it cannot be read as one); see _records."""
    try:
        # A FIFO or a link named like a record is no record.
        fd = open_regular(os.path.basename(path), dir_fd=batch_fd)
    except (OSError, NotRegularError):
        return None
    with os.fdopen(fd, encoding="utf-8") as fh:
        st = os.fstat(fd)
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        known = _records.get(path)
        if known is not None and known[0] == key:
            return known[1]
        try:
            items: Mapping[str, TrashItem] | None = MappingProxyType(
                _record_items(batch_id, json.load(fh))
            )
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            items = None
    if len(_records) >= RECORDS_KEPT:
        del _records[next(iter(_records))]  # the oldest parse
    _records[path] = (key, items)
    return items


def trash_problem(root: str, *, dir_fd: int | None = None) -> str | None:
    """Why `root/.ocrd-trash` must not be read or written (None: a real directory, or none).

    A symlink (or anything but a directory) there is never followed: reading or
    purging through it would reach outside the model dir; nor is a directory
    on another mount (a bind mount over it, another filesystem).
    """
    with borrowed_dir(root, dir_fd) as fd:
        try:
            trash = os.open(TRASH, DIR_FLAGS, dir_fd=fd)
        except FileNotFoundError:
            return None
        except PermissionError:
            return None  # a real directory, or not: this user cannot tell (look_at_trash)
        except OSError as exc:
            if exc.errno not in (errno.ENOTDIR, errno.ELOOP):
                return f"{TRASH} cannot be inspected ({exc.strerror})"
            try:
                st = os.stat(TRASH, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                return None
            what = describe_mode(st.st_mode)
            return f"{TRASH} is {what}, not ocrd's quarantine; it is never followed"
        try:
            mine, theirs = os.fstat(fd), os.fstat(trash)
            if mine.st_dev != theirs.st_dev or mount_id(trash) not in (None, mount_id(fd)):
                return (
                    f"{TRASH} is a mount point (another filesystem or a bind mount), "
                    "not ocrd's quarantine; it is never followed"
                )
        finally:
            os.close(trash)
        return None


def look_at_trash(
    root: str, *, dir_fd: int | None = None
) -> tuple[tuple[TrashItem, ...], str | None]:
    """The quarantined models (see read_trash), and what this user could not see of the
    quarantine, with the fix, in words for a warning (None: nothing hidden)."""
    try:
        with borrowed_dir(root, dir_fd) as fd:
            return _look(root, fd)
    except OSError as exc:
        return (), f"the model dir cannot be opened ({exc.strerror})"


def _look(root: str, fd: int) -> tuple[tuple[TrashItem, ...], str | None]:
    problem = trash_problem(root, dir_fd=fd)
    if problem is not None:
        return (), f"{problem}; quarantined models are not shown"
    try:
        trash = os.open(TRASH, DIR_FLAGS, dir_fd=fd)
    except FileNotFoundError:
        return (), None
    except OSError as exc:
        owner = _owner_of(fd)
        who = "root" if owner == "root" else f"{owner} (its owner) or root"
        return (), (
            f"{TRASH} cannot be read ({exc.strerror}); quarantined models are not "
            f"shown: run as {who} to see them"
        )
    items: list[TrashItem] = []
    hidden: list[str] = []  # batches (or their records) this user cannot read
    try:
        try:
            listing = list(os.scandir(trash))
        except OSError as exc:
            why = f"{TRASH} cannot be listed ({exc.strerror})"
            return (), f"{why}; quarantined models are not shown"
        base = os.path.join(root, TRASH)
        for child in listing:
            if child.name.startswith(".") or not child.is_dir(follow_symlinks=False):
                continue
            try:
                batch = read_batch(os.path.join(base, child.name), parent_fd=trash)
            except OSError:
                hidden.append(child.name)
                continue
            if batch.items is not None:
                items.extend(t for name, t in batch.items.items() if name in batch.payloads)
            elif batch.payloads:
                hidden.append(child.name)  # models without a readable record
    finally:
        os.close(trash)
    note = None
    if hidden:
        shown = ", ".join(sorted(hidden)[:3]) + (", …" if len(hidden) > 3 else "")
        note = (
            f"{len(hidden)} quarantine batch(es) in {TRASH} cannot be read, or hold models "
            f"without a readable record ({shown}); their models are not shown: run as "
            "their owner or root to see them"
        )
    return tuple(sorted(items, key=_by_time_id)), note


def _owner_of(dir_fd: int) -> str:
    try:
        return owner_name(os.stat(TRASH, dir_fd=dir_fd, follow_symlinks=False).st_uid)
    except OSError:
        return "the model dir's owner"


def read_trash(root: str, *, dir_fd: int | None = None) -> tuple[TrashItem, ...]:
    """Quarantined models in `root/.ocrd-trash/`: record entries whose payload is there.

    Nothing when `.ocrd-trash` is not a real directory on the model dir's mount
    (see trash_problem); every level is opened without following a link.
    """
    return look_at_trash(root, dir_fd=dir_fd)[0]
