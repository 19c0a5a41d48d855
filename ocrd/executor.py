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
import json
import os
import secrets
import shutil
import stat
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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

TMP_PREFIX = ".ocrd-tmp-"
DELETING_PREFIX = ".ocrd-deleting-"
RESTORE_MARGIN = 64 * 1024 * 1024  # free space kept beyond the restored file

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
        return path
    if not stat.S_ISDIR(st.st_mode):
        raise ActionError(f"{path} is not a directory; refusing to quarantine into it")
    return path


def _write_json(path: str, data: dict[str, Any], *, durable: bool = True) -> None:
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(data, fh)
        if durable:
            fh.flush()
            os.fsync(fh.fileno())
    os.replace(tmp, path)


def check_unchanged(root: str, entry: Entry) -> None:
    """Raise Changed unless the entry still looks as it did in the snapshot."""
    path = f"{root}/{entry.name}"  # names never hold "/"; join() is slow at 50,000 calls
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise Changed("vanished since the scan") from None
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


def quarantine(
    root: str,
    name: str,
    *,
    reason: str,
    size: int,
    sha256: str | None,
    now: float,
    sync: Sync = NOW_SYNC,
) -> str:
    """Move root/name into .ocrd-trash/<id>/name with a record; returns the id."""
    trash = _trash_dir(root)
    item_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now)) + "-" + secrets.token_hex(4)
    item = os.path.join(trash, item_id)
    os.mkdir(item, 0o700)
    record = {"name": name, "trashed_at": now, "reason": reason, "size": size, "sha256": sha256}
    # A record lost to a power cut leaves a payload without a record: kept, never lost.
    _write_json(os.path.join(item, snap.RECORD), record, durable=not sync.batch)
    os.rename(os.path.join(root, name), os.path.join(item, name))
    # The rename is one journal transaction covering both directories: flushing the
    # trash and the model dir (once per cycle when batched) makes it durable.
    sync.dir(trash)
    sync.dir(root)
    return item_id


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


def purge(root: str, item_id: str) -> None:
    """Remove one quarantine item for good (renamed out of the trash first)."""
    item = os.path.join(root, snap.TRASH, item_id)
    hidden = os.path.join(root, _hidden_name(DELETING_PREFIX))
    os.rename(item, hidden)
    _fsync_dir(root)
    shutil.rmtree(hidden)


def restore_from_trash(root: str, item: TrashItem, *, as_name: str | None = None) -> str:
    """Put a quarantined model back under its name (never over an existing entry)."""
    name = as_name or item.name
    target = os.path.join(root, name)
    if os.path.lexists(target):
        raise ActionError(f"{name!r} already exists in the model dir; move it away first")
    src = os.path.join(root, snap.TRASH, item.id, item.name)
    os.rename(src, target)
    _fsync_dir(root)
    hidden = os.path.join(root, _hidden_name(DELETING_PREFIX))
    os.rename(os.path.join(root, snap.TRASH, item.id), hidden)
    shutil.rmtree(hidden)
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
                size=action.entry.size,
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


def recover(root: str, log: Log) -> list[str]:
    """Finish or roll back what a crash left behind; returns what was cleaned."""
    cleaned = []
    with os.scandir(root) as it:
        leftovers = [c.name for c in it if c.name.startswith((TMP_PREFIX, DELETING_PREFIX))]
    for name in sorted(leftovers):
        try:
            _remove_tree(os.path.join(root, name))
        except OSError as exc:
            log.error("recovery.failed", path=name, error=str(exc))
            continue
        what = "rolled back" if name.startswith(TMP_PREFIX) else "finished deleting"
        log.info("recovery.removed", path=name, what=what)
        cleaned.append(name)
    trash = os.path.join(root, snap.TRASH)
    try:
        items = list(os.scandir(trash))
    except (FileNotFoundError, NotADirectoryError):
        items = []
    for child in items:
        if not child.is_dir(follow_symlinks=False):
            continue
        contents = set(os.listdir(child.path))
        record = os.path.join(child.path, snap.RECORD)
        payload_name = None
        if snap.RECORD in contents:
            try:
                with open(record, encoding="utf-8") as fh:
                    payload_name = str(json.load(fh)["name"])
            except (OSError, ValueError, KeyError, TypeError):
                payload_name = None
        payload = contents - {snap.RECORD, snap.RECORD + ".tmp"}
        if payload_name is not None and payload_name in payload:
            continue  # a complete item
        if payload:
            log.warning(
                "recovery.kept",
                path=f"{snap.TRASH}/{child.name}",
                reason="quarantine item without a readable record; left for an operator",
            )
            continue
        try:
            shutil.rmtree(child.path)
        except OSError as exc:
            log.error("recovery.failed", path=f"{snap.TRASH}/{child.name}", error=str(exc))
            continue
        log.info(
            "recovery.removed",
            path=f"{snap.TRASH}/{child.name}",
            what="incomplete quarantine item (the model never moved)",
        )
        cleaned.append(f"{snap.TRASH}/{child.name}")
    return cleaned


def _target_path(root: str, action: Action) -> str | None:
    if action.kind is ActionKind.PURGE:
        assert action.trash_id is not None
        return f"{root}/{snap.TRASH}/{action.trash_id}/{action.name}"
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


def _act(root: str, action: Action, *, now: float, log: Log, sync: Sync) -> None:
    if action.kind is ActionKind.PRUNE:
        assert action.entry is not None
        check_unchanged(root, action.entry)
        if action.mode == "delete":
            delete(root, action.name, action.entry.kind, sync=sync)
            dest = "deleted"
        else:
            item_id = quarantine(
                root,
                action.name,
                reason=action.reason,
                size=action.entry.size,
                sha256=action.entry.sha256,
                now=now,
                sync=sync,
            )
            dest = f"{snap.TRASH}/{item_id}"
        log.info(
            "model.pruned",
            model=action.name,
            reason=action.reason,
            bytes=action.entry.size,
            dest=dest,
            mode=action.mode,
        )
    elif action.kind is ActionKind.PURGE:
        assert action.trash_id is not None
        purge(root, action.trash_id)
        log.info(
            "trash.purged",
            model=action.name,
            reason=action.reason,
            bytes=action.bytes,
            dest="deleted",
            trash_id=action.trash_id,
        )
    else:
        total, sha, old_id = restore(root, action, now=now)
        log.info(
            "model.restored",
            model=action.name,
            reason=action.reason,
            bytes=total,
            sha256=sha,
            source=action.source,
            dest=action.name,
            replaced=(f"{snap.TRASH}/{old_id}" if old_id else None),
        )


LISTED = 50  # names per list in a log line


def _models_after(plan: Plan, result: _Result) -> list[str]:
    """ocrd's own listing after the actions: what it scanned, minus prunes, plus restores."""
    names = {c.name for c in plan.classified if c.entry is not None and c.cls is not Class.IGNORED}
    for action in result.done:
        if action.kind is ActionKind.PRUNE:
            names.discard(action.name)
        elif action.kind is ActionKind.RESTORE:
            names.add(action.name)
    return sorted(names)


def _open_and_compare(
    engine: Engine, root: str, *, log: Log, release_ms: float, ours: list[str]
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
    if engine.name != "none" and seen != set(ours):
        log.warning(
            "engine.listing_differs",
            engine=engine.name,
            only_engine=sorted(seen - set(ours))[:LISTED],
            only_ocrd=sorted(set(ours) - seen)[:LISTED],
            hint="expected without a licence: the library then lists only its default model; "
            "ocrd's own scan is what it acts on",
        )
    log.info(
        "engine.cycled",
        engine=engine.name,
        pid=getattr(engine, "pid", None),
        release_ms=release_ms,
        open_ms=open_ms,
        local_path=where,
        engine_models=sorted(seen)[:LISTED],
        engine_count=len(seen),
        ocrd_models=ours[:LISTED],
        ocrd_count=len(ours),
    )


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
    if not plan.actions:
        return result.outcome()

    started = time.monotonic()
    try:
        engine.release()
    except Exception as exc:  # any engine failure means: do nothing destructive
        log.error(
            "engine.release_failed", engine=engine.name, error=str(exc), skipped=len(plan.actions)
        )
        result.skipped.extend((a, "engine release failed") for a in plan.actions)
        return result.outcome(engine_error=f"release failed: {exc}")
    released_ms = round((time.monotonic() - started) * 1000, 1)

    targets: dict[int, tuple[set[tuple[int, int]], set[str]]] = {}
    for i, action in enumerate(plan.actions):
        path = _target_path(root, action)
        if path is None:
            continue
        entry = action.entry
        if entry is not None and entry.kind is not Kind.DIR and action.kind is not ActionKind.PURGE:
            # A file as scanned; if it is another inode by now, check_unchanged skips it.
            targets[i] = ({(entry.device, entry.inode)}, {path})
            continue
        try:
            targets[i] = snap.tree_members(path)
        except FileNotFoundError:
            targets[i] = (set(), set())
    devices = {dev for keys, _ in targets.values() for dev, _ in keys}
    if index is None:
        handle_index = build_index(devices, roots=(root,)) if devices else HandleIndex()
    else:
        handle_index = index(devices) if devices else HandleIndex()

    sync = Sync(batch=True)
    for i, action in enumerate(plan.actions):
        if stop is not None and stop():
            log.info(
                "action.skipped",
                model=action.name,
                action=action.kind.value,
                reason="shutting down",
            )
            result.skipped.append((action, "shutting down"))
            continue
        keys, paths = targets.get(i, (set(), set()))
        holders = handle_index.who(keys, paths)
        if holders:
            text = _holders_text(holders)
            log.warning(
                "model.busy",
                model=action.name,
                action=action.kind.value,
                holders=text,
                pids=[h.pid for h in holders],
            )
            result.busy.append(Report(ReportKind.BUSY, action.name, f"held by {text}"))
            result.skipped.append((action, f"busy: held by {text}"))
            continue
        try:
            _act(root, action, now=clock(), log=log, sync=sync)
        except Changed as exc:
            log.warning(
                "model.changed", model=action.name, action=action.kind.value, reason=str(exc)
            )
            result.skipped.append((action, str(exc)))
        except (OSError, ActionError) as exc:
            log.error("action.failed", model=action.name, action=action.kind.value, error=str(exc))
            result.failed.append((action, str(exc)))
        else:
            result.done.append(action)

    sync.flush()
    engine_error = None
    try:
        _open_and_compare(
            engine, root, log=log, release_ms=released_ms, ours=_models_after(plan, result)
        )
    except Exception as exc:  # a failing engine is reported, never fatal
        engine_error = f"open failed: {exc}"
        log.error("engine.unavailable", engine=engine.name, error=str(exc))
    return result.outcome(
        engine_error, inspected=handle_index.inspected, processes=handle_index.total
    )
