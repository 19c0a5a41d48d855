"""Plain values shared by the core: entries, snapshots, actions, plans.

Immutable values only; nothing here touches the disk or the clock. The
per-entry values (Entry, ListedEntry, Classified, Action, Report, TrashItem)
are NamedTuples: a 100,000-entry model dir builds hundreds of thousands of
them per cycle, and a frozen dataclass costs about four times as much to
create.
"""

from __future__ import annotations

import bisect
import operator
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import NamedTuple


class Kind(str, Enum):
    """What an entry is, as lstat (or the directory listing) tells it; links are not followed."""

    FILE = "file"
    DIR = "dir"
    SYMLINK = "symlink"
    OTHER = "other"


class Entry(NamedTuple):
    """One top-level entry of the model dir, as lstat saw it: what a rule may act on."""

    name: str
    kind: Kind
    size: int  # bytes; a directory counts everything below it, a symlink its length
    mtime: float  # seconds; a directory: the newest mtime inside it
    inode: int
    device: int
    mtime_ns: int  # the entry's own st_mtime_ns, to notice a change before acting
    sha256: str | None = None  # only computed for pinned required models


class ListedEntry(NamedTuple):
    """A top-level entry known from the directory listing alone, never looked at.

    What scan() gives for a name no rule can act on (see its *examine*): its
    name is enough to classify it, so it costs no lstat. The planner refuses
    to act on one; it has no size nor times to decide or re-check with.
    """

    name: str
    kind: Kind
    inode: int
    device: int


class TrashItem(NamedTuple):
    """One quarantined model in `.ocrd-trash/`."""

    id: str  # directory name inside .ocrd-trash
    name: str  # the model's original entry name
    trashed_at: float
    reason: str
    size: int
    sha256: str | None = None


_entry_name = operator.attrgetter("name")


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Observed state of one model dir at one instant; entries sorted by name."""

    root: str
    device: int
    entries: tuple[Entry | ListedEntry, ...] = ()
    trash: tuple[TrashItem, ...] = ()
    inode: int = 0  # with device: which directory this is (0: not known)
    unseen: tuple[str, ...] = ()  # what the scan could not look at, and what that means

    def by_name(self) -> dict[str, Entry | ListedEntry]:
        return {e.name: e for e in self.entries}

    def starting(self, prefix: str) -> list[Entry | ListedEntry]:
        """Entries whose name starts with *prefix*, found by bisection (sorted by name)."""
        start = bisect.bisect_left(self.entries, prefix, key=_entry_name)
        out = []
        for entry in self.entries[start:]:
            if not entry.name.startswith(prefix):
                break
            out.append(entry)
        return out

    def names_starting(self, prefix: str) -> list[str]:
        """Entry names starting with *prefix* (see starting)."""
        return [entry.name for entry in self.starting(prefix)]


class Class(str, Enum):
    """The classes of DESIGN §3, in the order the rule tries them."""

    IGNORED = "ignored"
    REQUIRED = "required"
    ALLOWED = "allowed"
    PRUNE = "prune"
    UNMANAGED = "unmanaged"
    MISSING = "missing"  # a required name with no entry


class Pin(str, Enum):
    """What a required model's sha256 pin says of the entry under its name."""

    NONE = "unpinned"  # no sha256 in the policy: any entry will do
    OK = "ok"  # a file whose sha256 is the pin
    CORRUPT = "corrupt"  # another sha256, none computed, or not a file


class Classified(NamedTuple):
    """An entry (or a missing required name) with the class and the rule that decided it."""

    name: str
    cls: Class
    rule: str
    entry: Entry | ListedEntry | None = None
    pin: Pin = Pin.NONE
    family: str | None = None  # the version family it belongs to (`versions[].match`)
    rank: int = 0  # its place there, 1 = the newest


class ActionKind(str, Enum):
    """What an action does on disk: a model goes, comes back, or leaves the quarantine."""

    PRUNE = "prune"  # into the quarantine, or deleted (prune.action)
    RESTORE = "restore"  # copied from its source, checked against its pin if it has one
    PURGE = "purge"  # a quarantined model deleted for good


class Action(NamedTuple):
    """One change on disk, with the rule and a human reason."""

    kind: ActionKind
    name: str
    reason: str
    rule: str
    bytes: int = 0
    entry: Entry | None = None  # what the target looked like when planned (None: absent)
    mode: str = ""  # prune: quarantine | delete
    source: str | None = None  # restore: where from (the first of sources)
    sha256: str | None = None  # restore: the pin to verify
    trash_id: str | None = None  # purge: which trash item
    sources: tuple[str, ...] = ()  # restore: every source, in the order to try


class ReportKind(str, Enum):
    """What a report tells an operator about a model; none of them changes the disk."""

    MISSING = "missing"
    CORRUPT = "corrupt"
    UNMANAGED = "unmanaged"
    WAITING = "waiting"
    DEFERRED = "deferred"  # over max_per_cycle: next cycle
    REFUSED = "refused"  # over max_fraction: no prune this cycle
    SUSPENDED = "suspended"  # suspend: true turned an action into a report
    BUSY = "busy"
    HELD = "held"  # the daemon holds it back: flapping, or retrying with backoff


class Report(NamedTuple):
    """Something an operator should know about that changes nothing on disk."""

    kind: ReportKind
    name: str
    reason: str


def freed(actions: Iterable[Action]) -> int:
    """Bytes that *actions* free: prunes and purges; a restore frees nothing."""
    return sum(a.bytes for a in actions if a.kind is not ActionKind.RESTORE)


@dataclass(frozen=True, slots=True)
class Plan:
    """What apply would do, and what it only reports."""

    actions: tuple[Action, ...] = ()
    reports: tuple[Report, ...] = ()
    classified: tuple[Classified, ...] = ()
    errors: tuple[str, ...] = ()
    suspended: bool = False
    models: int = 0  # entries that are models: everything scanned and not ignored

    @property
    def bytes_freed(self) -> int:
        """What the planned actions would free (a restore frees nothing)."""
        return freed(self.actions)

    @property
    def changes_disk(self) -> bool:
        return bool(self.actions)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one executed plan did."""

    done: tuple[Action, ...] = ()
    failed: tuple[tuple[Action, str], ...] = ()
    skipped: tuple[tuple[Action, str], ...] = ()
    busy: tuple[Report, ...] = ()
    engine_error: str | None = None
    extra: dict[str, int] = field(default_factory=dict)

    @property
    def bytes_freed(self) -> int:
        """What the actions done freed (a restore frees nothing)."""
        return freed(self.done)

    @property
    def ok(self) -> bool:
        return not self.failed and self.engine_error is None
