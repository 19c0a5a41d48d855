"""structlog configuration: one JSON object per line, or a console view.

structlog is set up as its performance guide suggests: loggers are cached on
first use, and one processor chain (TimeStamper, add_log_level,
format_exc_info, JSONRenderer) renders each line. The writer flushes each
line at once, except inside `batched()`, where a big prune's 50,000 lines go
out in blocks (a line flushes once FLUSH_EVERY seconds have passed) instead
of one write(2) each.

A cached logger keeps the processor list and the writer it was built with,
so `configure()` never replaces them: it refills the one list in place (as
`structlog.testing.capture_logs` does), points the one writer at the new
stream, and sets the level that the chain's first processor reads. A logger
used before a reload follows the reload's format, level and stream.

structlog itself is imported by the first `get()`, not at start-up: importing
it costs tens of milliseconds, and `check` and `status` never log a line.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from structlog.typing import EventDict, FilteringBoundLogger, Processor, WrappedLogger

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
FLUSH_EVERY = 0.1  # seconds a batched line may wait in the buffer
LISTED = 50  # names in one list of a log line (the first ones, in name order)

_RANK = {**LEVELS, "critical": logging.CRITICAL}  # structlog's method names


class LineWriter:
    """structlog's output: writes each rendered line, flushing unless batched.

    Batched lines are held in a list and written with one write() per flush:
    12 MB of prune lines then go to a pipe (journald, a terminal) in a few
    dozen large writes instead of thousands of 8 KiB ones.
    """

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.batching = 0
        self._held: list[str] = []
        self._flushed = 0.0
        self._lock = threading.Lock()

    def msg(self, message: str) -> None:
        with self._lock:
            if not self.batching:
                self.stream.write(message + "\n")
                self.stream.flush()
                return
            self._held.append(message)
            if (now := time.monotonic()) - self._flushed >= FLUSH_EVERY:
                self._write_held()
                self._flushed = now

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg

    def _write_held(self) -> None:
        if self._held:
            held, self._held = self._held, []
            self.stream.write("\n".join(held) + "\n")
        self.stream.flush()

    def flush(self) -> None:
        with self._lock:
            self._write_held()
            self._flushed = time.monotonic()

    def redirect(self, stream: TextIO) -> None:
        """Write to *stream* from now on; what is held goes to the old stream first."""
        with self._lock:
            self._write_held()
            self.stream = stream


_writer = LineWriter(sys.stdout)  # the one writer every logger writes to
_processors: list[Processor] = []  # the one chain every logger runs; refilled in place
_format = "json"
_level = logging.INFO
_lock = threading.Lock()


def _writer_for(*_: Any) -> LineWriter:
    """structlog's logger factory: every logger writes through the one writer."""
    return _writer


def _at_level(_: WrappedLogger, method: str, event_dict: EventDict) -> EventDict:
    """Drop what is below the configured level (read per line, so it reaches cached loggers)."""
    if _RANK[method] < _level:
        from structlog import DropEvent

        raise DropEvent
    return event_dict


class _JsonLine:
    """The JSON chain's stamper, level and renderer in one processor: timestamp
    (UTC, always six digits of microseconds), level and event first, then the
    fields in call order.

    structlog's TimeStamper, add_log_level and JSONRenderer in a row do the
    same in about three times as long; here the date and time are formatted
    once per second and the line is built in order. A big prune writes 50,000
    lines, each through this processor.
    """

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def __call__(self, _: WrappedLogger, method: str, event_dict: EventDict) -> str:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        stamp = f"{self._prefix}.{int((now - second) * 1_000_000):06d}Z"
        line = {"timestamp": stamp, "level": _LEVEL_NAMES.get(method, method)}
        line["event"] = event_dict.pop("event", None)
        event_dict.pop("timestamp", None)
        event_dict.pop("level", None)
        line.update(event_dict)
        return json.dumps(line, default=repr)  # what JSON cannot hold: its repr, as structlog


class _ConsoleLine:
    """The console chain's stamper, level and renderer (structlog's own) in one processor."""

    def __init__(self) -> None:
        import structlog

        self._stamp = structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp")
        self._level = structlog.processors.add_log_level
        self._render = structlog.dev.ConsoleRenderer(colors=False)

    def __call__(self, logger: WrappedLogger, method: str, event_dict: EventDict) -> str:
        event_dict = self._level(logger, method, self._stamp(logger, method, event_dict))
        return str(self._render(logger, method, event_dict))


_LEVEL_NAMES = {"warn": "warning", "exception": "error", "failure": "error", "err": "error"}


def _chain(fmt: str) -> list[Processor]:
    """The processors for *fmt*: json (one object per line) or console.

    Both have the same shape, so a line logged by another thread while
    configure() refills the list still meets one stamper and one renderer.
    """
    import structlog

    render: Processor = _ConsoleLine() if fmt == "console" else _JsonLine()
    return [_at_level, structlog.processors.format_exc_info, render]


def configure(*, fmt: str = "json", level: str = "info", stream: TextIO | None = None) -> None:
    """Route every ocrd log line to *stream* (stdout by default) in *fmt*, from *level* up.

    Takes effect at once, for loggers already in use too.
    """
    global _format, _level
    with _lock:
        _writer.redirect(stream or sys.stdout)
        _format, _level = fmt, LEVELS[level]
        if _processors:  # structlog is set up: its loggers hold this very list
            _processors[:] = _chain(fmt)


def get() -> FilteringBoundLogger:
    """The logger to pass around (structlog's, set up for ocrd on the first call)."""
    import structlog

    with _lock:
        if structlog.get_config()["processors"] is not _processors:
            _processors[:] = _chain(_format)
            structlog.configure(
                processors=_processors,
                # Every level passes here; _at_level filters by the level configured now.
                wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
                logger_factory=_writer_for,
                cache_logger_on_first_use=True,
            )
    logger: FilteringBoundLogger = structlog.get_logger("ocrd")
    return logger


@contextlib.contextmanager
def batched() -> Iterator[None]:
    """Inside, lines are held and written in one block FLUSH_EVERY s after the last; exit
    writes the rest."""
    _writer.batching += 1
    try:
        yield
    finally:
        _writer.batching -= 1
        _writer.flush()
