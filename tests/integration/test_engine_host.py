"""The engine host with the real `aspose-ocr-python-net` library (DESIGN §5, ASPOSE.md).

AsposeEngine runs the library in a child process and releases it by ending that process:
the only way a really loaded model is unmapped. These tests drive the real host on a real
(tiny) GGUF model, offline, and look at the kernel's view of it (/proc, statvfs on a tmpfs)
to prove that what ocrd deletes is no longer held by anyone and its space is back.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Mapping, Sequence
from importlib.metadata import version as dist_version
from pathlib import Path
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from ocrd.act.apply import apply
from ocrd.core.model import ActionKind, Plan
from ocrd.core.plan import reconcile
from ocrd.core.policy import Policy
from ocrd.engine.aspose import AsposeEngine
from ocrd.engine.base import EngineError
from ocrd.engine.none import NoEngine
from ocrd.observe.scan import scan
from tests.support.engine import DEFAULT_MODEL_DIR, DEFAULT_MODEL_FILE, make_tiny_gguf
from tests.support.logs import matching
from tests.support.mounts import mounted_tmpfs
from tests.support.procs import host_environ
from tests.support.wait import wait_for

DELETED = " (deleted)"
PAGE = os.sysconf("SC_PAGE_SIZE")
SPACE_SLACK = 4 * PAGE  # what statvfs may differ by besides the model's own pages

# -- helpers ---------------------------------------------------------------------------------


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer could still put on *path*'s filesystem."""
    vfs = os.statvfs(path)
    return vfs.f_bavail * vfs.f_frsize


def proc_state(pid: int) -> str | None:
    """The one-letter state of *pid* (R, S, T, Z, ...) from /proc/PID/stat, None when gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return text.rpartition(")")[2].split()[0]


def pid_gone(pid: int) -> bool:
    """True when no process (not even a zombie) has *pid*."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return not Path(f"/proc/{pid}").exists()
    return False


def comm(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


def holders(root: Path, key: tuple[int, int] | None = None) -> list[tuple[int, str, str]]:
    """(pid, "fd" | "mmap", path) for every process holding a file below *root* or with *key*.

    Looks at every /proc/PID/fd link and /proc/PID/maps line, under the file's path as the
    kernel reports it, with or without " (deleted)", and at the (device, inode) pair.
    """
    prefix = os.path.join(os.path.realpath(root), "")
    found: set[tuple[int, str, str]] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            for link in (entry / "fd").iterdir():
                try:
                    target = os.readlink(link)
                    st = os.stat(link)
                except OSError:
                    continue
                path = target.removesuffix(DELETED)
                if path.startswith(prefix) or (key is not None and key == (st.st_dev, st.st_ino)):
                    found.add((pid, "fd", target))
            for line in (entry / "maps").read_text(errors="replace").splitlines():
                fields = line.split(None, 5)
                if len(fields) < 5:
                    continue
                path = fields[5].strip() if len(fields) == 6 else ""
                major, _, minor = fields[3].partition(":")
                mapped = (os.makedev(int(major, 16), int(minor, 16)), int(fields[4]))
                if path.removesuffix(DELETED).startswith(prefix) or (
                    key is not None and fields[4] != "0" and mapped == key
                ):
                    found.add((pid, "mmap", path))
        except OSError:  # gone meanwhile
            continue
    return sorted(found)


def index_of(
    logs: Sequence[Mapping[str, Any]], name: str, *, after: int = -1, **fields: Any
) -> int:
    """Position of the first *name* event (with these fields) after position *after*."""
    for i, e in enumerate(logs):
        if i > after and e["event"] == name and all(e.get(k) == v for k, v in fields.items()):
            return i
    raise AssertionError(f"no {name} {fields} after position {after} in {logs}")


def shut(engine: AsposeEngine) -> None:
    """End whatever host *engine* still runs, whatever state it is in, and reap it."""
    engine.log = None
    proc = engine.host.proc if engine.host is not None else None
    if proc is None:
        return
    if proc.poll() is None and proc_state(proc.pid) == "T":
        proc.kill()  # a stopped host would take the whole release_timeout
    try:
        engine.release()
    except EngineError:
        proc.kill()
        proc.wait(timeout=10)
        engine.release()


def prune_policy(models: Path, state: Path) -> Policy:
    """Prefix "lmstudio-" pruned at any age, by deletion, whatever share of the models."""
    return Policy.model_validate(
        {
            "model_dir": str(models),
            "state_dir": str(state),
            "prune": {
                "prefixes": ["lmstudio-"],
                "min_age": 0,
                "max_fraction": 1.0,
                "action": "delete",
            },
            "engine": {"backend": "aspose"},
        }
    )


def plan_for(policy: Policy) -> Plan:
    return reconcile(policy, scan(policy.model_dir), now=time.time())


# -- 1. lifecycle ----------------------------------------------------------------------------


def test_open_starts_an_isolated_host_and_release_reaps_it(
    llama_runtime: Path, models: Path, tmp_path: Path
) -> None:
    """open() starts a host in the state dir with an explicit environment; release() reaps it."""
    model = make_tiny_gguf(models / DEFAULT_MODEL_DIR / DEFAULT_MODEL_FILE)
    state = tmp_path / "state"
    parent_environ = {
        "OCRD_TEST_MARKER": "must-not-leak",
        "PYTHONPATH": "/nonexistent/pythonpath",
        "LD_LIBRARY_PATH": "/nonexistent/lib",
        "HOME": "/nonexistent/home",
        "LANG": "C.UTF-8",
    }
    with capture_logs() as logs:
        engine = AsposeEngine(
            state,
            runtime_dir=llama_runtime,
            release_timeout=5,
            log=structlog.get_logger(),
            environ=parent_environ,
        )
        try:
            engine.open(models)
            pid = engine.pid
            assert pid is not None
            os.kill(pid, 0)  # alive
            assert engine.alive()
            assert b"ocrd.engine.child" in Path(f"/proc/{pid}/cmdline").read_bytes()
            started = matching(logs, "engine.started", pid=pid)
            assert len(started) == 1, logs
            assert started[0]["engine"] == "aspose"
            assert started[0]["version"] == dist_version("aspose-ocr-python-net")

            cwd = Path(os.readlink(f"/proc/{pid}/cwd"))
            assert cwd == (state / "engine" / "work").resolve()
            assert cwd.is_relative_to(state.resolve())

            env = host_environ(pid)
            assert env.get("DOTNET_SYSTEM_GLOBALIZATION_INVARIANT") == "1", env
            assert Path(env["XDG_DATA_HOME"]).is_relative_to(state), env
            assert Path(env["HOME"]).is_relative_to(state), env
            assert "OCRD_TEST_MARKER" not in env, env
            assert "PYTHONPATH" not in env, env
            assert "/nonexistent/lib" not in env["LD_LIBRARY_PATH"], env
            assert str(llama_runtime) in env["LD_LIBRARY_PATH"].split(":"), env
            assert not {k for k in env if k.startswith("PYTEST")}, env

            where = engine.local_path()
            assert where == str(Path(env["XDG_DATA_HOME"]) / "Aspose.AI.LLM" / "models")
            assert Path(where).is_symlink()
            assert os.path.realpath(where) == os.path.realpath(models)
            assert engine.list_local() == [f"{where}/{DEFAULT_MODEL_DIR}/{DEFAULT_MODEL_FILE}"]
            assert model.is_file()

            engine.release()
            released = matching(logs, "engine.released", pid=pid)
            assert len(released) == 1, logs
            assert released[0]["how"] == "quit"
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
            assert not Path(f"/proc/{pid}").exists()
            assert engine.pid is None
            assert not engine.alive()
            assert not matching(logs, "engine.crashed"), logs
        finally:
            shut(engine)


# -- 2. the proof with a really loaded model -----------------------------------------------


@pytest.mark.root
def test_a_cycle_unmaps_the_loaded_model_before_deleting_it_and_the_space_comes_back(
    llama_runtime: Path, tmp_path: Path
) -> None:
    """A model the host really loaded is released, deleted, unheld by anyone, its space freed."""
    state = tmp_path / "state"
    with mounted_tmpfs(tmp_path / "models", "4m", mode="0755") as models:
        model = make_tiny_gguf(models / DEFAULT_MODEL_DIR / DEFAULT_MODEL_FILE)
        size = model.stat().st_size
        st = model.stat()
        key = (st.st_dev, st.st_ino)
        real = os.path.realpath(model)
        with capture_logs() as logs:
            log = structlog.get_logger()
            engine = AsposeEngine(state, runtime_dir=llama_runtime, release_timeout=10, log=log)
            try:
                engine.open(models)
                first = engine.pid
                assert first is not None
                assert engine.call("load") == {"initialized": True}
                maps = Path(f"/proc/{first}/maps").read_text()
                assert real in maps, maps
                before = holders(models, key)
                assert (first, "mmap", real) in before, before

                policy = prune_policy(models, state)
                plan = plan_for(policy)
                assert [(a.kind, a.name) for a in plan.actions] == [
                    (ActionKind.PRUNE, DEFAULT_MODEL_DIR)
                ]
                free_before = free_bytes(models)
                outcome = apply(plan, root=models, engine=engine, log=log)
                free_after = free_bytes(models)

                assert [a.name for a in outcome.done] == [DEFAULT_MODEL_DIR], outcome
                assert outcome.busy == () and outcome.failed == (), outcome
                assert outcome.engine_error is None, outcome
                assert sorted(p.name for p in models.iterdir()) == []
                assert holders(models, key) == []
                assert pid_gone(first)
                assert free_after >= free_before + size - SPACE_SLACK, (
                    f"only {free_after - free_before} of {size} bytes came back"
                )

                released = index_of(logs, "engine.released", pid=first, how="quit")
                pruned = index_of(logs, "model.pruned", model=DEFAULT_MODEL_DIR, dest="deleted")
                assert released < pruned, logs
                second = engine.pid
                assert second is not None and second != first
                restarted = index_of(logs, "engine.started", after=pruned, pid=second)
                cycled = index_of(logs, "engine.cycled", after=restarted, pid=second)
                assert matching(logs, "engine.cycled")[0]["ocrd_models"] == []
                assert logs[cycled]["engine_models"] == []
                assert engine.alive()
            finally:
                shut(engine)


def test_a_model_held_by_a_running_host_is_busy_and_kept(
    llama_runtime: Path, models: Path, tmp_path: Path
) -> None:
    """Pruned with NoEngine while a host keeps it loaded, the model is reported busy and kept."""
    state = tmp_path / "state"
    model = make_tiny_gguf(models / DEFAULT_MODEL_DIR / DEFAULT_MODEL_FILE)
    real = os.path.realpath(model)
    holder = AsposeEngine(state, runtime_dir=llama_runtime, release_timeout=5)
    try:
        holder.open(models)
        host = holder.pid
        assert host is not None
        assert holder.call("load") == {"initialized": True}
        assert (host, "mmap", real) in holders(models)

        plan = plan_for(prune_policy(models, state))
        assert [a.name for a in plan.actions] == [DEFAULT_MODEL_DIR]
        with capture_logs() as logs:
            outcome = apply(plan, root=models, engine=NoEngine(), log=structlog.get_logger())

        assert outcome.done == (), outcome
        assert [r.name for r in outcome.busy] == [DEFAULT_MODEL_DIR], outcome
        assert f"pid {host} ({comm(host)}, mmap)" in outcome.busy[0].reason, outcome
        busy = matching(logs, "model.busy", model=DEFAULT_MODEL_DIR)
        assert len(busy) == 1 and host in busy[0]["pids"], logs
        assert not matching(logs, "model.pruned"), logs
        assert model.is_file()
        assert (host, "mmap", real) in holders(models)
        assert holder.alive()
    finally:
        shut(holder)


# -- 3. crash --------------------------------------------------------------------------------


def test_a_killed_host_is_reported_crashed_at_release_and_open_starts_a_new_one(
    aspose: None, models: Path, tmp_path: Path
) -> None:
    """After SIGKILL of the host, release() logs engine.crashed without raising; open() works."""
    with capture_logs() as logs:
        engine = AsposeEngine(tmp_path / "state", release_timeout=5, log=structlog.get_logger())
        try:
            engine.open(models)
            first = engine.pid
            assert first is not None
            os.kill(first, signal.SIGKILL)
            wait_for(lambda: not engine.alive(), what=f"host {first} to die")

            engine.release()  # must not raise

            crashed = matching(logs, "engine.crashed", pid=first)
            assert len(crashed) == 1, logs
            assert crashed[0]["exit"] == "killed by SIGKILL"
            assert crashed[0]["during"] == "release"
            assert crashed[0]["log_level"] == "error"
            assert not matching(logs, "engine.released"), logs
            assert pid_gone(first)
            assert engine.pid is None

            engine.open(models)
            second = engine.pid
            assert second is not None and second != first
            assert engine.alive()
            assert engine.call("ping") == {"pid": second}
            assert len(matching(logs, "engine.started", pid=second)) == 1, logs
        finally:
            shut(engine)


def test_a_host_killed_right_before_release_is_not_logged_as_quit(
    aspose: None, models: Path, tmp_path: Path
) -> None:
    """A host SIGKILLed just before release() is logged as crashed, never as released by quit."""
    with capture_logs() as logs:
        engine = AsposeEngine(tmp_path / "state", release_timeout=5, log=structlog.get_logger())
        try:
            engine.open(models)
            pid = engine.pid
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            engine.release()  # must not raise, whether or not the kernel finished the kill

            crashed = matching(logs, "engine.crashed", pid=pid)
            assert len(crashed) == 1, logs
            assert crashed[0]["exit"] == "killed by SIGKILL"
            assert pid_gone(pid)
            assert not matching(logs, "engine.released", pid=pid, how="quit"), logs
            engine.open(models)
            assert engine.alive()
        finally:
            shut(engine)


# -- 4. hang ---------------------------------------------------------------------------------


def test_a_stopped_host_is_killed_within_the_release_timeout(
    aspose: None, models: Path, tmp_path: Path
) -> None:
    """A SIGSTOPped host does not answer; release() kills and reaps it within ~release_timeout."""
    with capture_logs() as logs:
        engine = AsposeEngine(tmp_path / "state", release_timeout=2, log=structlog.get_logger())
        try:
            engine.open(models)
            pid = engine.pid
            assert pid is not None
            os.kill(pid, signal.SIGSTOP)
            wait_for(lambda: proc_state(pid) == "T", what=f"host {pid} to stop")

            started = time.monotonic()
            engine.release()
            elapsed = time.monotonic() - started
            print(f"\nrelease of a stopped host (release_timeout 2s): {elapsed:.2f} s")

            assert elapsed < 2.5, f"release took {elapsed:.2f} s"
            released = matching(logs, "engine.released", pid=pid)
            assert len(released) == 1, logs
            assert released[0]["how"] in ("kill", "terminate")
            assert pid_gone(pid)
            assert engine.pid is None
        finally:
            shut(engine)


# -- 5. ICU ----------------------------------------------------------------------------------


def test_a_host_aborting_without_icu_is_restarted_in_invariant_mode(
    aspose: None, models: Path, tmp_path: Path
) -> None:
    """With no usable ICU the first host aborts (SIGABRT); open() retries invariant and succeeds."""
    state = tmp_path / "state"
    with capture_logs() as logs:
        engine = AsposeEngine(
            state,
            release_timeout=5,
            log=structlog.get_logger(),
            environ={"CLR_ICU_VERSION_OVERRIDE": "999", "LANG": "C.UTF-8"},
        )
        try:
            engine.open(models)
            pid = engine.pid
            assert pid is not None and engine.alive()
            assert engine.call("ping") == {"pid": pid}

            crashed = index_of(logs, "engine.crashed", during="start", exit="killed by SIGABRT")
            fallback = index_of(logs, "engine.icu_fallback", after=crashed)
            assert logs[fallback]["log_level"] == "warning"
            index_of(logs, "engine.started", after=fallback, pid=pid)
            assert len(matching(logs, "engine.started")) == 1, logs

            env = host_environ(pid)
            assert env.get("DOTNET_SYSTEM_GLOBALIZATION_INVARIANT") == "1", env
            assert env.get("CLR_ICU_VERSION_OVERRIDE") == "999", env
            host_log = (state / "engine" / "host.log").read_text(errors="replace")
            assert "Couldn't find a valid ICU package" in host_log, host_log
        finally:
            shut(engine)


# -- 7. timing -------------------------------------------------------------------------------


def test_timing_of_open_load_release(llama_runtime: Path, models: Path, tmp_path: Path) -> None:
    """Print how long open, load and release of a real host take (figures only, no limits)."""
    make_tiny_gguf(models / DEFAULT_MODEL_DIR / DEFAULT_MODEL_FILE)
    engine = AsposeEngine(tmp_path / "state", runtime_dir=llama_runtime, release_timeout=10)
    figures: list[tuple[float, float, float]] = []
    try:
        for _ in range(3):
            t0 = time.monotonic()
            engine.open(models)
            t1 = time.monotonic()
            assert engine.call("load") == {"initialized": True}
            t2 = time.monotonic()
            pid = engine.pid
            assert pid is not None
            engine.release()
            t3 = time.monotonic()
            assert pid_gone(pid)
            figures.append((t1 - t0, t2 - t1, t3 - t2))
    finally:
        shut(engine)
    print()
    for i, (open_s, load_s, release_s) in enumerate(figures, 1):
        print(
            f"round {i}: open {open_s * 1000:.0f} ms, load {load_s * 1000:.0f} ms, "
            f"release (model loaded) {release_s * 1000:.0f} ms"
        )
