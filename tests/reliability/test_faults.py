"""Faults injected under the real ocrd: each one must leave the daemon running, be logged as
a clear event, lose no model's bytes, and be converged once the fault is gone (DESIGN §4, §6).

The daemon (`ocrd run`) runs as a subprocess; the engine faults run `run_cycle` in-process
with an engine that raises (the daemon builds its engine from the policy). Root is needed for
`chattr +i`, tmpfs mounts and the inotify sysctl; those tests skip with the reason otherwise.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from ocrd.config import load_policy
from ocrd.cycle import run_cycle
from ocrd.engine.base import EngineError
from ocrd.engine.none import NoEngine
from tests.support.cli import OCRD, Result, ocrd
from tests.support.daemon import CAP, Daemons
from tests.support.files import digest, leftovers, make_model, sha256
from tests.support.logs import epoch, log_lines
from tests.support.mounts import CAN_MOUNT, MOUNT
from tests.support.policy import policy_data, read_status, save_policy, status_when
from tests.support.procs import RENAMES, in_syscall
from tests.support.wait import wait_for

QUEUE_SYSCTL = Path("/proc/sys/fs/inotify/max_queued_events")
SETTLE = 20.0  # seconds the daemon may take to come to rest after a fault

STRACE = shutil.which("strace")
ROOT = os.geteuid() == 0
needs_mount = pytest.mark.skipif(not CAN_MOUNT, reason="mounts a tmpfs: needs root and mount")


# -- helpers ---------------------------------------------------------------------------------


def trash_batches(root: Path) -> dict[str, tuple[set[str] | None, set[str]]]:
    """Each quarantine dir: (the model names its record lists, None if unreadable; payloads).

    A v2 batch lists its cycle's models in `.ocrd-record.json`; a legacy (v1) item names its
    one model in `record.json`.
    """
    found: dict[str, tuple[set[str] | None, set[str]]] = {}
    trash = root / ".ocrd-trash"
    if not trash.is_dir():
        return found
    for batch in trash.iterdir():
        contents = set(os.listdir(batch))
        listed: set[str] | None = None
        record_file = ".ocrd-record.json" if ".ocrd-record.json" in contents else "record.json"
        try:
            record = json.loads((batch / record_file).read_text(encoding="utf-8"))
            if record_file == "record.json":
                listed = {record["name"]}
            else:
                listed = {item["name"] for item in record["items"]}
        except (OSError, ValueError, KeyError, TypeError):
            listed = None
        own = {record_file, ".ocrd-record.json.tmp", "record.json.tmp"}
        found[batch.name] = (listed, contents - own)
    return found


def trash_payloads(root: Path) -> dict[str, list[bytes]]:
    """Bytes of every complete quarantine item (a file its batch's record lists), by name."""
    found: dict[str, list[bytes]] = {}
    for batch, (listed, payloads) in trash_batches(root).items():
        for name in payloads & (listed or set()):
            payload = root / ".ocrd-trash" / batch / name
            if payload.is_file() and not payload.is_symlink():
                found.setdefault(name, []).append(payload.read_bytes())
    return found


def account(root: Path, expected: dict[str, bytes]) -> dict[str, str]:
    """Where each model's bytes are now: 'dir' (in place), 'trash' (quarantined) or 'gone'."""
    trash = trash_payloads(root)
    where = {}
    for name, data in expected.items():
        path = root / name
        if path.is_file() and not path.is_symlink() and path.read_bytes() == data:
            where[name] = "dir"
        elif data in trash.get(name, []):
            where[name] = "trash"
        else:
            where[name] = "gone"
    return where


def failed_for(model: str, *, words: str) -> Callable[[dict[str, Any]], bool]:
    """Matches an `action.failed` line for *model* whose error matches *words*."""
    return lambda e: e.get("model") == model and re.search(words, e.get("error", "")) is not None


# -- permission denied: an immutable model, an immutable model dir ----------------------------


@pytest.mark.skipif(not ROOT, reason="chattr +i needs root")
def test_immutable_model_fails_alone_and_is_pruned_once_the_flag_is_gone(
    daemons: Daemons,
    models: Path,
    policy: Path,
    status_file: Path,
    immutable: Callable[..., None],
) -> None:
    """A model that cannot be moved (EPERM) fails alone, is retried, and goes once it can."""
    data = {"keep.bin": b"keep", "old_stuck": b"stuck" * 100, "old_free": b"free" * 50}
    for name, content in data.items():
        make_model(models, name, content)
    immutable(models / "old_stuck", True)
    save_policy(policy, policy_data(models))

    daemon = daemons.start(policy)
    daemon.wait("model.pruned", model="old_free")
    first = daemon.wait("action.failed", where=failed_for("old_stuck", words="not permitted"))
    assert first["level"] == "error" and first["action"] == "prune", first
    retried = daemon.events.index(first) + 1
    daemon.wait("action.failed", after=retried, model="old_stuck")  # retried, not given up
    doc = status_when(status_file, lambda d: d["degraded"], what="degraded status")
    assert any("old_stuck" in r for r in doc["degraded_reasons"]), doc["degraded_reasons"]
    assert (models / "old_stuck").read_bytes() == data["old_stuck"]
    assert daemon.alive()

    immutable(models / "old_stuck", False)
    pruned = daemon.wait("model.pruned", model="old_stuck", timeout=15)
    assert pruned["bytes"] == len(data["old_stuck"])
    assert account(models, data) == {"keep.bin": "dir", "old_stuck": "trash", "old_free": "trash"}
    daemon.settle(timeout=SETTLE)
    batches = trash_batches(models)  # no incomplete or empty batch left
    assert all(payloads and payloads <= (listed or set()) for listed, payloads in batches.values())
    assert sorted(n for _, payloads in batches.values() for n in payloads) == [
        "old_free",
        "old_stuck",
    ]
    assert leftovers(models) == []
    status_when(status_file, lambda d: not d["degraded"], what="healthy status again")
    assert daemon.alive()


@pytest.mark.skipif(not ROOT, reason="chattr +i needs root")
def test_immutable_model_dir_fails_prunes_and_restores_then_converges(
    daemons: Daemons,
    models: Path,
    policy: Path,
    tmp_path: Path,
    immutable: Callable[..., None],
) -> None:
    """In a dir where nothing can be created or removed, prune and restore fail, nothing half."""
    data = {"keep.bin": b"keep", "old_a": b"old" * 1000}
    for name, content in data.items():
        make_model(models, name, content)
    good = os.urandom(100_000)
    source = make_model(tmp_path, "mirror.bin", good)
    save_policy(policy, policy_data(models, prune={"prefixes": ["zzz_"]}))
    daemon = daemons.start(policy)
    immutable(models, True)

    mark = daemon.mark()
    required = [{"name": "need.bin", "sha256": sha256(good), "source": str(source)}]
    save_policy(policy, policy_data(models, required=required))
    daemon.wait("policy.reloaded", after=mark)
    daemon.wait("action.failed", after=mark, where=failed_for("need.bin", words="not permitted"))
    daemon.wait("action.failed", after=mark, where=failed_for("old_a", words="not permitted"))
    assert sorted(os.listdir(models)) == [".ocrd-lock", "keep.bin", "old_a"]  # nothing partial
    assert account(models, data) == {"keep.bin": "dir", "old_a": "dir"}
    assert daemon.alive()

    immutable(models, False)
    daemon.wait("model.restored", after=mark, model="need.bin", timeout=15)
    daemon.wait("model.pruned", after=mark, model="old_a", timeout=15)
    assert (models / "need.bin").read_bytes() == good
    assert account(models, data) == {"keep.bin": "dir", "old_a": "trash"}
    assert leftovers(models) == []
    assert daemon.alive()


# -- disk full while restoring ------------------------------------------------------------


@pytest.mark.root
@needs_mount
def test_restore_that_does_not_fit_is_refused_whole_and_done_after_the_disk_grows(
    daemons: Daemons,
    models: Path,
    policy: Path,
    tmp_path: Path,
    tmpfs_at: Callable[[Path, str], None],
) -> None:
    """A restore bigger than the free space is refused before writing; after a grow it lands."""
    tmpfs_at(models, "2m")
    big = os.urandom(3 * 1024 * 1024)  # bigger than the whole filesystem
    source = make_model(tmp_path, "mirror.bin", big)
    data = {"keep.bin": b"keep" * 1000, "old_a": b"old" * 1000}
    for name, content in data.items():
        make_model(models, name, content)
    required = [{"name": "need.bin", "sha256": sha256(big), "source": str(source)}]
    save_policy(policy, policy_data(models, required=required))

    daemon = daemons.start(policy)
    failed = daemon.wait("action.failed", where=failed_for("need.bin", words=r"free space"))
    assert failed["action"] == "restore"
    assert re.search(r"\d+ bytes free", failed["error"]), failed
    daemon.wait("model.pruned", model="old_a")  # the other actions still ran
    assert not (models / "need.bin").exists()
    assert leftovers(models) == []  # nothing partial
    vfs = os.statvfs(models)
    assert (vfs.f_blocks - vfs.f_bfree) * vfs.f_frsize < 1024 * 1024  # no 3 MiB half-copy
    assert daemon.alive()

    subprocess.run([str(MOUNT), "-o", "remount,size=100m", str(models)], check=True)
    restored = daemon.wait("model.restored", model="need.bin", timeout=15)
    assert restored["bytes"] == len(big)
    assert (models / "need.bin").read_bytes() == big
    assert account(models, data) == {"keep.bin": "dir", "old_a": "trash"}
    assert leftovers(models) == []
    assert daemon.alive()


@pytest.mark.root
@needs_mount
def test_quarantine_on_a_full_disk_fails_closed_and_leaves_no_batch(
    models: Path,
    policy: Path,
    run_ocrd: Callable[..., Result],
    tmpfs_at: Callable[[Path, str], None],
) -> None:
    """With no room for the quarantine record, nothing moves, each prune fails, no dir is left."""
    tmpfs_at(models, "1m")
    data = {"keep.bin": b"keep" * 100, "old_a": b"a" * 100, "old_b": b"b" * 100}
    for name, content in data.items():
        make_model(models, name, content)
    filler = models / ".filler"
    with contextlib.suppress(OSError), filler.open("wb") as fh:  # fill the disk to the brim
        while True:
            fh.write(b"\0" * 4096)
            fh.flush()
    save_policy(policy, policy_data(models))

    full = run_ocrd("--config", policy, "apply")
    events = full.logs()
    failed = {e["model"]: e["error"] for e in events if e["event"] == "action.failed"}
    assert full.code != 0, full
    assert sorted(failed) == ["old_a", "old_b"], full
    assert all(re.search(r"space|quarantine", error) for error in failed.values()), failed
    assert not any(e["event"] == "model.pruned" for e in events)
    assert account(models, data) == {"keep.bin": "dir", "old_a": "dir", "old_b": "dir"}
    assert trash_batches(models) == {}  # no half-made quarantine dir
    assert leftovers(models) == []

    filler.unlink()  # room again: the next apply quarantines both
    again = run_ocrd("--config", policy, "apply")
    assert again.code == 0, again
    assert account(models, data) == {"keep.bin": "dir", "old_a": "trash", "old_b": "trash"}
    assert [listed for listed, _ in trash_batches(models).values()] == [{"old_a", "old_b"}]


# -- the model dir deleted, replaced by a file, re-created ----------------------------------


@pytest.mark.parametrize(
    "resync",
    [
        pytest.param("1h", id="found-by-retry"),  # README: retried with backoff
        pytest.param("500ms", id="found-by-resync"),
    ],
)
def test_model_dir_deleted_then_a_file_then_recreated_is_survived(
    daemons: Daemons, models: Path, policy: Path, tmp_path: Path, status_file: Path, resync: str
) -> None:
    """Deleting the model dir, putting a file at its path and re-creating it never crashes ocrd."""
    data = {"keep.bin": b"keep" * 10, "other.bin": b"other" * 10}
    for name, content in data.items():
        make_model(models, name, content)
    save_policy(policy, policy_data(models, reconcile={"resync": resync}))
    daemon = daemons.start(policy)
    stash = tmp_path / "stash"
    stash.mkdir()

    mark = daemon.mark()
    for name in data:
        os.rename(models / name, stash / name)
    shutil.rmtree(models)  # what is left: ocrd's own lock file
    daemon.wait("model_dir.suspicious", after=mark, where=lambda e: "vanished" in e["reason"])

    models.write_bytes(b"not a directory")
    since = time.time()
    doc = status_when(
        status_file,
        lambda d: d["updated_at"] > since,
        timeout=10,
        what="another look at the model dir (a retry with backoff) while it is a file",
    )
    assert doc["suspicious"] and doc["degraded"], doc
    assert models.read_bytes() == b"not a directory"  # looked at, never written or removed
    assert not daemon.seen("cycle.failed") and daemon.alive(), daemon

    models.unlink()
    staged = tmp_path / "staged"
    staged.mkdir()
    for name in data:
        os.rename(stash / name, staged / name)
    make_model(staged, "old_a", b"stale")
    os.rename(staged, models)
    daemon.wait("model.pruned", after=mark, model="old_a", timeout=15)
    daemon.wait("model_dir.trusted", after=mark)
    assert account(models, {**data, "old_a": b"stale"}) == {
        "keep.bin": "dir",
        "other.bin": "dir",
        "old_a": "trash",
    }
    assert (models / ".ocrd-lock").read_text().strip() == str(daemon.pid)
    assert not daemon.seen("cycle.failed") and daemon.alive(), daemon


# -- the policy file deleted, emptied, a directory, a dangling symlink --------------------------


def _delete(path: Path) -> None:
    path.unlink()


def _empty(path: Path) -> None:
    with open(path, "w", encoding="utf-8"):
        pass  # truncated in place: a valid YAML document without model_dir


def _directory(path: Path) -> None:
    path.unlink()
    path.mkdir()


def _dangling(path: Path) -> None:
    tmp = path.with_name(".policy.link")
    tmp.symlink_to(path.parent / "gone" / "policy.yaml")
    os.replace(tmp, path)


POLICY_FAULTS = {
    "deleted": (_delete, r"cannot read the policy"),
    "emptied": (_empty, r"model_dir: is required"),
    "directory": (_directory, r"cannot read the policy"),
    "dangling-symlink": (_dangling, r"cannot read the policy"),
}


@pytest.mark.parametrize("fault", list(POLICY_FAULTS))
def test_broken_policy_file_is_rejected_and_the_last_good_one_stays(
    daemons: Daemons, models: Path, policy: Path, status_file: Path, fault: str
) -> None:
    """A deleted, empty, directory or dangling policy is rejected; the old rules keep working."""
    breaks, words = POLICY_FAULTS[fault]
    save_policy(policy, policy_data(models))
    good = digest(policy)
    daemon = daemons.start(policy)

    mark = daemon.mark()
    breaks(policy)
    rejected = daemon.wait("policy.rejected", after=mark)
    assert rejected["level"] == "error" and rejected["kept"] == good, rejected
    assert str(policy) in rejected["errors"][0]
    assert re.search(words, " ".join(rejected["errors"])), rejected
    shown = status_when(
        status_file, lambda d: d["policy"]["rejected"], what="the rejection in the status file"
    )
    since = shown["updated_at"]
    os.kill(daemon.pid, signal.SIGHUP)  # a forced reload must not bring in defaults either
    doc = status_when(
        status_file, lambda d: d["updated_at"] > since, what="the status after SIGHUP"
    )
    assert doc["policy"]["digest"] == good and doc["policy"]["rejected"], doc["policy"]
    assert doc["degraded"] is True

    make_model(models, "old_a", b"stale")
    make_model(models, "new_a", b"fresh")
    daemon.wait("model.pruned", after=mark, model="old_a")  # the last good policy acts
    assert not daemon.seen("policy.reloaded", after=mark), daemon
    assert (models / "new_a").read_bytes() == b"fresh"

    if policy.is_dir() and not policy.is_symlink():
        policy.rmdir()
    save_policy(policy, policy_data(models, prune={"prefixes": ["new_"]}))
    daemon.wait("policy.reloaded", after=mark, digest=digest(policy))
    daemon.wait("model.pruned", after=mark, model="new_a")
    assert account(models, {"old_a": b"stale", "new_a": b"fresh"}) == {
        "old_a": "trash",
        "new_a": "trash",
    }
    status_when(
        status_file,
        lambda d: d["policy"]["rejected"] is None,
        what="the rejection cleared from the status",
    )
    assert daemon.alive()


# -- a model replaced between plan and act, at the CLI -------------------------------------


@pytest.mark.skipif(STRACE is None, reason="strace is not installed")
@pytest.mark.parametrize("mode", ["delete", "quarantine"])
def test_model_replaced_between_plan_and_act_is_left_alone_by_apply(
    env: dict[str, str], models: Path, policy: Path, tmp_path: Path, mode: str
) -> None:
    """`ocrd apply` stopped after planning while the model is swapped skips it (model.changed)."""
    assert STRACE is not None
    make_model(models, "keep.bin", b"keep")
    make_model(models, "old_a", b"original bytes")
    save_policy(policy, policy_data(models, prune={"action": mode}))
    trace = tmp_path / "strace.log"
    if mode == "quarantine":
        # After planning, the handle check opens /proc to index every process: stop there
        # (SIGSTOP on that syscall), swap the file, continue into the re-check and the act.
        stop_at = ["-P", "/proc", "-e", "trace=openat", "-e", "inject=openat:signal=STOP:when=1"]
        reason = "replaced since the scan"
    else:
        # A delete moves its target out of its name first (two-phase), re-checked just
        # before: hold ocrd at that rename, past the re-check, and swap the file there.
        # What moves is then the replacement, which goes back untouched.
        stop_at = [
            "-e", "trace=renameat,renameat2",
            "-e", "inject=renameat,renameat2:delay_enter=2000000:when=1",
        ]  # fmt: skip
        reason = "replaced since the re-check (a new entry took its name); "
        reason += "put back, nothing deleted"
    argv = [
        STRACE, "-f", "-qq", "-o", str(trace), *stop_at, OCRD, "--config", str(policy), "apply",
    ]  # fmt: skip
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    stopped_pid: int | None = None
    try:

        def stopped() -> int | None:
            assert proc.poll() is None, proc.communicate()
            text = trace.read_text() if trace.exists() else ""
            found = re.search(r"^(\d+)\s+--- stopped by SIGSTOP", text, re.MULTILINE)
            return int(found.group(1)) if found else None

        if mode == "quarantine":
            stopped_pid = wait_for(stopped, timeout=20, what="ocrd stopped between plan and act")
        else:
            wait_for(lambda: in_syscall(proc, RENAMES), timeout=20, what="ocrd held at a rename")
        os.rename(models / "old_a", tmp_path / "moved-away")  # someone swaps the model
        make_model(models, "old_a", b"a replacement written meanwhile")
        if stopped_pid is not None:
            os.kill(stopped_pid, signal.SIGCONT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            if stopped_pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(stopped_pid, signal.SIGKILL)
            proc.kill()
            proc.communicate()

    logs = log_lines(out)
    assert proc.returncode == 1, (out, err)  # not converged: a target was skipped
    changed = [e for e in logs if e["event"] == "model.changed"]
    assert [(e["model"], e["reason"]) for e in changed] == [("old_a", reason)]
    assert not [e for e in logs if e["event"] in ("model.pruned", "action.failed")], logs
    assert (models / "old_a").read_bytes() == b"a replacement written meanwhile"
    assert (tmp_path / "moved-away").read_bytes() == b"original bytes"
    assert leftovers(models) == []

    again = ocrd("--config", policy, "apply", env=env)
    assert again.returncode == 0, again
    assert not (models / "old_a").exists()
    replacement = {"old_a": b"a replacement written meanwhile", "keep.bin": b"keep"}
    assert account(models, replacement) == {
        "old_a": "trash" if mode == "quarantine" else "gone",  # delete mode: deleted by policy
        "keep.bin": "dir",
    }


# -- the state dir unwritable --------------------------------------------------------------


@pytest.mark.parametrize("how", ["under-a-file", "immutable"])
def test_unwritable_state_dir_warns_and_cycles_still_verify_pins(
    daemons: Daemons,
    plain_denv: dict[str, str],
    models: Path,
    policy: Path,
    tmp_path: Path,
    immutable: Callable[..., None],
    how: str,
) -> None:
    """With no writable state dir, cycles run on, warn, and still check every pin."""
    if how == "immutable" and not ROOT:
        pytest.skip("chattr +i needs root")
    if how == "under-a-file":
        blocker = tmp_path / "blocker"
        blocker.write_bytes(b"a file where a directory should be")
        state = blocker / "state"
    else:
        state = tmp_path / "state"
        state.mkdir()
        immutable(state, True)
    good, bad = b"good model", b"bit-rotted model"
    make_model(models, "good.bin", good)
    make_model(models, "bad.bin", bad)
    required = [
        {"name": "good.bin", "sha256": sha256(good)},
        {"name": "bad.bin", "sha256": sha256(b"what bad.bin should hold")},
    ]
    save_policy(policy, policy_data(models, state_dir=str(state), required=required))
    daemon = daemons.start(policy, env=plain_denv)  # the status goes to the state dir
    assert daemon.wait("hashcache.unwritable")["level"] == "warning"
    assert daemon.wait("status.unwritable")["level"] == "warning"
    corrupt = daemon.wait("model.corrupt")
    assert corrupt["model"] == "bad.bin"
    mark = daemon.mark()
    make_model(models, "old_a", b"stale")
    daemon.wait("model.pruned", after=mark, model="old_a")
    daemon.wait("model.corrupt", after=mark, model="bad.bin")  # re-verified, not cached
    assert not daemon.seen("model.corrupt", model="good.bin")
    assert daemon.alive()

    if how == "under-a-file":
        blocker.unlink()
    else:
        immutable(state, False)
    mark = daemon.mark()
    make_model(models, "old_b", b"stale too")
    daemon.wait("model.pruned", after=mark, model="old_b")
    daemon.wait("cycle.finished", after=mark)
    status = wait_for(lambda: read_status(state / "status.json"), what="status in the state dir")
    assert status["pid"] == daemon.pid
    hashes = json.loads((state / "hashes.json").read_text())["hashes"]
    assert sha256(good) in hashes.values()
    assert not daemon.seen("hashcache.unwritable", after=mark), daemon
    assert account(models, {"good.bin": good, "bad.bin": bad, "old_a": b"stale"}) == {
        "good.bin": "dir",
        "bad.bin": "dir",
        "old_a": "trash",
    }
    assert daemon.alive()


# -- the engine raising (in-process) ---------------------------------------------------------


class RaisingEngine(NoEngine):
    """An engine whose *method* raises *error*; everything else behaves like `none`."""

    name = "raising"

    def __init__(self, method: str, error: Exception) -> None:
        super().__init__()
        self.method = method
        self.error = error
        self.calls: list[str] = []

    def _call(self, method: str) -> None:
        self.calls.append(method)
        if method == self.method:
            raise self.error

    def open(self, model_dir: Path) -> None:
        self._call("open")
        super().open(model_dir)

    def list_local(self) -> list[str]:
        self._call("list_local")
        return super().list_local()

    def local_path(self) -> str | None:
        self._call("local_path")
        return super().local_path()

    def release(self) -> None:
        self._call("release")
        super().release()


ENGINE_FAULTS = {
    "release": EngineError("engine host pid 4242 is still alive after SIGKILL"),
    "release-bug": RuntimeError("release exploded"),
    "open": EngineError("the engine host could not create AsposeAI: ICU missing"),
    "list_local": EngineError("engine host list_local failed: boom"),
    "local_path": OSError(5, "Input/output error"),
}


@pytest.mark.parametrize("fault", list(ENGINE_FAULTS))
def test_engine_raising_is_reported_and_never_destructive_or_fatal(
    models: Path, policy: Path, tmp_path: Path, fault: str
) -> None:
    """release raising: nothing is touched; open/list raising: actions stand, engine reported."""
    method = fault.removesuffix("-bug")
    error = ENGINE_FAULTS[fault]
    make_model(models, "keep.bin", b"keep")
    stale = make_model(models, "old_a", b"stale" * 100)
    inode = stale.stat().st_ino
    save_policy(policy, policy_data(models, state_dir=str(tmp_path / "state")))
    loaded = load_policy(policy).policy
    engine = RaisingEngine(method, error)

    with capture_logs() as logs:
        result = run_cycle(loaded, engine=engine, log=structlog.get_logger())
    events = {e["event"]: e for e in logs}

    if method == "release":
        assert engine.calls == ["release"]  # never acted, never reopened
        failed = events["engine.release_failed"]
        assert (failed["log_level"], failed["skipped"]) == ("error", 1)
        assert str(error) in failed["error"]
        assert [why for _, why in result.outcome.skipped] == ["engine release failed"]
        assert result.outcome.done == ()
        assert stale.read_bytes() == b"stale" * 100 and stale.stat().st_ino == inode
        assert "model.pruned" not in events
    else:
        assert engine.calls[0] == "release"
        assert [a.name for a in result.outcome.done] == ["old_a"]
        unavailable = events["engine.unavailable"]
        assert (unavailable["log_level"], unavailable["engine"]) == ("error", "raising")
        assert str(error) in unavailable["error"]
        assert "engine.cycled" not in events
        assert result.outcome.engine_error and str(error) in result.outcome.engine_error
    assert result.problems  # not converged: the engine's fault is reported
    assert events["cycle.finished"]["failed"] == 0

    with capture_logs() as logs:
        again = run_cycle(loaded, engine=NoEngine(), log=structlog.get_logger())
    assert again.problems == [], again.problems
    assert account(models, {"keep.bin": b"keep", "old_a": b"stale" * 100}) == {
        "keep.bin": "dir",
        "old_a": "trash",
    }


def test_real_engine_that_cannot_open_is_reported_and_retried(
    aspose: None, daemons: Daemons, models: Path, policy: Path, tmp_path: Path
) -> None:
    """The real aspose host that cannot start is `engine.unavailable`; prunes go on; it recovers."""
    state = tmp_path / "state"
    state.mkdir()
    (state / "engine").write_bytes(b"a file where the engine's home should be")
    make_model(models, "keep.bin", b"keep")
    data = policy_data(models, state_dir=str(state), engine={"backend": "aspose"})
    save_policy(policy, data)
    hosts: list[int] = []
    daemon = daemons.start(policy)
    try:
        unavailable = daemon.wait("engine.unavailable")
        assert unavailable["engine"] == "aspose" and "Not a directory" in unavailable["error"]
        mark = daemon.mark()
        make_model(models, "old_a", b"stale")
        daemon.wait("model.pruned", after=mark, model="old_a")
        daemon.wait("engine.unavailable", after=mark)
        assert daemon.alive()

        (state / "engine").unlink()
        started = daemon.wait("engine.started", after=mark, timeout=20)
        hosts.append(int(started["pid"]))
        code, _ = daemon.stop()
        assert code == 0, daemon
        assert daemon.seen("engine.released", pid=started["pid"]), daemon
        assert account(models, {"keep.bin": b"keep", "old_a": b"stale"}) == {
            "keep.bin": "dir",
            "old_a": "trash",
        }
    finally:
        hosts += [int(e["pid"]) for e in daemon.seen("engine.started")]
        daemon.close()
        for pid in set(hosts):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


# -- a flood of events, and the event queue overflowing ---------------------------------------

FLOOD = 10_000
FLOOD_SECONDS = 3.0


def flood(root: Path, stop: threading.Event | None = None) -> tuple[float, float]:
    """Create FLOOD unmanaged files evenly over FLOOD_SECONDS; (start, end) wall times."""
    started = time.time()
    clock = time.monotonic()
    for i in range(FLOOD):
        if stop is not None and stop.is_set():
            break
        ahead = clock + i * FLOOD_SECONDS / FLOOD - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)  # pacing the load, not waiting for a result
        os.close(os.open(root / f"flood_{i:05d}", os.O_CREAT | os.O_WRONLY, 0o644))
    return started, time.time()


def test_a_flood_of_10000_events_over_3s_gives_a_bounded_number_of_cycles(
    daemons: Daemons, models: Path, policy: Path
) -> None:
    """10,000 file events spread over 3 s give a cycle per debounce cap or so, not thousands."""
    make_model(models, "keep.bin", b"keep")
    save_policy(policy, policy_data(models))
    daemon = daemons.start(policy)
    mark = daemon.mark()

    began, ended = flood(models)
    # A cycle over 10,000 entries may outlast the settle window on a loaded machine, so
    # wait for the cycle that saw them all (events lost would time out here), then rest.
    daemon.wait("cycle.finished", after=mark, timeout=SETTLE, models=FLOOD + 1)
    daemon.settle(timeout=SETTLE)

    cycles = daemon.cycles(mark)
    during = [c for c in cycles if began + CAP <= epoch(c) <= ended]
    bound = (ended - began) / CAP + 3
    assert len(cycles) <= bound, f"{len(cycles)} cycles for a {ended - began:.1f}s flood"
    assert len(during) >= 2, f"starved during the flood: {[epoch(c) - began for c in cycles]}"
    assert cycles[-1]["models"] == FLOOD + 1
    assert len(os.listdir(models)) >= FLOOD + 1  # nothing lost
    assert not daemon.seen("cycle.failed") and daemon.alive(), daemon


def test_sigterm_during_a_flood_of_events_ends_the_daemon_promptly(
    daemons: Daemons, models: Path, policy: Path
) -> None:
    """While events keep pouring in, SIGTERM still ends the daemon with exit 0 within 2 s."""
    save_policy(policy, policy_data(models))
    daemon = daemons.start(policy)
    mark = daemon.mark()
    stop = threading.Event()
    writer = threading.Thread(target=flood, args=(models, stop))
    writer.start()
    try:
        daemon.wait("cycle.finished", after=mark, where=lambda e: e["models"] > 0)
        assert writer.is_alive(), "the flood ended before the daemon was in it"
        code, elapsed = daemon.stop()
    finally:
        stop.set()
        writer.join()
    assert code == 0, daemon
    assert elapsed < 2.0, f"took {elapsed:.2f}s to stop: {daemon!r}"
    assert daemon.seen("daemon.stopped", pid=daemon.pid), daemon


@pytest.fixture
def inotify_queue() -> Iterator[Callable[[int], None]]:
    """inotify_queue(n): lower fs.inotify.max_queued_events to n; restored at the end."""
    try:
        original = QUEUE_SYSCTL.read_text()
        QUEUE_SYSCTL.write_text(original)
    except OSError as exc:
        pytest.skip(f"cannot write {QUEUE_SYSCTL}: {exc}")

    def lower(size: int) -> None:
        QUEUE_SYSCTL.write_text(f"{size}\n")

    try:
        yield lower
    finally:
        QUEUE_SYSCTL.write_text(original)


@pytest.mark.root
@needs_mount
def test_overflowed_event_queue_still_leads_to_a_rescan_that_prunes_everything(
    daemons: Daemons,
    models: Path,
    policy: Path,
    tmpfs_at: Callable[[Path, str], None],
    inotify_queue: Callable[[int], None],
) -> None:
    """Events lost to an inotify queue overflow are not lost forever: a rescan prunes them all."""
    tmpfs_at(models, "64m")
    make_model(models, "keep.bin", b"keep")
    save_policy(policy, policy_data(models))
    inotify_queue(16)  # read when the daemon creates its inotify instance
    daemon = daemons.start(policy)
    daemon.settle(timeout=SETTLE)
    mark = daemon.mark()

    os.kill(daemon.pid, signal.SIGSTOP)  # a stalled reader: nothing drains the queue
    try:
        for _ in range(20):  # fill the 16 slots with events that wake nobody: open, close
            with open(models / "keep.bin", "rb"):
                pass
        stale = {f"old_{i:04d}": f"stale {i}".encode() for i in range(1000)}
        for name, content in stale.items():  # all dropped: the queue has overflowed
            make_model(models, name, content)
    finally:
        os.kill(daemon.pid, signal.SIGCONT)

    wait_for(
        lambda: not any(n.startswith("old_") for n in os.listdir(models)),
        timeout=10,
        what=f"every old_ file pruned after the overflow (resync is 1h); {daemon!r}",
    )
    # The lines of a cycle's actions are written in blocks: they may follow the renames.
    wait_for(
        lambda: len(daemon.seen("model.pruned", after=mark)) >= 1000,
        timeout=10,
        what=f"a model.pruned line for each old_ file; {daemon!r}",
    )
    assert len(daemon.seen("model.pruned", after=mark)) == 1000
    assert set(account(models, stale).values()) == {"trash"}
    assert (models / "keep.bin").read_bytes() == b"keep"
    assert daemon.alive()
