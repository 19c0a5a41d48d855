"""ocrd's log output: the JSON line format, levels, batching, and reconfiguration."""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator
from pathlib import PurePosixPath
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from ocrd import log

FIELDS: dict[str, Any] = {
    "model": 'ünï "quoted" \\ name\n',
    "reason": "prefix 'old_', 3m old (100% %s %%)",
    "bytes": 12_345_678_901,
    "dest": ".ocrd-trash/20261127T000000Z-abcd/x",
    "mode": "quarantine",
    "extra": {"nested": [1, 2.5, None, True]},
    "path": PurePosixPath("/srv/models"),
}
# The line for FIELDS, byte for byte, after the timestamp (json.dumps' separators,
# non-ASCII escaped, a value JSON has no type for written as its repr()).
FIELDS_TEXT = (
    '"level": "info", "event": "model.pruned", '
    r'"model": "\u00fcn\u00ef \"quoted\" \\ name\n", '
    '"reason": "prefix \'old_\', 3m old (100% %s %%)", '
    '"bytes": 12345678901, "dest": ".ocrd-trash/20261127T000000Z-abcd/x", '
    '"mode": "quarantine", "extra": {"nested": [1, 2.5, null, true]}, '
    '"path": "PurePosixPath(\'/srv/models\')"}'
)
STAMP = re.compile(r'^\{"timestamp": "\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", ')


class Recorder(io.StringIO):
    """A stream that counts its writes and flushes."""

    def __init__(self) -> None:
        super().__init__()
        self.flushes = 0
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)

    def flush(self) -> None:
        self.flushes += 1
        super().flush()


@pytest.fixture
def stream() -> Iterator[Recorder]:
    """ocrd's JSON logging into a fresh stream; structlog's defaults restored afterwards."""
    out = Recorder()
    log.configure(fmt="json", level="info", stream=out)
    try:
        yield out
    finally:
        log.configure()
        structlog.reset_defaults()


def lines(out: io.StringIO) -> list[str]:
    return out.getvalue().splitlines()


def events(out: io.StringIO) -> list[Any]:
    return [json.loads(line)["event"] for line in lines(out)]


def test_a_line_is_one_json_object_with_timestamp_level_and_event_first(
    stream: Recorder,
) -> None:
    """A line is timestamp (UTC, microseconds, Z), level, event, then the fields in call
    order, in exactly json.dumps' text."""
    log.get().info("model.pruned", **FIELDS)
    (line,) = lines(stream)
    assert STAMP.match(line), line
    assert STAMP.sub("", line) == FIELDS_TEXT
    doc = json.loads(line)
    assert list(doc) == ["timestamp", "level", "event", *FIELDS]
    assert doc["model"] == FIELDS["model"] and doc["bytes"] == FIELDS["bytes"]


def test_level_names_are_the_standard_ones(stream: Recorder) -> None:
    """warning, error and exception() lines carry the stdlib level names."""
    logger = log.get()
    logger.warning("model.busy")
    logger.error("action.failed")
    try:
        raise ValueError("boom")
    except ValueError:
        logger.exception("cycle.failed")
    assert [json.loads(line)["level"] for line in lines(stream)] == ["warning", "error", "error"]


def test_an_exception_is_formatted_into_the_line(stream: Recorder) -> None:
    """exc_info becomes an `exception` field with the traceback text, after the fields."""
    try:
        raise ValueError("boom")
    except ValueError:
        log.get().exception("cycle.failed", error="boom")
    doc = json.loads(lines(stream)[0])
    assert list(doc) == ["timestamp", "level", "event", "error", "exception"]
    assert doc["exception"].startswith("Traceback") and "ValueError: boom" in doc["exception"]


def test_lines_below_the_level_are_dropped(stream: Recorder) -> None:
    """At level warning, info and debug lines are not written."""
    log.configure(fmt="json", level="warning", stream=stream)
    logger = log.get()
    logger.debug("model.seen")
    logger.info("model.pruned", model="a")
    logger.warning("model.busy", model="b")
    logger.error("action.failed", model="c")
    assert events(stream) == ["model.busy", "action.failed"]


def test_bound_context_stays_in_the_line(stream: Recorder) -> None:
    """Fields bound to a logger come after the event, before the call's fields."""
    log.get().bind(cycle=7).info("model.pruned", model="a")
    doc = json.loads(lines(stream)[0])
    assert list(doc) == ["timestamp", "level", "event", "cycle", "model"]
    assert doc["cycle"] == 7


def test_captured_events_reach_the_capture_not_the_stream(stream: Recorder) -> None:
    """Under capture_logs, even an already used logger's events are captured as dicts."""
    logger = log.get()
    logger.info("before.capture")
    with capture_logs() as captured:
        logger.info("model.pruned", model="a", bytes=1)
    logger.info("after.capture")
    assert captured == [{"event": "model.pruned", "log_level": "info", "model": "a", "bytes": 1}]
    assert events(stream) == ["before.capture", "after.capture"]


def test_batched_lines_flush_at_the_end_not_one_by_one(stream: Recorder) -> None:
    """Inside batched(), 1,000 lines cost a handful of writes and flushes, in order;
    all are out at the exit."""
    before, writes = stream.flushes, stream.writes
    logger = log.get().bind()
    with log.batched():
        for i in range(1000):
            logger.info("model.pruned", model=f"m{i}")
            if i == 500:
                logger.warning("model.busy", model="in between")
    out = lines(stream)
    assert len(out) == 1001
    assert [json.loads(line)["model"] for line in out] == [
        *(f"m{i}" for i in range(501)),
        "in between",
        *(f"m{i}" for i in range(501, 1000)),
    ]
    assert stream.flushes - before < 50
    assert stream.writes - writes < 50
    log.get().info("after.batch")
    assert stream.flushes > before  # outside a batch each line is flushed again


def test_console_format_renders_through_the_console_renderer(stream: Recorder) -> None:
    """log.format: console writes structlog's console view, not JSON."""
    log.configure(fmt="console", level="info", stream=stream)
    log.get().info("model.pruned", model="a")
    text = stream.getvalue()
    assert "model.pruned" in text and "model=a" in text and not text.startswith("{")


def test_a_second_configure_reaches_a_logger_already_in_use(stream: Recorder) -> None:
    """Loggers are cached on first use, yet another level, format and stream set by
    configure() (the daemon's reload) apply to them, bound ones included."""
    logger = log.get()
    bound = logger.bind(cycle=1)
    logger.info("first.line")
    bound.info("first.bound")
    assert events(stream) == ["first.line", "first.bound"]

    other = Recorder()
    log.configure(fmt="console", level="warning", stream=other)
    logger.info("dropped.info")
    bound.info("dropped.bound")
    logger.warning("console.line", model="a")
    bound.warning("console.bound")
    assert events(stream) == ["first.line", "first.bound"]  # the old stream has nothing new
    text = other.getvalue()
    assert "dropped" not in text
    assert "console.line" in text and "model=a" in text and "console.bound" in text
    assert not text.startswith("{")

    log.configure(fmt="json", level="info", stream=stream)
    logger.info("json.again")
    bound.info("json.bound")
    assert events(stream)[-2:] == ["json.again", "json.bound"]
    assert json.loads(lines(stream)[-1])["cycle"] == 1


def test_a_logger_taken_before_configure_follows_it() -> None:
    """A logger got (and used) before configure() writes where configure() says."""
    structlog.reset_defaults()
    early = io.StringIO()
    log.configure(stream=early)
    logger = log.get()
    logger.info("early.line")
    out = Recorder()
    try:
        log.configure(fmt="json", level="info", stream=out)
        logger.info("model.pruned", model="a")
    finally:
        log.configure()
        structlog.reset_defaults()
    assert events(early) == ["early.line"]
    assert events(out) == ["model.pruned"]


def test_held_lines_go_to_the_old_stream_when_reconfigured(stream: Recorder) -> None:
    """A reconfigure inside batched() writes what is held where it was headed."""
    other = Recorder()
    with log.batched():
        log.get().info("first.line")  # written at once (the last block is long gone)
        log.get().info("held.line")  # held: the block went out a moment ago
        log.configure(fmt="json", level="info", stream=other)
        log.get().info("new.line")
    assert events(stream) == ["first.line", "held.line"]
    assert events(other) == ["new.line"]
