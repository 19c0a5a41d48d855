"""backend: aspose — the real library, in an engine host that is cycled around acting.

`free_resources()` does not unmap a loaded model: only the end of the process
that loaded it does (ASPOSE.md). So the library lives in a child process
(ocrd.engine.host); release ends that process and open starts a fresh one.
This module owns what the child is given: a private home whose
`Aspose.AI.LLM/models` points at the model dir, an explicit environment with
no network, an optional llama.cpp runtime, and the ICU fallback.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ocrd.engine.base import EngineError
from ocrd.engine.host import HostProcess
from ocrd.openfile import make_dirs

# The llama.cpp build tag aspose-ocr-python-net 26.10 looks for, next to its
# models folder: <XDG_DATA_HOME>/Aspose.AI.LLM/runtimes/<tag>/<rid>/native/.
# The rid is linux-x64-cuda13.0 when an `nvcc` is found (next to the Python
# binary, in the working dir, or on PATH), else linux-x64-noavx: both are
# pointed at engine.runtime_dir, so a CPU runtime loads either way.
RUNTIME_TAG = "b6451"
RUNTIME_RIDS = ("linux-x64-noavx", "linux-x64-cuda13.0")
HOST_PATH = "/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin"
# The library tries to download runtimes even with allow_auto_download=False;
# a dead proxy makes any such attempt fail at once instead of reaching out.
NO_NETWORK_PROXY = "http://127.0.0.1:9"
PASSED_ENV = (
    "LANG",
    "LC_ALL",
    "TZ",
    "TMPDIR",
    "CLR_ICU_VERSION_OVERRIDE",
    "DOTNET_SYSTEM_GLOBALIZATION_INVARIANT",
)


def _libdl() -> str | None:
    for path in (
        "/usr/lib/x86_64-linux-gnu/libdl.so.2",
        "/lib/x86_64-linux-gnu/libdl.so.2",
        "/usr/lib64/libdl.so.2",
        "/lib64/libdl.so.2",
        "/usr/lib/libdl.so.2",
    ):
        if os.path.exists(path):
            return path
    return None


def _replace_symlink(link: Path, target: Path) -> None:
    """Point *link* at *target* atomically (a new link renamed over the old one)."""
    with contextlib.suppress(OSError):
        if os.readlink(link) == str(target):
            return
    tmp = link.with_name(f".{link.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    os.symlink(target, tmp)
    if os.geteuid() == 0:  # a root run leaves the link to the owner of its directory
        above = os.stat(link.parent)
        os.chown(tmp, above.st_uid, above.st_gid, follow_symlinks=False)
    os.replace(tmp, link)


class AsposeEngine:
    """backend: aspose — the real library in a cycled child process."""

    name = "aspose"
    hosted = True

    def __init__(
        self,
        state_dir: Path,
        *,
        runtime_dir: Path | None = None,
        release_timeout: float = 10.0,
        log: Any = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.root = state_dir / "engine"
        self.runtime_dir = runtime_dir
        self.release_timeout = release_timeout
        self.log = log
        self.environ = dict(os.environ if environ is None else environ)
        self.host: HostProcess | None = None
        self.version = ""
        self.force_invariant = False

    # -- layout and environment ------------------------------------------------

    @property
    def home(self) -> Path:
        return self.root / "home"

    @property
    def work(self) -> Path:
        return self.root / "work"

    @property
    def host_log(self) -> Path:
        return self.root / "host.log"

    def _prepare(self, model_dir: Path) -> None:
        models_parent = self.home / "Aspose.AI.LLM"
        make_dirs(models_parent)
        make_dirs(self.work)
        _replace_symlink(models_parent / "models", model_dir)
        if self.runtime_dir is not None:
            for rid in RUNTIME_RIDS:
                native_parent = models_parent / "runtimes" / RUNTIME_TAG / rid
                make_dirs(native_parent)
                _replace_symlink(native_parent / "native", self.runtime_dir)
            libdir = self.root / "lib"
            make_dirs(libdir)
            libdl = _libdl()
            if libdl is not None:
                _replace_symlink(libdir / "libdl.so", Path(libdl))

    def env(self) -> dict[str, str]:
        """The host's whole environment: explicit, nothing else inherited."""
        env = {k: self.environ[k] for k in PASSED_ENV if k in self.environ}
        env.update(
            PATH=HOST_PATH,
            HOME=str(self.home),
            XDG_DATA_HOME=str(self.home),
            PYTHONUNBUFFERED="1",
        )
        env.setdefault("LANG", "C.UTF-8")
        for proxy in ("http_proxy", "https_proxy", "all_proxy"):
            env[proxy] = env[proxy.upper()] = NO_NETWORK_PROXY
        if self.force_invariant or "CLR_ICU_VERSION_OVERRIDE" not in env:
            env.setdefault("DOTNET_SYSTEM_GLOBALIZATION_INVARIANT", "1")
        if self.force_invariant:
            env["DOTNET_SYSTEM_GLOBALIZATION_INVARIANT"] = "1"
        if self.runtime_dir is not None:
            env["LD_LIBRARY_PATH"] = f"{self.root / 'lib'}:{self.runtime_dir}"
        return env

    # -- the host process --------------------------------------------------------

    def _emit(self, level: str, event: str, **fields: Any) -> None:
        if self.log is not None:
            getattr(self.log, level)(event, **fields)

    def _start(self) -> tuple[HostProcess, dict[str, Any] | None]:
        self.host = HostProcess(
            cwd=self.work, env=self.env(), log_path=self.host_log, emit=self._emit
        )
        return self.host, self.host.start()

    def open(self, model_dir: Path) -> None:
        if self.host is not None:
            self.release()
        self._prepare(model_dir)
        started = time.monotonic()
        host, hello = self._start()
        if hello is None and host.proc is not None:
            code = host.proc.wait()
            icu_abort = code == -signal.SIGABRT and not self.force_invariant
            error = host.died("start")
            if not icu_abort:
                raise error
            # A missing ICU aborts .NET at construction (ASPOSE.md): retry invariant.
            self._emit(
                "warning",
                "engine.icu_fallback",
                error=str(error),
                hint="DOTNET_SYSTEM_GLOBALIZATION_INVARIANT=1 set for the engine host",
            )
            self.force_invariant = True
            host, hello = self._start()
            if hello is None:
                raise host.died("start")
        assert host.proc is not None and hello is not None
        if not hello.get("ready"):
            why = str(hello.get("error"))
            self.release()
            raise EngineError(f"the engine host could not create AsposeAI: {why}")
        self.version = str(hello.get("version", ""))
        self._emit(
            "info",
            "engine.started",
            engine=self.name,
            pid=host.pid,
            version=self.version,
            start_ms=round((time.monotonic() - started) * 1000, 1),
        )

    def call(self, op: str, *, timeout: float | None = None) -> Any:
        """Send one request to the running host and return its result."""
        if self.host is None:
            raise EngineError("the engine host is not running")
        try:
            return self.host.call(op, timeout=timeout)
        finally:
            if self.host.proc is None:
                self.host = None  # it died and was reaped

    @property
    def pid(self) -> int | None:
        return None if self.host is None else self.host.pid

    def alive(self) -> bool:
        return self.host is not None and self.host.alive()

    def list_local(self) -> list[str]:
        result = self.call("list_local", timeout=self.release_timeout)
        return [str(p) for p in result or []]

    def local_path(self) -> str | None:
        result = self.call("local_path", timeout=self.release_timeout)
        return None if result is None else str(result)

    def release(self) -> None:
        """free_resources(), then end the host and reap it, within release_timeout."""
        host = self.host
        if host is None:
            return
        if host.proc is None:
            self.host = None
            return
        pid = host.pid
        try:
            how = host.end(self.release_timeout)
        finally:
            if host.proc is None:
                self.host = None
        if how is not None:
            self._emit("info", "engine.released", engine=self.name, pid=pid, how=how)
