"""Helpers shared by the tests that run the real daemon (integration and reliability)."""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any

from conftest import write_policy

DEBOUNCE = 0.1  # reconcile.debounce of every policy made here


def policy_data(model_dir: Path, **overrides: Any) -> dict[str, Any]:
    """A fast policy: prefix old_, no min_age, no fraction limit, 100 ms debounce, engine none.

    A dict override is merged into the section of the same name; anything else replaces it.
    """
    data: dict[str, Any] = {
        "model_dir": str(model_dir),
        "prune": {
            "prefixes": ["old_"],
            "min_age": 0,
            "max_fraction": 1.0,
            "max_per_cycle": 100_000,
        },
        "engine": {"backend": "none"},
        "reconcile": {"debounce": f"{round(DEBOUNCE * 1000)}ms", "resync": "1h"},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return data


def save_policy(path: Path, data: dict[str, Any] | str) -> Path:
    """Save a policy the way editors do: write a temp file, then rename it over *path*."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.swp")
    if isinstance(data, str):
        tmp.write_text(data, encoding="utf-8")
    else:
        write_policy(tmp, data)
    os.replace(tmp, path)
    return path


def epoch(event: dict[str, Any]) -> float:
    """A log line's UTC ISO timestamp as seconds since the epoch."""
    return datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()


def read_status(path: Path) -> dict[str, Any] | None:
    """The status document at *path*, or None while there is none."""
    try:
        doc: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    return doc
