"""One reconcile cycle: scan -> plan -> recover -> apply. The CLI's `apply`
runs it once; the daemon runs it on every trigger."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from ocrd.act.apply import apply
from ocrd.act.fetching import Fetch, Fetcher, partial_name
from ocrd.act.fs import Log
from ocrd.act.recovery import recover
from ocrd.core.model import Action, ActionKind, Outcome, Plan, ReportKind, Snapshot
from ocrd.core.names import OWN_PREFIX
from ocrd.core.own import own_problems, own_reason
from ocrd.core.plan import reconcile
from ocrd.core.policy import Policy
from ocrd.engine.base import Engine
from ocrd.fetch.transport import Settings
from ocrd.observe.hashing import Progress
from ocrd.observe.scan import no_gc_pauses, observe, open_model_dir


@runtime_checkable
class Deferring(Protocol):
    """A fetch that runs downloads beside the caller (the daemon's)."""

    def defer(self, actions: Sequence[Action], dir_fd: int) -> dict[str, str]: ...


@dataclass(frozen=True, slots=True)
class CycleResult:
    snapshot: Snapshot
    plan: Plan
    outcome: Outcome
    recovered: tuple[str, ...]
    duration_ms: float
    held_back: str | None = None  # why nothing was done (the gate's reason)

    @property
    def problems(self) -> list[str]:
        """Why the model dir is not converged after this cycle (empty: all good)."""
        return self.reasons(unfinished=True)

    def reasons(self, *, unfinished: bool) -> list[str]:
        """The problems, in one list for every caller.

        With *unfinished* (the CLI's exit code) actions skipped this time and a
        held-back cycle count too; the daemon leaves them out of its degraded
        reasons (skipped ones are retried, a held-back cycle is reported as the
        suspicious view it is).
        """
        found = [f"{a.name}: {why}" for a, why in self.outcome.failed]
        if unfinished:
            found += [f"{a.name}: {why}" for a, why in self.outcome.skipped]
            if self.held_back:
                found.append(self.held_back)
        if self.outcome.engine_error:
            found.append(f"engine: {self.outcome.engine_error}")
        restored = {a.name for a in self.outcome.done if a.kind is ActionKind.RESTORE}
        found += [
            f"{r.name}: {r.kind.value}"
            for r in self.plan.reports
            if r.kind in (ReportKind.MISSING, ReportKind.CORRUPT) and r.name not in restored
        ]
        found += self.plan.errors
        return found


def run_cycle(
    policy: Policy,
    *,
    engine: Engine,
    log: Log,
    dry_run: bool = False,
    progress: Progress | None = None,
    clock: Callable[[], float] = time.time,
    hold: Mapping[str, str] | None = None,
    gate: Callable[[Snapshot], str | None] | None = None,
    stop: Callable[[], bool] | None = None,
    fetch: Fetch | None = None,
) -> CycleResult:
    """One pass; destructive only when not *dry_run* and the policy is not suspended.

    *gate* looks at the fresh snapshot and may return a reason not to act on it
    (the daemon's suspicious-view check): the cycle then only reports.
    *stop* is asked before each action; once it says yes the rest are skipped.
    *fetch* stages restores (default: now, with the policy's download settings).
    """
    if fetch is None:
        fetch = Fetcher(Settings.of(policy.download), log=log, progress=progress)
    with no_gc_pauses():
        started = time.monotonic()
        root = str(policy.model_dir)
        # One descriptor of the model dir for the whole cycle: the scan, recovery and
        # every action are relative to it, so a dir swapped meanwhile is never acted in.
        fd = open_model_dir(root)
        try:
            return _cycle(
                policy, fd, started, engine, log, dry_run, progress, clock, hold, gate, stop, fetch
            )
        finally:
            os.close(fd)


def _cycle(
    policy: Policy,
    fd: int,
    started: float,
    engine: Engine,
    log: Log,
    dry_run: bool,
    progress: Progress | None,
    clock: Callable[[], float],
    hold: Mapping[str, str] | None,
    gate: Callable[[Snapshot], str | None] | None,
    stop: Callable[[], bool] | None,
    fetch: Fetch,
) -> CycleResult:
    root = str(policy.model_dir)
    snapshot = observe(policy, log=log, dir_fd=fd, progress=progress)
    held_back = gate(snapshot) if gate is not None else _own_gate(snapshot, log)
    dry_run = dry_run or held_back is not None
    plan = reconcile(policy, snapshot, now=clock(), hold=hold)
    resumable = _resumable(policy, plan)
    recovered = (
        ()
        if dry_run
        else tuple(
            recover(
                root,
                log,
                names=snapshot.names_starting(OWN_PREFIX),
                dir_fd=fd,
                keep=resumable,
            )
        )
    )
    for error in plan.errors:
        log.error("plan.refused", error=error)
    for report in plan.reports:
        if report.kind is ReportKind.MISSING:
            log.warning("model.missing", model=report.name, reason=report.reason)
        elif report.kind is ReportKind.CORRUPT:
            log.warning("model.corrupt", model=report.name, reason=report.reason)
        elif report.kind is ReportKind.SUSPENDED:
            log.info("action.planned", model=report.name, reason=report.reason, suspended=True)
    if dry_run:
        if isinstance(fetch, Deferring):  # a held-back view: no download goes on into it
            fetch.defer((), fd)
        for action in plan.actions:
            log.info(
                "action.planned",
                action=action.kind.value,
                model=action.name,
                reason=action.reason,
                bytes=action.bytes,
                dry_run=True,
            )
        outcome = Outcome()
    else:
        # Downloads run beside the daemon's loop: a restore still downloading is left
        # out of this cycle (no engine release for it, nothing else waits for it).
        deferred: dict[str, str] = {}
        if isinstance(fetch, Deferring):
            deferred = fetch.defer(plan.actions, fd)
        now_plan = plan
        if deferred:
            now_plan = dataclasses.replace(
                plan,
                actions=tuple(
                    a
                    for a in plan.actions
                    if not (a.kind is ActionKind.RESTORE and a.name in deferred)
                ),
            )
        outcome = apply(
            now_plan,
            root=root,
            engine=engine,
            log=log,
            clock=clock,
            stop=stop,
            dir_fd=fd,
            progress=progress,
            fetch=fetch,
        )
        if deferred:
            waiting = tuple(
                (a, deferred[a.name])
                for a in plan.actions
                if a.kind is ActionKind.RESTORE and a.name in deferred
            )
            outcome = dataclasses.replace(outcome, skipped=outcome.skipped + waiting)
    result = CycleResult(
        snapshot,
        plan,
        outcome,
        recovered,
        round((time.monotonic() - started) * 1000, 1),
        held_back,
    )
    log.info(
        "cycle.finished",
        models=plan.models,
        planned=len(plan.actions),
        done=len(outcome.done),
        failed=len(outcome.failed),
        skipped=len(outcome.skipped),
        bytes_freed=outcome.bytes_freed,
        suspended=plan.suspended,
        dry_run=dry_run,
        duration_ms=result.duration_ms,
    )
    return result


def _resumable(policy: Policy, plan: Plan) -> frozenset[str]:
    """The downloads recovery leaves for a resume: those of required models from the
    network that are still to be restored (now, or once a backoff or hold ends)."""
    needing = {a.name for a in plan.actions if a.kind is ActionKind.RESTORE}
    needing |= {
        r.name
        for r in plan.reports
        if r.kind in (ReportKind.MISSING, ReportKind.CORRUPT, ReportKind.HELD)
    }
    return frozenset(
        partial_name(item.name)
        for item in policy.required
        if item.name in needing and any(s.remote for s in item.fetch_from())
    )


def _own_gate(snapshot: Snapshot, log: Log) -> str | None:
    """Without the daemon's view guard (a one-shot command): hold back a cycle whose
    view has one of ocrd's own names in a shape ocrd never made (ocrd.core.own)."""
    problems = own_problems(snapshot)
    if not problems:
        return None
    reason = own_reason(problems)
    log.error(
        "model_dir.suspicious",
        model_dir=snapshot.root,
        reason=reason,
        hint="nothing is pruned or restored until it is moved away",
    )
    return reason
