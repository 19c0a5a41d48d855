"""Finish or roll back what a crash left: `.ocrd-tmp-*`, `.ocrd-deleting-*`, empty batches."""

from __future__ import annotations

import os
from collections.abc import Iterable

from ocrd.act.fs import Log, remove_tree
from ocrd.act.trash import drop_if_empty
from ocrd.core.names import DELETING_PREFIX, TMP_PREFIX, TRASH
from ocrd.log import LISTED
from ocrd.observe.trash import read_batch


def recover(root: str, log: Log, *, names: Iterable[str] | None = None) -> list[str]:
    """Finish or roll back what a crash left behind; returns what was cleaned.

    *names*: the model dir's entries if the caller has just listed them (those
    starting with `.ocrd-` are enough).
    """
    cleaned = []
    if names is None:
        with os.scandir(root) as it:
            names = [c.name for c in it]
    prefixes = (TMP_PREFIX, DELETING_PREFIX)
    leftovers = [n for n in names if n.startswith(prefixes)]
    for name in sorted(leftovers):
        try:
            remove_tree(root, name)
        except FileNotFoundError:
            continue
        except OSError as exc:
            log.error("recovery.failed", path=name, error=str(exc))
            continue
        what = "rolled back" if name.startswith(TMP_PREFIX) else "finished deleting"
        log.info("recovery.removed", path=name, what=what)
        cleaned.append(name)
    trash = os.path.join(root, TRASH)
    try:
        batches = sorted(os.scandir(trash), key=lambda c: c.name)
    except (FileNotFoundError, NotADirectoryError):
        batches = []
    for child in batches:
        if child.name.startswith(".") or not child.is_dir(follow_symlinks=False):
            continue
        where = f"{TRASH}/{child.name}"
        try:
            batch = read_batch(child.path)
        except OSError as exc:
            log.error("recovery.failed", path=where, error=str(exc))
            continue
        unlisted = batch.payloads - set(batch.items or ())
        if unlisted:
            log.warning(
                "recovery.kept",
                path=where,
                unlisted=sorted(unlisted)[:LISTED],
                reason="quarantined entries without a readable record; left for an operator",
            )
            continue
        if batch.payloads:
            continue  # complete: every model in it is in its record
        try:
            drop_if_empty(root, child.name)
        except OSError as exc:
            log.error("recovery.failed", path=where, error=str(exc))
            continue
        log.info(
            "recovery.removed",
            path=where,
            what="quarantine batch without models (none moved, or all restored or purged)",
        )
        cleaned.append(where)
    return cleaned
