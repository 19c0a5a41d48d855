"""The installed `ocrd` command as a subprocess, and what it printed."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tests.support.logs import log_lines

OCRD = str(Path(sys.executable).parent / "ocrd")


def ocrd(
    *args: str | Path, env: Mapping[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run `ocrd ARGS` with exactly *env* and wait; never raises on its exit code."""
    return subprocess.run(
        [OCRD, *map(str, args)],
        capture_output=True,
        text=True,
        env=dict(env),
        timeout=timeout,
        check=False,
    )


def ocrd_status(
    env: Mapping[str, str], policy: Path, *args: str
) -> subprocess.CompletedProcess[str]:
    """`ocrd --config POLICY status ARGS` with exactly *env*."""
    return ocrd("--config", policy, "status", *args, env=env)


class Result:
    """What one `ocrd` run gave: its exit code, stdout and stderr (the `run_ocrd` fixture)."""

    def __init__(self, proc: subprocess.CompletedProcess[str]) -> None:
        self.code = proc.returncode
        self.out = proc.stdout
        self.err = proc.stderr

    def json(self) -> Any:
        return json.loads(self.out)

    def logs(self) -> list[dict[str, Any]]:
        """The JSON log lines on stdout (apply, trash restore/purge)."""
        return log_lines(self.out)

    def events(self) -> list[str]:
        return [line["event"] for line in self.logs()]

    def __repr__(self) -> str:
        return f"Result(code={self.code}, out={self.out!r}, err={self.err!r})"
