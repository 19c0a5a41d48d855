"""Observe a model dir: one read-only pass over its top level.

Sizes and newest mtimes of directory models come from a walk below them
(lstat only, symlinks never followed). sha256 is computed only for pinned
models, streamed in large blocks, and cached by (device, inode, size, mtime_ns)
so an unchanged multi-GB file is read once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import gc
import operator
import os
import stat
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from ocrd.core.errors import ModelDirError
from ocrd.core.model import Entry, Kind, ListedEntry, Snapshot
from ocrd.core.names import OWN_PREFIX as OWN
from ocrd.core.plan import may_act_on
from ocrd.core.policy import Policy
from ocrd.observe.hashing import HashCache, Progress, sha256_file
from ocrd.observe.trash import look_at_trash
from ocrd.observe.walk import Incomplete, below
from ocrd.openfile import NotRegularError

_by_name = operator.attrgetter("name")


def kind_of(mode: int) -> Kind:
    if stat.S_ISLNK(mode):
        return Kind.SYMLINK
    if stat.S_ISDIR(mode):
        return Kind.DIR
    if stat.S_ISREG(mode):
        return Kind.FILE
    return Kind.OTHER


def tree_stats(dir_fd: int, name: str) -> tuple[int, float]:
    """(total bytes, newest mtime) of the directory *name* of *dir_fd* and everything below it.

    Raises Incomplete when part of it cannot be looked into.
    """
    newest = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mtime
    total = 0
    for _, st in below(dir_fd, name):
        newest = max(newest, st.st_mtime)
        if not stat.S_ISDIR(st.st_mode):
            total += st.st_size
    return total, newest


def tree_members(dir_fd: int, name: str, root: str) -> tuple[set[tuple[int, int]], set[str]]:
    """Every (device, inode) and path (under *root*, the path of *dir_fd*) at or below
    *name*, links not followed; raises Incomplete when part of it cannot be looked into."""
    top = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    keys, paths = {(top.st_dev, top.st_ino)}, {f"{root}/{name}"}
    if stat.S_ISDIR(top.st_mode):
        for path, st in below(dir_fd, name):
            keys.add((st.st_dev, st.st_ino))
            paths.add(f"{root}/{path}")
    return keys, paths


# hashed(name, bytes, seconds): a pinned model was hashed (not found in the cache)
Hashed = Callable[[str, int, float], None]


def _sha256(
    dir_fd: int,
    name: str,
    st: os.stat_result,
    cache: HashCache | None,
    progress: Progress | None,
    hashed: Hashed | None,
) -> str | None:
    """The sha256 of the pinned file *name* as lstat saw it (*st*), from the cache or read.

    None when it cannot be read or it is not the file *st* describes from the
    first byte to the last (it changed meanwhile): never trusted then.
    """
    sha = cache.get(st) if cache is not None else None
    if sha is not None:
        return sha
    started = time.monotonic()
    try:
        sha, before, after = sha256_file(name, dir_fd=dir_fd, name=name, progress=progress)
    except (OSError, NotRegularError):
        return None  # unreadable: reported as corrupt, never trusted
    key = HashCache.key(st)
    if HashCache.key(before) != key or HashCache.key(after) != key:
        return None
    if cache is not None:
        cache.put(st, sha)  # remembered at once: a restart never hashes it again
    if hashed is not None:
        hashed(name, st.st_size, time.monotonic() - started)
    return sha


def _entry(
    dir_fd: int,
    name: str,
    st: os.stat_result,
    pins: Mapping[str, str],
    cache: HashCache | None,
    progress: Progress | None,
    hashed: Hashed | None = None,
    unseen: list[str] | None = None,
) -> Entry:
    kind = kind_of(st.st_mode)
    size, mtime = st.st_size, st.st_mtime
    if kind is Kind.DIR and not name.startswith("."):
        try:
            size, mtime = tree_stats(dir_fd, name)
        except Incomplete as exc:
            # Part of it cannot be looked into: its newest mtime is unknown, so it is
            # taken as modified just now (never due for a prune by age).
            mtime = time.time()
            if unseen is not None:
                unseen.append(
                    f"{name}: part of it cannot be looked into ({exc.strerror}); "
                    "taken as modified just now, so it is never pruned by age"
                )
        except FileNotFoundError:
            pass
    sha = None
    if kind is Kind.FILE and name in pins:
        sha = _sha256(dir_fd, name, st, cache, progress, hashed)
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
    fd = open_model_dir(root)
    try:
        return _entry(fd, name, os.stat(name, dir_fd=fd, follow_symlinks=False), {}, None, None)
    finally:
        os.close(fd)


def open_model_dir(root: str) -> int:
    """The model dir, opened for one cycle: every look and every action is relative to it.

    The policy's model_dir has its links resolved when it is loaded; a final
    component that became a link since is never followed.
    """
    try:
        return os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ModelDirError(
            f"model_dir {root} does not exist; create it or fix model_dir"
        ) from None
    except PermissionError:
        raise ModelDirError(f"model_dir {root} is not readable by this user") from None
    except OSError as exc:
        # O_NOFOLLOW|O_DIRECTORY on a link: ENOTDIR (or ELOOP) — say which it is.
        if exc.errno in (errno.ELOOP, errno.ENOTDIR) and os.path.islink(root):
            raise ModelDirError(
                f"model_dir {root} is now a symbolic link, which ocrd never follows there; "
                "point model_dir at the real directory (links in it are resolved when the "
                "policy is loaded: reload it)"
            ) from None
        if exc.errno == errno.ENOTDIR:
            raise ModelDirError(f"model_dir {root} is not a directory") from None
        raise ModelDirError(f"model_dir {root} cannot be opened: {exc.strerror}") from None


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
    dir_fd: int | None = None,
    pins: Mapping[str, str] | None = None,
    cache: HashCache | None = None,
    progress: Progress | None = None,
    hashed: Hashed | None = None,
    examine: Callable[[str], bool] | None = None,
) -> Snapshot:
    """Snapshot of *root*'s top level; hashes the files named in *pins*.

    The directory is listed through one descriptor (*dir_fd*, the cycle's, or
    one opened here) and each entry is looked at with fstatat(2) relative to
    it: no path walk, and plain files (nearly all of them) take a short path.
    With *examine*, only the names it accepts are looked at (a directory model
    is walked below); the others are a ListedEntry, with the kind and inode
    the listing gives and no size or times: a cycle over 100,000 entries need
    not lstat the 50,000 no rule acts on.
    """
    root = str(root)
    pins = pins or {}
    fd = open_model_dir(root) if dir_fd is None else dir_fd
    entries: list[Entry | ListedEntry] = []
    unseen: list[str] = []
    try:
        own = os.fstat(fd)
        device = own.st_dev
        with os.scandir(fd) as it:
            for child in it:
                name = child.name
                try:
                    if examine is not None and not examine(name) and not name.startswith(OWN):
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
                        entry = _entry(fd, name, st, pins, cache, progress, hashed, unseen)
                    entries.append(entry)
                except FileNotFoundError:
                    continue  # removed while we looked
        trash, unreadable = look_at_trash(root, dir_fd=fd)
        if unreadable is not None:
            unseen.append(unreadable)
    except PermissionError:
        raise ModelDirError(f"model_dir {root} is not readable by this user") from None
    finally:
        if dir_fd is None:
            os.close(fd)
    entries.sort(key=_by_name)
    return Snapshot(
        root=root,
        device=device,
        entries=tuple(entries),
        trash=trash,
        inode=own.st_ino,
        unseen=tuple(unseen),
    )


def observe(
    policy: Policy,
    *,
    log: Any,
    dir_fd: int | None = None,
    progress: Progress | None = None,
    full: bool = False,
) -> Snapshot:
    """Scan the model dir, hashing pinned models through the state dir's cache.

    Only entries the policy may act on are looked at closely, unless *full*
    (`ocrd list` shows every entry's size and age). A model hashed (not found
    in the cache) is logged and remembered at once.
    """
    cache = HashCache(policy.state_dir)

    def unwritable(error: str | None) -> None:
        if error:
            log.warning(
                "hashcache.unwritable",
                error=error,
                hint="pinned models are re-hashed every cycle until the state dir is writable",
            )

    def hashed(name: str, size: int, seconds: float) -> None:
        log.info("model.hashed", model=name, bytes=size, duration_ms=round(seconds * 1000, 1))
        unwritable(cache.error)

    snapshot = scan(
        policy.model_dir,
        dir_fd=dir_fd,
        pins=policy.pins(),
        cache=cache,
        progress=progress,
        hashed=hashed,
        examine=None if full else may_act_on(policy),
    )
    if cache.unreadable is not None and policy.pins():
        why = f"{cache.unreadable}; pinned models are hashed again"
        snapshot = dataclasses.replace(snapshot, unseen=(*snapshot.unseen, why))
    unwritable(cache.save())
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
