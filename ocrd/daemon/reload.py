"""Policy reload: read the file, decide whether it changed, and what a change touches.

An edited policy is loaded in full before anything switches; an invalid one
is rejected and the last good policy stays in force (nginx, Prometheus and
Caddy do the same). What a valid one changes is a field-by-field diff.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from ocrd.config.yamlsafe import MAX_BYTES
from ocrd.core.policy import Policy
from ocrd.openfile import read_regular


@dataclass(frozen=True, slots=True)
class Change:
    """What a reloaded policy changes that needs more than the next cycle."""

    model_dir: bool  # another directory: take its lock, point the engine at it
    engine: bool  # the engine's dir or settings: restart it
    backend: bool  # another kind of engine: make a new one
    log: bool  # format or level: reconfigure the log


def diff(old: Policy, new: Policy) -> Change:
    return Change(
        model_dir=new.model_dir != old.model_dir,
        engine=new.model_dir != old.model_dir or new.engine != old.engine,
        backend=new.engine.backend != old.engine.backend,
        log=new.log != old.log,
    )


def file_digest(path: Path) -> str:
    """sha256 of the policy file's bytes, read without blocking on what it is.

    Raises OSError when it cannot be read, NotRegularError when it is no
    regular file (an editor or an attacker put a FIFO there: reading it would
    block the loop, and with it SIGTERM and the watchdog). A file over the
    size limit is hashed up to it; loading it then reports the size.
    """
    return hashlib.sha256(read_regular(path, limit=MAX_BYTES, follow=True)).hexdigest()
