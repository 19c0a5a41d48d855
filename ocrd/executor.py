"""Carry out a plan: the only module that renames, unlinks or removes.

Any plan that changes the disk runs the engine cycle of DESIGN §5:
release the engine -> check handles -> act -> open the engine again.
Release failing means nothing destructive happens (fail closed). Every
target is re-checked right before it is touched; one failed action never
stops the others. Every step is crash-safe: a model is always either under
its name, in `.ocrd-trash/`, or under a `.ocrd-deleting-*` / `.ocrd-tmp-*`
name that recover() finishes or rolls back at the next start.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import heapq
import json
import os
import secrets
import shutil
import stat
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ocrd import log as logconf
from ocrd import snapshot as snap
from ocrd.engine import Engine
from ocrd.handles import HandleIndex, Holder, build_index
from ocrd.model import (
    Action,
    ActionKind,
    Class,
    Entry,
    Kind,
    Outcome,
    Plan,
    Report,
    ReportKind,
    TrashItem,
)

OWN_PREFIX = ".ocrd-"  # every name ocrd itself makes in the model dir
TMP_PREFIX = OWN_PREFIX + "tmp-"
DELETING_PREFIX = OWN_PREFIX + "deleting-"
RESTORE_MARGIN = 64 * 1024 * 1024  # free space kept beyond the restored file
LISTED = 50  # names per list in a log line

Log = Any  # a structlog bound logger
IndexFn = Callable[[set[int]], HandleIndex]


class ActionError(Exception):
    """An action that could not be carried out, with a reason for the log."""


class Changed(Exception):
    """The target is not what the plan saw: skip it this cycle."""


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Sync:
    """Directory fsyncs, now or batched to the end of a cycle.

    A rename or unlink is atomic whether or not it is flushed: after a power
    loss each model is under one name or the other, never lost. So a cycle
    flushes each touched directory once at its end instead of once per model
    (50,000 fsyncs would dominate a big prune). File data that is about to
    appear under a model's name (restore) is always flushed first.
    """

    def __init__(self, *, batch: bool = False) -> None:
        self.batch = batch
        self.pending: set[str] = set()

    def dir(self, path: str) -> None:
        if self.batch:
            self.pending.add(path)
        else:
            _fsync_dir(path)

    def flush(self) -> None:
        for path in sorted(self.pending):
            with contextlib.suppress(FileNotFoundError):
                _fsync_dir(path)
        self.pending.clear()


NOW_SYNC = Sync()


def _hidden_name(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(8)}"


def _remove_tree(path: str) -> None:
    """Remove a file, link or directory at *path* (never following a symlink)."""
    st = os.lstat(path)
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def _trash_dir(root: str) -> str:
    path = os.path.join(root, snap.TRASH)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        os.mkdir(path, 0o700)
        _fsync_dir(root)
        return path
    if not stat.S_ISDIR(st.st_mode):
        raise ActionError(f"{path} is not a directory; refusing to quarantine into it")
    return path


def _write_json(path: str, data: dict[str, Any]) -> None:
    """Write *path* durably: a flushed temp file renamed over it."""
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(json.dumps(data))  # dumps: CPython's C encoder; dump() streams in Python
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def check_unchanged(root: str, entry: Entry, *, dir_fd: int | None = None) -> None:
    """Raise Changed unless the entry still looks as it did in the snapshot.

    With *dir_fd* (the model dir, open) the entry is looked up relative to it.
    """
    try:
        st = os.lstat(entry.name if dir_fd is not None else f"{root}/{entry.name}", dir_fd=dir_fd)
    except FileNotFoundError:
        raise Changed("vanished since the scan") from None
    if (
        entry.kind is Kind.FILE
        and st.st_ino == entry.inode
        and st.st_mtime_ns == entry.mtime_ns
        and st.st_size == entry.size
        and stat.S_ISREG(st.st_mode)
    ):
        return  # the common case, a plain file as scanned: one test, no name lookups
    path = f"{root}/{entry.name}"  # names never hold "/"
    if snap.kind_of(st.st_mode) is not entry.kind or st.st_ino != entry.inode:
        raise Changed("replaced since the scan")
    if st.st_mtime_ns != entry.mtime_ns:
        raise Changed("modified since the scan")
    if entry.kind is Kind.FILE and st.st_size != entry.size:
        raise Changed("size changed since the scan")
    if entry.kind is Kind.DIR:
        size, newest = snap.tree_stats(path)
        if size != entry.size or newest != entry.mtime:
            raise Changed("modified since the scan")


class QuarantineBatch:
    """One cycle's quarantine directory, `.ocrd-trash/<id>/`.

    Its record lists every model the cycle may move in and is durable before
    the first one moves, so quarantining a model is then a single rename: a
    model in the directory always has its record, and a listed model that is
    not there simply never moved (or was restored or purged since).
    """

    def __init__(self, root: str, items: list[dict[str, Any]], *, now: float) -> None:
        """*items*: what may move in, each {name, reason, size, sha256} (see record_item)."""
        trash = _trash_dir(root)
        self.id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now)) + "-" + secrets.token_hex(4)
        self.path = os.path.join(trash, self.id)
        self.moved = 0
        os.mkdir(self.path, 0o700)
        try:
            _write_json(
                os.path.join(self.path, snap.RECORD),
                {"version": 2, "trashed_at": now, "items": items},
            )
            _fsync_dir(self.path)
            _fsync_dir(trash)
            self._fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            shutil.rmtree(self.path, ignore_errors=True)  # nothing moved in yet
            raise

    def move(self, root_fd: int, name: str) -> str:
        """Rename *name* from the model dir into the batch; returns its trash id."""
        os.rename(name, name, src_dir_fd=root_fd, dst_dir_fd=self._fd)
        self.moved += 1
        return f"{self.id}/{name}"

    def close(self, root: str, sync: Sync) -> None:
        """Flush the moves (or, if nothing moved, remove the batch again)."""
        os.close(self._fd)
        if self.moved:
            sync.dir(self.path)
        else:
            drop_if_empty(root, self.id)


def record_item(name: str, reason: str, size: int, sha256: str | None) -> dict[str, Any]:
    """One model's line in a quarantine record."""
    return {"name": name, "reason": reason, "size": size, "sha256": sha256}


def quarantine(
    root: str, name: str, *, reason: str, size: int, sha256: str | None, now: float
) -> str:
    """Move root/name into a quarantine batch of its own; returns its trash id."""
    batch = QuarantineBatch(root, [record_item(name, reason, size, sha256)], now=now)
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        item_id = batch.move(root_fd, name)
    finally:
        os.close(root_fd)
        batch.close(root, NOW_SYNC)
    _fsync_dir(root)
    return item_id


def drop_if_empty(root: str, batch_id: str) -> bool:
    """Remove a quarantine batch that holds no model any more (only its record)."""
    path = os.path.join(root, snap.TRASH, batch_id)
    try:
        batch = snap.read_batch(path)
    except FileNotFoundError:
        return False
    if batch.payloads:
        return False
    hidden = os.path.join(root, _hidden_name(DELETING_PREFIX))
    os.rename(path, hidden)
    shutil.rmtree(hidden)
    return True


def delete(root: str, name: str, kind: Kind, *, sync: Sync = NOW_SYNC) -> None:
    """Remove root/name: files and links at once, directories via a hidden name."""
    path = f"{root}/{name}"
    if kind is Kind.DIR:
        hidden = os.path.join(root, _hidden_name(DELETING_PREFIX))
        os.rename(path, hidden)
        _fsync_dir(root)  # out of its name for good before its contents go
        shutil.rmtree(hidden)
    else:
        os.unlink(path)
        sync.dir(root)


def purge(root: str, item_id: str, *, sync: Sync = NOW_SYNC) -> None:
    """Remove one quarantined model for good (a directory is renamed out first).

    The caller drops the batch once it is empty (drop_if_empty).
    """
    batch_id, name = item_id.split("/", 1)
    path = os.path.join(root, snap.TRASH, batch_id, name)
    if stat.S_ISDIR(os.lstat(path).st_mode):
        hidden = os.path.join(root, _hidden_name(DELETING_PREFIX))
        os.rename(path, hidden)
        _fsync_dir(root)
        shutil.rmtree(hidden)
    else:
        os.unlink(path)
        sync.dir(os.path.dirname(path))


def restore_from_trash(root: str, item: TrashItem, *, as_name: str | None = None) -> str:
    """Put a quarantined model back under its name (never over an existing entry)."""
    name = as_name or item.name
    target = os.path.join(root, name)
    if os.path.lexists(target):
        raise ActionError(f"{name!r} already exists in the model dir; move it away first")
    batch_id = item.id.split("/", 1)[0]
    src = os.path.join(root, snap.TRASH, item.id)
    os.rename(src, target)
    _fsync_dir(root)
    drop_if_empty(root, batch_id)
    return name


def _copy_verified(source: str, tmp: str, expected: str | None) -> tuple[int, str]:
    digest = hashlib.sha256()
    src_fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
    try:
        st = os.fstat(src_fd)
        if not stat.S_ISREG(st.st_mode):
            raise ActionError(f"source {source} is not a regular file")
        dst_fd = os.open(
            tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
        try:
            total = 0
            while True:
                chunk = os.read(src_fd, snap.BLOCK)
                if not chunk:
                    break
                digest.update(chunk)
                view = memoryview(chunk)
                while view:
                    written = os.write(dst_fd, view)
                    view = view[written:]
                total += len(chunk)
            os.fchmod(dst_fd, stat.S_IMODE(st.st_mode) & 0o755 | 0o400)
            os.fsync(dst_fd)
        finally:
            os.close(dst_fd)
    finally:
        os.close(src_fd)
    sha = digest.hexdigest()
    if expected is not None and sha != expected:
        raise ActionError(
            f"source {source} has sha256 {sha[:12]}…, not the pinned "
            f"{expected[:12]}…; nothing replaced"
        )
    return total, sha


def restore(root: str, action: Action, *, now: float) -> tuple[int, str, str | None]:
    """Fetch, verify, then put a required model in place: (bytes, sha256, trash id of old)."""
    assert action.source is not None
    size = os.stat(action.source).st_size
    vfs = os.statvfs(root)
    free = vfs.f_bavail * vfs.f_frsize
    if free < size + RESTORE_MARGIN:
        raise ActionError(
            f"not enough free space in the model dir: {free} bytes free, "
            f"{size} + {RESTORE_MARGIN} needed"
        )
    tmp = os.path.join(root, _hidden_name(TMP_PREFIX))
    target = os.path.join(root, action.name)
    old_id = None
    try:
        total, sha = _copy_verified(action.source, tmp, action.sha256)
        _fsync_dir(root)
        if action.entry is not None:
            check_unchanged(root, action.entry)
            old_id = quarantine(
                root,
                action.name,
                reason="corrupt; replaced by restore",
                size=action.entry.size or 0,  # a required model is always looked at
                sha256=action.entry.sha256,
                now=now,
            )
        try:
            os.link(tmp, target)  # atomic and never replaces what appeared meanwhile
        except FileExistsError:
            raise Changed("an entry appeared under this name meanwhile") from None
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK):
                raise
            if os.path.lexists(target):
                raise Changed("an entry appeared under this name meanwhile") from None
            os.rename(tmp, target)
        _fsync_dir(root)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)
    return total, sha, old_id


def recover(root: str, log: Log, *, names: Iterable[str] | None = None) -> list[str]:
    """Finish or roll back what a crash left behind; returns what was cleaned.

    *names*: the model dir's entries if the caller has just listed them (those
    starting with `.ocrd-` are enough).
    """
    cleaned = []
    if names is None:
        with os.scandir(root) as it:
            names = [c.name for c in it]
    prefixes = (TMP_PREFIX, DELETING_PREFIX)
    leftovers = [n for n in names if n.startswith(prefixes)]
    for name in sorted(leftovers):
        try:
            _remove_tree(os.path.join(root, name))
        except FileNotFoundError:
            continue
        except OSError as exc:
            log.error("recovery.failed", path=name, error=str(exc))
            continue
        what = "rolled back" if name.startswith(TMP_PREFIX) else "finished deleting"
        log.info("recovery.removed", path=name, what=what)
        cleaned.append(name)
    trash = os.path.join(root, snap.TRASH)
    try:
        batches = sorted(os.scandir(trash), key=lambda c: c.name)
    except (FileNotFoundError, NotADirectoryError):
        batches = []
    for child in batches:
        if child.name.startswith(".") or not child.is_dir(follow_symlinks=False):
            continue
        where = f"{snap.TRASH}/{child.name}"
        try:
            batch = snap.read_batch(child.path)
        except OSError as exc:
            log.error("recovery.failed", path=where, error=str(exc))
            continue
        unlisted = batch.payloads - set(batch.items or ())
        if unlisted:
            log.warning(
                "recovery.kept",
                path=where,
                unlisted=sorted(unlisted)[:LISTED],
                reason="quarantined entries without a readable record; left for an operator",
            )
            continue
        if batch.payloads:
            continue  # complete: every model in it is in its record
        try:
            drop_if_empty(root, child.name)
        except OSError as exc:
            log.error("recovery.failed", path=where, error=str(exc))
            continue
        log.info(
            "recovery.removed",
            path=where,
            what="quarantine batch without models (none moved, or all restored or purged)",
        )
        cleaned.append(where)
    return cleaned


def _target_path(root: str, action: Action) -> str | None:
    if action.kind is ActionKind.PURGE:
        assert action.trash_id is not None
        return f"{root}/{snap.TRASH}/{action.trash_id}"
    if action.entry is not None:
        return f"{root}/{action.name}"
    return None


@dataclass(slots=True)
class _Result:
    done: list[Action] = field(default_factory=list)
    failed: list[tuple[Action, str]] = field(default_factory=list)
    skipped: list[tuple[Action, str]] = field(default_factory=list)
    busy: list[Report] = field(default_factory=list)

    def outcome(self, engine_error: str | None = None, **extra: int) -> Outcome:
        return Outcome(
            tuple(self.done),
            tuple(self.failed),
            tuple(self.skipped),
            tuple(self.busy),
            engine_error,
            dict(extra),
        )


def _holders_text(holders: Iterable[Holder]) -> str:
    return ", ".join(f"pid {h.pid} ({h.name}, {h.how})" for h in holders)


def _find_holders(
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
            trees[i] = snap.tree_members(path)
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


class _Acting:
    """The state of one apply's action loop: the open model dir, the batch, the syncs."""

    def __init__(self, root: str, *, log: Log, now: float, quarantined: list[Action]) -> None:
        self.root, self.log, self.now = root, log, now
        self.fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.sync = Sync(batch=True)
        self.sync.dir(root)  # whatever the actions do there is flushed once, at the end
        self.quarantined = quarantined  # what the batch record lists
        self.batch: QuarantineBatch | None = None
        self.batch_error: str | None = None  # why this cycle's batch could not be made
        self.emptied: set[str] = set()  # batches a purge took something out of
        self.pruned = logconf.emitter(
            log, "info", "model.pruned", ("model", "reason", "bytes", "dest", "mode")
        )

    def prune(self, action: Action) -> None:
        entry = action.entry
        assert entry is not None
        check_unchanged(self.root, entry, dir_fd=self.fd)
        if action.mode == "delete":
            if entry.kind is Kind.DIR:
                delete(self.root, action.name, entry.kind, sync=self.sync)
            else:
                os.unlink(action.name, dir_fd=self.fd)  # flushed with the dir at the end
            dest = "deleted"
        else:
            if self.batch_error is not None:
                raise ActionError(self.batch_error)
            if self.batch is None:
                listed = [
                    record_item(a.name, a.reason, a.bytes, a.entry.sha256)
                    for a in self.quarantined
                    if a.entry is not None
                ]
                try:
                    self.batch = QuarantineBatch(self.root, listed, now=self.now)
                except (OSError, ActionError) as exc:
                    # Nothing moved; the rest of the cycle's quarantines fail fast, alike.
                    self.batch_error = f"cannot set up the quarantine dir: {exc}"
                    raise ActionError(self.batch_error) from exc
            dest = f"{snap.TRASH}/{self.batch.move(self.fd, action.name)}"
        self.pruned(action.name, action.reason, entry.size, dest, action.mode)

    def purge(self, action: Action) -> None:
        assert action.trash_id is not None
        purge(self.root, action.trash_id, sync=self.sync)
        self.emptied.add(action.trash_id.split("/", 1)[0])
        self.log.info(
            "trash.purged",
            model=action.name,
            reason=action.reason,
            bytes=action.bytes,
            dest="deleted",
            trash_id=action.trash_id,
        )

    def restore(self, action: Action, now: float) -> None:
        total, sha, old_id = restore(self.root, action, now=now)
        self.log.info(
            "model.restored",
            model=action.name,
            reason=action.reason,
            bytes=total,
            sha256=sha,
            source=action.source,
            dest=action.name,
            replaced=(f"{snap.TRASH}/{old_id}" if old_id else None),
        )

    def close(self) -> None:
        """Flush what moved; drop batches left empty. Errors are logged, not raised."""
        try:
            if self.batch is not None:
                self.batch.close(self.root, self.sync)
            for batch_id in sorted(self.emptied):
                drop_if_empty(self.root, batch_id)
            self.sync.flush()
        except OSError as exc:
            self.log.error("trash.cleanup_failed", error=str(exc))
        finally:
            os.close(self.fd)


class _Listing:
    """ocrd's own listing after the actions: what it scanned, minus prunes, plus restores.

    Its count and first names come without a set of every name (100,000 for
    a big model dir); that set is built only to compare with an engine that
    lists models.
    """

    def __init__(self, plan: Plan, result: _Result) -> None:
        self.plan = plan
        self.pruned = {a.name for a in result.done if a.kind is ActionKind.PRUNE}
        restores = [a for a in result.done if a.kind is ActionKind.RESTORE]
        self.restored = {a.name for a in restores}
        # A restore of a missing model adds one; of a corrupt one, replaces it.
        self.count = plan.models - len(self.pruned) + sum(1 for a in restores if a.entry is None)

    def _scanned(self) -> Iterator[str]:
        """The scanned models' names that are still there, in name order."""
        ignored, pruned = Class.IGNORED, self.pruned
        for c in self.plan.classified:  # sorted by name
            if c.entry is not None and c.cls is not ignored and c.name not in pruned:
                yield c.name

    def first(self) -> list[str]:
        """The first LISTED names in order, reading only as far as needed."""
        merged = heapq.merge(self._scanned(), sorted(self.restored))
        out: list[str] = []
        for name in merged:
            if not out or out[-1] != name:  # a corrupt model restored is in both
                out.append(name)
                if len(out) == LISTED:
                    break
        return out

    def names(self) -> set[str]:
        return set(self._scanned()) | self.restored


def _first(names: set[str]) -> list[str]:
    """The first LISTED names in order, without sorting them all."""
    return heapq.nsmallest(LISTED, names)


def _open_and_compare(
    engine: Engine, root: str, *, log: Log, release_ms: float, ours: _Listing
) -> None:
    """Start the engine again and log its view of the models next to ocrd's."""
    started = time.monotonic()
    engine.open(Path(root))
    open_ms = round((time.monotonic() - started) * 1000, 1)
    where = engine.local_path()
    listed = engine.list_local()
    seen = set()
    for path in listed:
        rel = os.path.relpath(path, where) if where else path
        seen.add(rel.split(os.sep, 1)[0])
    if engine.name != "none":
        names = ours.names()
        if seen != names:
            log.warning(
                "engine.listing_differs",
                engine=engine.name,
                only_engine=_first(seen - names),
                only_ocrd=_first(names - seen),
                hint="expected without a licence: the library then lists only its default "
                "model; ocrd's own scan is what it acts on",
            )
    log.info(
        "engine.cycled",
        engine=engine.name,
        pid=getattr(engine, "pid", None),
        release_ms=release_ms,
        open_ms=open_ms,
        local_path=where,
        engine_models=_first(seen),
        engine_count=len(seen),
        ocrd_models=ours.first(),
        ocrd_count=ours.count,
    )


def _run_actions(
    acting: _Acting,
    actions: tuple[Action, ...],
    held: dict[int, list[Holder]],
    result: _Result,
    *,
    clock: Callable[[], float],
    stop: Callable[[], bool] | None,
) -> None:
    """Each action in order; one that fails or is skipped never stops the others."""
    log = acting.log
    done, skipped = result.done.append, result.skipped.append
    prune, purge_kind = ActionKind.PRUNE, ActionKind.PURGE
    for i, action in enumerate(actions):
        if stop is not None and stop():
            log.info(
                "action.skipped",
                model=action.name,
                action=action.kind.value,
                reason="shutting down",
            )
            skipped((action, "shutting down"))
            continue
        if i in held:
            text = _holders_text(held[i])
            log.warning(
                "model.busy",
                model=action.name,
                action=action.kind.value,
                holders=text,
                pids=[h.pid for h in held[i]],
            )
            result.busy.append(Report(ReportKind.BUSY, action.name, f"held by {text}"))
            skipped((action, f"busy: held by {text}"))
            continue
        try:
            if action.kind is prune:
                acting.prune(action)
            elif action.kind is purge_kind:
                acting.purge(action)
            else:
                acting.restore(action, clock())
        except Changed as exc:
            log.warning(
                "model.changed", model=action.name, action=action.kind.value, reason=str(exc)
            )
            skipped((action, str(exc)))
        except (OSError, ActionError) as exc:
            log.error("action.failed", model=action.name, action=action.kind.value, error=str(exc))
            result.failed.append((action, str(exc)))
        else:
            done(action)


def apply(
    plan: Plan,
    *,
    root: Path | str,
    engine: Engine,
    log: Log,
    clock: Callable[[], float] = time.time,
    index: IndexFn | None = None,
    stop: Callable[[], bool] | None = None,
) -> Outcome:
    """Run the engine cycle around *plan*'s actions; see the module docstring."""
    root = str(root)
    result = _Result()
    actions = plan.actions
    if not actions:
        return result.outcome()
    log = log.bind()  # one bound logger for the whole cycle, not one per line

    started = time.monotonic()
    try:
        engine.release()
    except Exception as exc:  # any engine failure means: do nothing destructive
        log.error("engine.release_failed", engine=engine.name, error=str(exc), skipped=len(actions))
        result.skipped.extend((a, "engine release failed") for a in actions)
        return result.outcome(engine_error=f"release failed: {exc}")
    released_ms = round((time.monotonic() - started) * 1000, 1)

    held, handle_index = _find_holders(root, actions, index)
    quarantined = [
        a
        for i, a in enumerate(actions)
        if a.kind is ActionKind.PRUNE and a.mode != "delete" and i not in held
    ]
    try:
        acting = _Acting(root, log=log, now=clock(), quarantined=quarantined)
    except OSError as exc:
        log.error("action.failed", model=root, action="open model dir", error=str(exc))
        result.failed.extend((a, str(exc)) for a in actions)
    else:
        try:
            with logconf.batched():  # 50,000 prune lines: written in blocks, not one by one
                _run_actions(acting, actions, held, result, clock=clock, stop=stop)
        finally:
            acting.close()

    engine_error = None
    try:
        _open_and_compare(
            engine, root, log=log, release_ms=released_ms, ours=_Listing(plan, result)
        )
    except Exception as exc:  # a failing engine is reported, never fatal
        engine_error = f"open failed: {exc}"
        log.error("engine.unavailable", engine=engine.name, error=str(exc))
    return result.outcome(
        engine_error, inspected=handle_index.inspected, processes=handle_index.total
    )
