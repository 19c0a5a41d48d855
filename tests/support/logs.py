"""ocrd's JSON log lines: parsing a command's stdout, picking events, their timestamps."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any, TypeVar

Record = TypeVar("Record", bound=Mapping[str, Any])


def json_lines(out: str) -> list[dict[str, Any]]:
    """Every stdout line as a JSON object; fails on any line that is not one."""
    lines = out.splitlines()
    assert lines, "expected JSON log lines on stdout, got nothing"
    records = []
    for line in lines:
        record = json.loads(line)
        assert isinstance(record, dict), line
        records.append(record)
    return records


def log_lines(out: str) -> list[dict[str, Any]]:
    """The JSON log lines of *out*, passing over any line that does not start with '{'."""
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def events(out: str, event: str) -> list[dict[str, Any]]:
    """The *event* lines of *out*, which must be JSON lines only (see json_lines)."""
    return [r for r in json_lines(out) if r["event"] == event]


def matching(records: Iterable[Record], event: str, **fields: Any) -> list[Record]:
    """The *event* records (captured or parsed log lines) whose *fields* have these values."""
    return [
        r for r in records if r["event"] == event and all(r.get(k) == v for k, v in fields.items())
    ]


def epoch(event: Mapping[str, Any]) -> float:
    """A log line's UTC ISO timestamp as seconds since the epoch."""
    return datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()
