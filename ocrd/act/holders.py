"""Who holds each target of a plan: one handle index for all of a cycle's actions."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from ocrd.core.model import Action, ActionKind, Kind
from ocrd.core.names import TRASH
from ocrd.observe.handles import HandleIndex, Holder, build_index
from ocrd.observe.scan import tree_members

IndexFn = Callable[[set[int]], HandleIndex]


def _target_path(root: str, action: Action) -> str | None:
    if action.kind is ActionKind.PURGE:
        assert action.trash_id is not None
        return f"{root}/{TRASH}/{action.trash_id}"
    if action.entry is not None:
        return f"{root}/{action.name}"
    return None


def holders_text(holders: Iterable[Holder]) -> str:
    return ", ".join(f"pid {h.pid} ({h.name}, {h.how})" for h in holders)


def find_holders(
    root: str, actions: tuple[Action, ...], index: IndexFn | None
) -> tuple[dict[int, list[Holder]], HandleIndex]:
    """Who holds each action's target (by action number): one /proc index for all."""
    dir_kind, purge_kind = Kind.DIR, ActionKind.PURGE
    # A file as scanned (nearly every target); if it is another inode by now,
    # check_unchanged skips it.
    files = [
        (i, entry)
        for i, action in enumerate(actions)
        if (entry := action.entry) is not None
        and entry.kind is not dir_kind
        and action.kind is not purge_kind
    ]
    devices = {entry.device for _, entry in files}
    trees: dict[int, tuple[set[tuple[int, int]], set[str]]] = {}
    for i, action in enumerate(actions):
        entry = action.entry
        if entry is not None and entry.kind is not dir_kind and action.kind is not purge_kind:
            continue
        path = _target_path(root, action)
        if path is None:
            continue
        try:
            trees[i] = tree_members(path)
        except FileNotFoundError:
            continue
        devices.update(dev for dev, _ in trees[i][0])
    if not devices:
        handle_index = HandleIndex()
    elif index is None:
        handle_index = build_index(devices, roots=(root,))
    else:
        handle_index = index(devices)
    by_key, by_path = handle_index.holders, handle_index.paths
    held = {}
    for i, entry in files:
        key = (entry.device, entry.inode)
        if key in by_key or (by_path and f"{root}/{entry.name}" in by_path):
            held[i] = handle_index.who({key}, {f"{root}/{entry.name}"})
    for i, (keys, paths) in trees.items():
        holders = handle_index.who(keys, paths)
        if holders:
            held[i] = holders
    return held, handle_index
