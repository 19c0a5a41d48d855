"""`ocrd run`: the long-running, level-triggered reconcile loop.

File events and signals only wake the loop; every pass re-plans from a fresh
scan. Signal handlers set flags; the loop does the work. A failed pass is
logged and backed off, never fatal. systemd hears READY/RELOADING/STATUS/
WATCHDOG/STOPPING from this loop itself, so a hung loop gets restarted.
"""

from __future__ import annotations

import hashlib
import os
import signal
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from ocrd import log as logconf
from ocrd import status as statusfile
from ocrd.config import LoadedPolicy, load_policy
from ocrd.cycle import CycleResult, run_cycle
from ocrd.engine import Engine, EngineError, make_engine
from ocrd.errors import LockedError, ModelDirError, PolicyError
from ocrd.handles import DeletedHeld, deleted_held, pinned_bytes, visibility
from ocrd.lock import DirLock
from ocrd.model import ActionKind, ReportKind, Snapshot
from ocrd.plan import count_models, next_due
from ocrd.systemd import Notifier, watchdog_interval
from ocrd.watcher import Watcher

BACKOFF = (1, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144, 233, 300)  # seconds (kopf's series)
DEBOUNCE_CAP = 5  # a cycle at least every 5 debounce periods under constant writes
BUSY_RETRY = 10.0  # seconds before a busy model is tried again
FLAP_ROUNDS = 3  # prunes of one name within FLAP_WINDOW before ocrd stops fighting
FLAP_WINDOW = 3600.0
MAX_ERRORS = 20
MIN_SLEEP = 0.05
ENGINE_CHECK = 30.0  # seconds between checks that the engine host is still alive


@dataclass(slots=True)
class _Retry:
    failures: int
    not_before: float  # time.monotonic()
    reason: str


@dataclass(slots=True)
class _View:
    """What a confirmed view of the model dir looked like."""

    device: int
    models: int


@dataclass(slots=True)
class _State:
    started_at: float = field(default_factory=time.time)
    last: CycleResult | None = None
    last_finished: float | None = None
    errors: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=MAX_ERRORS))
    rejected: dict[str, Any] | None = None
    suspicious: str | None = None
    cycle_failures: int = 0
    loaded_at: float = field(default_factory=time.time)
    deleted_held: list[DeletedHeld] = field(default_factory=list)


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


class Daemon:
    """One daemon for one policy file (and so one model dir)."""

    def __init__(
        self,
        config_path: Path,
        *,
        notifier: Notifier | None = None,
        force_polling: bool = False,
    ) -> None:
        self.config_path = config_path
        self.notify = notifier or Notifier()
        self.force_polling = force_polling
        self.log = logconf.get()
        self._wake = threading.Event()
        self._models_event = False
        self._overflowed = False
        self._policy_event = False
        self._reload_requested = False
        self._stopping = False
        self._signals = 0
        self._watchdog = watchdog_interval()
        self._last_ping = 0.0
        self._retries: dict[str, _Retry] = {}
        self._busy_retry_at: float | None = None
        self._prunes: dict[str, deque[float]] = {}
        self._flapping: dict[str, str] = {}
        self._view: _View | None = None
        self._lock: DirLock | None = None
        self._locked_dir: Path | None = None
        self._lock_id: tuple[int, int] | None = None
        self._dir_retry = 0
        self._engine_failures = 0
        self._engine_retry_at: float | None = None
        self.state = _State()
        self._visibility: tuple[int, int] | None = None
        self.loaded: LoadedPolicy
        self.engine: Engine
        self.watcher: Watcher

    # -- signals and wake-ups ------------------------------------------------

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGHUP:
            self._reload_requested = True
        else:
            self._signals += 1
            if self._signals > 1:
                os.write(2, b"ocrd: second signal, exiting at once\n")
                os._exit(1)
            self._stopping = True
        self._wake.set()

    def _on_models(self) -> None:
        self._models_event = True
        self._wake.set()

    def _on_overflow(self) -> None:
        """The kernel dropped file events: whatever they were, rescan."""
        self._overflowed = True
        self._on_models()

    def _on_policy(self) -> None:
        self._policy_event = True
        self._wake.set()

    def _ping(self) -> None:
        if self._watchdog is not None:
            now = time.monotonic()
            if now - self._last_ping >= self._watchdog * 0.9:
                self.notify.watchdog()
                self._last_ping = now

    def _sleep(self, timeout: float) -> bool:
        """Wait up to *timeout* for a wake-up, pinging the watchdog meanwhile."""
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            chunk = remaining if self._watchdog is None else min(remaining, self._watchdog)
            if self._wake.wait(chunk):
                return True
            self._ping()

    def _debounce(self) -> None:
        """Let a burst of events settle for `debounce`, but no longer than the cap."""
        debounce = self.loaded.policy.reconcile.debounce
        cap = time.monotonic() + DEBOUNCE_CAP * debounce
        while not (self._stopping or self._reload_requested or self._policy_event):
            self._wake.clear()
            remaining = min(debounce, cap - time.monotonic())
            if remaining <= 0 or not self._sleep(remaining):
                return

    # -- lifecycle -------------------------------------------------------------

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT; returns the process exit code."""
        try:
            self.loaded = load_policy(self.config_path)
        except PolicyError as exc:
            for problem in exc.problems:
                print(f"ocrd: error: {problem}", file=sys.stderr)
            return 2
        policy = self.loaded.policy
        logconf.configure(fmt=policy.log.format, level=policy.log.level, stream=sys.stdout)
        try:
            self.engine, fallback = make_engine(policy, log=self.log)
        except EngineError as exc:
            print(f"ocrd: error: {self.config_path}: engine.backend: {exc}", file=sys.stderr)
            return 2
        if fallback:
            self.log.warning("engine.fallback", warning=fallback)
        if policy.model_dir.is_dir():
            try:
                self._take_lock(policy.model_dir)
            except LockedError as exc:
                print(f"ocrd: error: {exc}", file=sys.stderr)
                return 1
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self._on_signal)
        self.watcher = Watcher(
            on_models=self._on_models,
            on_policy=self._on_policy,
            on_overflow=self._on_overflow,
            warn=self.log.warning,
            force_polling=self.force_polling,
        )
        self._open_engine()
        self.log.info(
            "daemon.started",
            pid=os.getpid(),
            policy=str(self.config_path),
            digest=self.loaded.digest,
            model_dir=str(policy.model_dir),
            engine=self.engine.name,
            watchdog_s=self._watchdog,
        )
        try:
            self._loop()
        finally:
            self._shutdown()
        return 0

    def _shutdown(self) -> None:
        self.notify.stopping()
        self.watcher.stop()
        try:
            self.engine.release()
        except Exception as exc:  # shutting down anyway; say what happened
            self.log.error("engine.release_failed", engine=self.engine.name, error=str(exc))
        self._write_status(state="stopped")
        if self._lock is not None:
            self._lock.release()
        self.log.info("daemon.stopped", pid=os.getpid())
        self.notify.close()

    def _take_lock(self, model_dir: Path) -> None:
        lock = DirLock(model_dir)
        lock.acquire()
        if self._lock is not None:
            self._lock.release()
        self._lock, self._locked_dir = lock, model_dir
        self._lock_id = _identity(model_dir)

    def _open_engine(self) -> None:
        try:
            self.engine.open(self.loaded.policy.model_dir)
        except Exception as exc:  # reported, never fatal
            self._engine_failures += 1
            delay = BACKOFF[min(self._engine_failures - 1, len(BACKOFF) - 1)]
            self._engine_retry_at = time.monotonic() + delay
            self.log.error(
                "engine.unavailable", engine=self.engine.name, error=str(exc), retry_s=delay
            )
            self._note_error("engine", str(exc))
        else:
            self._engine_failures = 0
            self._engine_retry_at = None

    def _check_engine(self) -> None:
        """Notice a host that died between cycles (engine.crashed) and start a fresh one."""
        alive = getattr(self.engine, "alive", None)
        if alive is None or alive():
            return
        if getattr(self.engine, "proc", None) is not None:
            try:
                self.engine.release()  # reaps it and logs engine.crashed
            except Exception as exc:  # the next check tries again
                self.log.error("engine.release_failed", engine=self.engine.name, error=str(exc))
                return
        if self._engine_retry_at is None or time.monotonic() >= self._engine_retry_at:
            self._open_engine()

    def _loop(self) -> None:
        first = need_cycle = True
        while not self._stopping:
            # Flags are set before the event, so clearing first loses no wake-up.
            self._wake.clear()
            if self._reload_requested or self._policy_event:
                need_cycle = self._reload() or need_cycle
                if self._stopping:
                    break
                if not need_cycle and not first:
                    self._write_status()  # a rejected edit shows at once
                    self.notify.status(self._status_line())
            if need_cycle:
                self._models_event = False
                if self._overflowed:
                    self._overflowed = False
                    self.log.warning(
                        "watch.overflow",
                        hint="the kernel's inotify queue overflowed and events were lost; "
                        "rescanning (raise fs.inotify.max_queued_events if this repeats)",
                    )
                watch_error = self.watcher.watch(self.loaded.policy.model_dir, self.config_path)
                if watch_error:
                    self._note_error("watch", watch_error)
                self._cycle()
                self._write_status()
                if first:
                    self.notify.ready(self._status_line())
                    first = False
                self.notify.status(self._status_line())
            self._check_engine()
            self._ping()
            woke = self._sleep(self._next_timeout())
            need_cycle = not woke or self._models_event
            if woke and self._models_event:
                self._debounce()

    def _next_timeout(self) -> float:
        policy = self.loaded.policy
        timeout = policy.reconcile.resync
        last = self.state.last
        if last is not None and self.state.suspicious is None:
            due = next_due(policy, last.snapshot, now=time.time())
            if due is not None:
                timeout = min(timeout, due - time.time() + 0.01)
        now = time.monotonic()
        if self._retries:
            timeout = min(timeout, min(r.not_before for r in self._retries.values()) - now)
        if self._busy_retry_at is not None:
            timeout = min(timeout, self._busy_retry_at - now)
        if getattr(self.engine, "alive", None) is not None:
            timeout = min(timeout, ENGINE_CHECK)
        if self._engine_retry_at is not None:
            timeout = min(timeout, self._engine_retry_at - now)
        if self.state.cycle_failures or self._dir_retry or self._locked_dir != policy.model_dir:
            # A missing, unreadable or locked model dir, or a failing cycle: retry with
            # backoff (its watch may be gone with it, so no event would come).
            tries = max(self._dir_retry, self.state.cycle_failures, 1)
            timeout = min(timeout, float(BACKOFF[min(tries - 1, len(BACKOFF) - 1)]))
        return max(MIN_SLEEP, timeout)

    # -- reload ------------------------------------------------------------------

    def _reload(self) -> bool:
        """Apply an edited (or, on SIGHUP, the same) policy; True when a cycle should follow."""
        forced = self._reload_requested
        self._reload_requested = self._policy_event = False
        try:
            data = self.config_path.read_bytes()
            digest = hashlib.sha256(data).hexdigest()
        except OSError as exc:
            if not (self.state.rejected and self.state.rejected.get("digest") is None):
                self._reject([f"{self.config_path}: cannot read the policy: {exc.strerror}"], None)
            return False
        rejected_digest = self.state.rejected.get("digest") if self.state.rejected else None
        if not forced and digest in (self.loaded.digest, rejected_digest):
            if digest == self.loaded.digest and self.state.rejected:
                self.state.rejected = None  # the file is back to the policy in force
                self.log.info("policy.restored", policy=str(self.config_path), digest=digest)
            return False
        self.notify.reloading()
        try:
            new = load_policy(self.config_path)
        except PolicyError as exc:
            self._reject([str(p) for p in exc.problems], digest)
            self.notify.ready(self._status_line())
            return False
        old = self.loaded.policy
        if new.policy.model_dir != old.model_dir and new.policy.model_dir.is_dir():
            try:
                self._take_lock(new.policy.model_dir)
            except LockedError as exc:
                self._reject([f"{self.config_path}: model_dir: {exc}"], digest)
                self.notify.ready(self._status_line())
                return False
        if new.policy.log != old.log:
            logconf.configure(fmt=new.policy.log.format, level=new.policy.log.level)
        self.loaded = new
        self.state.rejected = None
        self.state.loaded_at = time.time()
        # A reload is the operator's confirmation: accept the current view, forget fights.
        self._view = None
        self.state.suspicious = None
        self._flapping.clear()
        self._prunes.clear()
        self._retries.clear()
        if new.policy.model_dir != old.model_dir or new.policy.engine != old.engine:
            try:
                self.engine.release()
            except Exception as exc:  # the next cycle's release will try again
                self.log.error("engine.release_failed", engine=self.engine.name, error=str(exc))
            if new.policy.engine.backend != old.engine.backend:
                try:
                    self.engine, _ = make_engine(new.policy, log=self.log)
                except EngineError as exc:
                    self.log.error("engine.unavailable", error=str(exc))
            self._open_engine()
        self.log.info(
            "policy.reloaded",
            policy=str(self.config_path),
            digest=new.digest,
            model_dir=str(new.policy.model_dir),
            forced=forced,
        )
        self.notify.ready(self._status_line())
        return True

    def _reject(self, errors: list[str], digest: str | None) -> None:
        self.state.rejected = {"at": time.time(), "digest": digest, "errors": errors}
        self.log.error(
            "policy.rejected",
            policy=str(self.config_path),
            errors=errors,
            kept=self.loaded.digest,
        )
        self._note_error("policy", "; ".join(errors))

    # -- one cycle ---------------------------------------------------------------

    def _note_error(self, where: str, error: str) -> None:
        self.state.errors.append({"at": time.time(), "where": where, "error": error})

    def _gate(self, snapshot: Snapshot) -> str | None:
        """A reason not to act on this view of the model dir, or None (DESIGN §4)."""
        models = count_models(self.loaded.policy, snapshot)
        reason = None
        if self._view is not None:
            if snapshot.device != self._view.device:
                reason = (
                    f"model_dir is on another filesystem than before (device "
                    f"{self._view.device} -> {snapshot.device}): a mount may have gone away"
                )
            elif models == 0 and self._view.models > 0:
                reason = f"model_dir became empty (it held {self._view.models} models)"
        if reason is None:
            self._view = _View(snapshot.device, models)
        return self._suspect(reason)

    def _suspect(self, reason: str | None) -> str | None:
        if reason is not None and reason != self.state.suspicious:
            self.log.error(
                "model_dir.suspicious",
                model_dir=str(self.loaded.policy.model_dir),
                reason=reason,
                hint="nothing is pruned or restored until an operator confirms with a reload "
                "(systemctl reload ocrd, or SIGHUP)",
            )
        elif reason is None and self.state.suspicious is not None:
            self.log.info("model_dir.trusted", model_dir=str(self.loaded.policy.model_dir))
        self.state.suspicious = reason
        return reason

    def _hold(self) -> dict[str, str]:
        now = time.monotonic()
        hold = dict(self._flapping)
        for name, retry in self._retries.items():
            if retry.not_before > now:
                hold.setdefault(
                    name,
                    f"failed {retry.failures}x ({retry.reason}); retry in "
                    f"{retry.not_before - now:.0f}s",
                )
        return hold

    def _cycle(self) -> None:
        policy = self.loaded.policy
        model_dir = policy.model_dir
        if not model_dir.is_dir():
            what = "vanished" if self._view is not None else "does not exist (yet)"
            self._dir_retry += 1
            self._suspect(f"model_dir {model_dir} {what}")
            return
        if self._locked_dir != model_dir or _identity(model_dir) != self._lock_id:
            # New path, or the directory was replaced under the same path: the lock
            # file we hold is in the old one, so take the lock in this one.
            try:
                self._take_lock(model_dir)
            except LockedError as exc:
                self._dir_retry += 1
                self._note_error("lock", str(exc))
                self._suspect(str(exc))
                return
        self._dir_retry = 0
        try:
            result = run_cycle(
                policy,
                engine=self.engine,
                log=self.log,
                hold=self._hold(),
                gate=self._gate,
                stop=lambda: self._stopping,
            )
        except ModelDirError as exc:
            self._dir_retry += 1
            self._suspect(str(exc))
            return
        except Exception as exc:  # a failed pass is logged and backed off, never fatal
            self.state.cycle_failures += 1
            self.log.exception("cycle.failed", error=f"{type(exc).__name__}: {exc}")
            self._note_error("cycle", f"{type(exc).__name__}: {exc}")
            return
        self.state.cycle_failures = 0
        if result.held_back is None and self._view is not None:
            # Our own prunes and restores change what "normal" looks like: emptying the
            # dir by policy is not a suspicious view at the next cycle.
            pruned = sum(1 for a in result.outcome.done if a.kind is ActionKind.PRUNE)
            restored = sum(1 for a in result.outcome.done if a.kind is ActionKind.RESTORE)
            self._view.models = max(0, self._view.models - pruned + restored)
        self.state.deleted_held = deleted_held(str(model_dir))
        self.state.last = result
        self.state.last_finished = time.time()
        self._track(result)

    def _track(self, result: CycleResult) -> None:
        """Backoff for failures, a retry timer for busy models, flapping detection."""
        now = time.monotonic()
        outcome = result.outcome
        for action in outcome.done:
            self._retries.pop(action.name, None)
            if action.kind is ActionKind.PRUNE:
                rounds = self._prunes.setdefault(action.name, deque(maxlen=FLAP_ROUNDS))
                rounds.append(now)
                if len(rounds) == FLAP_ROUNDS and now - rounds[0] <= FLAP_WINDOW:
                    reason = (
                        f"pruned {FLAP_ROUNDS} times within {FLAP_WINDOW / 60:.0f} min and "
                        "re-created each time; left alone until a reload"
                    )
                    self._flapping[action.name] = reason
                    self.log.warning("model.flapping", model=action.name, reason=reason)
        for action, error in outcome.failed:
            failures = (
                self._retries[action.name].failures + 1 if action.name in self._retries else 1
            )
            delay = BACKOFF[min(failures - 1, len(BACKOFF) - 1)]
            self._retries[action.name] = _Retry(failures, now + delay, error)
            self._note_error(action.name, error)
        if outcome.engine_error:
            self._note_error("engine", outcome.engine_error)
        self._busy_retry_at = now + BUSY_RETRY if outcome.busy else None

    # -- status --------------------------------------------------------------------

    def _degraded(self) -> list[str]:
        reasons = []
        if self.state.rejected:
            reasons.append("the last policy edit was rejected; the previous policy is in force")
        if self.state.suspicious:
            reasons.append(f"suspicious view: {self.state.suspicious}")
        if self.state.cycle_failures:
            reasons.append(f"{self.state.cycle_failures} cycle(s) failed in a row")
        last = self.state.last
        if last is not None:
            reasons += [f"{a.name}: {why}" for a, why in last.outcome.failed]
            if last.outcome.engine_error:
                reasons.append(f"engine: {last.outcome.engine_error}")
            restored = {a.name for a in last.outcome.done if a.kind is ActionKind.RESTORE}
            reasons += [
                f"{r.name}: {r.kind.value}"
                for r in last.plan.reports
                if r.kind in (ReportKind.MISSING, ReportKind.CORRUPT) and r.name not in restored
            ]
            reasons += list(last.plan.errors)
        return reasons

    def _status_line(self) -> str:
        last = self.state.last
        if last is None:
            base = "no cycle yet"
        else:
            models = last.plan.models
            pending = len(last.plan.actions) - len(last.outcome.done)
            base = (
                f"models={models} pending={pending} busy={len(last.outcome.busy)} "
                f"done={len(last.outcome.done)}"
            )
        degraded = self._degraded()
        if degraded:
            base += f" degraded: {degraded[0]}"
        elif self.state.errors:
            base += f" last error: {self.state.errors[-1]['error']}"
        return " ".join(base.split())[:400]

    def _status(self, state: str) -> dict[str, Any]:
        policy = self.loaded.policy
        last = self.state.last
        doc: dict[str, Any] = {
            "schema": 1,
            "state": state,
            "pid": os.getpid(),
            "started_at": self.state.started_at,
            "updated_at": time.time(),
            "policy": {
                "path": str(self.config_path),
                "digest": self.loaded.digest,
                "loaded_at": self.state.loaded_at,
                "rejected": self.state.rejected,
            },
            "model_dir": str(policy.model_dir),
            "watch": self.watcher.mode,
            "engine": self.engine.name,
            "suspicious": self.state.suspicious,
            "errors": list(self.state.errors),
            "degraded_reasons": self._degraded(),
            "last_cycle": None,
        }
        doc["degraded"] = bool(doc["degraded_reasons"])
        if last is not None:
            counts: dict[str, int] = {}
            for c in last.plan.classified:
                counts[c.cls.value] = counts.get(c.cls.value, 0) + 1
            done = {(a.kind, a.name) for a in last.outcome.done}
            doc["last_cycle"] = {
                "finished_at": self.state.last_finished,
                "duration_ms": last.duration_ms,
                "planned": len(last.plan.actions),
                "done": len(last.outcome.done),
                "failed": len(last.outcome.failed),
                "skipped": len(last.outcome.skipped),
                "bytes_freed": sum(
                    a.bytes for a in last.outcome.done if a.kind is not ActionKind.RESTORE
                ),
                "held_back": last.held_back,
            }
            doc["counts"] = counts
            doc["pending"] = [
                {"action": a.kind.value, "model": a.name, "reason": a.reason}
                for a in last.plan.actions
                if (a.kind, a.name) not in done
            ]
            doc["busy"] = [{"model": r.name, "reason": r.reason} for r in last.outcome.busy]
            for kind in (
                ReportKind.WAITING,
                ReportKind.MISSING,
                ReportKind.CORRUPT,
                ReportKind.HELD,
            ):
                doc[kind.value] = [
                    {"model": r.name, "reason": r.reason}
                    for r in last.plan.reports
                    if r.kind is kind
                ]
        if "inspected" in (last.outcome.extra if last else {}):
            assert last is not None
            self._visibility = (last.outcome.extra["inspected"], last.outcome.extra["processes"])
        if self._visibility is None:
            self._visibility = visibility()
        doc["handles"] = {"inspected": self._visibility[0], "processes": self._visibility[1]}
        doc["deleted_held"] = [row.as_dict() for row in self.state.deleted_held]
        doc["pinned_bytes"] = pinned_bytes(self.state.deleted_held)
        return doc

    def _write_status(self, state: str = "running") -> None:
        policy = self.loaded.policy
        assert policy.state_dir is not None
        path = statusfile.status_dir(policy.state_dir) / statusfile.STATUS_NAME
        error = statusfile.write(path, self._status(state))
        if error:
            self.log.warning("status.unwritable", error=error)
