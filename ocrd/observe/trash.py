"""Read the quarantine, `model_dir/.ocrd-trash/`: batches, their records, the items.

One directory per cycle holds the models moved there and one record of them
(see ocrd.act.trash, the only writer). Reading never changes anything; a
record that cannot be read leaves its batch's models unlisted, never lost.
"""

from __future__ import annotations

import json
import operator
import os
import stat
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, NamedTuple

from ocrd.core.model import TrashItem
from ocrd.core.names import LEGACY_RECORD, RECORD, TRASH
from ocrd.openfile import NotRegularError, describe_mode, open_regular

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


def read_batch(path: str) -> Batch:
    """Look at one quarantine directory (raises OSError if it cannot be listed).

    A `record.json` counts as a (v1) record only if it reads as one: in a v2
    directory that lost its own record it may be a model of that name.
    """
    contents = set(os.listdir(path))
    own = {RECORD + ".tmp", LEGACY_RECORD + ".tmp"}
    items = None
    for record in (RECORD, LEGACY_RECORD):
        if record not in contents:
            continue
        items = _read_record(os.path.join(path, record), os.path.basename(path))
        if items is not None or record == RECORD:
            own.add(record)
        break
    return Batch(items, frozenset(contents - own))


def _read_record(path: str, batch_id: str) -> Mapping[str, TrashItem] | None:
    """A record's items by name (None if it cannot be read as one); see _records."""
    try:
        fd = open_regular(path)  # a FIFO or a link named like a record is no record
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


def trash_problem(root: str) -> str | None:
    """Why `root/.ocrd-trash` must not be read or written (None: a real directory, or none).

    A symlink (or anything but a directory) there is never followed: reading or
    purging through it would reach outside the model dir.
    """
    try:
        st = os.lstat(os.path.join(root, TRASH))
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"{TRASH} cannot be inspected ({exc.strerror})"
    if stat.S_ISDIR(st.st_mode):
        return None
    return f"{TRASH} is {describe_mode(st.st_mode)}, not ocrd's quarantine; it is never followed"


def read_trash(root: str) -> tuple[TrashItem, ...]:
    """Quarantined models in `root/.ocrd-trash/`: record entries whose payload is there.

    Nothing when `.ocrd-trash` is not a real directory (see trash_problem).
    """
    trash = os.path.join(root, TRASH)
    items: list[TrashItem] = []
    if trash_problem(root) is not None:
        return ()
    try:
        it = os.scandir(trash)
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return ()  # PermissionError: another user's trash; read-only commands go on without it
    with it:
        for child in it:
            if child.name.startswith(".") or not child.is_dir(follow_symlinks=False):
                continue
            try:
                batch = read_batch(child.path)
            except OSError:
                continue
            if batch.items is not None:
                items.extend(t for name, t in batch.items.items() if name in batch.payloads)
    return tuple(sorted(items, key=_by_time_id))
