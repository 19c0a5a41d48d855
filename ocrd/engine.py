"""The OCR engine whose handles must be released before anything is deleted.

An Engine is opened on the model dir, listed, and released around every
cycle that changes the disk (DESIGN §5). `none` has no engine: the handle
check still runs. `aspose` runs the real library in a child process, the
engine host (enginehost.py), because `free_resources()` does not unmap a
loaded model: only the end of the process that loaded it does. So release
ends the host (free, quit, terminate, kill, reap), and open starts a fresh one.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any, Protocol, runtime_checkable

from ocrd.policy import Policy

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
START_TIMEOUT = 60.0
PASSED_ENV = (
    "LANG",
    "LC_ALL",
    "TZ",
    "TMPDIR",
    "CLR_ICU_VERSION_OVERRIDE",
    "DOTNET_SYSTEM_GLOBALIZATION_INVARIANT",
)


class EngineError(Exception):
    """The engine failed to open, list or release."""


@runtime_checkable
class Engine(Protocol):
    """What ocrd needs from an OCR engine."""

    name: str

    def open(self, model_dir: Path) -> None:
        """Start (or restart) the engine pointed at *model_dir*."""

    def list_local(self) -> list[str]:
        """The models the engine itself sees, for the log next to ocrd's own listing."""
        ...

    def local_path(self) -> str | None:
        """Where the engine looks for models."""
        ...

    def release(self) -> None:
        """Drop every handle on model files; raise EngineError when that cannot be done."""


class NoEngine:
    """backend: none — nothing to release; the handle check still guards deletes."""

    name = "none"

    def __init__(self) -> None:
        self._dir: Path | None = None

    def open(self, model_dir: Path) -> None:
        self._dir = model_dir

    def list_local(self) -> list[str]:
        return []

    def local_path(self) -> str | None:
        return None if self._dir is None else str(self._dir)

    def release(self) -> None:
        self._dir = None


def aspose_installed() -> bool:
    """Whether `aspose-ocr-python-net` is importable (checked without importing it)."""
    try:
        return importlib.util.find_spec("aspose") is not None
    except (ImportError, ValueError):
        return False


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


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
    os.replace(tmp, link)


class AsposeEngine:
    """backend: aspose — the real library in a cycled child process."""

    name = "aspose"

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
        self.proc: subprocess.Popen[bytes] | None = None
        self.version = ""
        self._buffer = b""
        self._log_file: IO[bytes] | None = None
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
        models_parent.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        _replace_symlink(models_parent / "models", model_dir)
        if self.runtime_dir is not None:
            for rid in RUNTIME_RIDS:
                native_parent = models_parent / "runtimes" / RUNTIME_TAG / rid
                native_parent.mkdir(parents=True, exist_ok=True)
                _replace_symlink(native_parent / "native", self.runtime_dir)
            libdir = self.root / "lib"
            libdir.mkdir(exist_ok=True)
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

    def _stderr_tail(self, lines: int = 5) -> str:
        try:
            with open(self.host_log, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(0, fh.tell() - 4096))
                text = fh.read().decode("utf-8", "replace")
        except OSError:
            return ""
        return " | ".join(text.strip().splitlines()[-lines:])

    def _readline(self, timeout: float) -> dict[str, Any] | None:
        """One protocol line from the host, None on EOF; EngineError on timeout."""
        assert self.proc is not None and self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while b"\n" not in self._buffer:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise EngineError(
                        f"engine host (pid {self.proc.pid}) did not answer within {timeout:g}s"
                    )
                if not sel.select(remaining):
                    continue
                chunk = os.read(fd, 65536)
                if not chunk:
                    return None
                self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        try:
            message = json.loads(line)
        except ValueError:
            raise EngineError(f"engine host sent a bad line: {line[:200]!r}") from None
        if not isinstance(message, dict):
            raise EngineError(f"engine host sent a bad line: {line[:200]!r}")
        return message

    def _died(self, during: str) -> EngineError:
        assert self.proc is not None
        code = self.proc.wait()
        pid = self.proc.pid
        tail = self._stderr_tail()
        self._emit(
            "error",
            "engine.crashed",
            pid=pid,
            during=during,
            exit=_describe_exit(code),
            stderr=tail,
            log=str(self.host_log),
        )
        self._reap()
        return EngineError(
            f"engine host (pid {pid}) died during {during}: "
            f"{_describe_exit(code)}" + (f"; {tail}" if tail else "")
        )

    def _reap(self) -> None:
        if self.proc is not None:
            for stream in (self.proc.stdin, self.proc.stdout):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()
        self.proc = None
        self._buffer = b""
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def _spawn(self) -> dict[str, Any] | None:
        self._log_file = open(self.host_log, "ab")  # noqa: SIM115 - lives as long as the host
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-m", "ocrd.enginehost"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log_file,
            cwd=self.work,
            env=self.env(),
            start_new_session=True,  # a terminal's Ctrl-C goes to ocrd, which ends the host
            close_fds=True,
        )
        return self._readline(START_TIMEOUT)

    def open(self, model_dir: Path) -> None:
        if self.proc is not None:
            self.release()
        self._prepare(model_dir)
        started = time.monotonic()
        hello = self._spawn()
        if hello is None and self.proc is not None:
            code = self.proc.wait()
            icu_abort = code == -signal.SIGABRT and not self.force_invariant
            error = self._died("start")
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
            hello = self._spawn()
            if hello is None:
                raise self._died("start")
        assert self.proc is not None and hello is not None
        if not hello.get("ready"):
            why = str(hello.get("error"))
            self.release()
            raise EngineError(f"the engine host could not create AsposeAI: {why}")
        self.version = str(hello.get("version", ""))
        self._emit(
            "info",
            "engine.started",
            engine=self.name,
            pid=self.proc.pid,
            version=self.version,
            start_ms=round((time.monotonic() - started) * 1000, 1),
        )

    def call(self, op: str, *, timeout: float | None = None) -> Any:
        """Send one request to the running host and return its result."""
        if self.proc is None:
            raise EngineError("the engine host is not running")
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps({"op": op}).encode() + b"\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            raise self._died(op) from None
        reply = self._readline(timeout if timeout is not None else START_TIMEOUT)
        if reply is None:
            raise self._died(op)
        if not reply.get("ok"):
            raise EngineError(f"engine host {op} failed: {reply.get('error')}")
        return reply.get("result")

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def list_local(self) -> list[str]:
        result = self.call("list_local", timeout=self.release_timeout)
        return [str(p) for p in result or []]

    def local_path(self) -> str | None:
        result = self.call("local_path", timeout=self.release_timeout)
        return None if result is None else str(result)

    def release(self) -> None:
        """free_resources(), then end the host and reap it, within release_timeout."""
        proc = self.proc
        if proc is None:
            return
        pid = proc.pid
        deadline = time.monotonic() + self.release_timeout
        how = "quit"
        if proc.poll() is not None:
            self._died("release")
            return
        with contextlib.suppress(EngineError):
            self.call("free", timeout=max(0.1, self.release_timeout / 2))
        if self.proc is None:
            return  # it died meanwhile: engine.crashed was logged and it was reaped
        if proc.poll() is None:
            with contextlib.suppress(EngineError):
                self.call("quit", timeout=max(0.1, deadline - time.monotonic()))
            if self.proc is None:
                return
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic() - 1.0))
        except subprocess.TimeoutExpired:
            how = "terminate"
            proc.terminate()
            try:
                proc.wait(timeout=max(0.1, (deadline - time.monotonic()) / 2))
            except subprocess.TimeoutExpired:
                how = "kill"
                proc.kill()
                try:
                    proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    raise EngineError(
                        f"engine host pid {pid} is still alive after SIGKILL and "
                        f"{self.release_timeout:g}s; nothing will be deleted"
                    ) from None
        self._reap()
        self._emit("info", "engine.released", engine=self.name, pid=pid, how=how)


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
