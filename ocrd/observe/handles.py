"""Which processes hold files open or mapped: one index per cycle.

Reads /proc/PID/fd (stat of each descriptor's magic link) and /proc/PID/maps
(device and inode columns) of every process this user may inspect. Seeing
another user's descriptors needs the same uid or CAP_SYS_PTRACE; processes we
cannot inspect are counted so the gap is visible. Leases (shared flocks, see
ocrd.lease) come from /proc/locks, which needs no privilege at all.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field

from ocrd.observe.locks import lease_name, read_locks

PROC = "/proc"


@dataclass(frozen=True, slots=True)
class Holder:
    pid: int
    name: str
    how: str  # "fd" | "mmap" | "lease" (pid 0: a lease from another PID namespace)


@dataclass(slots=True)
class HandleIndex:
    """(device, inode) -> the processes holding it; plus how much we could see."""

    holders: dict[tuple[int, int], list[Holder]] = field(default_factory=dict)
    # Mappings by path, for files under the watched roots: on overlayfs
    # /proc/PID/maps shows the lower layer's device, not the one stat() sees.
    paths: dict[str, list[Holder]] = field(default_factory=dict)
    inspected: int = 0
    total: int = 0

    def add(self, key: tuple[int, int], holder: Holder) -> None:
        _add(self.holders.setdefault(key, []), holder)

    def add_path(self, path: str, holder: Holder) -> None:
        _add(self.paths.setdefault(path, []), holder)

    def who(self, keys: set[tuple[int, int]], paths: Iterable[str] = ()) -> list[Holder]:
        """Holders of any of *keys* or *paths*, each process once."""
        out: dict[tuple[int, str], Holder] = {}
        found = [self.holders.get(key, []) for key in keys]
        found += [self.paths.get(path, []) for path in paths]
        for holders in found:
            for holder in holders:
                out.setdefault((holder.pid, holder.how), holder)
        return sorted(out.values(), key=lambda h: (h.pid, h.how))


def _add(found: list[Holder], holder: Holder) -> None:
    if all(h.pid != holder.pid or h.how != holder.how for h in found):
        found.append(holder)


def _comm(pid_dir: str) -> str:
    try:
        with open(os.path.join(pid_dir, "comm"), encoding="utf-8", errors="replace") as fh:
            return fh.read().strip()
    except OSError:
        return "?"


def _scan_fds(pid_dir: str, devices: set[int] | None) -> list[tuple[int, int]]:
    found = []
    fd_dir = os.path.join(pid_dir, "fd")
    with os.scandir(fd_dir) as it:
        for link in it:
            try:
                st = os.stat(link.path)
            except OSError:
                continue  # closed meanwhile, or a socket/pipe we cannot stat
            if devices is None or st.st_dev in devices:
                found.append((st.st_dev, st.st_ino))
    return found


def _scan_maps(
    pid_dir: str, devices: set[int] | None, roots: tuple[str, ...]
) -> tuple[list[tuple[int, int]], list[str]]:
    keys, paths = [], []
    with open(os.path.join(pid_dir, "maps"), encoding="utf-8", errors="replace") as fh:
        for line in fh:
            parts = line.rstrip("\n").split(None, 5)
            if len(parts) < 5 or parts[4] == "0":
                continue
            major, _, minor = parts[3].partition(":")
            try:
                dev = os.makedev(int(major, 16), int(minor, 16))
                ino = int(parts[4])
            except ValueError:
                continue
            if devices is None or dev in devices:
                keys.append((dev, ino))
            if roots and len(parts) == 6:
                path = parts[5].strip()
                if path.endswith(" (deleted)"):
                    path = path[: -len(" (deleted)")]
                if path.startswith(roots):
                    paths.append(path)
    return keys, paths


def build_index(
    devices: set[int] | None = None, *, proc: str = PROC, roots: Iterable[str] = ()
) -> HandleIndex:
    """One pass over every process: descriptors and memory maps on *devices*,
    plus mappings of files below *roots* by path (whatever device maps shows)."""
    prefixes = tuple(os.path.join(str(r), "") for r in roots)
    index = HandleIndex()
    try:
        pids = [p for p in os.listdir(proc) if p.isdigit()]
    except OSError:
        return index
    add_leases(index, devices, proc=proc)
    for pid_text in pids:
        pid_dir = os.path.join(proc, pid_text)
        index.total += 1
        try:
            fds = _scan_fds(pid_dir, devices)
            maps, mapped_paths = _scan_maps(pid_dir, devices, prefixes)
        except FileNotFoundError:
            index.total -= 1  # exited while we looked
            continue
        except OSError:
            continue  # not ours to inspect: counted in total, not in inspected
        index.inspected += 1
        name = _comm(pid_dir)
        pid = int(pid_text)
        for key in fds:
            index.add(key, Holder(pid, name, "fd"))
        for key in maps:
            index.add(key, Holder(pid, name, "mmap"))
        for path in mapped_paths:
            index.add_path(path, Holder(pid, name, "mmap"))
    return index


OTHER_NAMESPACE = "another namespace"


def add_leases(index: HandleIndex, devices: set[int] | None, *, proc: str = PROC) -> None:
    """Every lock on *devices* as a lease holder of its (device, inode)."""
    for lock in read_locks(os.path.join(proc, "locks")):
        if devices is not None and lock.device not in devices:
            continue
        name = lease_name(lock.pid, proc=proc)
        pid = lock.pid if name is not None else 0
        index.add((lock.device, lock.inode), Holder(pid, name or OTHER_NAMESPACE, "lease"))


def visibility(*, proc: str = PROC) -> tuple[int, int]:
    """(processes whose descriptors we may read, all processes): cheap, no stat per fd."""
    inspected = total = 0
    try:
        pids = [p for p in os.listdir(proc) if p.isdigit()]
    except OSError:
        return (0, 0)
    for pid in pids:
        try:
            os.listdir(os.path.join(proc, pid, "fd"))
            with open(os.path.join(proc, pid, "maps"), "rb") as fh:
                fh.read(1)
        except FileNotFoundError:
            continue
        except OSError:
            total += 1
            continue
        total += 1
        inspected += 1
    return (inspected, total)


DELETED = " (deleted)"


@dataclass(frozen=True, slots=True)
class DeletedHeld:
    """A file under the model dir that was deleted but is still open or mapped."""

    path: str  # as the kernel reports it, without " (deleted)"
    pid: int
    name: str
    how: str  # "fd" | "mmap"
    bytes: int  # the disk space it pins (the file's size), 0 when unknown

    def as_dict(self) -> dict[str, str | int]:
        """The row as documented for `list --json` and the status file."""
        return {
            "path": self.path,
            "pid": self.pid,
            "process": self.name,
            "how": self.how,
            "bytes": self.bytes,
        }


def _map_size(pid_dir: str, address: str) -> int:
    """Size of a mapped deleted file, via map_files (needs privilege), else 0."""
    try:
        return os.stat(os.path.join(pid_dir, "map_files", address)).st_size
    except OSError:
        return 0


def deleted_held(root: str, *, proc: str = PROC) -> list[DeletedHeld]:
    """Files below *root* that are deleted yet held open or mapped, one row per process.

    This is how a Linux server silently fills up: unlink succeeds, the space
    comes back only when the last holder lets go.
    """
    prefix = os.path.join(root, "")
    found: dict[tuple[str, int, str], DeletedHeld] = {}
    try:
        pids = [p for p in os.listdir(proc) if p.isdigit()]
    except OSError:
        return []
    for pid_text in pids:
        pid_dir = os.path.join(proc, pid_text)
        pid = int(pid_text)
        rows: list[tuple[str, str, int]] = []
        try:
            with os.scandir(os.path.join(pid_dir, "fd")) as it:
                for link in it:
                    try:
                        target = os.readlink(link.path)
                    except OSError:
                        continue
                    if target.endswith(DELETED) and target.startswith(prefix):
                        try:
                            size = os.stat(link.path).st_size
                        except OSError:
                            size = 0
                        rows.append((target[: -len(DELETED)], "fd", size))
            with open(os.path.join(pid_dir, "maps"), encoding="utf-8", errors="replace") as fh:
                for line in fh:
                    parts = line.rstrip("\n").split(None, 5)
                    if len(parts) == 6:
                        path = parts[5].strip()
                        if path.endswith(DELETED) and path.startswith(prefix):
                            size = _map_size(pid_dir, parts[0])
                            rows.append((path[: -len(DELETED)], "mmap", size))
        except OSError:
            continue
        if not rows:
            continue
        name = _comm(pid_dir)
        for path, how, size in rows:
            key = (path, pid, how)
            old = found.get(key)
            if old is None or size > old.bytes:
                found[key] = DeletedHeld(path, pid, name, how, size)
    return sorted(found.values(), key=lambda d: (d.path, d.pid, d.how))


def pinned_bytes(rows: Iterable[DeletedHeld]) -> int:
    """Disk space pinned by deleted files, each file counted once."""
    sizes: dict[str, int] = {}
    for row in rows:
        sizes[row.path] = max(sizes.get(row.path, 0), row.bytes)
    return sum(sizes.values())
