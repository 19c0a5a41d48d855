"""Finish or roll back what a crash left: `.ocrd-tmp-*`, `.ocrd-deleting-*`, empty batches."""

from __future__ import annotations

import os
from collections.abc import Iterable

from ocrd.act.fs import Log, remove_tree
from ocrd.act.holders import holders_text
from ocrd.act.trash import drop_if_empty
from ocrd.core.names import DELETING_PREFIX, TMP_PREFIX, TRASH
from ocrd.log import LISTED
from ocrd.observe.handles import build_index
from ocrd.observe.scan import tree_members
from ocrd.observe.trash import read_batch, trash_problem


def _held(root: str, names: list[str]) -> dict[str, str]:
    """Why a leftover must stay for now: a process holds it, or it cannot be looked into.

    A crash between a delete's phases leaves its target under a hidden name;
    it is not removed under a holder either (fail closed: what cannot be
    inspected is not removed).
    """
    members: dict[str, tuple[set[tuple[int, int]], set[str]]] = {}
    why: dict[str, str] = {}
    for name in names:
        try:
            members[name] = tree_members(os.path.join(root, name))
        except FileNotFoundError:
            continue
        except OSError as exc:
            why[name] = f"cannot be inspected ({exc.strerror or exc}); left as it is"
    devices = {dev for keys, _ in members.values() for dev, _ in keys}
    index = build_index(devices, roots=(root,))
    for name, (keys, paths) in members.items():
        holders = index.who(keys, paths)
        if holders:
            why[name] = f"held by {holders_text(holders)}; removed once nobody holds it"
    return why


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
    leftovers = sorted(n for n in names if n.startswith(prefixes))
    held = _held(root, leftovers) if leftovers else {}
    for name in leftovers:
        if name in held:
            log.warning("recovery.kept", path=name, reason=held[name])
            continue
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
    problem = trash_problem(root)
    if problem is not None:
        log.warning("recovery.kept", path=TRASH, reason=problem)
        return cleaned
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
