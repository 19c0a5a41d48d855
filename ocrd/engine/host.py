"""The engine host seen from ocrd: one child process, JSON lines, and how it is ended.

The child runs `python -I -m ocrd.engine.child` (see that module for the
protocol). Ending it escalates within a deadline: `free`, then `quit`, then
SIGTERM, then SIGKILL, then reap. A host that dies is an `engine.crashed`
event with its exit and the tail of its stderr log, never a crash of ocrd.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from ocrd.engine.base import EngineError
from ocrd.openfile import give_to_owner_of

CHILD_MODULE = "ocrd.engine.child"
START_TIMEOUT = 60.0

Emit = Callable[..., None]  # emit(level, event, **fields)


def describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


class HostProcess:
    """One running engine host: started by start(), ended by end() or by dying."""

    def __init__(self, *, cwd: Path, env: dict[str, str], log_path: Path, emit: Emit) -> None:
        self.cwd, self.env, self.log_path, self._emit = cwd, env, log_path, emit
        self.proc: subprocess.Popen[bytes] | None = None
        self._buffer = b""
        self._log_file: IO[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> dict[str, Any] | None:
        """Spawn the child and read its hello line (None: it exited first)."""
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the host
        give_to_owner_of(self._log_file.fileno(), os.stat(self.log_path.parent))
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-m", CHILD_MODULE],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log_file,
            cwd=self.cwd,
            env=self.env,
            start_new_session=True,  # a terminal's Ctrl-C goes to ocrd, which ends the host
            close_fds=True,
        )
        return self._readline(START_TIMEOUT)

    def stderr_tail(self, lines: int = 5) -> str:
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(0, fh.tell() - 4096))
                text = fh.read().decode("utf-8", "replace")
        except OSError:
            return ""
        return " | ".join(text.strip().splitlines()[-lines:])

    def _readline(self, timeout: float) -> dict[str, Any] | None:
        """One protocol line from the host, None on EOF; EngineError on timeout."""
        assert self.proc is not None and self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while b"\n" not in self._buffer:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise EngineError(
                        f"engine host (pid {self.proc.pid}) did not answer within {timeout:g}s"
                    )
                if not sel.select(remaining):
                    continue
                chunk = os.read(fd, 65536)
                if not chunk:
                    return None
                self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        try:
            message = json.loads(line)
        except ValueError:
            raise EngineError(f"engine host sent a bad line: {line[:200]!r}") from None
        if not isinstance(message, dict):
            raise EngineError(f"engine host sent a bad line: {line[:200]!r}")
        return message

    def died(self, during: str) -> EngineError:
        """Reap a host that exited, log `engine.crashed`, and return the error to raise."""
        assert self.proc is not None
        code = self.proc.wait()
        pid = self.proc.pid
        tail = self.stderr_tail()
        self._emit(
            "error",
            "engine.crashed",
            pid=pid,
            during=during,
            exit=describe_exit(code),
            stderr=tail,
            log=str(self.log_path),
        )
        self.reap()
        return EngineError(
            f"engine host (pid {pid}) died during {during}: "
            f"{describe_exit(code)}" + (f"; {tail}" if tail else "")
        )

    def reap(self) -> None:
        if self.proc is not None:
            for stream in (self.proc.stdin, self.proc.stdout):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()
        self.proc = None
        self._buffer = b""
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def call(self, op: str, *, timeout: float | None = None) -> Any:
        """Send one request to the running host and return its result."""
        if self.proc is None:
            raise EngineError("the engine host is not running")
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps({"op": op}).encode() + b"\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            raise self.died(op) from None
        reply = self._readline(timeout if timeout is not None else START_TIMEOUT)
        if reply is None:
            raise self.died(op)
        if not reply.get("ok"):
            raise EngineError(f"engine host {op} failed: {reply.get('error')}")
        return reply.get("result")

    def end(self, timeout: float) -> str | None:
        """free, quit, SIGTERM, SIGKILL, reap, all within *timeout*.

        Returns how it ended ("quit", "terminate", "kill"), or None when it had
        died already (engine.crashed was logged). Raises EngineError when even
        SIGKILL did not end it in time.
        """
        proc = self.proc
        if proc is None:
            return None
        pid = proc.pid
        deadline = time.monotonic() + timeout
        how = "quit"
        if proc.poll() is not None:
            self.died("release")
            return None
        with contextlib.suppress(EngineError):
            self.call("free", timeout=max(0.1, timeout / 2))
        if self.proc is None:
            return None  # it died meanwhile: engine.crashed was logged and it was reaped
        if proc.poll() is None:
            with contextlib.suppress(EngineError):
                self.call("quit", timeout=max(0.1, deadline - time.monotonic()))
            if self.proc is None:
                return None
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic() - 1.0))
        except subprocess.TimeoutExpired:
            how = "terminate"
            proc.terminate()
            try:
                proc.wait(timeout=max(0.1, (deadline - time.monotonic()) / 2))
            except subprocess.TimeoutExpired:
                how = "kill"
                proc.kill()
                try:
                    proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    raise EngineError(
                        f"engine host pid {pid} is still alive after SIGKILL and "
                        f"{timeout:g}s; nothing will be deleted"
                    ) from None
        self.reap()
        return how
