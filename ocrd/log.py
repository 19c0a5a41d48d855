"""structlog configuration: one JSON object per line, or a console view.

The JSON path is built for volume: one processor renders a line (timestamp,
level and event first, then the fields in the order given) with a reused
encoder, and the writer flushes each line at once except inside
`batched()`, where a big prune's 50,000 lines go out in blocks (a line
flushes once FLUSH_EVERY seconds have passed) instead of one write(2) each.

structlog itself is imported on the first line logged, not at start-up:
importing it (and what it pulls in) costs tens of milliseconds, and most
commands (`check`, `plan`, `list`, `status`) never log a line.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TextIO, cast

if TYPE_CHECKING:
    from structlog.typing import EventDict, FilteringBoundLogger, WrappedLogger

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
FLUSH_EVERY = 0.1  # seconds a batched line may wait in the buffer
LISTED = 50  # names in one list of a log line (the first ones, in name order)

_LEVEL_NAME = {"warn": "warning", "exception": "error", "fatal": "critical"}


def _encoder() -> Callable[[Any], str]:
    """json.dumps(obj, default=repr) as one reused encoder (CPython's C one, unwrapped)."""
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:
        return json.JSONEncoder(default=repr).encode
    chunks = make(
        None, repr, json.encoder.encode_basestring_ascii, None, ": ", ", ", False, False, True
    )
    return lambda obj: "".join(chunks(obj, 0))


_encode = _encoder()
_second: tuple[int, str] = (-1, "")


def _timestamp() -> str:
    """Now in UTC, ISO 8601 with microseconds and a Z (the date part cached per second)."""
    global _second
    now = time.time()
    sec = int(now)
    if sec != _second[0]:
        _second = (sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)))
    return f"{_second[1]}.{int((now - sec) * 1_000_000):06d}Z"


def _json_line(_: WrappedLogger, method: str, event_dict: EventDict) -> str:
    """The final processor: timestamp, level, event, then the fields as given."""
    line: dict[str, Any] = {
        "timestamp": _timestamp(),
        "level": _LEVEL_NAME.get(method, method),
        "event": event_dict.pop("event", None),
    }
    if "exc_info" in event_dict:
        import structlog

        event_dict = structlog.processors.format_exc_info(_, method, event_dict)
    line.update(event_dict)
    return _encode(line)


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


_writer: LineWriter | None = None
_direct: tuple[Any, int] | None = None  # (our logger factory, min level) with JSON set up
_pending: tuple[str, str, TextIO | None] | None = None  # settings not yet given to structlog
_setup_lock = threading.Lock()


def configure(*, fmt: str = "json", level: str = "info", stream: TextIO | None = None) -> None:
    """Route every ocrd log line to *stream* (stdout by default) in *fmt*.

    Takes effect at once if structlog is in use already, else with the first line.
    """
    global _pending
    with _setup_lock:
        _pending = (fmt, level, stream)
        if "structlog" in sys.modules:
            _setup()


def _setup() -> None:
    """Configure structlog with the pending settings (called under _setup_lock)."""
    global _writer, _pending, _direct
    if _pending is None:
        return
    import structlog

    fmt, level, stream = _pending
    processors: list[Any]
    if fmt == "console":
        processors = [
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp"),
            structlog.processors.format_exc_info,
            structlog.dev.ConsoleRenderer(colors=False),
        ]
    else:
        processors = [_json_line]
    writer = LineWriter(stream or sys.stdout)

    def factory(*_: Any) -> LineWriter:
        return writer

    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        logger_factory=factory,
        cache_logger_on_first_use=False,
    )
    if _writer is not None:
        _writer.flush()
    _writer, _pending = writer, None
    _direct = (factory, LEVELS[level]) if fmt == "json" else None


class _Logger:
    """ocrd's logger: structlog's, fetched (and structlog set up) when first used."""

    def __getattr__(self, name: str) -> Any:
        if _pending is not None:
            with _setup_lock:
                _setup()
        import structlog

        return getattr(structlog.get_logger("ocrd"), name)


def _value(v: Any) -> str:
    """One field's JSON text, exactly as the encoder writes it inside an object."""
    kind = type(v)
    if kind is str:
        return _ascii(v)
    if kind is int:
        return int.__repr__(v)
    return _encode(v)


_ascii: Callable[[str], str] = json.encoder.encode_basestring_ascii


def emitter(logger: Any, level: str, event: str, keys: tuple[str, ...]) -> Callable[..., None]:
    """A function of the field values that logs like `logger.<level>(event, **fields)`.

    When structlog runs with ocrd's JSON output (the CLI, the daemon) and
    *logger* has no bound context, the line is built straight from the values
    into the same text `_json_line` makes: a big prune logs 50,000 lines, and
    structlog's general path costs several times as much per line. Otherwise
    (console format, a test capturing events) it calls *logger*.
    """
    if _pending is not None:
        with _setup_lock:
            _setup()
    writer, direct = _writer, _direct
    if writer is None or direct is None:
        writer = None
    else:
        import structlog

        factory, min_level = direct
        config = structlog.get_config()
        if (
            config["processors"] != [_json_line]  # e.g. a test capturing events
            or config["logger_factory"] is not factory
            or LEVELS[level] < min_level
            or getattr(logger, "_context", None)
        ):
            writer = None
    if writer is None:
        method = getattr(logger, level)
        return lambda *values: method(event, **dict(zip(keys, values, strict=True)))

    # One %-template per event: '{"timestamp": "%s", "level": …, "model": %s, …}'.
    def literal(text: str) -> str:
        return _ascii(text).replace("%", "%%")

    template = f'{{"timestamp": "%s", "level": "{level}", "event": {literal(event)}'
    template += "".join(f", {literal(k)}: %s" for k in keys) + "}"
    count, msg = len(keys), writer.msg

    def emit(*values: Any) -> None:
        if len(values) != count:
            raise TypeError(f"{event}: {count} values expected ({', '.join(keys)})")
        msg(template % (_timestamp(), *map(_value, values)))

    return emit


@contextlib.contextmanager
def batched() -> Iterator[None]:
    """Inside, lines are held and written in one block FLUSH_EVERY s after the last; exit
    writes the rest."""
    writer = _writer
    if writer is None:
        yield
        return
    writer.batching += 1
    try:
        yield
    finally:
        writer.batching -= 1
        writer.flush()


def get() -> FilteringBoundLogger:
    """The logger to pass around; each call goes to structlog's current configuration."""
    return cast("FilteringBoundLogger", _Logger())
