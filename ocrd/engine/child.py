"""The engine host: a child process that holds one Aspose `AsposeAI`.

Run as `python -I -m ocrd.engine.child` by ocrd (ocrd.engine.host), never by hand.
`free_resources()` does not unmap a loaded model (ASPOSE.md), so ocrd ends
this whole process to release the engine, and starts a fresh one after.

Protocol: JSON lines. On start the host writes
`{"ready": true, "pid": N, "version": "..."}` (or `{"ready": false, "error": ...}`).
Then each request line `{"op": OP, ...}` gets one response line
`{"ok": true, "result": ...}` or `{"ok": false, "error": "..."}`. Ops:

- `ping` -> `{"pid": N}`
- `list_local` -> list of paths the library sees (`AsposeAI.list_local()`)
- `local_path` -> `AsposeAI.get_local_path()`
- `load` -> loads the default model offline (a spell-check post-processor,
  `allow_auto_download = False`, `gpu_layers = 0`) -> `{"initialized": bool}`.
  Used by tests and load checks; it may reach for the runtime dir, never the
  network.
- `free` -> `AsposeAI.free_resources()` -> null
- `quit` -> null, then the process exits 0.

Standard output carries only the protocol: the library's own prints are sent
to standard error, which ocrd keeps in `<state_dir>/engine/host.log`.
Imports only the standard library besides `aspose.ocr`, so it starts fast.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, TextIO


def _protocol_stream() -> TextIO:
    """Keep a private copy of stdout for the protocol; point fd 1 at stderr."""
    fd = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = os.fdopen(os.dup(2), "w", buffering=1)
    return os.fdopen(fd, "w", buffering=1, encoding="utf-8")


def _send(out: TextIO, message: dict[str, Any]) -> None:
    out.write(json.dumps(message) + "\n")
    out.flush()


class Host:
    def __init__(self) -> None:
        from aspose.ocr.ai import AsposeAI  # the import reads the environment: set before

        self.ai = AsposeAI()
        self.processor: Any = None

    def ping(self) -> dict[str, int]:
        return {"pid": os.getpid()}

    def list_local(self) -> list[str]:
        return [str(p) for p in self.ai.list_local()]

    def local_path(self) -> str:
        return str(self.ai.get_local_path())

    def load(self) -> dict[str, bool]:
        from aspose.ocr.ai import AsposeAIModelConfig, SpellCheckAIProcessor

        cfg = AsposeAIModelConfig()
        cfg.allow_auto_download = False
        cfg.gpu_layers = 0
        self.processor = SpellCheckAIProcessor()
        self.ai.set_post_processor(self.processor, cfg)
        return {"initialized": bool(self.ai.is_initialized())}

    def free(self) -> None:
        self.ai.free_resources()


def main() -> int:
    out = _protocol_stream()
    try:
        host = Host()
        from importlib.metadata import PackageNotFoundError
        from importlib.metadata import version as dist_version

        try:
            version = dist_version("aspose-ocr-python-net")
        except PackageNotFoundError:
            version = ""
    except Exception as exc:  # the host reports and ends; ocrd decides what to do
        _send(out, {"ready": False, "error": f"{type(exc).__name__}: {exc}"})
        return 1
    _send(out, {"ready": True, "pid": os.getpid(), "version": version})
    ops = {
        "ping": host.ping,
        "list_local": host.list_local,
        "local_path": host.local_path,
        "load": host.load,
        "free": host.free,
    }
    for line in sys.stdin:
        try:
            request = json.loads(line)
            op = request["op"]
        except (ValueError, KeyError, TypeError):
            _send(out, {"ok": False, "error": f"bad request: {line.strip()[:200]}"})
            continue
        if op == "quit":
            _send(out, {"ok": True, "result": None})
            return 0
        handler = ops.get(op)
        if handler is None:
            _send(out, {"ok": False, "error": f"unknown op {op!r}"})
            continue
        try:
            _send(out, {"ok": True, "result": handler()})
        except Exception as exc:  # one failed call never ends the host
            _send(out, {"ok": False, "error": f"{type(exc).__name__}: {exc}"})
    return 0  # stdin closed: ocrd is gone or wants us gone


if __name__ == "__main__":
    sys.exit(main())
