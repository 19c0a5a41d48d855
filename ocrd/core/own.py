"""Whether ocrd's own names in the model dir are what ocrd made them (pure).

Each of ocrd's names has one shape: `.ocrd-trash` a directory, `.ocrd-lock`
a file, a `.ocrd-tmp-*` a restore's copy (a file), a `.ocrd-deleting-*` a
model on its way out (a file, a directory or a link, which is never
followed), all on the model dir's own filesystem. Anything else under one
of these names was not made by ocrd: the view is suspicious, reported, and
nothing under such a name is followed or destroyed.
"""

from __future__ import annotations

from ocrd.core.model import Kind, Snapshot
from ocrd.core.names import DELETING_PREFIX, LOCK, OWN_PREFIX, TMP_PREFIX, TRASH

_WORDS = {
    Kind.FILE: "a file",
    Kind.DIR: "a directory",
    Kind.SYMLINK: "a symbolic link",
    Kind.OTHER: "a special file (FIFO, socket or device)",
}


def _allowed(name: str) -> tuple[Kind, ...] | None:
    """The kinds ocrd makes under *name*; None for a name that is not one of ocrd's."""
    if name == TRASH:
        return (Kind.DIR,)
    if name == LOCK:
        return (Kind.FILE,)
    if name.startswith(TMP_PREFIX):
        return (Kind.FILE,)
    if name.startswith(DELETING_PREFIX):
        return (Kind.FILE, Kind.DIR, Kind.SYMLINK)
    return None


def own_leftover_problem(name: str, kind: Kind, device: int, dir_device: int) -> str | None:
    """Why the entry *name* (one of ocrd's) is not what ocrd made there, or None."""
    allowed = _allowed(name)
    if allowed is None:
        return None
    if kind not in allowed:
        return f"{name} is {_WORDS[kind]}, which ocrd never makes under that name"
    if kind is Kind.DIR and device != dir_device:
        # Directories only: overlayfs reports a file's device as its lower layer's.
        return f"{name} is on another filesystem than the model dir (a mount point)"
    return None


def own_problems(snapshot: Snapshot) -> list[str]:
    """Every one of ocrd's names in *snapshot* that is not what ocrd made there."""
    found = []
    for entry in snapshot.starting(OWN_PREFIX):
        problem = own_leftover_problem(entry.name, entry.kind, entry.device, snapshot.device)
        if problem is not None:
            found.append(problem)
    return found


def own_reason(problems: list[str]) -> str:
    """The suspicious-view reason for *problems* (see own_problems)."""
    return "ocrd's own names are not what ocrd made: " + "; ".join(problems)
