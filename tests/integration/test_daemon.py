"""The daemon (`ocrd run`) as a real subprocess: when it cycles, signals, the model dir
coming and going, the one-instance lock, and the status file (DESIGN §4, §6).

Hot reload is in test_daemon_reload.py and sd_notify in test_notify.py; the daemon harness
they all use is tests/support/daemon.py, started by the `daemons` fixture.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from ocrd.core.names import TRASH
from ocrd.observe.trash import read_batch, read_trash
from tests.support.cli import OCRD, ocrd_status
from tests.support.daemon import CAP, Daemons
from tests.support.files import digest, make_model
from tests.support.logs import epoch
from tests.support.mounts import CAN_MOUNT, mount_tmpfs, unmount
from tests.support.policy import DEBOUNCE, policy_data, read_status, save_policy, status_when
from tests.support.procs import HOLD_FD, holder
from tests.support.wait import wait_for

HOUR = 3600.0
STRACE = shutil.which("strace")
root_only = pytest.mark.skipif(not CAN_MOUNT, reason="mounts a tmpfs; needs root")


def second_instance(env: dict[str, str], policy: Path) -> tuple[int | None, str]:
    """Start another `ocrd run`; its exit code (None: still running after 3 s) and stderr."""
    proc = subprocess.Popen(
        [OCRD, "--config", str(policy), "run"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        _, err = proc.communicate(timeout=3)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        return None, err
    return proc.returncode, err


# -- cycles: at start, after settled events, capped, resync ------------------------------


def test_one_cycle_at_start_and_none_without_events(
    daemons: Daemons, models: Path, policy: Path
) -> None:
    """The daemon runs exactly one cycle at start and then waits while nothing changes."""
    make_model(models, "keep.bin")
    save_policy(policy, policy_data(models))
    daemon = daemons.start(policy)
    daemon.quiet()
    assert len(daemon.cycles()) == 1
    assert daemon.cycles()[0]["models"] == 1


def test_events_settle_for_the_debounce_then_give_one_cycle(
    daemons: Daemons, models: Path, policy: Path
) -> None:
    """A quick series of file events leads to one cycle, once they settled for `debounce`."""
    save_policy(policy, policy_data(models))
    daemon = daemons.start(policy)
    mark = daemon.mark()
    for i in range(20):
        make_model(models, f"keep_{i}.bin")
    last_write = time.time()
    daemon.wait_cycles(1, after=mark)
    cycle = daemon.cycles(mark)[0]
    assert cycle["models"] == 20
    assert epoch(cycle) >= last_write + DEBOUNCE - 0.01
    daemon.quiet()
    assert len(daemon.cycles(mark)) == 1


def test_constant_writes_still_get_a_cycle_every_few_debounce_periods(
    daemons: Daemons, models: Path, policy: Path
) -> None:
    """Writes more often than `debounce` never settle, yet the cap forces a cycle about every 5."""
    save_policy(policy, policy_data(models))
    daemon = daemons.start(policy)
    mark = daemon.mark()
    started = time.monotonic()
    i = 0
    while time.monotonic() - started < 4 * CAP:
        make_model(models, f"keep_{i}.bin")  # 4 times per debounce period
        i += 1
        time.sleep(DEBOUNCE / 4)
    during = len(daemon.cycles(mark))
    assert 2 <= during <= 8, daemon  # not 0 (no cap), not one per write (no debounce)


def test_resync_rescans_without_any_event(daemons: Daemons, models: Path, policy: Path) -> None:
    """With no file events at all, a full cycle still runs every `reconcile.resync`."""
    save_policy(policy, policy_data(models, reconcile={"resync": "500ms"}))
    daemon = daemons.start(policy)
    daemon.wait_cycles(4, timeout=10)
    stamps = [epoch(c) for c in daemon.cycles()[:4]]
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    assert all(0.45 <= gap <= 1.5 for gap in gaps), gaps


@pytest.mark.root
@root_only
def test_a_burst_of_10000_events_gives_a_handful_of_cycles(
    tmpfs: Path, daemons: Daemons, policy: Path
) -> None:
    """10,000 files created in a tight loop are pruned in a handful of cycles, not thousands."""
    make_model(tmpfs, "keep.bin")
    save_policy(policy, policy_data(tmpfs, prune={"action": "delete"}))
    daemon = daemons.start(policy)
    mark = daemon.mark()
    root = str(tmpfs)
    for i in range(10_000):
        os.close(os.open(f"{root}/old_{i:05d}", os.O_CREAT | os.O_WRONLY, 0o644))
    # Deleted, not only out of their names (a delete moves each one out first, then the
    # cycle removes them and logs each prune).
    wait_for(
        lambda: not any(name.startswith(("old_", ".ocrd-deleting-")) for name in os.listdir(root)),
        timeout=60,
        what="every old_ file pruned",
    )
    daemon.wait("cycle.finished", after=mark, where=lambda e: e["done"] > 0, timeout=60)
    daemon.settle()
    assert len(daemon.seen("model.pruned", after=mark)) == 10_000
    assert len(daemon.cycles(mark)) <= 10
    assert (tmpfs / "keep.bin").exists()


def test_own_writes_do_not_cause_endless_cycles(
    daemons: Daemons, models: Path, policy: Path
) -> None:
    """Quarantining models writes into the model dir, yet the daemon comes to rest."""
    make_model(models, "keep.bin")
    save_policy(policy, policy_data(models))
    daemon = daemons.start(policy)
    mark = daemon.mark()
    for name in ("old_a", "old_b", "old_c"):
        make_model(models, name)
    for name in ("old_a", "old_b", "old_c"):
        daemon.wait("model.pruned", after=mark, model=name)
    pruned = daemon.mark()
    daemon.settle()
    # Each model quarantined once; the cycles left no batch without a model in it.
    assert sorted(i.name for i in read_trash(str(models))) == ["old_a", "old_b", "old_c"]
    for batch in (models / TRASH).iterdir():
        assert read_batch(str(batch)).payloads, f"{batch.name} holds no model"
    assert len(daemon.cycles(pruned)) <= 3


def test_pruning_every_model_is_not_a_suspicious_view(
    daemons: Daemons, models: Path, policy: Path, status_file: Path, denv: dict[str, str]
) -> None:
    """When ocrd's own prunes empty the model dir, that is the desired state, not a lost mount."""
    save_policy(policy, policy_data(models))
    daemon = daemons.start(policy)
    mark = daemon.mark()
    make_model(models, "old_a")
    make_model(models, "old_b")
    daemon.wait("model.pruned", after=mark, model="old_a")
    daemon.wait("model.pruned", after=mark, model="old_b")
    later = daemon.mark()
    make_model(models, "probe.tmp")  # ignored, so not a model, but it wakes a cycle
    daemon.wait("cycle.finished", after=later, models=0)
    daemon.settle()
    assert not daemon.seen("model_dir.suspicious"), daemon
    doc = read_status(status_file)
    assert doc is not None
    assert doc["degraded"] is False, doc["degraded_reasons"]
    assert ocrd_status(denv, policy).returncode == 0


# -- watching: polling ---------------------------------------------------------------------


def test_polling_flag_watches_by_polling(
    daemons: Daemons, models: Path, policy: Path, status_file: Path
) -> None:
    """`ocrd run --polling` watches by polling, and a new file still leads to a cycle."""
    save_policy(policy, policy_data(models))
    daemon = daemons.start(policy, "--polling")
    mark = daemon.mark()
    make_model(models, "old_a")
    daemon.wait("model.pruned", after=mark, model="old_a", timeout=10)
    doc = wait_for(lambda: read_status(status_file), what="the status file")
    assert doc["watch"] == "polling"


@pytest.mark.parametrize(
    "fault",
    [
        pytest.param("inotify_init,inotify_init1:error=EMFILE", id="instance-limit"),
        pytest.param("inotify_add_watch:error=ENOSPC", id="watch-limit"),
    ],
)
@pytest.mark.skipif(STRACE is None, reason="strace is not installed")
def test_inotify_unavailable_falls_back_to_polling_with_a_warning(
    daemons: Daemons, models: Path, policy: Path, status_file: Path, fault: str
) -> None:
    """When inotify fails (instance or watch limit) the daemon warns `watch.polling` and polls."""
    syscalls = fault.split(":")[0]
    assert STRACE is not None
    strace = [STRACE, "-f", "-qq", "-o", "/dev/null", "-e", f"trace={syscalls}"]
    save_policy(policy, policy_data(models))
    daemon = daemons.start(policy, wrapper=[*strace, "-e", f"inject={fault}"])
    warning = daemon.wait("watch.polling")
    assert warning["level"] == "warning"
    mark = daemon.mark()
    make_model(models, "old_a")
    daemon.wait("model.pruned", after=mark, model="old_a", timeout=10)
    doc = wait_for(lambda: read_status(status_file), what="the status file")
    assert doc["watch"] == "polling"
    assert daemon.stop()[0] == 0


# -- signals and the lock --------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_sigterm_and_sigint_exit_0_quickly(
    daemons: Daemons, models: Path, policy: Path, status_file: Path, signum: int
) -> None:
    """SIGTERM or SIGINT ends the daemon with exit 0 within 5 s, logging `daemon.stopped`."""
    save_policy(policy, policy_data(models))
    daemon = daemons.start(policy)
    pid = daemon.pid
    code, elapsed = daemon.stop(signum)
    assert code == 0, daemon
    assert elapsed < 5
    assert daemon.seen("daemon.stopped", pid=pid)
    doc = read_status(status_file)
    assert doc is not None
    assert doc["state"] == "stopped"


def test_second_instance_on_the_same_model_dir_exits_naming_the_first(
    daemons: Daemons, models: Path, policy: Path, denv: dict[str, str]
) -> None:
    """A second `ocrd run` on a locked model dir exits non-zero naming the first one's pid."""
    save_policy(policy, policy_data(models))
    first = daemons.start(policy)
    other = save_policy(policy.with_name("other.yaml"), policy_data(models))
    code, err = second_instance(denv, other)
    assert code not in (None, 0), err
    assert f"pid {first.pid}" in err
    assert first.proc.poll() is None


# -- the model dir coming and going ------------------------------------------------------------


def test_missing_model_dir_at_start_is_survived(
    daemons: Daemons, tmp_path: Path, policy: Path
) -> None:
    """A model dir that does not exist yet is reported; once it appears the daemon manages it."""
    models = tmp_path / "models"
    save_policy(policy, policy_data(models))
    daemon = daemons.start(policy, first_cycle=False)
    event = daemon.wait("model_dir.suspicious")
    assert "does not exist" in event["reason"]
    staged = tmp_path / "models.new"
    staged.mkdir()
    make_model(staged, "old_a")
    make_model(staged, "keep.bin")
    os.rename(staged, models)
    daemon.wait("model.pruned", model="old_a", timeout=15)
    assert (models / "keep.bin").exists()
    assert (models / ".ocrd-lock").read_text().strip() == str(daemon.pid)


def test_vanished_model_dir_is_suspicious_and_resumes_when_it_returns(
    daemons: Daemons, models: Path, tmp_path: Path, policy: Path, status_file: Path
) -> None:
    """A model dir that vanishes is a suspicious view; the daemon runs on and resumes on return."""
    make_model(models, "keep.bin")
    save_policy(policy, policy_data(models, reconcile={"resync": "500ms"}))
    daemon = daemons.start(policy)
    away = tmp_path / "away"
    os.rename(models, away)
    event = daemon.wait("model_dir.suspicious")
    assert "vanished" in event["reason"]
    doc = status_when(status_file, lambda d: d["suspicious"], what="suspicious")
    assert doc["degraded"] is True
    make_model(away, "old_a")
    mark = daemon.mark()
    os.rename(away, models)
    daemon.wait("model.pruned", after=mark, model="old_a")
    assert daemon.seen("model_dir.trusted", after=mark)
    assert (models / "keep.bin").exists()


@pytest.mark.root
@root_only
def test_model_dir_on_another_filesystem_prunes_nothing_until_sighup(
    daemons: Daemons, models: Path, policy: Path
) -> None:
    """A mount appearing over the model dir (its device changed) holds prunes until SIGHUP."""
    make_model(models, "keep.bin")
    save_policy(policy, policy_data(models, reconcile={"resync": "500ms"}))
    daemon = daemons.start(policy)
    mount_tmpfs(models, "8m")
    try:
        make_model(models, "old_a")
        event = daemon.wait("model_dir.suspicious")
        assert "another filesystem" in event["reason"]
        mark = daemon.mark()
        daemon.wait_cycles(2, after=mark)
        assert all(c["dry_run"] for c in daemon.cycles(mark))
        assert (models / "old_a").exists()
        assert not daemon.seen("model.pruned")
        mark = daemon.mark()
        daemon.send(signal.SIGHUP)
        daemon.wait("policy.reloaded", after=mark)
        daemon.wait("model.pruned", after=mark, model="old_a")
        assert not (models / "old_a").exists()
    finally:
        daemon.close()
        unmount(models)


def replace_model_dir(models: Path, tmp_path: Path) -> None:
    """Stage a new model dir (keep.bin, old_a), move *models* to models.old, rename it in."""
    staged = tmp_path / "models.new"
    staged.mkdir()
    make_model(staged, "keep.bin")
    make_model(staged, "old_a")
    os.rename(models, tmp_path / "models.old")
    os.rename(staged, models)


def test_replaced_model_dir_is_suspicious_until_a_reload_confirms_it(
    daemons: Daemons, models: Path, tmp_path: Path, policy: Path
) -> None:
    """A model dir replaced by another directory under its path is a suspicious view: nothing
    in it is pruned until an operator reloads; then the new one is managed and watched."""
    make_model(models, "keep.bin")
    save_policy(policy, policy_data(models, reconcile={"resync": "500ms"}))
    daemon = daemons.start(policy)
    mark = daemon.mark()
    replace_model_dir(models, tmp_path)
    event = daemon.wait("model_dir.suspicious", after=mark)
    assert "not the directory it was" in event["reason"]
    daemon.wait_cycles(2, after=daemon.mark())
    assert (models / "old_a").exists()
    assert not daemon.seen("model.pruned")
    mark = daemon.mark()
    daemon.send(signal.SIGHUP)
    daemon.wait("model.pruned", after=mark, model="old_a")
    make_model(tmp_path / "models.old", "old_z")
    mark = daemon.mark()
    make_model(models, "old_b")
    daemon.wait("model.pruned", after=mark, model="old_b")
    assert (tmp_path / "models.old" / "old_z").exists()
    assert daemon.proc.poll() is None


def test_a_symlink_swapped_in_for_the_model_dir_is_never_followed(
    daemons: Daemons, models: Path, tmp_path: Path, policy: Path, status_file: Path
) -> None:
    """The model dir's path made a symlink to another directory while the daemon runs:
    nothing there is pruned and no lock is put there until a reload confirms it."""
    make_model(models, "keep.bin")
    save_policy(policy, policy_data(models, reconcile={"resync": "500ms"}))
    daemon = daemons.start(policy)
    other = tmp_path / "elsewhere"
    other.mkdir()
    make_model(other, "old_precious")
    mark = daemon.mark()
    os.rename(models, tmp_path / "models.old")
    models.symlink_to(other)
    event = daemon.wait("model_dir.suspicious", after=mark)
    # The cycle opens the path without following a link: it says so (or, had it looked
    # by following the link, that this is not the directory it was).
    assert "symbolic link" in event["reason"] or "not the directory it was" in event["reason"]
    # Two more tries, each ending in a status update that still says why.
    for _ in range(2):
        seen = status_when(status_file, lambda d: d["suspicious"], what="a suspicious status")
        status_when(
            status_file,
            lambda d, at=seen["updated_at"]: d["updated_at"] > at and d["suspicious"],
            what="another try, still suspicious",
        )
    assert (other / "old_precious").exists()
    assert not (other / ".ocrd-lock").exists()
    assert not daemon.seen("model.pruned")


def test_replaced_model_dir_is_still_locked_against_a_second_instance(
    daemons: Daemons, models: Path, tmp_path: Path, policy: Path, denv: dict[str, str]
) -> None:
    """After the model dir is replaced and a reload confirms it, the daemon manages the new
    one and locks it too."""
    make_model(models, "keep.bin")
    save_policy(policy, policy_data(models, reconcile={"resync": "500ms"}))
    first = daemons.start(policy)
    mark = first.mark()
    replace_model_dir(models, tmp_path)
    first.wait("model_dir.suspicious", after=mark)
    first.send(signal.SIGHUP)
    first.wait("model.pruned", after=mark, model="old_a")
    code, err = second_instance(denv, policy)
    assert code is not None, "a second daemon runs on the replaced model dir"
    assert code != 0
    assert f"pid {first.pid}" in err


def test_emptied_model_dir_is_suspicious_until_sighup_confirms(
    daemons: Daemons, models: Path, tmp_path: Path, policy: Path
) -> None:
    """An emptied model dir restores nothing until SIGHUP confirms it, then restores."""
    source = tmp_path / "mirror" / "need.bin"
    source.parent.mkdir()
    source.write_bytes(b"the required model")
    make_model(models, "need.bin", b"the required model")
    make_model(models, "keep.bin")
    required = [{"name": "need.bin", "source": str(source)}]
    save_policy(policy, policy_data(models, required=required, reconcile={"resync": "500ms"}))
    daemon = daemons.start(policy)
    out = tmp_path / "out"
    out.mkdir()
    for name in ("need.bin", "keep.bin"):
        os.rename(models / name, out / name)
    event = daemon.wait("model_dir.suspicious")
    assert "empty" in event["reason"]
    mark = daemon.mark()
    daemon.wait_cycles(2, after=mark)
    assert not (models / "need.bin").exists()
    assert not daemon.seen("model.restored")
    assert daemon.proc.poll() is None
    mark = daemon.mark()
    daemon.send(signal.SIGHUP)
    daemon.wait("policy.reloaded", after=mark, forced=True)
    daemon.wait("model.restored", after=mark, model="need.bin")
    assert (models / "need.bin").read_bytes() == b"the required model"


# -- the status file and `ocrd status` --------------------------------------------------------


def test_status_file_describes_the_last_cycle(
    daemons: Daemons,
    models: Path,
    policy: Path,
    status_file: Path,
    denv: dict[str, str],
    tmp_path: Path,
) -> None:
    """status.json in $RUNTIME_DIRECTORY tells pid, policy, last cycle, counts, busy, waiting."""
    make_model(models, "need.bin")
    make_model(models, "llm.gguf")
    make_model(models, "notes.txt")
    make_model(models, ".hidden")
    make_model(models, "old_aged", age=2 * HOUR)
    held = make_model(models, "old_held", age=2 * HOUR)
    make_model(models, "old_young")
    save_policy(
        policy,
        policy_data(
            models,
            required=[{"name": "need.bin"}],
            whitelist=["*.gguf"],
            prune={"min_age": "1h"},
        ),
    )
    with holder(tmp_path, "ocrd-hold-fd", HOLD_FD, held) as child:
        daemon = daemons.start(policy)
        daemon.wait("model.pruned", model="old_aged")
        daemon.settle()
        doc = read_status(status_file)
        assert doc is not None
        assert doc["state"] == "running"
        assert doc["pid"] == daemon.pid
        assert doc["policy"]["path"] == str(policy)
        assert doc["policy"]["digest"] == digest(policy)
        assert doc["policy"]["rejected"] is None
        assert doc["model_dir"] == str(models)
        last = doc["last_cycle"]
        assert last["planned"] == 1
        assert last["done"] == last["failed"] == 0
        assert time.time() - last["finished_at"] < 30
        counts = doc["counts"]
        assert {k: v for k, v in counts.items() if k != "ignored"} == {
            "required": 1,
            "allowed": 1,
            "unmanaged": 1,
            "prune": 2,
        }
        assert counts["ignored"] >= 1
        assert [(p["action"], p["model"]) for p in doc["pending"]] == [("prune", "old_held")]
        assert [b["model"] for b in doc["busy"]] == ["old_held"]
        assert str(child.pid) in doc["busy"][0]["reason"]
        assert [w["model"] for w in doc["waiting"]] == ["old_young"]
        assert doc["errors"] == []
        assert 1 <= doc["handles"]["inspected"] <= doc["handles"]["processes"]
        assert doc["degraded"] is False
        assert doc["degraded_reasons"] == []
        shown = ocrd_status(denv, policy, "--json")
        assert shown.returncode == 0, shown
        assert json.loads(shown.stdout)["running"] is True


def test_status_file_is_replaced_atomically(
    daemons: Daemons, models: Path, policy: Path, status_file: Path
) -> None:
    """A reader polling status.json during many cycles never sees a partial document."""
    save_policy(policy, policy_data(models))
    daemon = daemons.start(policy)
    bad: list[str] = []
    reads = [0]
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            try:
                text = status_file.read_text(encoding="utf-8")
            except FileNotFoundError:
                bad.append("missing")
                continue
            try:
                json.loads(text)
            except ValueError:
                bad.append(text)
            reads[0] += 1

    wait_for(status_file.exists, what=str(status_file))
    thread = threading.Thread(target=reader)
    thread.start()
    try:
        mark = daemon.mark()
        for i in range(8):
            make_model(models, f"keep_{i}.bin")
            daemon.wait_cycles(i + 1, after=mark)
    finally:
        stop.set()
        thread.join()
    assert reads[0] > 100
    assert bad == []

    def listing() -> list[str]:
        return [p.name for p in status_file.parent.iterdir()]

    # The last cycle's status may still be being written (a temp file beside status.json):
    # let the daemon come to rest and that write finish before looking at the run dir.
    daemon.settle()
    wait_for(lambda: listing() == ["status.json"], what=f"only status.json in {listing()}")
    assert listing() == ["status.json"]


def test_status_file_falls_back_to_the_state_dir(
    daemons: Daemons, plain_denv: dict[str, str], tmp_path: Path, models: Path, policy: Path
) -> None:
    """Without $RUNTIME_DIRECTORY the status file is in the state dir, where `ocrd status` looks."""
    save_policy(policy, policy_data(models))
    daemon = daemons.start(policy, env=plain_denv)
    path = tmp_path / "xdg-state" / "ocrd" / "status.json"
    doc = wait_for(lambda: read_status(path), what=str(path))
    assert doc["pid"] == daemon.pid
    assert not (tmp_path / "run").exists()
    shown = ocrd_status(plain_denv, policy)
    assert shown.returncode == 0, shown


def test_status_exit_codes_running_degraded_stopped(
    daemons: Daemons,
    models: Path,
    tmp_path: Path,
    policy: Path,
    status_file: Path,
    denv: dict[str, str],
) -> None:
    """`ocrd status` exits 3 with no daemon, 0 when healthy, 1 degraded, 3 once it stopped."""
    make_model(models, "need.bin")
    save_policy(policy, policy_data(models, required=[{"name": "need.bin"}]))
    assert ocrd_status(denv, policy).returncode == 3
    daemon = daemons.start(policy)
    healthy = ocrd_status(denv, policy, "--json")
    assert healthy.returncode == 0, healthy
    assert json.loads(healthy.stdout)["degraded"] is False
    os.rename(models / "need.bin", tmp_path / "need.bin")
    status_when(status_file, lambda doc: doc["degraded"], what="the status file to say degraded")
    degraded = ocrd_status(denv, policy, "--json")
    assert degraded.returncode == 1, degraded
    assert "need.bin: missing" in json.loads(degraded.stdout)["degraded_reasons"]
    assert daemon.stop()[0] == 0
    stopped = ocrd_status(denv, policy, "--json")
    assert stopped.returncode == 3, stopped
    assert json.loads(stopped.stdout)["running"] is False
