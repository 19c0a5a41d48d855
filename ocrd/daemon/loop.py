"""`ocrd run`: the long-running, level-triggered reconcile loop.

File events and signals only wake the loop; every pass re-plans from a fresh
scan. Signal handlers set flags; the loop does the work. A failed pass is
logged and backed off, never fatal. systemd hears READY/RELOADING/STATUS/
WATCHDOG/STOPPING from this loop itself, so a hung loop gets restarted.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType

from ocrd import log as logconf
from ocrd.config import LoadedPolicy, load_policy
from ocrd.core.errors import Interrupted, LockedError, ModelDirError, PolicyError
from ocrd.core.model import ActionKind, Snapshot
from ocrd.core.own import own_problems
from ocrd.core.plan import count_models, next_due
from ocrd.cycle import CycleResult, run_cycle
from ocrd.daemon import reload, status
from ocrd.daemon.backoff import Backoff, delay_after
from ocrd.daemon.downloads import Downloads
from ocrd.daemon.flapping import Flapping
from ocrd.daemon.lock import DirLock
from ocrd.daemon.supervisor import EngineSupervisor
from ocrd.daemon.systemd import Notifier, watchdog_interval
from ocrd.daemon.view import ViewGuard
from ocrd.daemon.watcher import Watcher
from ocrd.engine.auto import make_engine
from ocrd.engine.base import EngineError
from ocrd.fetch.transport import Settings
from ocrd.observe.handles import deleted_held, visibility
from ocrd.openfile import NotRegularError

DEBOUNCE_CAP = 5  # a cycle at least every 5 debounce periods under constant writes
BUSY_RETRY = 10.0  # seconds before a busy model is tried again
MIN_SLEEP = 0.05
DOWNLOAD_STATUS_EVERY = 2.0  # seconds between status writes while a download runs


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
        # Set by signal handlers and watcher threads; the loop reads and clears them.
        self._wake = threading.Event()
        self._models_event = False
        self._overflowed = False
        self._policy_event = False
        self._reload_requested = False
        self._stopping = False
        self._signals = 0
        # The watchdog: pinged from the loop itself.
        self._watchdog = watchdog_interval()
        self._last_ping = 0.0
        # What is retried, held back or not trusted.
        self._dir = Backoff()  # the model dir: missing, unreadable, locked by another
        self._retries: dict[str, Backoff] = {}  # models whose action failed
        self._busy_retry_at: float | None = None
        self._flapping = Flapping()
        self.state = status.State(view=ViewGuard(self.log))
        # The lock on the model dir, and which directory it is in.
        self._lock: DirLock | None = None
        self._locked_dir: Path | None = None
        self._lock_id: tuple[int, int] | None = None
        self._visibility: tuple[int, int] | None = None
        self._unseen: tuple[str, ...] = ()  # what the last scan could not look at
        # Restores from the network, beside the loop; a finished one wakes it.
        self.downloads = Downloads(log=self.log, wake=self._on_models, progress=self._keepalive)
        self.loaded: LoadedPolicy
        self.engine: EngineSupervisor
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
            downloading = bool(self.downloads.in_progress())
            if downloading:
                chunk = min(chunk, DOWNLOAD_STATUS_EVERY)
            if self._wake.wait(chunk):
                return True
            self._ping()
            if downloading:
                self._write_status()  # bytes done so far, for `ocrd status`

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
            engine, fallback = make_engine(policy, log=self.log)
        except EngineError as exc:
            print(f"ocrd: error: {self.config_path}: engine.backend: {exc}", file=sys.stderr)
            return 2
        self.engine = EngineSupervisor(engine, log=self.log, note_error=self.state.note_error)
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
        self.engine.open(policy.model_dir)
        self.log.info(
            "daemon.started",
            pid=os.getpid(),
            policy=str(self.config_path),
            digest=self.loaded.digest,
            model_dir=str(policy.model_dir),
            engine=self.engine.engine.name,
            watchdog_s=self._watchdog,
        )
        try:
            self._loop()
        finally:
            self._shutdown()
        return 0

    def _shutdown(self) -> None:
        self.notify.stopping()
        self.downloads.stop()  # at once: what landed stays, the next start resumes it
        self.watcher.stop()
        self.engine.release()
        self._write_status(word="stopped")
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
                    self.notify.status(status.line(self.state))
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
                    self.state.note_error("watch", watch_error)
                self._cycle()
                self._write_status()
                if first:
                    self.notify.ready(status.line(self.state))
                    first = False
                self.notify.status(status.line(self.state))
            self.engine.check(self.loaded.policy.model_dir)
            self._ping()
            woke = self._sleep(self._next_timeout())
            need_cycle = not woke or self._models_event
            if woke and self._models_event:
                self._debounce()

    def _next_timeout(self) -> float:
        policy = self.loaded.policy
        timeout = policy.reconcile.resync
        last = self.state.last
        if last is not None and self.state.view.suspicious is None:
            due = next_due(policy, last.snapshot, now=time.time())
            if due is not None:
                timeout = min(timeout, due - time.time() + 0.01)
        now = time.monotonic()
        retries = [r.not_before for r in self._retries.values() if r.not_before is not None]
        if retries:
            timeout = min(timeout, min(retries) - now)
        if self._busy_retry_at is not None:
            timeout = min(timeout, self._busy_retry_at - now)
        engine_wait = self.engine.timeout(now)
        if engine_wait is not None:
            timeout = min(timeout, engine_wait)
        cycle = self.state.cycle
        if cycle.failing or self._dir.failing or self._locked_dir != policy.model_dir:
            # A missing, unreadable or locked model dir, or a failing cycle: retry with
            # backoff (its watch may be gone with it, so no event would come).
            tries = max(self._dir.failures, cycle.failures, 1)
            timeout = min(timeout, float(delay_after(tries)))
        return max(MIN_SLEEP, timeout)

    # -- reload ------------------------------------------------------------------

    def _reload(self) -> bool:
        """Apply an edited (or, on SIGHUP, the same) policy; True when a cycle should follow."""
        forced = self._reload_requested
        self._reload_requested = self._policy_event = False
        state = self.state
        try:
            digest = reload.file_digest(self.config_path)
        except (OSError, NotRegularError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else str(exc)
            if not (state.rejected and state.rejected.get("digest") is None):
                self._reject([f"{self.config_path}: cannot read the policy: {why}"], None)
            return False
        rejected_digest = state.rejected.get("digest") if state.rejected else None
        if not forced and digest in (self.loaded.digest, rejected_digest):
            if digest == self.loaded.digest and state.rejected:
                state.rejected = None  # the file is back to the policy in force
                self.log.info("policy.restored", policy=str(self.config_path), digest=digest)
            return False
        self.notify.reloading()
        try:
            new = load_policy(self.config_path)
        except PolicyError as exc:
            self._reject([str(p) for p in exc.problems], digest)
            self.notify.ready(status.line(state))
            return False
        old = self.loaded.policy
        change = reload.diff(old, new.policy)
        if change.model_dir and new.policy.model_dir.is_dir():
            try:
                self._take_lock(new.policy.model_dir)
            except LockedError as exc:
                self._reject([f"{self.config_path}: model_dir: {exc}"], digest)
                self.notify.ready(status.line(state))
                return False
        if change.log:
            logconf.configure(fmt=new.policy.log.format, level=new.policy.log.level)
        self.loaded = new
        state.rejected = None
        state.loaded_at = time.time()
        # A reload is the operator's confirmation: accept the current view, forget fights.
        state.view.confirm()
        self._flapping.clear()
        self._retries.clear()
        if change.engine:
            self.engine.restart(new.policy, backend_changed=change.backend)
        self.log.info(
            "policy.reloaded",
            policy=str(self.config_path),
            digest=new.digest,
            model_dir=str(new.policy.model_dir),
            forced=forced,
        )
        self.notify.ready(status.line(state))
        return True

    def _reject(self, errors: list[str], digest: str | None) -> None:
        self.state.rejected = {"at": time.time(), "digest": digest, "errors": errors}
        self.log.error(
            "policy.rejected",
            policy=str(self.config_path),
            errors=errors,
            kept=self.loaded.digest,
        )
        self.state.note_error("policy", "; ".join(errors))

    # -- one cycle ---------------------------------------------------------------

    def _suspect(self, reason: str) -> None:
        self.state.view.suspect(reason, model_dir=str(self.loaded.policy.model_dir))

    def _gate(self, snapshot: Snapshot) -> str | None:
        """A reason not to act on this view of the model dir, or None (DESIGN §4).

        The identity checked is the one of the directory the cycle opened and
        scanned (its descriptor), not a second look at the path.
        """
        policy = self.loaded.policy
        return self.state.view.gate(
            snapshot,
            models=count_models(policy, snapshot),
            model_dir=str(policy.model_dir),
            identity=(snapshot.device, snapshot.inode),
            own=own_problems(snapshot),
        )

    def _keepalive(self, name: str = "", done: int = 0, total: int = 0) -> None:
        """Called while a long step makes progress (each block hashed or copied): feeds
        the watchdog, and stops the step when a SIGTERM came (Interrupted)."""
        self._ping()
        if self._stopping:
            raise Interrupted(f"stopped while {name or 'working'} ({done} of {total} bytes)")

    def _stop_now(self) -> bool:
        """Asked before each action: feeds the watchdog, says whether to stop."""
        self._ping()
        return self._stopping

    def _hold(self) -> dict[str, str]:
        """Models left alone this cycle, and why: flapping, or failing with backoff."""
        now = time.monotonic()
        hold = dict(self._flapping.held)
        for name, retry in self._retries.items():
            if retry.not_before is not None and retry.not_before > now:
                hold.setdefault(
                    name,
                    f"failed {retry.failures}x ({retry.reason}); retry in "
                    f"{retry.not_before - now:.0f}s",
                )
        return hold

    def _cycle(self) -> None:
        policy = self.loaded.policy
        model_dir = policy.model_dir
        now = time.monotonic()
        identity = _identity(model_dir)
        if identity is None or not model_dir.is_dir():
            what = "vanished" if self.state.view.seen else "does not exist (yet)"
            self._dir.failed(now=now)
            self.state.view.vanished()
            self._suspect(f"model_dir {model_dir} {what}")
            return
        if self.state.view.trusts(identity) and (
            self._locked_dir != model_dir or identity != self._lock_id
        ):
            # A new path, or (after it vanished and came back, or a reload confirmed a
            # replaced one) a new directory under the same path: take the lock in it.
            # A directory swapped in unconfirmed gets no lock: the gate holds it back.
            try:
                self._take_lock(model_dir)
            except LockedError as exc:
                self._dir.failed(str(exc), now=now)
                self.state.note_error("lock", str(exc))
                self._suspect(str(exc))
                return
        self._dir.succeeded()
        self.downloads.settings = Settings.of(policy.download)
        try:
            result = run_cycle(
                policy,
                engine=self.engine.engine,
                log=self.log,
                hold=self._hold(),
                gate=self._gate,
                stop=self._stop_now,
                progress=self._keepalive,
                fetch=self.downloads,
            )
        except Interrupted as exc:
            self.log.info("cycle.interrupted", reason=str(exc))
            return
        except ModelDirError as exc:
            self._dir.failed(str(exc), now=now)
            self._suspect(str(exc))
            return
        except Exception as exc:  # a failed pass is logged and backed off, never fatal
            self.state.cycle.failed(str(exc), now=now)
            self.log.exception("cycle.failed", error=f"{type(exc).__name__}: {exc}")
            self.state.note_error("cycle", f"{type(exc).__name__}: {exc}")
            return
        self.state.cycle.succeeded()
        if result.snapshot.unseen != self._unseen:
            self._unseen = result.snapshot.unseen
            if self._unseen:  # logged when it changes, not every cycle
                self.log.warning("scan.unseen", unseen=list(self._unseen))
        if result.held_back is None:
            done = result.outcome.done
            self.state.view.acted(
                pruned=sum(1 for a in done if a.kind is ActionKind.PRUNE),
                restored=sum(1 for a in done if a.kind is ActionKind.RESTORE),
            )
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
                reason = self._flapping.pruned(action.name, now=now)
                if reason is not None:
                    self.log.warning("model.flapping", model=action.name, reason=reason)
        for action, error in outcome.failed:
            self._retries.setdefault(action.name, Backoff()).failed(error, now=now)
            self.state.note_error(action.name, error)
        if outcome.engine_error:
            self.state.note_error("engine", outcome.engine_error)
        self._busy_retry_at = now + BUSY_RETRY if outcome.busy else None

    # -- status --------------------------------------------------------------------

    def _handles(self) -> tuple[int, int]:
        """(processes the handle check could inspect, all processes), as last seen."""
        last = self.state.last
        if last is not None and "inspected" in last.outcome.extra:
            extra = last.outcome.extra
            self._visibility = (extra["inspected"], extra["processes"])
        if self._visibility is None:
            self._visibility = visibility()
        return self._visibility

    def _write_status(self, word: str = "running") -> None:
        policy = self.loaded.policy
        assert policy.state_dir is not None
        doc = status.document(
            self.state,
            word=word,
            policy_path=self.config_path,
            digest=self.loaded.digest,
            model_dir=policy.model_dir,
            watch=self.watcher.mode,
            engine=self.engine.engine.name,
            handles=self._handles(),
            notify_dropped=self.notify.dropped,
            downloads=self.downloads.in_progress(),
        )
        error = status.write(status.status_dir(policy.state_dir) / status.STATUS_NAME, doc)
        if error:
            self.log.warning("status.unwritable", error=error)
