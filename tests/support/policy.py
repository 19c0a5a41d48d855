"""Policy files for the daemon tests, saved as editors save them, and the status file."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from tests.support.wait import wait_for

DEBOUNCE = 0.1  # reconcile.debounce of every policy_data() policy


def write_policy(path: Path, data: dict[str, Any]) -> Path:
    """Write *data* as a YAML policy file at *path*."""
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


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


def read_status(path: Path) -> dict[str, Any] | None:
    """The status document at *path*, or None while there is none."""
    try:
        doc: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    return doc


def status_when(
    path: Path, until: Callable[[dict[str, Any]], Any], *, what: str, timeout: float = 10.0
) -> dict[str, Any]:
    """The status document at *path* as soon as *until* holds for it; fail after *timeout*."""

    def ready() -> dict[str, Any] | None:
        doc = read_status(path)
        return doc if doc and until(doc) else None

    found: dict[str, Any] = wait_for(ready, timeout=timeout, what=what)
    return found
