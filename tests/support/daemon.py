"""A daemon under test: one running `ocrd` subprocess whose JSON log lines a thread reads
as they come.

`Daemon` is one process, usually `ocrd run` (the crash tests also watch `ocrd apply` so);
`Daemons` starts them for one test and ends whatever is left of them (the `daemons` fixture
of tests/conftest.py). Every wait sleeps on a condition variable that each new log line and
the end of stdout wake, and looks at each line once: nothing polls the log.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from tests.support.cli import OCRD
from tests.support.policy import DEBOUNCE

# Variables a service manager sets; none may leak in from the shell running the tests.
SERVICE_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "RUNTIME_DIRECTORY")
CAP = 5 * DEBOUNCE  # the daemon's hard cap on settling under constant writes
# Longer than any debounce the daemon may still be in, and than the 0.5 s watchdog waits
# to pair a move out of the model dir (a prune) with its other half before reporting it.
QUIET = CAP + 0.4

Event = dict[str, Any]
Where = Callable[[Event], bool]


def daemon_env(env: Mapping[str, str], *, runtime: Path | None) -> dict[str, str]:
    """*env* without service-manager variables; $RUNTIME_DIRECTORY=*runtime* if one is given."""
    clean = {k: v for k, v in env.items() if k not in SERVICE_VARS}
    if runtime is not None:
        clean["RUNTIME_DIRECTORY"] = str(runtime)
    return clean


class Daemon:
    """One running `ocrd` and every JSON line it logged, read by a thread as it comes.

    *stderr*: a file to send the process's stderr to (else a thread collects it).
    """

    def __init__(
        self, argv: Sequence[str], env: Mapping[str, str], *, stderr: Path | None = None
    ) -> None:
        self.argv = list(argv)
        self.events: list[Event] = []
        self.noise: list[str] = []  # stdout lines that are not JSON objects
        self.started = time.monotonic()
        self.first_line_at: float | None = None  # monotonic time of the first stdout line
        self.ended = False  # stdout is closed: the process has exited
        self.ended_at: float | None = None  # monotonic time stdout closed
        self._stderr_file = stderr
        self._stderr_lines: list[str] = []
        self._pid: int | None = None
        self._cond = threading.Condition()
        sink: IO[bytes] | None = stderr.open("wb") if stderr is not None else None
        try:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE if sink is None else sink,
                env=dict(env),
            )
        finally:
            if sink is not None:
                sink.close()  # the child has its own descriptor
        self._readers = [threading.Thread(target=self._read_stdout, daemon=True)]
        if sink is None:
            self._readers.append(threading.Thread(target=self._read_stderr, daemon=True))
        for reader in self._readers:
            reader.start()

    # -- the reader threads -----------------------------------------------------------------

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            try:
                line = json.loads(raw)
            except ValueError:
                line = None
            with self._cond:
                if self.first_line_at is None:
                    self.first_line_at = time.monotonic()
                if isinstance(line, dict):
                    self.events.append(line)
                else:
                    self.noise.append(raw.decode(errors="replace"))
                self._cond.notify_all()
        with self._cond:
            self.ended, self.ended_at = True, time.monotonic()
            self._cond.notify_all()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            self._stderr_lines.append(raw.decode(errors="replace"))

    # -- what it logged ---------------------------------------------------------------------

    @property
    def stderr(self) -> str:
        """What the process wrote to stderr so far."""
        if self._stderr_file is None:
            return "".join(self._stderr_lines)
        try:
            return self._stderr_file.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return f"({self._stderr_file} is gone)"

    def __repr__(self) -> str:
        return (
            f"Daemon(rc={self.proc.poll()}, events={self.names()[-60:]}, "
            f"stderr={self.stderr[-2000:]!r}, noise={self.noise[:5]!r})"
        )

    @property
    def pid(self) -> int:
        """The pid of ocrd itself (not of a wrapper such as strace), from `daemon.started`."""
        if self._pid is None:
            self._pid = int(self.wait("daemon.started")["pid"])
        return self._pid

    def mark(self) -> int:
        """A position in the log; pass it as *after* to look only at what came later."""
        return len(self.events)

    def after(self, event: Event) -> int:
        """The position just past *event*, a line of this log."""
        return next(i for i, e in enumerate(self.events) if e is event) + 1

    def names(self, after: int = 0) -> list[str]:
        return [e["event"] for e in self.events[after:]]

    def seen(
        self, event: str, *, after: int = 0, where: Where | None = None, **fields: Any
    ) -> list[Event]:
        """The *event* lines from *after* on whose *fields* match (and *where*, if given)."""
        return [e for e in self.events[after:] if _matches(e, event, where, fields)]

    def cycles(self, after: int = 0) -> list[Event]:
        return self.seen("cycle.finished", after=after)

    def converged(self) -> bool:
        """A cycle that did everything it planned."""
        return any(
            c["planned"] == c["done"] and not c["failed"] and not c["skipped"]
            for c in self.cycles()
        )

    def alive(self) -> bool:
        return self.proc.poll() is None

    # -- waiting ----------------------------------------------------------------------------

    def wait_until(self, predicate: Callable[[], bool], what: str, timeout: float = 60) -> None:
        """Block until *predicate* holds (checked on every log line and at EOF)."""
        with self._cond:
            if not self._cond.wait_for(predicate, timeout=timeout):
                raise AssertionError(f"timed out after {timeout}s waiting for {what}; {self!r}")

    def wait(
        self,
        event: str,
        *,
        after: int = 0,
        timeout: float = 10.0,
        where: Where | None = None,
        **fields: Any,
    ) -> Event:
        """The first *event* (with these field values) logged after *after*; fail on a deadline."""
        scan = _Scan(self.events, after)
        found: list[Event] = []

        def hit() -> bool:
            found.extend(e for e in scan.new() if _matches(e, event, where, fields))
            return bool(found) or self.ended

        self.wait_until(hit, f"{event} {fields}", timeout)
        if not found:  # the log ended; hit() had read it to its last line
            raise AssertionError(f"ocrd ended before logging {event} {fields}; {self!r}")
        return found[0]

    def wait_cycles(self, count: int, *, after: int = 0, timeout: float = 10.0) -> None:
        """Wait until *count* cycles finished after *after*."""
        scan = _Scan(self.events, after)
        done = [0]

        def enough() -> bool:
            done[0] += sum(e["event"] == "cycle.finished" for e in scan.new())
            return done[0] >= count or self.ended

        self.wait_until(enough, f"{count} cycle(s)", timeout)
        if done[0] < count:
            raise AssertionError(f"ocrd ended after {done[0]} of {count} cycle(s); {self!r}")

    def quiet(self, seconds: float = QUIET, *, event: str = "cycle.finished") -> None:
        """Assert that no new *event* is logged for *seconds* (a negative needs a window)."""
        scan = _Scan(self.events, self.mark())
        deadline = time.monotonic() + seconds
        with self._cond:
            while True:
                new = [e for e in scan.new() if e["event"] == event]
                assert not new, f"unexpected {event} within {seconds}s: {new}"
                assert not self.ended and self.alive(), f"ocrd ended: {self!r}"
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self._cond.wait(left)

    def settle(self, *, quiet: float = QUIET, timeout: float = 15.0) -> int:
        """Wait until no cycle has finished for *quiet* s; fail if cycles keep coming.

        Returns the number of cycles so far.
        """
        scan = _Scan(self.events, 0)
        deadline = time.monotonic() + timeout
        with self._cond:
            count, changed = 0, time.monotonic()
            while True:
                new = sum(e["event"] == "cycle.finished" for e in scan.new())
                if new:
                    count, changed = count + new, time.monotonic()
                now = time.monotonic()
                if now - changed >= quiet:
                    return count
                assert now < deadline, f"cycles never stopped within {timeout}s: {self!r}"
                assert not self.ended, f"ocrd ended: {self!r}"
                self._cond.wait(min(changed + quiet, deadline) - now)

    # -- ending it --------------------------------------------------------------------------

    def send(self, signum: int) -> None:
        """Send *signum* to ocrd itself."""
        os.kill(self.pid, signum)

    def stop(self, signum: int = signal.SIGTERM, *, timeout: float = 10.0) -> tuple[int, float]:
        """Send *signum*; the exit code and how long the process took to end."""
        pid = self.pid
        started = time.monotonic()
        os.kill(pid, signum)
        code = self.proc.wait(timeout=timeout)
        elapsed = time.monotonic() - started
        self._join()
        return code, elapsed

    def kill(self) -> None:
        """SIGKILL the process (a wrapper, if there is one) now, without waiting for it."""
        self.proc.send_signal(signal.SIGKILL)

    def finish(self, timeout: float = 60) -> int:
        """Wait for the process to end and its output to be read; its exit code."""
        code = self.proc.wait(timeout=timeout)
        self._join()
        return code

    def close(self) -> None:
        """End ocrd (and a wrapper around it) by pid, whatever state it is in; reap it.

        A killed strace would leave its tracee running, so ocrd's own pid is killed too.
        """
        if self.proc.poll() is None:
            for line in self.seen("daemon.started"):
                if int(line["pid"]) != self.proc.pid:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(line["pid"]), signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGCONT)  # in case a test left it stopped
            self.proc.kill()
        self.finish(timeout=10)

    def _join(self) -> None:
        """Let the readers take in the last lines, then close the pipes they are done with."""
        streams = [self.proc.stdout, self.proc.stderr]
        for reader, stream in zip(self._readers, streams, strict=False):
            reader.join(timeout=5)
            if not reader.is_alive() and stream is not None:
                stream.close()


class _Scan:
    """Walks a growing log from a position on: each call returns the lines new since the last."""

    def __init__(self, events: list[Event], start: int) -> None:
        self.events = events
        self.pos = start

    def new(self) -> list[Event]:
        lines = self.events[self.pos :]
        self.pos += len(lines)
        return lines


def _matches(e: Event, event: str, where: Where | None, fields: Mapping[str, Any]) -> bool:
    return (
        e["event"] == event
        and all(e.get(k) == v for k, v in fields.items())
        and (where is None or where(e))
    )


class Daemons:
    """Starts daemons for one test and ends whatever is left of them at the end."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = dict(env)
        self.started: list[Daemon] = []
        self._lock = threading.Lock()  # the crash tests launch from several threads

    def launch(
        self,
        policy: Path,
        *args: str,
        env: Mapping[str, str] | None = None,
        extra_env: Mapping[str, str] | None = None,
        wrapper: Sequence[str] = (),
        stderr: Path | None = None,
    ) -> Daemon:
        """`[WRAPPER] ocrd --config POLICY ARGS` (ARGS name the command), not waited for.

        *env* replaces the group's environment; *extra_env* is added to it.
        """
        daemon = Daemon(
            [*wrapper, OCRD, "--config", str(policy), *args],
            {**(self.env if env is None else env), **(extra_env or {})},
            stderr=stderr,
        )
        with self._lock:
            self.started.append(daemon)
        return daemon

    def start(
        self,
        policy: Path,
        *args: str,
        env: Mapping[str, str] | None = None,
        extra_env: Mapping[str, str] | None = None,
        wrapper: Sequence[str] = (),
        started: bool = True,
        first_cycle: bool = True,
    ) -> Daemon:
        """`ocrd --config POLICY run ARGS`; by default returns once the first cycle finished.

        *started*: wait for `daemon.started`; *first_cycle*: and for the first cycle too.
        """
        daemon = self.launch(policy, "run", *args, env=env, extra_env=extra_env, wrapper=wrapper)
        if started or first_cycle:
            daemon.wait("daemon.started", timeout=20)
        if first_cycle:
            daemon.wait_cycles(1)
        return daemon

    def close(self) -> None:
        """End every daemon started here (safe to call twice)."""
        with self._lock:
            started = list(self.started)
        for daemon in started:
            daemon.close()

    def __enter__(self) -> Daemons:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
