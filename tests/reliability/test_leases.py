"""Leases through the real CLI (issue "Leases"): a worker ocrd cannot inspect — another
user, another PID namespace — keeps its model through a prune cycle by holding a lease,
and loses it only after releasing; `ocrd lease` passes the exit code through."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.cli import OCRD, Result
from tests.support.files import make_model
from tests.support.policy import policy_data, write_policy
from tests.support.procs import HOLD_FD, HOLD_LEASE
from tests.support.users import SYSTEM_PYTHON, ensure_test_user

ROOT = os.geteuid() == 0
PROJECT = str(Path(__file__).resolve().parents[2])
SETPRIV, UNSHARE = shutil.which("setpriv"), shutil.which("unshare")
# Root without a single capability: it cannot look into another user's /proc/PID/fd or maps.
NO_CAPS = ["--bounding-set=-all", "--inh-caps=-all"]


@pytest.fixture
def test_user() -> pwd.struct_passwd:
    """A system user without a home, for a worker ocrd may not inspect."""
    if not ROOT or SETPRIV is None or not Path(SYSTEM_PYTHON).exists():
        pytest.skip(f"runs as another user: needs root, setpriv and {SYSTEM_PYTHON}")
    return ensure_test_user()


def start(argv: list[str], script: str, *paths: Path) -> subprocess.Popen[str]:
    """A worker running *script* (from tests.support.procs) under the *argv* prefix."""
    proc = subprocess.Popen(
        [*argv, SYSTEM_PYTHON, "-c", script, *map(str, paths)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": PROJECT},
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.strip() == "ready", f"worker did not get ready: {line!r}"
    return proc


def stop(proc: subprocess.Popen[str]) -> None:
    """The worker ends (its lease with it)."""
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.close()
    proc.wait(timeout=10)
    proc.stdout.close()


def apply(prefix: list[str], policy: Path, env: dict[str, str]) -> Result:
    """`ocrd apply` under *prefix* (no capabilities, or another PID namespace)."""
    proc = subprocess.run(
        [*prefix, OCRD, "--config", str(policy), "apply"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    return Result(proc)


def models_dir(shared_dir: Path) -> Path:
    models = shared_dir / "models"
    models.mkdir()
    models.chmod(0o755)
    make_model(models, "old_a", b"a" * 4096).chmod(0o644)
    make_model(models, "keep.bin").chmod(0o644)
    return models


def as_user(user: pwd.struct_passwd) -> list[str]:
    assert SETPRIV is not None
    return [SETPRIV, f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups"]


def gone(models: Path, name: str, action: str) -> bool:
    """Pruned: not under its name, and (quarantine) in the trash."""
    if (models / name).exists():
        return False
    if action == "quarantine":
        return any((models / ".ocrd-trash").rglob(name))
    return True


@pytest.mark.parametrize("action", ["delete", "quarantine"])
def test_a_lease_of_another_user_keeps_the_model_until_released(
    shared_dir: Path, tmp_path: Path, env: dict[str, str], test_user: pwd.struct_passwd, action: str
) -> None:
    """ocrd without privilege cannot see the other user's descriptors (a plain open file is
    pruned under it), but sees its lease: the leased model stays, busy with 'lease, pid N',
    and is pruned once the lease ends."""
    assert SETPRIV is not None
    models = models_dir(shared_dir)
    policy = write_policy(tmp_path / "policy.yaml", policy_data(models, prune={"action": action}))
    blind = [SETPRIV, *NO_CAPS]

    opened = start(as_user(test_user), HOLD_FD, models / "old_a")
    try:
        assert apply(blind, policy, env).code == 0
        assert gone(models, "old_a", action)  # the fd check saw nothing: that is the gap
    finally:
        stop(opened)

    make_model(models, "old_a", b"a" * 4096).chmod(0o644)
    worker = start(as_user(test_user), HOLD_LEASE, models / "old_a")
    try:
        result = apply(blind, policy, env)
        assert (models / "old_a").read_bytes() == b"a" * 4096, result
        busy = [e for e in result.logs() if e["event"] == "model.busy"]
        assert [e["model"] for e in busy] == ["old_a"], result
        assert f"lease, pid {worker.pid} (python3)" in busy[0]["holders"]
    finally:
        stop(worker)
    assert apply(blind, policy, env).code == 0
    assert gone(models, "old_a", action)
    assert (models / "keep.bin").exists()


@pytest.mark.parametrize("action", ["delete", "quarantine"])
def test_a_lease_from_another_pid_namespace_keeps_the_model(
    shared_dir: Path, tmp_path: Path, env: dict[str, str], action: str
) -> None:
    """ocrd in a PID namespace of its own (as in a container) sees no process of the worker,
    and its /proc/locks does not list the lease either (the kernel hides locks whose owner is
    outside that namespace); the exclusive check right before the unlink or the rename into
    the quarantine finds it: 'lease, another namespace'. Pruned after release."""
    if not ROOT or UNSHARE is None:
        pytest.skip("needs root and unshare")
    models = models_dir(shared_dir)
    policy = write_policy(tmp_path / "policy.yaml", policy_data(models, prune={"action": action}))
    container = [UNSHARE, "--pid", "--fork", "--mount-proc"]
    worker = start([], HOLD_LEASE, models / "old_a")
    try:
        result = apply(container, policy, env)
        assert (models / "old_a").exists(), result
        busy = [e for e in result.logs() if e["event"] == "model.busy"]
        assert [e["holders"] for e in busy] == ["lease, another namespace"], result
    finally:
        stop(worker)
    assert apply(container, policy, env).code == 0
    assert gone(models, "old_a", action)


def test_a_worker_in_its_own_pid_namespace_keeps_the_model(
    shared_dir: Path, tmp_path: Path, env: dict[str, str]
) -> None:
    """A worker started by `unshare --pid --fork` holding a lease keeps its model."""
    if not ROOT or UNSHARE is None:
        pytest.skip("needs root and unshare")
    models = models_dir(shared_dir)
    policy = write_policy(tmp_path / "policy.yaml", policy_data(models, prune={"action": "delete"}))
    worker = start([UNSHARE, "--pid", "--fork"], HOLD_LEASE, models / "old_a")
    try:
        result = apply([], policy, env)
        assert (models / "old_a").exists(), result
        assert any("lease" in e.get("holders", "") for e in result.logs()), result
    finally:
        stop(worker)
    assert apply([], policy, env).code == 0
    assert not (models / "old_a").exists()


def test_ocrd_lease_passes_the_exit_code_through(tmp_path: Path, env: dict[str, str]) -> None:
    """`ocrd lease PATH -- CMD` holds the lease while CMD runs and exits with CMD's code."""
    model = make_model(tmp_path, "old_a")
    ino = os.stat(model).st_ino
    script = f"grep -q ':{ino} ' /proc/locks || exit 9; exit 7"
    proc = subprocess.run(
        [OCRD, "lease", str(model), "--", "sh", "-c", script], env=env, timeout=30, check=False
    )
    assert proc.returncode == 7
    missing = subprocess.run(
        [OCRD, "lease", str(tmp_path / "nope"), "--", "true"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert missing.returncode == 1
    assert "cannot lease" in missing.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_ocrd_lease_releases_when_the_command_is_killed(
    tmp_path: Path, env: dict[str, str], sig: signal.Signals
) -> None:
    """The command killed by SIGTERM or SIGKILL: the lease is gone with it."""
    model = make_model(tmp_path, "old_a")
    ino = os.stat(model).st_ino
    proc = subprocess.Popen(
        [
            OCRD,
            "lease",
            str(model),
            "--",
            sys.executable,
            "-c",
            HOLD_LEASE.split("with")[0] + "print('ready', flush=True)\nimport time\ntime.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    assert f":{ino} " in Path("/proc/locks").read_text()
    proc.send_signal(sig)
    assert proc.wait(timeout=10) == -sig
    proc.stdout.close()
    assert f":{ino} " not in Path("/proc/locks").read_text()


@pytest.mark.parametrize("seed", range(4))
def test_a_lease_taken_at_any_instant_of_a_big_delete_cycle_keeps_its_model(
    tmp_path: Path, env: dict[str, str], seed: int
) -> None:
    """While `ocrd apply` deletes 400 models, leases are taken on random ones at random
    instants (seeded): each lease that was granted still has its model under its name
    after the cycle, the very inode it locked."""
    import random

    from ocrd.lease import acquire

    rng = random.Random(seed)
    models = tmp_path / "models"
    models.mkdir()
    names = [f"old_{i:04d}" for i in range(400)]
    for name in names:
        make_model(models, name, b"m" * 512)
    policy = write_policy(tmp_path / "policy.yaml", policy_data(models, prune={"action": "delete"}))
    proc = subprocess.Popen(
        [OCRD, "--config", str(policy), "apply"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    held: dict[str, int] = {}
    try:
        while proc.poll() is None:
            name = rng.choice(names)
            if name not in held:
                try:
                    held[name] = acquire(models / name, timeout=0.5)
                except FileNotFoundError:
                    continue  # deleted before the lease: the worker is told, never misled
            time.sleep(rng.uniform(0, 0.004))
        proc.wait(timeout=60)
        assert held, "no lease was granted during the cycle"
        for name, fd in held.items():
            st = os.stat(models / name)
            assert (st.st_dev, st.st_ino) == (os.fstat(fd).st_dev, os.fstat(fd).st_ino), name
    finally:
        for fd in held.values():
            os.close(fd)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_ocrd_leases_lists_who_holds_what(
    tmp_path: Path, env: dict[str, str], run_ocrd: Callable[..., Result]
) -> None:
    """`ocrd leases` lists each leased model with pid and process, as a table and as JSON."""
    models = tmp_path / "models"
    models.mkdir()
    make_model(models, "old_a")
    make_model(models, "free.bin")
    policy = write_policy(tmp_path / "policy.yaml", policy_data(models))
    worker = start([], HOLD_LEASE, models / "old_a")
    try:
        table = run_ocrd("--config", policy, "leases")
        doc = run_ocrd("--config", policy, "leases", "--json")
    finally:
        stop(worker)
    assert table.code == 0, table
    assert "old_a" in table.out and str(worker.pid) in table.out and "free.bin" not in table.out
    assert doc.json()["leases"] == [
        {
            "model": "old_a",
            "pid": worker.pid,
            "process": "python3",
            "mode": "shared",
            "kind": "FLOCK",
        }
    ]
    after = run_ocrd("--config", policy, "leases")
    assert after.code == 0 and "No leases" in after.out


def test_a_leased_corrupt_model_is_not_replaced_by_a_restore_until_released(
    shared_dir: Path, tmp_path: Path, env: dict[str, str]
) -> None:
    """A restore would quarantine a corrupt pinned model; leased (by a worker outside ocrd's
    PID namespace, so only the exclusive check sees it) it stays, busy, and is replaced
    once the lease ends."""
    import hashlib

    if not ROOT or UNSHARE is None:
        pytest.skip("needs root and unshare")
    models = models_dir(shared_dir)
    good = b"good model"
    source = make_model(tmp_path, "mirror.bin", good)
    make_model(models, "en.bin", b"corrupt!")
    required = [
        {"name": "en.bin", "sha256": hashlib.sha256(good).hexdigest(), "source": str(source)}
    ]
    policy = write_policy(tmp_path / "policy.yaml", policy_data(models, required=required))
    container = [UNSHARE, "--pid", "--fork", "--mount-proc"]
    worker = start([], HOLD_LEASE, models / "en.bin")
    try:
        result = apply(container, policy, env)
        assert (models / "en.bin").read_bytes() == b"corrupt!", result
        busy = [e for e in result.logs() if e["event"] == "model.busy"]
        assert [(e["model"], e["holders"]) for e in busy] == [
            ("en.bin", "lease, another namespace")
        ], result
    finally:
        stop(worker)
    result = apply(container, policy, env)
    assert (models / "en.bin").read_bytes() == good, result
