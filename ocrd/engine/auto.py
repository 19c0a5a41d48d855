"""Choose the engine for a policy's `engine.backend`: aspose, none, or auto."""

from __future__ import annotations

import importlib.util
from typing import Any

from ocrd.core.policy import Policy
from ocrd.engine.aspose import AsposeEngine
from ocrd.engine.base import Engine, EngineError
from ocrd.engine.none import NoEngine


def aspose_installed() -> bool:
    """Whether `aspose-ocr-python-net` is importable (checked without importing it)."""
    try:
        return importlib.util.find_spec("aspose") is not None
    except (ImportError, ValueError):
        return False


def make_engine(policy: Policy, *, log: Any = None) -> tuple[Engine, str | None]:
    """The engine for the policy's backend, and a warning to log when it fell back."""
    backend = policy.engine.backend
    if backend == "none":
        return NoEngine(), None
    installed = aspose_installed()
    if backend == "aspose" and not installed:
        raise EngineError(
            "engine.backend is 'aspose' but the package aspose-ocr-python-net is not "
            "installed for this Python (it has wheels for Linux x86_64, Windows x86_64 and "
            "macOS arm64 only); install it, or set engine.backend to 'auto' or 'none'"
        )
    if not installed:
        return NoEngine(), (
            "engine.backend auto: aspose-ocr-python-net is not installed; using 'none' "
            "(the handle check still runs)"
        )
    assert policy.state_dir is not None
    engine = AsposeEngine(
        policy.state_dir,
        runtime_dir=policy.engine.runtime_dir,
        release_timeout=policy.engine.release_timeout,
        log=log,
    )
    return engine, None
