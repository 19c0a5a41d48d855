"""Who holds each target of a plan: one handle index for all of a cycle's actions."""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable

from ocrd.act.twophase import Moved
from ocrd.core.model import Action, ActionKind, Kind
from ocrd.observe.handles import HandleIndex, Holder, build_index
from ocrd.observe.scan import tree_members

# (keys, paths) -> the index of who holds them; the default is build_index.
IndexFn = Callable[[set[tuple[int, int]], set[str]], HandleIndex]


def holder_text(holder: Holder) -> str:
    """`pid 12 (ocr, fd)`; a lease: `lease, pid 12 (ocr)` or `lease, another namespace`."""
    if holder.how != "lease":
        return f"pid {holder.pid} ({holder.name}, {holder.how})"
    if holder.pid <= 0:
        return f"lease, {holder.name}"
    return f"lease, pid {holder.pid} ({holder.name})"


def holders_text(holders: Iterable[Holder]) -> str:
    return ", ".join(holder_text(h) for h in holders)


def find_holders(
    root: str,
    actions: tuple[Action, ...],
    index: IndexFn | None,
    *,
    dir_fd: int,
    moved: Iterable[Moved] = (),
    skip: Collection[int] = (),
) -> tuple[dict[int, list[Holder]], HandleIndex]:
    """Who holds each action's target (by action number): one /proc index for all, built now.

    A target a two-phase delete moved out (*moved*) is looked for by what moved;
    actions in *skip* (deletes that did not move out) are left out.
    """
    groups: dict[int, tuple[set[tuple[int, int]], set[str]]] = {
        m.number: (set(m.keys), set(m.paths)) for m in moved
    }
    for i, action in enumerate(actions):
        if i in groups or i in skip:
            continue
        entry = action.entry
        if entry is not None and entry.kind is not Kind.DIR and action.kind is not ActionKind.PURGE:
            # A file as scanned (nearly every target); if it is another inode by now,
            # the re-check skips it.
            groups[i] = ({(entry.device, entry.inode)}, {f"{root}/{entry.name}"})
            continue
        if entry is None or action.kind is ActionKind.PURGE:
            continue  # a purge is always moved out first (or skipped)
        try:
            groups[i] = tree_members(dir_fd, action.name, root)
        except FileNotFoundError:
            continue
        except OSError:
            # Cannot be looked into whole: not quarantined blind (its re-check fails too).
            continue
    all_keys = {key for keys, _ in groups.values() for key in keys}
    all_paths = {path for _, paths in groups.values() for path in paths}
    if not all_keys:
        handle_index = HandleIndex()
    elif index is None:
        handle_index = build_index(all_keys, paths=all_paths, roots=(root,))
    else:
        handle_index = index(all_keys, all_paths)
    held = {}
    for i, (keys, paths) in groups.items():
        if any(k in handle_index.holders for k in keys) or any(
            p in handle_index.paths for p in paths
        ):
            held[i] = handle_index.who(keys, paths)
    return held, handle_index
