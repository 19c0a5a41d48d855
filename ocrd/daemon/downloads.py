"""The daemon's downloads: restores from the network run beside the loop.

A cycle that plans a restore from an http(s):// or hf:// source hands it here
(`defer`): the download starts in a thread of its own and the cycle goes on
without it (its other actions are not held up, the engine is not released for
it, the watchdog keeps being fed by the loop). When the model is staged —
downloaded and verified under its hidden name — the thread wakes the loop, and
the next cycle puts it in place (`__call__`), which takes a moment. A failed
download is that restore's failure in the next cycle (logged, backed off like
any other). SIGTERM aborts every download at once (`stop`): the socket is shut,
what landed stays for the next start to resume.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ocrd.act.fetching import Fetcher, Pending, Progressing, Staged
from ocrd.act.fs import ActionError, Log
from ocrd.core.model import Action, ActionKind
from ocrd.core.sources import parse_source, shown
from ocrd.fetch.transport import Settings
from ocrd.observe.hashing import Progress

STOP_WAIT = 1.0  # seconds SIGTERM waits for the downloads to let go


def remote(action: Action) -> bool:
    """Whether *action* is a restore with a source on the network."""
    return action.kind is ActionKind.RESTORE and any(
        parse_source(text).remote for text in action.sources
    )


@dataclass
class _Job:
    model: str
    key: tuple[tuple[str, ...], str | None]  # what it fetches: sources and pin
    where: tuple[int, int]  # the model dir it downloads into: (device, inode)
    fetcher: Fetcher
    thread: threading.Thread | None = None
    progress: Progressing | None = None
    staged: Staged | None = None
    error: str | None = None
    started: float = field(default_factory=time.time)

    @property
    def running(self) -> bool:
        return self.thread is not None and self.thread.is_alive()


class Downloads:
    """Restores from the network, beside the loop; see the module docstring."""

    def __init__(
        self, *, log: Log, wake: Callable[[], None], progress: Progress | None = None
    ) -> None:
        self.log, self.wake, self.progress = log, wake, progress
        self.settings = Settings()
        self._jobs: dict[str, _Job] = {}
        self._leaving: list[_Job] = []  # aborted, their thread not ended yet
        self._lock = threading.Lock()
        self._stopping = False

    # -- the cycle's side -----------------------------------------------------------

    def defer(self, actions: Sequence[Action], dir_fd: int) -> dict[str, str]:
        """Start the downloads *actions* need; the restores to leave out of this cycle
        (still downloading), each with what status says of it."""
        deferred: dict[str, str] = {}
        wanted = {(a.name, a.sources, a.sha256) for a in actions if remote(a)}
        names = {name for name, _, _ in wanted}
        here = _identity(dir_fd)
        with self._lock:
            dropped = [
                self._jobs.pop(name)
                for name, job in list(self._jobs.items())
                # Not needed as it is, or for a model dir that is not this one any more.
                if name not in names or (name, *job.key) not in wanted or job.where != here
            ]
        for job in dropped:
            job.fetcher.abort()
        for job in dropped:  # a new download of that model needs its file (and its lock)
            if job.thread is not None:
                job.thread.join(STOP_WAIT)
        self._leaving = [job for job in [*self._leaving, *dropped] if job.running]
        leaving = {job.model for job in self._leaving}
        for action in actions:
            if not remote(action):
                continue
            if action.name in leaving:  # an aborted download of it has not let go yet
                deferred[action.name] = "waiting for the previous download of it to stop"
                continue
            key = (action.sources, action.sha256)
            with self._lock:
                found = self._jobs.get(action.name)
                job = found if found is not None else self._start(action, key, dir_fd)
                if job.running or (job.staged is None and job.error is None):
                    deferred[action.name] = _describe(job)
        return deferred

    def __call__(self, action: Action, dir_fd: int) -> Staged:
        """The staged model for *action* (from the thread that fetched it), or its error."""
        if not remote(action):
            # A local copy runs in the cycle, feeding the watchdog (and SIGTERM stops it).
            return Fetcher(self.settings, log=self.log, progress=self.progress)(action, dir_fd)
        with self._lock:
            job = self._jobs.get(action.name)
            if job is None or job.running:
                raise Pending(_describe(job) if job is not None else "download not started")
            del self._jobs[action.name]
        if job.error is not None:
            raise ActionError(job.error)
        assert job.staged is not None
        return job.staged

    # -- threads --------------------------------------------------------------------

    def _start(self, action: Action, key: tuple[tuple[str, ...], str | None], dir_fd: int) -> _Job:
        cancel = threading.Event()
        fetcher = Fetcher(self.settings, log=self.log, cancel=cancel)
        job = _Job(action.name, key, _identity(dir_fd), fetcher)
        job.fetcher.watch = lambda progress: setattr(job, "progress", progress)
        fd = os.dup(dir_fd)  # the thread's own: the cycle closes its descriptor
        job.thread = threading.Thread(
            target=self._run, args=(job, action, fd), name=f"ocrd-download-{action.name}"
        )
        job.thread.daemon = True
        self._jobs[action.name] = job
        job.thread.start()
        return job

    def _run(self, job: _Job, action: Action, fd: int) -> None:
        try:
            job.staged = job.fetcher(action, fd)
        except Exception as exc:  # the next cycle reports it as the action's failure
            job.error = str(exc) if not job.fetcher.cancel.is_set() else "stopped"
        finally:
            os.close(fd)
        if not self._stopping:
            self.wake()

    def stop(self, timeout: float = STOP_WAIT) -> None:
        """Abort every download; wait up to *timeout* for the threads to let go."""
        self._stopping = True
        with self._lock:
            jobs = list(self._jobs.values())
        for job in jobs:
            job.fetcher.abort()
        deadline = time.monotonic() + timeout
        for job in jobs:
            if job.thread is not None:
                job.thread.join(max(0.0, deadline - time.monotonic()))

    # -- status ---------------------------------------------------------------------

    def in_progress(self) -> list[dict[str, object]]:
        """The downloads running now, for status: model, source, bytes done and total."""
        found = []
        with self._lock:
            jobs = list(self._jobs.items())
        for name, job in jobs:
            if not job.running:
                continue
            progress = job.progress
            found.append(
                {
                    "model": name,
                    "source": progress.source if progress else shown(job.key[0][0]),
                    "done": progress.done if progress else 0,
                    "total": progress.total if progress else None,
                    "started": job.started,
                }
            )
        return found


def _identity(dir_fd: int) -> tuple[int, int]:
    st = os.fstat(dir_fd)
    return st.st_dev, st.st_ino


def _describe(job: _Job) -> str:
    progress = job.progress
    if progress is None:
        return "downloading (starting)"
    total = f" of {progress.total}" if progress.total is not None else ""
    return f"downloading from {progress.source}: {progress.done}{total} bytes"
