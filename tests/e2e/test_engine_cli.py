"""The real engine seen from the `ocrd` command: check, run and list as subprocesses.

The engine host runs the real `aspose-ocr-python-net` library (DESIGN §5): a machine without
ICU must not stop `ocrd check` or `ocrd run`, a host that dies is an `engine.crashed` event
and never a daemon crash, and `ocrd list` shows model files that were deleted while a
process still holds them (ASPOSE.md: the disk space only comes back when it lets go).
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.cli import ocrd
from tests.support.daemon import Daemons
from tests.support.files import make_model
from tests.support.policy import write_policy
from tests.support.procs import HOLD_FD, HOLD_MMAP, fd_targets, holder, host_environ, mapped_paths
from tests.support.wait import wait_for

HOST_MODULE = b"ocrd.engine.child"
START_TIMEOUT = 30.0  # for each line a daemon with a real engine host logs
STOP_TIMEOUT = 20.0


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


@pytest.fixture
def engine_daemons(daemons: Daemons, tmp_path: Path) -> Iterator[Daemons]:
    """`daemons`; after them, every engine host left under tmp_path/state is killed too."""
    try:
        yield daemons
        daemons.close()  # the daemons first, so that none starts another host
    finally:
        kill_hosts(tmp_path / "state")


# -- 5. ICU at the command line ------------------------------------------------------------


def test_check_starts_the_engine_on_a_machine_without_icu(
    aspose: None, plain_denv: dict[str, str], models: Path, tmp_path: Path
) -> None:
    """`ocrd check` without ICU exits 0 and prints the engine ok line (the host fell back)."""
    policy = engine_policy(tmp_path, models)
    state = tmp_path / "state"
    try:
        proc = ocrd("--config", policy, "check", env=no_icu(plain_denv), timeout=90)
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
    engine_daemons: Daemons,
    plain_denv: dict[str, str],
    models: Path,
    tmp_path: Path,
) -> None:
    """`ocrd run` without ICU logs engine.icu_fallback, then engine.started, and keeps running."""
    make_model(models, "keep.bin")
    policy = engine_policy(tmp_path, models)
    d = engine_daemons.start(policy, env=no_icu(plain_denv), started=False, first_cycle=False)
    fallback = d.wait("engine.icu_fallback", timeout=START_TIMEOUT)
    assert fallback["level"] == "warning"
    started = d.wait("engine.started", after=d.after(fallback), timeout=START_TIMEOUT)
    d.wait("daemon.started", after=d.after(started), timeout=START_TIMEOUT)
    d.wait("cycle.finished", after=d.after(started), timeout=START_TIMEOUT)
    host = int(started["pid"])
    assert d.proc.poll() is None, d
    assert hosts_in(tmp_path / "state") == [host]
    assert host_environ(host).get("DOTNET_SYSTEM_GLOBALIZATION_INVARIANT") == "1"

    assert d.stop(timeout=STOP_TIMEOUT)[0] == 0, d
    assert d.seen("engine.released", pid=host), d
    assert hosts_in(tmp_path / "state") == []


# -- 3. a host killed under a running daemon ---------------------------------------------


def test_daemon_reports_a_killed_host_at_the_next_cycle_and_starts_a_new_one(
    aspose: None,
    engine_daemons: Daemons,
    plain_denv: dict[str, str],
    models: Path,
    tmp_path: Path,
) -> None:
    """A SIGKILLed host is an engine.crashed event at the next release; the daemon carries on."""
    make_model(models, "keep.bin")
    policy = engine_policy(tmp_path, models)
    d = engine_daemons.start(policy, env=plain_denv, started=False, first_cycle=False)
    started = d.wait("engine.started", timeout=START_TIMEOUT)
    d.wait("cycle.finished", after=d.after(started), timeout=START_TIMEOUT)
    first = int(started["pid"])
    assert hosts_in(tmp_path / "state") == [first]

    os.kill(first, signal.SIGKILL)
    mark = d.mark()  # past the last event seen so far
    make_model(models, "old_model.bin")  # a prune: the cycle releases the engine first

    crashed = d.wait("engine.crashed", after=mark, pid=first, timeout=START_TIMEOUT)
    assert crashed["exit"] == "killed by SIGKILL", d
    pruned = d.wait(
        "model.pruned", after=d.after(crashed), model="old_model.bin", timeout=START_TIMEOUT
    )
    restarted = d.wait("engine.started", after=d.after(pruned), timeout=START_TIMEOUT)
    second = int(restarted["pid"])
    assert second != first
    d.wait("engine.cycled", after=d.after(restarted), pid=second, timeout=START_TIMEOUT)
    d.wait("cycle.finished", after=d.after(restarted), timeout=START_TIMEOUT)
    assert not (models / "old_model.bin").exists()
    assert (models / "keep.bin").is_file()
    assert d.proc.poll() is None, d
    assert hosts_in(tmp_path / "state") == [second]
    assert not d.seen("engine.unavailable"), d
    assert not d.seen("cycle.failed"), d

    assert d.stop(timeout=STOP_TIMEOUT)[0] == 0, d
    assert d.seen("engine.released", pid=second), d
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
    with (
        holder(tmp_path, "ocrd-hold-fd", HOLD_FD, opened) as fd_child,
        holder(tmp_path, "ocrd-hold-map", HOLD_MMAP, mapped) as mmap_child,
    ):
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
