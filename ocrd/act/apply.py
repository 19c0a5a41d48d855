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

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ocrd import log as logconf
from ocrd.act.fs import ActionError, Changed, Log, Sync, check_unchanged, delete
from ocrd.act.holders import IndexFn, find_holders, holders_text
from ocrd.act.listing import ocrd_models, open_and_compare
from ocrd.act.restore import restore
from ocrd.act.trash import Purger, QuarantineBatch, record_item
from ocrd.core.model import Action, ActionKind, Kind, Outcome, Plan, Report, ReportKind
from ocrd.core.names import TRASH
from ocrd.engine.base import Engine
from ocrd.observe.handles import Holder


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
    """The state of one apply's action loop: the open model dir, the batch, the syncs."""

    def __init__(self, root: str, *, log: Log, now: float, quarantined: list[Action]) -> None:
        self.root, self.log, self.now = root, log, now
        self.fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.sync = Sync(batch=True)
        self.sync.dir(root)  # whatever the actions do there is flushed once, at the end
        self.quarantined = quarantined  # what the batch record lists
        self.batch: QuarantineBatch | None = None
        self.batch_error: str | None = None  # why this cycle's batch could not be made
        self.purger = Purger(root, log=log, sync=self.sync)
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
            dest = f"{TRASH}/{self.batch.move(self.fd, action.name)}"
        self.pruned(action.name, action.reason, entry.size, dest, action.mode)

    def purge(self, action: Action) -> None:
        assert action.trash_id is not None
        self.purger.purge(
            action.trash_id, model=action.name, reason=action.reason, size=action.bytes
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
            replaced=(f"{TRASH}/{old_id}" if old_id else None),
        )

    def close(self) -> None:
        """Flush what moved; drop batches left empty. Errors are logged, not raised."""
        try:
            if self.batch is not None:
                self.batch.close(self.root, self.sync)
            self.purger.close()
            self.sync.flush()
        except OSError as exc:
            self.log.error("trash.cleanup_failed", error=str(exc))
        finally:
            os.close(self.fd)


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
            text = holders_text(held[i])
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

    held, handle_index = find_holders(root, actions, index)
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
        open_and_compare(
            engine, root, log=log, release_ms=released_ms, ours=ocrd_models(plan, result.done)
        )
    except Exception as exc:  # a failing engine is reported, never fatal
        engine_error = f"open failed: {exc}"
        log.error("engine.unavailable", engine=engine.name, error=str(exc))
    return result.outcome(
        engine_error, inspected=handle_index.inspected, processes=handle_index.total
    )
