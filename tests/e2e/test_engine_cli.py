"""The real engine seen from the `ocrd` command: check, run and list as subprocesses.

The engine host runs the real `aspose-ocr-python-net` library (DESIGN §5): a machine without
ICU must not stop `ocrd check` or `ocrd run`, a host that dies is an `engine.crashed` event
and never a daemon crash, and `ocrd list` shows model files that were deleted while a
process still holds them (ASPOSE.md: the disk space only comes back when it lets go).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import OCRD, make_model, wait_for, write_policy
from engine_support import aspose_available

SERVICE_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "RUNTIME_DIRECTORY")
HOST_MODULE = b"ocrd.engine.child"
START_TIMEOUT = 30.0

# A process that keeps a model open through a descriptor until its stdin closes.
FD_HOLDER = """
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
sys.stdin.read()
"""

# A process that maps a model the way llama.cpp does and closes the descriptor at once.
MMAP_HOLDER = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [
    ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long
]
fd = os.open(sys.argv[1], os.O_RDONLY)
size = os.fstat(fd).st_size
PROT_READ, MAP_SHARED = 1, 1
addr = libc.mmap(None, size, PROT_READ, MAP_SHARED, fd, 0)
if addr is None or addr == ctypes.c_void_p(-1).value:
    sys.exit(f"mmap failed: errno {ctypes.get_errno()}")
os.close(fd)
sys.stdin.read()
"""


# -- helpers ---------------------------------------------------------------------------------


def engine_policy(tmp_path: Path, models: Path, **engine: Any) -> Path:
    """A policy on *models* with the aspose backend, a 100 ms debounce and prefix old_ deleted."""
    return write_policy(
        tmp_path / "policy.yaml",
        {
            "model_dir": str(models),
            "state_dir": str(tmp_path / "state"),
            "prune": {"prefixes": ["old_"], "min_age": 0, "max_fraction": 1.0, "action": "delete"},
            "engine": {"backend": "aspose", "release_timeout": "5s", **engine},
            "reconcile": {"debounce": "100ms", "resync": "1h"},
        },
    )


def no_icu(env: dict[str, str]) -> dict[str, str]:
    """*env* as on a machine without a usable ICU (ASPOSE.md's simulation)."""
    clean = {k: v for k, v in env.items() if k != "DOTNET_SYSTEM_GLOBALIZATION_INVARIANT"}
    clean["CLR_ICU_VERSION_OVERRIDE"] = "999"
    return clean


def host_environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    pairs = (item.decode().partition("=") for item in raw.split(b"\0") if item)
    return {key: value for key, _, value in pairs}


def hosts_in(state: Path) -> list[int]:
    """Pids of engine hosts whose working directory is below *state* (started by this test)."""
    prefix = os.path.join(os.path.realpath(state), "")
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cwd = os.readlink(entry / "cwd")
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if HOST_MODULE in cmdline and os.path.join(cwd, "").startswith(prefix):
            found.append(int(entry.name))
    return sorted(found)


def kill_hosts(state: Path) -> None:
    """SIGKILL, by pid, every engine host this test left running under *state*."""
    for pid in hosts_in(state):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def fd_targets(pid: int) -> list[str]:
    targets = []
    for link in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            targets.append(os.readlink(link))
    return targets


def mapped_paths(pid: int) -> list[str]:
    lines = Path(f"/proc/{pid}/maps").read_text(errors="replace").splitlines()
    return [f[5].strip() for f in (line.split(None, 5) for line in lines) if len(f) == 6]


class Daemon:
    """One `ocrd run` subprocess and every JSON line it logged, read by a thread."""

    def __init__(self, policy: Path, env: dict[str, str]) -> None:
        self.events: list[dict[str, Any]] = []
        self.stderr: list[str] = []
        self.proc = subprocess.Popen(
            [OCRD, "--config", str(policy), "run"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self._readers = [
            threading.Thread(target=self._read, args=(self.proc.stdout, True), daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stderr, False), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _read(self, stream: Any, is_stdout: bool) -> None:
        for line in stream:
            if is_stdout and line.startswith("{"):
                self.events.append(json.loads(line))
            else:
                self.stderr.append(line)

    def __repr__(self) -> str:
        names = [e["event"] for e in self.events]
        return f"Daemon(rc={self.proc.poll()}, events={names}, stderr={''.join(self.stderr)!r})"

    def index(self, event: str, *, after: int = -1, **fields: Any) -> int | None:
        for i, e in enumerate(list(self.events)):
            if i > after and e["event"] == event and all(e.get(k) == v for k, v in fields.items()):
                return i
        return None

    def wait(
        self, event: str, *, after: int = -1, timeout: float = START_TIMEOUT, **fields: Any
    ) -> int:
        """Position of the first *event* with these fields after *after*; fail on a deadline."""

        def found() -> int | None:
            i = self.index(event, after=after, **fields)
            if i is None and self.proc.poll() is not None:
                for reader in self._readers:
                    reader.join(timeout=5)
                i = self.index(event, after=after, **fields)
                if i is None:
                    raise AssertionError(f"ocrd ended before logging {event} {fields}: {self!r}")
            return i

        try:
            wait_for(lambda: found() is not None, timeout=timeout, what=f"{event} {fields}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; {self!r}") from None
        i = self.index(event, after=after, **fields)
        assert i is not None
        return i

    def stop(self) -> int:
        """SIGTERM; the exit code (the daemon must end within 20 s)."""
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=20)
        for reader in self._readers:
            reader.join(timeout=5)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        for reader in self._readers:
            reader.join(timeout=5)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture(scope="session")
def aspose() -> None:
    """Skip, with the import error, where `aspose.ocr` cannot be imported."""
    reason = aspose_available()
    if reason is not None:
        pytest.skip(reason)


@pytest.fixture
def denv(env: dict[str, str]) -> dict[str, str]:
    """The `env` fixture without service-manager variables: status goes to the state dir."""
    return {k: v for k, v in env.items() if k not in SERVICE_VARS}


@pytest.fixture
def models(tmp_path: Path) -> Path:
    path = tmp_path / "models"
    path.mkdir()
    return path


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Callable[[Path, dict[str, str]], Daemon]]:
    """Start `ocrd run` daemons; whatever is left of them and their hosts is killed after."""
    started: list[Daemon] = []

    def start(policy: Path, env: dict[str, str]) -> Daemon:
        started.append(Daemon(policy, env))
        return started[-1]

    try:
        yield start
    finally:
        for d in started:
            d.kill()
        kill_hosts(tmp_path / "state")


# -- 5. ICU at the command line ------------------------------------------------------------


def test_check_starts_the_engine_on_a_machine_without_icu(
    aspose: None, denv: dict[str, str], models: Path, tmp_path: Path
) -> None:
    """`ocrd check` without ICU exits 0 and prints the engine ok line (the host fell back)."""
    policy = engine_policy(tmp_path, models)
    state = tmp_path / "state"
    try:
        proc = subprocess.run(
            [OCRD, "--config", str(policy), "check"],
            capture_output=True,
            text=True,
            env=no_icu(denv),
            timeout=90,
            check=False,
        )
        assert proc.returncode == 0, proc
        where = state / "engine" / "home" / "Aspose.AI.LLM" / "models"
        expected = (
            f"ok: engine backend 'aspose' starts; it looks for models in {where} "
            "and lists 0 of them"
        )
        assert expected in proc.stdout.splitlines(), proc.stdout
        host_log = (state / "engine" / "host.log").read_text(errors="replace")
        assert "Couldn't find a valid ICU package" in host_log, host_log  # the first host aborted
        assert hosts_in(state) == []  # check released its host
    finally:
        kill_hosts(state)


def test_run_on_a_machine_without_icu_falls_back_and_keeps_running(
    aspose: None,
    daemon: Callable[[Path, dict[str, str]], Daemon],
    denv: dict[str, str],
    models: Path,
    tmp_path: Path,
) -> None:
    """`ocrd run` without ICU logs engine.icu_fallback, then engine.started, and keeps running."""
    make_model(models, "keep.bin")
    d = daemon(engine_policy(tmp_path, models), no_icu(denv))
    fallback = d.wait("engine.icu_fallback")
    assert d.events[fallback]["level"] == "warning"
    started = d.wait("engine.started", after=fallback)
    d.wait("daemon.started", after=started)
    d.wait("cycle.finished", after=started)
    host = int(d.events[started]["pid"])
    assert d.proc.poll() is None, d
    assert hosts_in(tmp_path / "state") == [host]
    assert host_environ(host).get("DOTNET_SYSTEM_GLOBALIZATION_INVARIANT") == "1"

    assert d.stop() == 0, d
    assert d.index("engine.released", pid=host) is not None, d
    assert hosts_in(tmp_path / "state") == []


# -- 3. a host killed under a running daemon ---------------------------------------------


def test_daemon_reports_a_killed_host_at_the_next_cycle_and_starts_a_new_one(
    aspose: None,
    daemon: Callable[[Path, dict[str, str]], Daemon],
    denv: dict[str, str],
    models: Path,
    tmp_path: Path,
) -> None:
    """A SIGKILLed host is an engine.crashed event at the next release; the daemon carries on."""
    make_model(models, "keep.bin")
    d = daemon(engine_policy(tmp_path, models), denv)
    started = d.wait("engine.started")
    d.wait("cycle.finished", after=started)
    first = int(d.events[started]["pid"])
    assert hosts_in(tmp_path / "state") == [first]

    os.kill(first, signal.SIGKILL)
    mark = len(d.events) - 1  # the position of the last event seen so far
    make_model(models, "old_model.bin")  # a prune: the cycle releases the engine first

    crashed = d.wait("engine.crashed", after=mark, pid=first)
    assert d.events[crashed]["exit"] == "killed by SIGKILL", d
    pruned = d.wait("model.pruned", after=crashed, model="old_model.bin")
    restarted = d.wait("engine.started", after=pruned)
    second = int(d.events[restarted]["pid"])
    assert second != first
    d.wait("engine.cycled", after=restarted, pid=second)
    d.wait("cycle.finished", after=restarted)
    assert not (models / "old_model.bin").exists()
    assert (models / "keep.bin").is_file()
    assert d.proc.poll() is None, d
    assert hosts_in(tmp_path / "state") == [second]
    assert d.index("engine.unavailable") is None, d
    assert d.index("cycle.failed") is None, d

    assert d.stop() == 0, d
    assert d.index("engine.released", pid=second) is not None, d
    assert hosts_in(tmp_path / "state") == []


# -- 6. deleted but still held -------------------------------------------------------------


def test_list_shows_models_deleted_while_a_process_holds_them(
    run_ocrd: Callable[..., Any], models: Path, tmp_path: Path
) -> None:
    """`ocrd list` reports deleted models still open (fd) or mapped (mmap), and the bytes pinned."""
    opened = make_model(models, "opened.gguf", os.urandom(123_457))
    mapped = make_model(models, "mapped.gguf", os.urandom(234_568))
    policy = write_policy(
        tmp_path / "policy.yaml",
        {
            "model_dir": str(models),
            "state_dir": str(tmp_path / "state"),
            "engine": {"backend": "none"},
        },
    )
    children: list[subprocess.Popen[bytes]] = []
    try:
        for script, path in ((FD_HOLDER, opened), (MMAP_HOLDER, mapped)):
            children.append(
                subprocess.Popen(
                    [sys.executable, "-c", script, str(path)],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.DEVNULL,
                )
            )
        fd_child, mmap_child = children
        wait_for(lambda: str(opened) in fd_targets(fd_child.pid), what="the model open")
        wait_for(lambda: str(mapped) in mapped_paths(mmap_child.pid), what="the model mapped")
        assert str(mapped) not in fd_targets(mmap_child.pid)  # the descriptor was closed
        assert mmap_child.poll() is None

        opened.unlink()
        mapped.unlink()

        listed = run_ocrd("--config", policy, "list", "--json")
        assert listed.code == 0, listed
        doc = listed.json()
        rows = sorted(doc["deleted_held"], key=lambda r: r["path"])
        assert rows == [
            {
                "path": str(mapped),
                "pid": mmap_child.pid,
                "process": Path(f"/proc/{mmap_child.pid}/comm").read_text().strip(),
                "how": "mmap",
                "bytes": 234_568,
            },
            {
                "path": str(opened),
                "pid": fd_child.pid,
                "process": Path(f"/proc/{fd_child.pid}/comm").read_text().strip(),
                "how": "fd",
                "bytes": 123_457,
            },
        ], rows
        assert doc["pinned_bytes"] == 123_457 + 234_568

        table = run_ocrd("--config", policy, "list")
        assert table.code == 0, table
        assert "Deleted but still held" in table.out, table
        section = table.out.split("Deleted but still held", 1)[1]
        for child, path in ((fd_child, opened), (mmap_child, mapped)):
            assert str(path) in section and str(child.pid) in section, table
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
            child.wait(timeout=10)
            if child.stdin is not None:
                child.stdin.close()
