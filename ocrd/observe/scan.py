"""Observe a model dir: one read-only pass over its top level.

Sizes and newest mtimes of directory models come from a walk below them
(lstat only, symlinks never followed). sha256 is computed only for pinned
models, streamed in large blocks, and cached by (device, inode, size, mtime_ns)
so an unchanged multi-GB file is read once.
"""

from __future__ import annotations

import contextlib
import gc
import operator
import os
import stat
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from ocrd.core.errors import ModelDirError
from ocrd.core.model import Entry, Kind, ListedEntry, Snapshot
from ocrd.core.plan import may_act_on
from ocrd.core.policy import Policy
from ocrd.observe.hashing import HashCache, Progress, sha256_file
from ocrd.observe.trash import read_trash

_by_name = operator.attrgetter("name")


def kind_of(mode: int) -> Kind:
    if stat.S_ISLNK(mode):
        return Kind.SYMLINK
    if stat.S_ISDIR(mode):
        return Kind.DIR
    if stat.S_ISREG(mode):
        return Kind.FILE
    return Kind.OTHER


def _below(path: str) -> Iterator[tuple[str, os.stat_result]]:
    """(path, lstat) of everything below the directory *path*, symlinks not followed.

    What vanishes during the walk is passed over; a *path* that is no
    directory has nothing below it.
    """
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
                    yield child.path, st
                    if stat.S_ISDIR(st.st_mode):
                        stack.append(child.path)
        except (FileNotFoundError, NotADirectoryError):
            continue


def tree_stats(path: str) -> tuple[int, float]:
    """(total bytes, newest mtime) of a directory and everything below it."""
    newest = os.lstat(path).st_mtime
    total = 0
    for _, st in _below(path):
        newest = max(newest, st.st_mtime)
        if not stat.S_ISDIR(st.st_mode):
            total += st.st_size
    return total, newest


def tree_members(path: str) -> tuple[set[tuple[int, int]], set[str]]:
    """Every (device, inode) and path at or below *path*, symlinks not followed."""
    top = os.lstat(path)
    keys, paths = {(top.st_dev, top.st_ino)}, {path}
    if stat.S_ISDIR(top.st_mode):
        for below, st in _below(path):
            keys.add((st.st_dev, st.st_ino))
            paths.add(below)
    return keys, paths


def _entry(
    path: str,
    name: str,
    st: os.stat_result,
    pins: Mapping[str, str],
    cache: HashCache | None,
    progress: Progress | None,
) -> Entry:
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
    path = os.path.join(root, name)
    return _entry(path, name, os.lstat(path), {}, None, None)


def _open_dir(root: str) -> int:
    try:
        return os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ModelDirError(
            f"model_dir {root} does not exist; create it or fix model_dir"
        ) from None
    except NotADirectoryError:
        raise ModelDirError(f"model_dir {root} is not a directory") from None
    except PermissionError:
        raise ModelDirError(f"model_dir {root} is not readable by this user") from None


def _kind_listed(child: os.DirEntry[str]) -> Kind:
    """An entry's kind from the directory listing (no lstat where the file system says)."""
    if child.is_file(follow_symlinks=False):
        return Kind.FILE
    if child.is_dir(follow_symlinks=False):
        return Kind.DIR
    if child.is_symlink():
        return Kind.SYMLINK
    return Kind.OTHER


def scan(
    root: Path | str,
    *,
    pins: Mapping[str, str] | None = None,
    cache: HashCache | None = None,
    progress: Progress | None = None,
    examine: Callable[[str], bool] | None = None,
) -> Snapshot:
    """Snapshot of *root*'s top level; hashes the files named in *pins*.

    The directory is listed through one descriptor and each entry is looked
    at with fstatat(2) relative to it: no path walk, and plain files (nearly
    all of them) take a short path. With *examine*, only the names it accepts
    are looked at (a directory model is walked below); the others are a
    ListedEntry, with the kind and inode the listing gives and no size or
    times: a cycle over 100,000 entries need not lstat the 50,000 no rule
    acts on.
    """
    root = str(root)
    pins = pins or {}
    fd = _open_dir(root)
    entries: list[Entry | ListedEntry] = []
    try:
        device = os.fstat(fd).st_dev
        with os.scandir(fd) as it:
            for child in it:
                name = child.name
                try:
                    if examine is not None and not examine(name):
                        listed = ListedEntry(
                            name=name, kind=_kind_listed(child), inode=child.inode(), device=device
                        )
                        entries.append(listed)
                        continue
                    st = child.stat(follow_symlinks=False)
                    if stat.S_ISREG(st.st_mode) and name not in pins:
                        entry = Entry(
                            name=name,
                            kind=Kind.FILE,
                            size=st.st_size,
                            mtime=st.st_mtime,
                            inode=st.st_ino,
                            device=st.st_dev,
                            mtime_ns=st.st_mtime_ns,
                        )
                    else:
                        entry = _entry(f"{root}/{name}", name, st, pins, cache, progress)
                    entries.append(entry)
                except FileNotFoundError:
                    continue  # removed while we looked
    except PermissionError:
        raise ModelDirError(f"model_dir {root} is not readable by this user") from None
    finally:
        os.close(fd)
    entries.sort(key=_by_name)
    return Snapshot(root=root, device=device, entries=tuple(entries), trash=read_trash(root))


def observe(
    policy: Policy, *, log: Any, progress: Progress | None = None, full: bool = False
) -> Snapshot:
    """Scan the model dir, hashing pinned models through the state dir's cache.

    Only entries the policy may act on are looked at closely, unless *full*
    (`ocrd list` shows every entry's size and age).
    """
    cache = HashCache(policy.state_dir)
    snapshot = scan(
        policy.model_dir,
        pins=policy.pins(),
        cache=cache,
        progress=progress,
        examine=None if full else may_act_on(policy),
    )
    error = cache.save()
    if error:
        log.warning(
            "hashcache.unwritable",
            error=error,
            hint="pinned models are re-hashed every cycle until the state dir is writable",
        )
    return snapshot


@contextlib.contextmanager
def no_gc_pauses() -> Iterator[None]:
    """Hold the cyclic garbage collector for one cycle.

    A cycle over 100,000 entries builds a few hundred thousand small tuples
    and no reference cycles; the collector would walk the growing heap again
    and again (it doubled the time to plan such a dir). Reference counting
    still frees everything; collection resumes when the cycle ends.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        # What the cycle built and still holds goes straight to the oldest
        # generation: re-enabled as is, the first allocation after the cycle
        # would walk every one of those objects in a young-generation pass.
        gc.freeze()
        gc.unfreeze()
        if was_enabled:
            gc.enable()
