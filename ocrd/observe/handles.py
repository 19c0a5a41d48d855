"""Which processes hold files open or mapped: one index per cycle.

Reads /proc/PID/fd (stat of each descriptor's magic link) and /proc/PID/maps
(device and inode columns) of every process this user may inspect. Seeing
another user's descriptors needs the same uid or CAP_SYS_PTRACE; processes we
cannot inspect are counted so the gap is visible. Leases (shared flocks, see
ocrd.lease) come from /proc/locks, which needs no privilege at all.
"""

from __future__ import annotations

import os
import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field

from ocrd.observe.locks import lease_name, read_locks

PROC = "/proc"
DELETED = " (deleted)"  # how the kernel marks a path that was unlinked


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
    _seen: set[tuple[object, int, str]] = field(default_factory=set, repr=False)

    def add(self, key: tuple[int, int], holder: Holder) -> None:
        """Record *holder* for *key*, once per (process, way it holds)."""
        if (key, holder.pid, holder.how) not in self._seen:
            self._seen.add((key, holder.pid, holder.how))
            self.holders.setdefault(key, []).append(holder)

    def add_path(self, path: str, holder: Holder) -> None:
        if (path, holder.pid, holder.how) not in self._seen:
            self._seen.add((path, holder.pid, holder.how))
            self.paths.setdefault(path, []).append(holder)

    def who(self, keys: set[tuple[int, int]], paths: Iterable[str] = ()) -> list[Holder]:
        """Holders of any of *keys* or *paths*, each process once."""
        out: dict[tuple[int, str], Holder] = {}
        found = [self.holders.get(key, []) for key in keys]
        found += [self.paths.get(path, []) for path in paths]
        for holders in found:
            for holder in holders:
                out.setdefault((holder.pid, holder.how), holder)
        return sorted(out.values(), key=lambda h: (h.pid, h.how))


class Targets:
    """What one index looks for: files by (device, inode), mappings by path.

    Built once per index; each process's maps text is first tested for the
    targets' inode numbers as bytes (memmem in C), and parsed only on a hit,
    so a process that holds nothing costs a read and a few searches.
    """

    FEW = 32  # up to this many distinct inodes, search for each; beyond, one regex pass

    def __init__(
        self,
        keys: Collection[tuple[int, int]] | None,
        paths: Collection[str] | None = None,
        roots: Iterable[str] = (),
    ) -> None:
        self.keys = None if keys is None else frozenset(keys)
        self.paths = None if paths is None else frozenset(paths)
        self.roots = tuple(os.path.join(str(r), "") for r in roots)
        self.root_needles = tuple(b" " + os.fsencode(r) for r in self.roots)
        inodes = set() if self.keys is None else {ino for _, ino in self.keys}
        self.inodes = frozenset(b"%d" % ino for ino in inodes)
        self.needles = tuple(b" %d " % ino for ino in inodes)

    def wants_fd(self, key: tuple[int, int]) -> bool:
        return self.keys is None or key in self.keys

    def maps_may_hold(self, text: bytes) -> bool:
        """False when *text* (a maps file) cannot mention a target: no parse needed."""
        if self.keys is None:
            return True
        if any(needle in text for needle in self.root_needles):
            return True
        if len(self.needles) <= self.FEW:
            return any(needle in text for needle in self.needles)
        return not self.inodes.isdisjoint(_INODES.findall(text))

    def wants_path(self, path: str) -> bool:
        return path.startswith(self.roots) and (self.paths is None or path in self.paths)


# The inode column of every line of a maps file (start-end perms offset dev inode path).
_INODES = re.compile(rb"^\S+ \S+ \S+ \S+ (\d+)", re.MULTILINE)
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


def _comm(pid_dir: str) -> str:
    try:
        with open(os.path.join(pid_dir, "comm"), encoding="utf-8", errors="replace") as fh:
            return fh.read().strip()
    except OSError:
        return "?"


def _read_all(name: str, dir_fd: int) -> bytes:
    fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 17):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _scan_fds(pid_fd: int, targets: Targets) -> set[tuple[int, int]]:
    """The targets this process has open: one fstatat per descriptor, relative to its fd dir."""
    found = set()
    keys = targets.keys  # one set lookup per descriptor: this loop runs ~70 times a process
    fd_dir = os.open("fd", _DIR, dir_fd=pid_fd)
    try:
        for name in os.listdir(fd_dir):
            try:
                st = os.stat(name, dir_fd=fd_dir)
            except OSError:
                continue  # closed meanwhile, or a socket/pipe we cannot stat
            key = (st.st_dev, st.st_ino)
            if keys is None or key in keys:
                found.add(key)
    finally:
        os.close(fd_dir)
    return found


def _scan_maps(text: bytes, targets: Targets) -> tuple[set[tuple[int, int]], set[str]]:
    """The targets this maps text maps, by (device, inode) and by path under the roots."""
    keys: set[tuple[int, int]] = set()
    paths: set[str] = set()
    for raw in text.splitlines():
        parts = raw.split(None, 5)
        if len(parts) < 5 or parts[4] == b"0":
            continue
        if targets.keys is not None and parts[4] not in targets.inodes and not targets.roots:
            continue
        major, _, minor = parts[3].partition(b":")
        try:
            key = (os.makedev(int(major, 16), int(minor, 16)), int(parts[4]))
        except ValueError:
            continue
        if targets.wants_fd(key):
            keys.add(key)
        if targets.roots and len(parts) == 6:
            path = os.fsdecode(parts[5].strip())
            if path.endswith(DELETED):
                path = path[: -len(DELETED)]
            if targets.wants_path(path):
                paths.add(path)
    return keys, paths


def build_index(
    keys: Collection[tuple[int, int]] | None = None,
    *,
    paths: Collection[str] | None = None,
    proc: str = PROC,
    roots: Iterable[str] = (),
) -> HandleIndex:
    """One pass over every process: who has any of *keys* open, mapped or leased.

    *keys* None indexes every file (tests, diagnostics). Mappings are also
    matched by path below *roots* (all of them, or only *paths*): overlayfs
    shows the lower layer's device in maps. The cost is linear in processes x
    (descriptors + mappings); a process's name is read only when it holds a target.
    """
    targets = Targets(keys, paths, roots)
    index = HandleIndex()
    try:
        pids = [p for p in os.listdir(proc) if p.isdigit()]
    except OSError:
        return index
    add_leases(index, targets, proc=proc)
    for pid_text in pids:
        index.total += 1
        try:
            pid_fd = os.open(os.path.join(proc, pid_text), _DIR)
        except FileNotFoundError:
            index.total -= 1  # exited while we looked
            continue
        except OSError:
            continue
        try:
            fds = _scan_fds(pid_fd, targets)
            text = _read_all("maps", pid_fd)
        except FileNotFoundError:
            index.total -= 1
            continue
        except OSError:
            continue  # not ours to inspect: counted in total, not in inspected
        finally:
            os.close(pid_fd)
        index.inspected += 1
        maps, mapped_paths = _scan_maps(text, targets) if targets.maps_may_hold(text) else ((), ())
        if not (fds or maps or mapped_paths):
            continue
        pid = int(pid_text)
        name = _comm(os.path.join(proc, pid_text))
        for key in fds:
            index.add(key, Holder(pid, name, "fd"))
        for key in maps:
            index.add(key, Holder(pid, name, "mmap"))
        for path in mapped_paths:
            index.add_path(path, Holder(pid, name, "mmap"))
    return index


OTHER_NAMESPACE = "another namespace"


def add_leases(index: HandleIndex, targets: Targets, *, proc: str = PROC) -> None:
    """Every lock on a target as a lease holder of its (device, inode)."""
    for lock in read_locks(os.path.join(proc, "locks")):
        if not targets.wants_fd((lock.device, lock.inode)):
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
