"""Finish or roll back what a crash left: `.ocrd-tmp-*`, `.ocrd-deleting-*`, empty batches."""

from __future__ import annotations

import os
from collections.abc import Iterable

from ocrd.act.fs import Log
from ocrd.act.holders import holders_text
from ocrd.act.trash import drop_if_empty
from ocrd.act.tree import remove_whole
from ocrd.act.twophase import exclusive
from ocrd.core.names import DELETING_PREFIX, TMP_PREFIX, TRASH
from ocrd.core.own import own_leftover_problem
from ocrd.log import LISTED
from ocrd.observe.handles import build_index
from ocrd.observe.scan import kind_of, tree_members
from ocrd.observe.trash import read_batch, trash_problem
from ocrd.openfile import DIR_FLAGS, borrowed_dir


def _held(
    root: str, dir_fd: int, names: list[str]
) -> tuple[dict[str, str], dict[str, tuple[int, int]]]:
    """Why a leftover must stay for now: a process holds it, it cannot be looked into,
    or it is not what ocrd leaves behind.

    A crash between a delete's phases leaves its target under a hidden name;
    it is not removed under a holder either (fail closed: what cannot be
    inspected is not removed). A `.ocrd-tmp-*` is a restore's copy, a file;
    a `.ocrd-deleting-*` is a model on its way out (a file, a directory or a
    link, never followed); anything else under those names, or on another
    mount, is not ocrd's and is left alone. Also returns the (device, inode)
    inspected under each name: only that may be removed.
    """
    members: dict[str, tuple[set[tuple[int, int]], set[str]]] = {}
    why: dict[str, str] = {}
    tops: dict[str, tuple[int, int]] = {}
    device = os.fstat(dir_fd).st_dev
    for name in names:
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            continue
        except OSError as exc:
            why[name] = f"cannot be inspected ({exc.strerror or exc}); left as it is"
            continue
        tops[name] = (st.st_dev, st.st_ino)
        problem = own_leftover_problem(name, kind_of(st.st_mode), st.st_dev, device)
        if problem is not None:
            why[name] = f"{problem}; left as it is"
            continue
        try:
            members[name] = tree_members(dir_fd, name, root)
        except FileNotFoundError:
            continue
        except OSError as exc:
            why[name] = f"cannot be inspected ({exc.strerror or exc}); left as it is"
    all_keys = {key for keys, _ in members.values() for key in keys}
    all_paths = {path for _, paths in members.values() for path in paths}
    index = build_index(all_keys, paths=all_paths, roots=(root,))
    for name, (keys, paths) in members.items():
        holders = index.who(keys, paths)
        if holders:
            why[name] = f"held by {holders_text(holders)}; removed once nobody holds it"
    return why, tops


def recover(
    root: str,
    log: Log,
    *,
    names: Iterable[str] | None = None,
    dir_fd: int | None = None,
    keep: frozenset[str] = frozenset(),
) -> list[str]:
    """Finish or roll back what a crash left behind; returns what was cleaned.

    *names*: the model dir's entries if the caller has just listed them (those
    starting with `.ocrd-` are enough). *dir_fd*: the model dir as the cycle
    opened it; everything is done relative to it. *keep*: downloads to resume
    (`.ocrd-tmp-dl-*` of models still to be restored from the network).
    """
    with borrowed_dir(root, dir_fd) as fd:
        return _recover(root, fd, log, names, keep)


def _recover(
    root: str, fd: int, log: Log, names: Iterable[str] | None, keep: frozenset[str]
) -> list[str]:
    cleaned = []
    if names is None:
        with os.scandir(fd) as it:
            names = [c.name for c in it]
    prefixes = (TMP_PREFIX, DELETING_PREFIX)
    leftovers = sorted(n for n in names if n.startswith(prefixes) and n not in keep)
    held, tops = _held(root, fd, leftovers) if leftovers else ({}, {})
    for name in leftovers:
        if name in held:
            log.warning("recovery.kept", path=name, reason=held[name])
            continue
        if name not in tops:
            continue  # vanished before it was looked at
        try:
            lock_fd = exclusive(fd, name, tops[name])
        except FileNotFoundError:
            continue
        except BlockingIOError:  # a lease taken since the handle check
            log.warning("recovery.kept", path=name, reason="leased; removed once nobody holds it")
            continue
        except OSError as exc:
            log.error("recovery.failed", path=name, error=f"cannot check it for a lease ({exc})")
            continue
        try:
            remove_whole(fd, name, expect=tops[name])
        except FileNotFoundError:
            continue
        except OSError as exc:
            log.error("recovery.failed", path=name, error=str(exc))
            continue
        finally:
            if lock_fd is not None:
                os.close(lock_fd)
        what = "rolled back" if name.startswith(TMP_PREFIX) else "finished deleting"
        log.info("recovery.removed", path=name, what=what)
        cleaned.append(name)
    problem = trash_problem(root, dir_fd=fd)
    if problem is not None:
        log.warning("recovery.kept", path=TRASH, reason=problem)
        return cleaned
    try:
        trash = os.open(TRASH, DIR_FLAGS, dir_fd=fd)
    except FileNotFoundError:
        return cleaned
    except OSError as exc:
        log.warning("recovery.kept", path=TRASH, reason=f"cannot be opened ({exc.strerror})")
        return cleaned
    try:
        batches = sorted(os.scandir(trash), key=lambda c: c.name)
        for child in batches:
            if child.name.startswith(".") or not child.is_dir(follow_symlinks=False):
                continue
            where = f"{TRASH}/{child.name}"
            try:
                batch = read_batch(os.path.join(root, where), parent_fd=trash)
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
                drop_if_empty(root, child.name, dir_fd=fd)
            except OSError as exc:
                log.error("recovery.failed", path=where, error=str(exc))
                continue
            log.info(
                "recovery.removed",
                path=where,
                what="quarantine batch without models (none moved, or all restored or purged)",
            )
            cleaned.append(where)
    finally:
        os.close(trash)
    return cleaned
