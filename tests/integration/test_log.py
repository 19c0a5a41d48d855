"""ocrd's log output: the JSON line format, the fast per-prune path, batching."""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from ocrd import log

FIELDS = ("model", "reason", "bytes", "dest", "mode", "extra")
VALUES: tuple[Any, ...] = (
    'ünï "quoted" \\ name\n',
    "prefix 'old_', 3m old (100% %s %%)",
    12_345_678_901,
    ".ocrd-trash/20261127T000000Z-abcd/x",
    "quarantine",
    {"nested": [1, 2.5, None, True]},
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
        structlog.reset_defaults()
        log._writer = None  # the next test configures its own
        log._direct = None


def lines(out: io.StringIO) -> list[str]:
    return out.getvalue().splitlines()


def test_fast_line_is_the_same_text_as_a_structlog_line(stream: Recorder) -> None:
    """emitter() writes exactly what logger.info() writes, timestamp aside."""
    logger = log.get()
    logger.info("model.pruned", **dict(zip(FIELDS, VALUES, strict=True)))
    log.emitter(logger.bind(), "info", "model.pruned", FIELDS)(*VALUES)
    slow, fast = lines(stream)
    assert STAMP.match(slow) and STAMP.match(fast)
    assert STAMP.sub("", slow) == STAMP.sub("", fast)
    doc = json.loads(fast)
    assert list(doc) == ["timestamp", "level", "event", *FIELDS]
    assert doc["model"] == VALUES[0] and doc["bytes"] == VALUES[2]


def test_fast_line_respects_the_level(stream: Recorder) -> None:
    """An emitter below the configured level writes nothing."""
    log.configure(fmt="json", level="warning", stream=stream)
    log.emitter(log.get(), "info", "model.pruned", ("model",))("a")
    log.emitter(log.get(), "warning", "model.busy", ("model",))("b")
    assert [json.loads(line)["event"] for line in lines(stream)] == ["model.busy"]


def test_emitter_goes_through_structlog_when_events_are_captured(stream: Recorder) -> None:
    """Under capture_logs the events reach the capture, not the stream."""
    with capture_logs() as captured:
        log.emitter(log.get(), "info", "model.pruned", ("model", "bytes"))("a", 1)
    assert captured == [{"event": "model.pruned", "log_level": "info", "model": "a", "bytes": 1}]
    assert lines(stream) == []


def test_emitter_keeps_bound_context(stream: Recorder) -> None:
    """A logger with bound fields is never bypassed: the fields stay in the line."""
    log.emitter(log.get().bind(cycle=7), "info", "model.pruned", ("model",))("a")
    assert json.loads(lines(stream)[0])["cycle"] == 7


def test_batched_lines_flush_at_the_end_not_one_by_one(stream: Recorder) -> None:
    """Inside batched(), 1,000 lines cost a handful of writes and flushes, in order;
    all are out at the exit."""
    before, writes = stream.flushes, stream.writes
    emit = log.emitter(log.get(), "info", "model.pruned", ("model",))
    with log.batched():
        for i in range(1000):
            emit(f"m{i}")
            if i == 500:
                log.get().warning("model.busy", model="in between")
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


def test_console_format_is_unaffected(stream: Recorder) -> None:
    """log.format: console still renders through structlog's console renderer."""
    log.configure(fmt="console", level="info", stream=stream)
    log.emitter(log.get(), "info", "model.pruned", ("model",))("a")
    assert "model.pruned" in stream.getvalue() and not stream.getvalue().startswith("{")
