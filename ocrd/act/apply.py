"""Carry out a plan: the engine cycle around the actions (DESIGN §5).

release the engine -> move every delete's target out of its name (two-phase,
ocrd.act.twophase) -> build the one handle index -> restores and quarantines
-> remove what nobody holds, put back what somebody does -> open the engine
again. Release failing means nothing destructive happens (fail closed).
Every target is re-checked right before it is touched; one failed action
never stops the others. Every step is crash-safe: a model is always either
under its name, in `.ocrd-trash/`, or under a `.ocrd-deleting-*` /
`.ocrd-tmp-*` name that recovery finishes or rolls back at the next start.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ocrd import log as logconf
from ocrd.act.fetching import Fetch, Fetcher, Pending
from ocrd.act.fs import (
    ActionError,
    Changed,
    Log,
    Sync,
    check_unchanged,
    hidden_name,
    rename_noreplace,
)
from ocrd.act.holders import IndexFn, find_holders, holders_text
from ocrd.act.listing import ocrd_models, open_and_compare
from ocrd.act.restore import restore
from ocrd.act.trash import Purger, QuarantineBatch, quarantine, record_item
from ocrd.act.twophase import Expect, Leased, Moved, TwoPhase, exclusive, lease_holders
from ocrd.core.model import (
    Action,
    ActionKind,
    Kind,
    Outcome,
    Plan,
    Report,
    ReportKind,
    TrashItem,
)
from ocrd.core.names import DELETING_PREFIX, TRASH
from ocrd.core.sources import shown
from ocrd.engine.base import Engine
from ocrd.fetch.transport import Settings
from ocrd.observe.handles import HandleIndex, Holder
from ocrd.observe.hashing import Progress
from ocrd.openfile import DIR_FLAGS


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


class _Acting:
    """The state of one apply's actions: the open model dir, the two phases, the batch."""

    def __init__(
        self,
        root: str,
        *,
        log: Log,
        now: float,
        dir_fd: int | None = None,
        progress: Progress | None = None,
        fetch: Fetch | None = None,
    ) -> None:
        self.root, self.log, self.now, self.progress = root, log, now, progress
        self.fetch = fetch or Fetcher(Settings(), log=log, progress=progress)
        # The cycle's own descriptor of the model dir (the one it scanned), else one now.
        self.fd = os.dup(dir_fd) if dir_fd is not None else os.open(root, DIR_FLAGS)
        self.sync = Sync(batch=True)
        self.sync.dir(root)  # whatever the actions do there is flushed once, at the end
        self.two = TwoPhase(root, self.fd, keep=self._keep)
        self.purger = Purger(self.two, log=log)
        self.quarantined: list[Action] = []  # what the batch record lists
        self.batch: QuarantineBatch | None = None
        self.batch_error: str | None = None  # why this cycle's batch could not be made

    def _keep(self, moved: Moved) -> str:
        """A delete's target that cannot go back under its name (a newer entry took it):
        into the quarantine, under its name, instead of being lost or deleted."""
        hidden = moved.inner
        if moved.out_fd != self.fd:  # in a deleting dir: to a hidden name of its own first
            hidden = hidden_name(DELETING_PREFIX)
            rename_noreplace(moved.inner, hidden, src_dir_fd=moved.out_fd, dst_dir_fd=self.fd)
        size = os.stat(hidden, dir_fd=self.fd, follow_symlinks=False).st_size
        item_id = quarantine(
            self.root,
            hidden,
            as_name=moved.name,
            reason="could not go back under its name (a newer entry took it); kept",
            size=size,
            sha256=None,
            now=self.now,
            dir_fd=self.fd,
        )
        return f"{TRASH}/{item_id}"

    def move_out(self, number: int, action: Action) -> None:
        """Phase 1 of a delete: a prune in delete mode, or a purge."""
        if action.kind is ActionKind.PURGE:
            assert action.trash_id is not None
            self.purger.move_out(number, action.trash_id)
            return
        entry = action.entry
        assert entry is not None
        check_unchanged(self.root, entry, dir_fd=self.fd)
        size = entry.size if entry.kind is Kind.FILE else None
        expect = Expect(entry.device, entry.inode, entry.mtime_ns, size)
        self.two.move_out(
            number, back_fd=self.fd, name=action.name, expect=expect, is_dir=entry.kind is Kind.DIR
        )

    def removed(self, number: int, action: Action) -> None:
        """Log a delete phase 3 carried out."""
        if action.kind is ActionKind.PURGE:
            self.purger.purged(number, model=action.name, reason=action.reason, size=action.bytes)
            return
        assert action.entry is not None
        self.log.info(
            "model.pruned",
            model=action.name,
            reason=action.reason,
            bytes=action.entry.size,
            dest="deleted",
            mode=action.mode,
        )

    def quarantine(self, action: Action) -> None:
        entry = action.entry
        assert entry is not None
        check_unchanged(self.root, entry, dir_fd=self.fd)
        if self.batch_error is not None:
            raise ActionError(self.batch_error)
        if self.batch is None:
            listed = [
                record_item(a.name, a.reason, a.bytes, a.entry.sha256)
                for a in self.quarantined
                if a.entry is not None
            ]
            try:
                self.batch = QuarantineBatch(self.root, self.fd, listed, now=self.now)
            except (OSError, ActionError) as exc:
                # Nothing moved; the rest of the cycle's quarantines fail fast, alike.
                self.batch_error = f"cannot set up the quarantine dir: {exc}"
                raise ActionError(self.batch_error) from exc
        # The last step before the rename, as for a delete: a lease taken up to now wins;
        # one taken after finds the name gone (ocrd.lease checks the path it locked).
        ident = (entry.device, entry.inode)
        try:
            lock_fd = exclusive(self.fd, action.name, ident)
        except BlockingIOError:
            raise Leased(lease_holders(ident)) from None
        try:
            dest = f"{TRASH}/{self.batch.move(self.fd, action.name)}"
        finally:
            if lock_fd is not None:
                os.close(lock_fd)
        self.log.info(
            "model.pruned",
            model=action.name,
            reason=action.reason,
            bytes=entry.size,
            dest=dest,
            mode=action.mode,
        )

    def restore(self, action: Action, now: float) -> None:
        staged, old_id = restore(self.root, action, now=now, dir_fd=self.fd, fetch=self.fetch)
        self.log.info(
            "model.restored",
            model=action.name,
            reason=action.reason,
            bytes=staged.size,
            sha256=staged.sha256,
            source=shown(staged.source),
            dest=action.name,
            replaced=(f"{TRASH}/{old_id}" if old_id else None),
        )

    def close(self) -> None:
        """Flush what moved; drop batches left empty. Errors are logged, not raised."""
        try:
            if self.batch is not None:
                self.batch.close(self.sync)
            self.two.close()
            self.purger.close()
            self.sync.flush()
        except (OSError, ActionError) as exc:
            self.log.error("trash.cleanup_failed", error=str(exc))
        finally:
            os.close(self.fd)


def _is_delete(action: Action) -> bool:
    """Whether carrying out *action* deletes something: two-phase (DESIGN §4)."""
    return action.kind is ActionKind.PURGE or (
        action.kind is ActionKind.PRUNE and action.mode == "delete"
    )


def _busy(log: Log, result: _Result, action: Action, holders: list[Holder], **extra: str) -> None:
    text = holders_text(holders)
    log.warning(
        "model.busy",
        model=action.name,
        action=action.kind.value,
        holders=text,
        pids=sorted({h.pid for h in holders if h.pid}),  # each process once
        **extra,
    )
    result.busy.append(Report(ReportKind.BUSY, action.name, f"held by {text}"))
    result.skipped.append((action, f"busy: held by {text}"))


def _attempt(log: Log, result: _Result, action: Action, step: Callable[[], None]) -> bool:
    """Run one step of *action*; a change or a failure is logged and noted, never raised."""
    try:
        step()
    except Leased as exc:
        _busy(log, result, action, exc.holders)
    except Pending as exc:  # downloading beside the loop: not a failure, not done
        result.skipped.append((action, str(exc)))
    except Changed as exc:
        log.warning("model.changed", model=action.name, action=action.kind.value, reason=str(exc))
        result.skipped.append((action, str(exc)))
    except (OSError, ActionError) as exc:
        log.error("action.failed", model=action.name, action=action.kind.value, error=str(exc))
        result.failed.append((action, str(exc)))
    else:
        return True
    return False


def _stopping(log: Log, result: _Result, action: Action, stop: Callable[[], bool] | None) -> bool:
    if stop is None or not stop():
        return False
    log.info("action.skipped", model=action.name, action=action.kind.value, reason="shutting down")
    result.skipped.append((action, "shutting down"))
    return True


def _run_actions(
    acting: _Acting,
    actions: tuple[Action, ...],
    result: _Result,
    *,
    index: IndexFn | None,
    clock: Callable[[], float],
    stop: Callable[[], bool] | None,
) -> HandleIndex:
    """Every action; one that fails or is skipped never stops the others. Returns the index.

    Deletes go first out of their names (phase 1); then the one handle index is
    built; then restores and quarantines run in plan order, skipping held
    targets; last, each delete is carried out or put back (phase 3).
    """
    log = acting.log
    deletes = [i for i, action in enumerate(actions) if _is_delete(action)]
    for i in deletes:
        action = actions[i]
        if not _stopping(log, result, action, stop):
            _attempt(log, result, action, functools.partial(acting.move_out, i, action))
    held, handle_index = find_holders(
        acting.root, actions, index, dir_fd=acting.fd, moved=acting.two.moved, skip=set(deletes)
    )
    acting.quarantined = [
        a
        for i, a in enumerate(actions)
        if a.kind is ActionKind.PRUNE and not _is_delete(a) and i not in held
    ]
    try:
        for i, action in enumerate(actions):
            if _is_delete(action) or _stopping(log, result, action, stop):
                continue
            if i in held:
                _busy(log, result, action, held[i])
                continue
            if action.kind is ActionKind.PRUNE:
                step = functools.partial(acting.quarantine, action)
            else:
                step = functools.partial(acting.restore, action, clock())
            if _attempt(log, result, action, step):
                result.done.append(action)
    except BaseException:
        # Stopping mid-copy (SIGTERM, Ctrl-C) or failing: the deletes go back under
        # their names; nothing is deleted the cycle had not finished deciding on.
        acting.two.abandon()
        raise
    for settled in acting.two.settle(lambda moved: held.get(moved.number, [])):
        action = actions[settled.moved.number]
        if settled.holders:
            extra = {} if settled.kept is None else {"kept": settled.kept}
            _busy(log, result, action, settled.holders, **extra)
        elif settled.error is not None:
            log.error(
                "action.failed", model=action.name, action=action.kind.value, error=settled.error
            )
            result.failed.append((action, settled.error))
        else:
            acting.removed(settled.moved.number, action)
            result.done.append(action)
    return handle_index


def _act(
    actions: tuple[Action, ...],
    *,
    root: str,
    log: Log,
    clock: Callable[[], float],
    index: IndexFn | None,
    stop: Callable[[], bool] | None,
    dir_fd: int | None = None,
    progress: Progress | None = None,
    fetch: Fetch | None = None,
) -> tuple[_Result, HandleIndex]:
    result = _Result()
    try:
        acting = _Acting(root, log=log, now=clock(), dir_fd=dir_fd, progress=progress, fetch=fetch)
    except OSError as exc:
        log.error("action.failed", model=root, action="open model dir", error=str(exc))
        result.failed.extend((a, str(exc)) for a in actions)
        return result, HandleIndex()
    try:
        with logconf.batched():  # 50,000 prune lines: written in blocks, not one by one
            handle_index = _run_actions(
                acting, actions, result, index=index, clock=clock, stop=stop
            )
    finally:
        acting.close()
    return result, handle_index


def purge(items: Sequence[TrashItem], *, root: Path | str, log: Log, reason: str) -> Outcome:
    """Purge quarantined models now, without the engine cycle (`ocrd trash purge`): the
    same two-phase path as the cycle's retention purge, logged alike."""
    actions = tuple(
        Action(
            ActionKind.PURGE,
            item.name,
            reason=reason,
            rule="ocrd trash purge",
            bytes=item.size,
            trash_id=item.id,
        )
        for item in items
    )
    result, _ = _act(
        actions, root=str(root), log=log.bind(), clock=time.time, index=None, stop=None
    )
    return result.outcome()


def apply(
    plan: Plan,
    *,
    root: Path | str,
    engine: Engine,
    log: Log,
    clock: Callable[[], float] = time.time,
    index: IndexFn | None = None,
    stop: Callable[[], bool] | None = None,
    dir_fd: int | None = None,
    progress: Progress | None = None,
    fetch: Fetch | None = None,
) -> Outcome:
    """Run the engine cycle around *plan*'s actions; see the module docstring.

    *dir_fd*: the model dir as the cycle opened (and scanned) it; every action
    is relative to it. *progress* is called while a restore copies (it may
    raise to stop, and keeps the watchdog fed). *fetch* stages each restore's model
    (ocrd.act.fetching.Fetcher: now; the daemon's: beside the loop).
    """
    root = str(root)
    actions = plan.actions
    if not actions:
        return Outcome()
    log = log.bind()  # one bound logger for the whole cycle, not one per line

    started = time.monotonic()
    try:
        engine.release()
    except Exception as exc:  # any engine failure means: do nothing destructive
        log.error("engine.release_failed", engine=engine.name, error=str(exc), skipped=len(actions))
        skipped = _Result(skipped=[(a, "engine release failed") for a in actions])
        return skipped.outcome(engine_error=f"release failed: {exc}")
    released_ms = round((time.monotonic() - started) * 1000, 1)

    result, handle_index = _act(
        actions,
        root=root,
        log=log,
        clock=clock,
        index=index,
        stop=stop,
        dir_fd=dir_fd,
        progress=progress,
        fetch=fetch,
    )

    engine_error = None
    try:
        open_and_compare(
            engine, root, log=log, release_ms=released_ms, ours=ocrd_models(plan, result.done)
        )
    except Exception as exc:  # a failing engine is reported, never fatal
        engine_error = f"open failed: {exc}"
        log.error("engine.unavailable", engine=engine.name, error=str(exc))
    return result.outcome(
        engine_error, inspected=handle_index.inspected, processes=handle_index.total
    )
