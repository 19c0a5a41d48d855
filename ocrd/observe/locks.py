"""Leases: shared `flock`s on models, read from /proc/locks without privilege.

/proc/locks is world-readable and lists every lock on the host, keyed by
device and inode, whoever holds it (any user, any container sharing the
filesystem). A line reads `1: FLOCK  ADVISORY  READ 1234 fd:01:5678 0 EOF`;
a waiter blocked on a lock is shown as `1: -> FLOCK ...` and holds nothing.
The pid is as this PID namespace sees it: 0 when the holder lives in another
namespace, -1 for an open-file-description lock (no owning process).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

LOCKS = "/proc/locks"
KINDS = frozenset({"FLOCK", "POSIX", "OFDLCK"})  # not LEASE/DELEG: those are NFS/SMB leases


@dataclass(frozen=True, slots=True)
class Lock:
    """One lock held on (device, inode)."""

    kind: str  # FLOCK | POSIX | OFDLCK
    mode: str  # READ (shared) | WRITE (exclusive)
    pid: int  # as this namespace sees it; 0 or -1 when not visible
    device: int
    inode: int


def parse(text: str) -> Iterator[Lock]:
    """The held locks in the text of /proc/locks; waiters and odd lines skipped."""
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 6 or parts[1] == "->":
            continue
        kind, mode, pid_text, ident = parts[1], parts[3], parts[4], parts[5]
        if kind not in KINDS:
            continue
        fields = ident.split(":")
        if len(fields) != 3:
            continue
        try:
            device = os.makedev(int(fields[0], 16), int(fields[1], 16))
            inode = int(fields[2])
            pid = int(pid_text)
        except ValueError:
            continue
        yield Lock(kind, mode, pid, device, inode)


def read_locks(path: str = LOCKS) -> list[Lock]:
    """Every lock on the host now; none when /proc/locks cannot be read."""
    try:
        with open(path, encoding="ascii", errors="replace") as fh:
            return list(parse(fh.read()))
    except OSError:
        return []


EXITED = "exited; a process it started holds the lock on"


def lease_name(pid: int, *, proc: str = "/proc") -> str | None:
    """The process name of a lease holder visible here, else None (another namespace)."""
    if pid <= 0:
        return None
    try:
        with open(os.path.join(proc, str(pid), "comm"), encoding="utf-8", errors="replace") as fh:
            return fh.read().strip() or "?"
    except FileNotFoundError:
        return EXITED  # the kernel named it in our namespace: the taker is gone, not hidden
    except OSError:
        return "?"


@dataclass(frozen=True, slots=True)
class Lease:
    """One lock on a model of the model dir, as `ocrd leases` shows it."""

    model: str
    pid: int  # 0: another PID namespace
    process: str
    mode: str  # shared (a lease) | exclusive
    kind: str  # FLOCK | POSIX | OFDLCK

    def as_dict(self) -> dict[str, str | int]:
        return {
            "model": self.model,
            "pid": self.pid,
            "process": self.process,
            "mode": self.mode,
            "kind": self.kind,
        }


def leases_in(root: str, *, proc: str = "/proc") -> list[Lease]:
    """Every lock on a top-level entry of *root* (a file model, or a directory model's
    directory), by model name then pid. Links are not followed."""
    models: dict[tuple[int, int], str] = {}
    with os.scandir(root) as it:
        for entry in it:
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            models[(st.st_dev, st.st_ino)] = entry.name
    found = []
    for lock in read_locks(os.path.join(proc, "locks")):
        model = models.get((lock.device, lock.inode))
        if model is None:
            continue
        name = lease_name(lock.pid, proc=proc)
        found.append(
            Lease(
                model=model,
                pid=lock.pid if name is not None else 0,
                process=name or "another namespace",
                mode="shared" if lock.mode == "READ" else "exclusive",
                kind=lock.kind,
            )
        )
    return sorted(found, key=lambda x: (x.model, x.pid, x.mode))
