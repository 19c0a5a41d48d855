"""Observe a model dir: one read-only pass over its top level.

Sizes and newest mtimes of directory models come from a walk below them
(lstat only, symlinks never followed). sha256 is computed only for pinned
models, streamed in large blocks, and cached by (device, inode, size, mtime_ns)
so an unchanged multi-GB file is read once.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Callable, Mapping
from pathlib import Path

from ocrd import statefile
from ocrd.errors import ModelDirError
from ocrd.model import Entry, Kind, Snapshot, TrashItem

TRASH = ".ocrd-trash"
RECORD = "record.json"
BLOCK = 4 * 1024 * 1024
CACHE_FILE = "hashes.json"

# progress(name, bytes_done, bytes_total)
Progress = Callable[[str, int, int], None]


def kind_of(mode: int) -> Kind:
    if stat.S_ISLNK(mode):
        return Kind.SYMLINK
    if stat.S_ISDIR(mode):
        return Kind.DIR
    if stat.S_ISREG(mode):
        return Kind.FILE
    return Kind.OTHER


def tree_stats(path: str) -> tuple[int, float]:
    """(total bytes, newest mtime) of a directory and everything below it."""
    top = os.lstat(path)
    total, newest = 0, top.st_mtime
    stack = [path]
    while stack:
        current = stack.pop()
        try:
            with os.scandir(current) as it:
                for child in it:
                    try:
                        st = child.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    newest = max(newest, st.st_mtime)
                    if stat.S_ISDIR(st.st_mode):
                        stack.append(child.path)
                    else:
                        total += st.st_size
        except (FileNotFoundError, NotADirectoryError):
            continue
    return total, newest


def tree_members(path: str) -> tuple[set[tuple[int, int]], set[str]]:
    """Every (device, inode) and path at or below *path*, symlinks not followed."""
    top = os.lstat(path)
    keys, paths = {(top.st_dev, top.st_ino)}, {path}
    if not stat.S_ISDIR(top.st_mode):
        return keys, paths
    stack = [path]
    while stack:
        current = stack.pop()
        try:
            with os.scandir(current) as it:
                for child in it:
                    try:
                        st = child.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    keys.add((st.st_dev, st.st_ino))
                    paths.add(child.path)
                    if stat.S_ISDIR(st.st_mode):
                        stack.append(child.path)
        except (FileNotFoundError, NotADirectoryError):
            continue
    return keys, paths


def tree_inodes(path: str) -> set[tuple[int, int]]:
    """Every (device, inode) at or below *path*, symlinks not followed."""
    return tree_members(path)[0]


def sha256_file(path: str, *, name: str = "", progress: Progress | None = None) -> str:
    """Stream *path* through sha256 without following a final symlink."""
    digest = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb", buffering=0) as fh:
        total = os.fstat(fd).st_size
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        buf = bytearray(BLOCK)
        view = memoryview(buf)
        done = 0
        while True:
            n = fh.readinto(buf)
            if not n:
                break
            digest.update(view[:n])
            done += n
            if progress is not None:
                progress(name, done, total)
    return digest.hexdigest()


class HashCache:
    """sha256 by (device, inode, size, mtime_ns), kept as JSON in the state dir."""

    def __init__(self, state_dir: Path | None) -> None:
        self.path = None if state_dir is None else state_dir / CACHE_FILE
        self._data: dict[str, str] = {}
        self._seen: set[str] = set()
        self._dirty = False
        if self.path is not None:
            try:
                with open(self.path, encoding="utf-8") as fh:
                    loaded = json.load(fh)
                if isinstance(loaded, dict) and loaded.get("version") == 1:
                    self._data = {str(k): str(v) for k, v in loaded["hashes"].items()}
            except (OSError, ValueError, KeyError, AttributeError):
                self._data = {}

    @staticmethod
    def key(st: os.stat_result) -> str:
        return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"

    def get(self, st: os.stat_result) -> str | None:
        key = self.key(st)
        self._seen.add(key)
        return self._data.get(key)

    def put(self, st: os.stat_result, sha: str) -> None:
        key = self.key(st)
        self._seen.add(key)
        self._data[key] = sha
        self._dirty = True

    def save(self) -> str | None:
        """Keep the entries used since loading; returns an error text instead of raising."""
        if self.path is None:
            return None
        data = {k: v for k, v in self._data.items() if k in self._seen}
        if not self._dirty and data == self._data:
            return None
        error = statefile.write_json(self.path, {"version": 1, "hashes": data}, mode=0o640)
        if error:
            return error
        self._data, self._dirty = data, False
        return None


def read_trash(root: str) -> tuple[TrashItem, ...]:
    """Complete quarantine items (a record and its payload) in `root/.ocrd-trash/`."""
    trash = os.path.join(root, TRASH)
    items = []
    try:
        it = os.scandir(trash)
    except (FileNotFoundError, NotADirectoryError):
        return ()
    with it:
        for child in it:
            if child.name.startswith(".") or not child.is_dir(follow_symlinks=False):
                continue
            try:
                with open(os.path.join(child.path, RECORD), encoding="utf-8") as fh:
                    rec = json.load(fh)
                item = TrashItem(
                    id=child.name,
                    name=str(rec["name"]),
                    trashed_at=float(rec["trashed_at"]),
                    reason=str(rec["reason"]),
                    size=int(rec["size"]),
                    sha256=rec.get("sha256"),
                )
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if os.path.lexists(os.path.join(child.path, item.name)):
                items.append(item)
    return tuple(sorted(items, key=lambda t: (t.trashed_at, t.id)))


def _entry(
    path: str,
    name: str,
    pins: Mapping[str, str],
    cache: HashCache | None,
    progress: Progress | None,
) -> Entry:
    st = os.lstat(path)
    kind = kind_of(st.st_mode)
    size, mtime = st.st_size, st.st_mtime
    if kind is Kind.DIR and not name.startswith("."):
        size, mtime = tree_stats(path)
    sha = None
    if kind is Kind.FILE and name in pins:
        sha = cache.get(st) if cache is not None else None
        if sha is None:
            try:
                sha = sha256_file(path, name=name, progress=progress)
            except OSError:
                sha = None  # unreadable: reported as corrupt, never trusted
            else:
                after = os.lstat(path)
                if cache is not None and HashCache.key(after) == HashCache.key(st):
                    cache.put(st, sha)
    return Entry(
        name=name,
        kind=kind,
        size=size,
        mtime=mtime,
        inode=st.st_ino,
        device=st.st_dev,
        mtime_ns=st.st_mtime_ns,
        sha256=sha,
    )


def stat_entry(root: str, name: str) -> Entry:
    """One entry of *root*, looked at as scan() would (no hashing)."""
    return _entry(os.path.join(root, name), name, {}, None, None)


def scan(
    root: Path | str,
    *,
    pins: Mapping[str, str] | None = None,
    cache: HashCache | None = None,
    progress: Progress | None = None,
) -> Snapshot:
    """Snapshot of *root*'s top level; hashes the files named in *pins*."""
    root = str(root)
    pins = pins or {}
    try:
        top = os.stat(root)
        if not stat.S_ISDIR(top.st_mode):
            raise ModelDirError(f"model_dir {root} is not a directory")
        it = os.scandir(root)
    except FileNotFoundError:
        raise ModelDirError(
            f"model_dir {root} does not exist; create it or fix model_dir"
        ) from None
    except PermissionError:
        raise ModelDirError(f"model_dir {root} is not readable by this user") from None
    entries = []
    with it:
        for child in it:
            try:
                entries.append(_entry(child.path, child.name, pins, cache, progress))
            except FileNotFoundError:
                continue  # removed while we looked
    return Snapshot(
        root=root,
        device=top.st_dev,
        entries=tuple(sorted(entries, key=lambda e: e.name)),
        trash=read_trash(root),
    )
