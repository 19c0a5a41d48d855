"""Quarantine items built by hand, as ocrd (or an older ocrd) writes them.

A v2 batch is `.ocrd-trash/<batch>/` with the models of one cycle and `.ocrd-record.json`
listing them; a legacy (v1) item is `.ocrd-trash/<id>/` with one model and `record.json`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from ocrd.core.names import LEGACY_RECORD, RECORD, TRASH

# A directory model by relative path: a file's bytes, or None for an empty directory.
Tree = Mapping[str, bytes | None]


def write_tree(base: Path, tree: Tree) -> int:
    """Files and empty directories of *tree* under *base* (created); the bytes written."""
    base.mkdir(parents=True, exist_ok=True)
    size = 0
    for rel, data in tree.items():
        path = base / rel
        if data is None:
            path.mkdir(parents=True, exist_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            size += len(data)
    return size


def write_payload(path: Path, data: bytes | Tree) -> int:
    """A file model (bytes) or a directory model (a tree) at *path*; its size in bytes."""
    if isinstance(data, bytes):
        path.write_bytes(data)
        return len(data)
    return write_tree(path, data)


def trash_item(
    root: Path, item_id: str, name: str, data: bytes | Tree, *, trashed_at: float
) -> Path:
    """A legacy (v1) quarantine item: one model and its record.json in a dir of its own."""
    item = root / TRASH / item_id
    item.mkdir(parents=True)
    size = write_payload(item / name, data)
    record = {"name": name, "trashed_at": trashed_at, "reason": "test", "size": size,
              "sha256": None}  # fmt: skip
    (item / LEGACY_RECORD).write_text(json.dumps(record), encoding="utf-8")
    return item


def trash_batch(
    root: Path,
    batch_id: str,
    models: Mapping[str, bytes | Tree],
    *,
    trashed_at: float,
    never_moved: tuple[str, ...] = (),
) -> Path:
    """A v2 quarantine batch: *models* moved in, *never_moved* only listed in its record."""
    batch = root / TRASH / batch_id
    batch.mkdir(parents=True)
    items = [
        {"name": name, "reason": "test", "size": write_payload(batch / name, data), "sha256": None}
        for name, data in models.items()
    ]
    items += [{"name": n, "reason": "test", "size": 1, "sha256": None} for n in never_moved]
    record = {"version": 2, "trashed_at": trashed_at, "items": items}
    (batch / RECORD).write_text(json.dumps(record), encoding="utf-8")
    return batch
