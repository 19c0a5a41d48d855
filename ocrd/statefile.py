"""Atomic JSON files in ocrd's own directories (hash cache, status), never models.

Each writer uses a temp name carrying its pid; a writer killed mid-write
leaves that temp file behind, and the next write in the directory sweeps the
temp files of processes that no longer exist.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

from ocrd.openfile import give_to_owner_of, make_dirs


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (ours to signal or not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sweep(path: Path) -> None:
    prefix = f".{path.name}."
    with contextlib.suppress(OSError), os.scandir(path.parent) as it:
        for child in it:
            if not (child.name.startswith(prefix) and child.name.endswith(".tmp")):
                continue
            pid = child.name[len(prefix) : -len(".tmp")]
            if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
                with contextlib.suppress(OSError):
                    Path(child.path).unlink()  # a dead writer's temp file, never a model


def write_json(
    path: Path,
    data: dict[str, Any],
    *,
    mode: int = 0o644,
    durable: bool = True,
    indent: int | None = None,
) -> str | None:
    """Replace *path* with *data* atomically; returns an error text instead of raising."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        make_dirs(path.parent, 0o750)
        _sweep(path)
        fd = os.open(
            tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, mode
        )
        try:
            give_to_owner_of(fd, os.stat(path.parent))
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(json.dumps(data, indent=indent))  # the C encoder, unlike dump()
                fh.write("\n")
                if durable:
                    fh.flush()
                    os.fsync(fh.fileno())
            os.chmod(tmp, mode)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()  # our own temp file, never a model
            raise
    except OSError as exc:
        return f"{path}: {exc.strerror or exc}"
    return None
