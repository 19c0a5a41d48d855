"""Shared helpers: policy files in temp dirs, the real `ocrd` command, waiting."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

OCRD = str(Path(sys.executable).parent / "ocrd")


def write_policy(path: Path, data: dict[str, Any]) -> Path:
    """Write *data* as a YAML policy file at *path*."""
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def make_model(root: Path, name: str, data: bytes = b"model", *, age: float = 0.0) -> Path:
    """A file model under *root*, with its mtime *age* seconds in the past."""
    path = root / name
    path.write_bytes(data)
    if age:
        past = time.time() - age
        os.utime(path, (past, past))
    return path


def wait_for(predicate: Callable[[], Any], *, timeout: float = 10.0, what: str = "") -> Any:
    """Poll *predicate* every 20 ms until it is truthy; fail with *what* after *timeout*."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(0.02)


class Result:
    def __init__(self, proc: subprocess.CompletedProcess[str]) -> None:
        self.code = proc.returncode
        self.out = proc.stdout
        self.err = proc.stderr

    def json(self) -> Any:
        return json.loads(self.out)

    def logs(self) -> list[dict[str, Any]]:
        """The JSON log lines on stdout (apply, trash restore/purge)."""
        return [json.loads(line) for line in self.out.splitlines() if line.startswith("{")]

    def events(self) -> list[str]:
        return [line["event"] for line in self.logs()]

    def __repr__(self) -> str:
        return f"Result(code={self.code}, out={self.out!r}, err={self.err!r})"


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """An environment for the real CLI: no OCRD_* leaking in, state under tmp_path."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OCRD_")}
    clean.pop("STATE_DIRECTORY", None)
    clean["XDG_STATE_HOME"] = str(tmp_path / "xdg-state")
    return clean


@pytest.fixture
def run_ocrd(env: dict[str, str]) -> Callable[..., Result]:
    """Run the installed `ocrd` command as a subprocess: run_ocrd("--config", p, "plan")."""

    def run(
        *args: str | Path, extra_env: dict[str, str] | None = None, timeout: float = 60
    ) -> Result:
        proc = subprocess.run(
            [OCRD, *map(str, args)],
            capture_output=True,
            text=True,
            env={**env, **(extra_env or {})},
            timeout=timeout,
            check=False,
        )
        return Result(proc)

    return run
