"""File events -> wake-ups. Events only wake the daemon loop; every pass
re-plans from a fresh scan, so a lost or coalesced event costs nothing but
latency (the periodic resync covers it)."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver, ObservedWatch
from watchdog.observers.polling import PollingObserver

POLL_INTERVAL = 2.0


def _top_name(root: str, path: str) -> str | None:
    rel = os.path.relpath(path, root)
    if rel == "." or rel.startswith(".."):
        return None
    return rel.split(os.sep, 1)[0]


class _OverflowHook(logging.Handler):
    """watchdog reports an inotify queue overflow (IN_Q_OVERFLOW) only by logging
    a warning and dropping what it had; this turns that warning into a wake-up."""

    LOGGERS = ("watchdog.observers.inotify_c", "watchdog.observers.inotify")

    def __init__(self, callback: Callable[[], None]) -> None:
        super().__init__(logging.WARNING)
        self.callback = callback

    def emit(self, record: logging.LogRecord) -> None:
        if "overflow" in record.getMessage().lower():
            self.callback()

    @classmethod
    def install(cls, callback: Callable[[], None]) -> None:
        for name in cls.LOGGERS:
            logger = logging.getLogger(name)
            for old in [h for h in logger.handlers if isinstance(h, cls)]:
                logger.removeHandler(old)
            logger.addHandler(cls(callback))
            logger.propagate = False  # ocrd logs it itself (watch.overflow), once


def _identity(path: str | None) -> tuple[int, int] | None:
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _paths(event: FileSystemEvent) -> list[str] | None:
    """The paths an event is about (a move has two); None for events that change nothing."""
    if event.event_type in ("opened", "closed_no_write"):
        return None
    paths = [os.fsdecode(event.src_path)]
    dest = getattr(event, "dest_path", "")  # only moves carry one
    if dest:
        paths.append(os.fsdecode(dest))
    return paths


class _ModelEvents(FileSystemEventHandler):
    """Wakes on changes to top-level entries; ocrd's own dot-entries are skipped."""

    def __init__(self, root: str, wake: Callable[[], None]) -> None:
        self.root = root
        self.wake = wake

    def on_any_event(self, event: FileSystemEvent) -> None:
        for path in _paths(event) or ():
            name = _top_name(self.root, path)
            if name is None or not name.startswith("."):
                self.wake()
                return


class _PolicyEvents(FileSystemEventHandler):
    """Changes to the policy file's own name in its directory, or to what it links
    through (a Kubernetes ConfigMap swaps a `..data` symlink); the daemon then
    compares digests, so a spurious wake-up costs one read of the file."""

    def __init__(self, policy_file: str, wake: Callable[[], None]) -> None:
        self.wake = wake
        self.directory = os.path.dirname(policy_file)
        self.names = {os.path.basename(policy_file)}
        try:
            target = os.readlink(policy_file)
        except OSError:
            target = ""
        if target and not os.path.isabs(target):
            self.names.add(target.split(os.sep, 1)[0])

    def _relevant(self, path: str) -> bool:
        if os.path.dirname(path) != self.directory:
            return False
        name = os.path.basename(path)
        return name in self.names or name.startswith("..")

    def on_any_event(self, event: FileSystemEvent) -> None:
        if any(self._relevant(p) for p in _paths(event) or ()):
            self.wake()


class Watcher:
    """One observer for the model dir and the policy file's directory.

    Falls back to polling when inotify cannot be used (instance or watch
    limits), and says so through *warn*.
    """

    def __init__(
        self,
        *,
        on_models: Callable[[], None],
        on_policy: Callable[[], None],
        warn: Callable[..., Any],
        on_overflow: Callable[[], None] | None = None,
        force_polling: bool = False,
    ) -> None:
        if on_overflow is not None:
            _OverflowHook.install(on_overflow)
        self._on_models = on_models
        self._on_policy = on_policy
        self._warn = warn
        self._lock = threading.Lock()
        self.mode = "polling" if force_polling else "inotify"
        self._observer: BaseObserver = self._new_observer()
        self._started = False
        self._model_watch: ObservedWatch | None = None
        self._policy_watch: ObservedWatch | None = None
        self.model_dir: str | None = None
        self._model_id: tuple[int, int] | None = None
        self.policy_file: str | None = None

    def _new_observer(self) -> BaseObserver:
        if self.mode == "inotify":
            try:
                return Observer()
            except OSError as exc:  # e.g. EMFILE: inotify instance limit reached
                self._warn(
                    "watch.polling",
                    error=str(exc),
                    hint="inotify is unavailable (raise fs.inotify.max_user_watches / "
                    "max_user_instances); polling every 2s instead",
                )
                self.mode = "polling"
        return PollingObserver(timeout=POLL_INTERVAL)

    def _fall_back(self, error: OSError) -> None:
        self._warn(
            "watch.polling",
            error=str(error),
            hint="inotify is unavailable (raise fs.inotify.max_user_watches / "
            "max_user_instances); polling every 2s instead",
        )
        if self._started:
            # The broken observer is being replaced; how it fails to stop doesn't matter.
            with contextlib.suppress(Exception):
                self._observer.stop()
        self.mode = "polling"
        self._observer = self._new_observer()
        self._started = False
        self._model_watch = self._policy_watch = None

    def _ensure_started(self) -> None:
        if not self._started:
            self._observer.start()
            self._started = True

    def _schedule(self, path: str, handler: FileSystemEventHandler) -> ObservedWatch:
        for _ in range(2):
            try:
                self._ensure_started()
                return self._observer.schedule(handler, path, recursive=False)
            except OSError as exc:
                if self.mode == "polling" or not os.path.isdir(path):
                    raise
                self._fall_back(exc)
        raise OSError(f"cannot watch {path}")  # pragma: no cover - loop always returns

    def watch(self, model_dir: Path | None, policy_file: Path) -> str | None:
        """(Re)point the watches; returns an error text when the model dir can't be watched."""
        with self._lock:
            policy_path = os.path.abspath(policy_file)
            policy_dir = os.path.dirname(policy_path)
            if self._policy_watch is None or policy_path != self.policy_file:
                if self._policy_watch is not None:
                    self._observer.unschedule(self._policy_watch)
                try:
                    handler = _PolicyEvents(policy_path, self._on_policy)
                    self._policy_watch = self._schedule(policy_dir, handler)
                    self.policy_file = policy_path
                except OSError as exc:
                    self._policy_watch = None
                    return f"cannot watch the policy directory {policy_dir}: {exc}"
            target = None if model_dir is None else str(model_dir)
            identity = _identity(target)
            if (
                self._model_watch is not None
                and target == self.model_dir
                and (identity is not None and identity == self._model_id)
            ):
                return None
            self._drop_model_watch()
            if target is None or not os.path.isdir(target):
                return f"model_dir {target} does not exist; watching again when it does"
            try:
                self._model_watch = self._schedule(target, _ModelEvents(target, self._on_models))
            except OSError as exc:
                return f"cannot watch {target}: {exc}"
            self.model_dir = target
            self._model_id = identity
            return None

    def forget_model_dir(self) -> None:
        """Drop the model-dir watch so the next watch() schedules it afresh."""
        with self._lock:
            self._drop_model_watch()

    def _drop_model_watch(self) -> None:
        if self._model_watch is not None:
            # KeyError/OSError: its emitter already died with the directory.
            with contextlib.suppress(KeyError, OSError):
                self._observer.unschedule(self._model_watch)
        self._model_watch = None
        self.model_dir = None
        self._model_id = None

    def stop(self) -> None:
        with self._lock:
            if self._started:
                self._observer.stop()
                self._observer.join(timeout=5)
                self._started = False
