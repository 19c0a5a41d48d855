"""Attacks on ocrd's two promises through the real CLI and daemon: special files where ocrd
expects its own, a mount inside a model, a very deep model, a notify socket nobody reads, a
root run before the service user's (DESIGN §4, issue "Safety")."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.cli import Result
from tests.support.daemon import Daemons
from tests.support.files import make_deep, make_model
from tests.support.logs import epoch
from tests.support.notify import NotifySocket
from tests.support.policy import policy_data, read_status, save_policy, write_policy
from tests.support.procs import RENAMES, in_syscall
from tests.support.users import SYSTEM_PYTHON, TEST_USER, ensure_test_user
from tests.support.wait import wait_for

ROOT = os.geteuid() == 0
MOUNT, UMOUNT = shutil.which("mount"), shutil.which("umount")
needs_mount = pytest.mark.skipif(
    not ROOT or MOUNT is None or UMOUNT is None, reason="bind-mounts a directory: needs root"
)


def delete_policy_data(models: Path) -> dict[str, object]:
    """A policy pruning old_* at once, by deletion."""
    return policy_data(models, prune={"action": "delete"})


def delete_policy(path: Path, models: Path) -> Path:
    """A policy pruning old_* at once, by deletion."""
    return write_policy(path, delete_policy_data(models))


# -- ocrd's own names are what they must be, or ocrd refuses ------------------------------


def _link(path: Path) -> None:
    path.symlink_to("/etc/passwd")


def _fifo(path: Path) -> None:
    os.mkfifo(path)


def _directory(path: Path) -> None:
    path.mkdir()


@pytest.mark.parametrize("make", [_link, _fifo, _directory], ids=["symlink", "fifo", "directory"])
@pytest.mark.parametrize("command", ["apply", "trash purge --all"])
def test_a_lock_that_is_not_a_regular_file_is_refused_in_one_line(
    run_ocrd: Callable[..., Result],
    models: Path,
    policy: Path,
    make: Callable[[Path], None],
    command: str,
) -> None:
    """A symlink, FIFO or directory at `.ocrd-lock`: one line naming it and the fix, exit 1,
    nothing followed (the link's target untouched), nothing pruned; never blocks."""
    make_model(models, "old_a", age=3600)
    delete_policy(policy, models)
    make(models / ".ocrd-lock")
    before = Path("/etc/passwd").stat()
    result = run_ocrd("--config", policy, *command.split(), timeout=20)
    assert result.code == 1, result
    lines = result.err.strip().splitlines()
    assert len(lines) == 1, result
    assert ".ocrd-lock" in lines[0] and "not ocrd's lock file" in lines[0], result
    assert "internal error" not in result.err
    assert (models / "old_a").exists()
    after = Path("/etc/passwd").stat()
    assert (after.st_mtime_ns, after.st_size) == (before.st_mtime_ns, before.st_size)


# -- FIFOs where ocrd reads a file -------------------------------------------------------


def test_a_fifo_as_restore_source_fails_the_restore_and_never_blocks(
    run_ocrd: Callable[..., Result], models: Path, policy: Path, tmp_path: Path
) -> None:
    """`source:` a FIFO nobody writes to: the restore fails with a message naming it, the
    command ends (it used to hang with the lock held)."""
    source = tmp_path / "mirror.bin"
    os.mkfifo(source)
    write_policy(
        policy, policy_data(models, required=[{"name": "need.bin", "source": str(source)}])
    )
    result = run_ocrd("--config", policy, "apply", timeout=20)
    assert result.code == 1, result
    (failed,) = [e for e in result.logs() if e["event"] == "action.failed"]
    assert failed["model"] == "need.bin"
    assert "FIFO" in failed["error"] and str(source) in failed["error"]
    assert not (models / "need.bin").exists()
    assert [n for n in os.listdir(models) if n.startswith(".ocrd-tmp-")] == []


def test_a_policy_swapped_for_a_fifo_is_rejected_and_the_daemon_stays_responsive(
    daemons: Daemons, models: Path, policy: Path
) -> None:
    """The policy file replaced (by rename, as editors save) with a FIFO: the reload is
    rejected naming it, cycles go on, SIGTERM ends the daemon at once."""
    save_policy(policy, policy_data(models))
    daemon = daemons.start(policy)
    mark = daemon.mark()
    staged = policy.with_name(".policy.fifo")
    os.mkfifo(staged)
    os.replace(staged, policy)
    rejected = daemon.wait("policy.rejected", after=mark)
    assert "FIFO" in rejected["errors"][0]
    make_model(models, "old_a")
    daemon.wait("model.pruned", after=mark, model="old_a")
    code, took = daemon.stop()
    assert code == 0
    assert took < 5


# -- systemd's notify socket nobody reads ------------------------------------------------


@pytest.fixture
def deaf_socket(tmp_path: Path) -> Iterator[str]:
    """An AF_UNIX datagram socket that is never read: the kernel queues a few datagrams,
    then a blocking sendto() would wait forever."""
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    try:
        yield path
    finally:
        sock.close()


def test_a_notify_socket_nobody_reads_never_blocks_the_loop(
    daemons: Daemons, models: Path, policy: Path, deaf_socket: str, status_file: Path
) -> None:
    """With NOTIFY_SOCKET unread and a 200 ms watchdog (five pings a second fill the queue
    within seconds), cycles still run, prunes still happen, the drops are counted in the
    status file, and SIGTERM still stops the daemon."""
    save_policy(policy, policy_data(models))
    daemon = daemons.start(
        policy,
        extra_env={
            "NOTIFY_SOCKET": deaf_socket,
            "WATCHDOG_USEC": "200000",
            "WATCHDOG_PID": "",
        },
    )
    # The queue fills within about a second (max_dgram_qlen is 10 here; a ping is one
    # datagram); every prune's cycle rewrites the status file with the drops so far.
    deadline = time.monotonic() + 20
    for round_ in itertools.count():
        mark = daemon.mark()
        make_model(models, f"old_{round_}")
        daemon.wait("model.pruned", after=mark, model=f"old_{round_}", timeout=10)
        daemon.wait_cycles(1, after=mark)
        doc = read_status(status_file)
        if doc is not None and doc["notify_dropped"] > 0:
            break
        assert time.monotonic() < deadline, f"no drop counted after {round_ + 1} cycles: {doc}"
    code, took = daemon.stop()
    assert code == 0
    assert took < 5


# -- a mount point inside a directory model ----------------------------------------------


def mounts_below(path: Path) -> list[str]:
    """Mount points at or below *path*, deepest first (/proc/self/mountinfo, field 5)."""
    with open("/proc/self/mountinfo", encoding="utf-8") as fh:
        points = [line.split()[4].replace("\\040", " ") for line in fh]
    prefix = str(path)
    return sorted((p for p in points if p == prefix or p.startswith(prefix + "/")), reverse=True)


@pytest.fixture
def bind(tmp_path: Path) -> Iterator[Callable[[Path, Path], None]]:
    """bind(source, target): a bind mount; every mount left below tmp_path (wherever a
    rename took it) is undone after the test."""

    def mount(source: Path, target: Path) -> None:
        assert MOUNT is not None
        subprocess.run([MOUNT, "--bind", str(source), str(target)], check=True)

    yield mount
    for point in mounts_below(tmp_path):
        assert UMOUNT is not None
        subprocess.run([UMOUNT, "-l", point], check=False)


@needs_mount
@pytest.mark.parametrize("action", ["delete", "quarantine-then-purge"])
def test_a_directory_model_holding_a_bind_mount_is_left_whole(
    run_ocrd: Callable[..., Result],
    models: Path,
    policy: Path,
    tmp_path: Path,
    bind: Callable[[Path, Path], None],
    action: str,
) -> None:
    """`mount --bind OTHER old_dir/mnt`: deleting (or purging) old_dir leaves OTHER's files
    alone, keeps old_dir whole where it was, says why (a mount point), leaves no
    `.ocrd-deleting-*`, and removes it once the mount is gone."""
    other = tmp_path / "other"
    other.mkdir()
    (other / "precious.bin").write_bytes(b"precious")
    old = models / "old_dir"
    (old / "mnt").mkdir(parents=True)
    (old / "weights.bin").write_bytes(b"w")
    if action == "delete":
        delete_policy(policy, models)
    else:
        write_policy(
            policy, policy_data(models, quarantine={"retention": "0s"}, prune={"min_age": 0})
        )
    bind(other, old / "mnt")
    first = run_ocrd("--config", policy, "apply")
    if action == "delete":
        assert first.code == 1, first
        (failed,) = [e for e in first.logs() if e["event"] == "action.failed"]
        assert "mount point" in failed["error"]
        assert (old / "weights.bin").exists()
    else:
        # Quarantined (a rename moves the mount along), then the purge refuses it.
        again = run_ocrd("--config", policy, "trash", "purge", "--all")
        assert again.code == 1, again
        assert any("mount point" in e.get("error", "") for e in again.logs()), again
    assert (other / "precious.bin").read_bytes() == b"precious"
    assert [n for n in os.listdir(models) if n.startswith(".ocrd-deleting-")] == []
    (point,) = mounts_below(models)
    subprocess.run([str(UMOUNT), point], check=True)
    final = run_ocrd(
        "--config", policy, *(["apply"] if action == "delete" else ["trash", "purge", "--all"])
    )
    assert final.code == 0, final
    assert not old.exists()
    assert (other / "precious.bin").read_bytes() == b"precious"


# -- a very deep model -------------------------------------------------------------------


def test_a_1000_deep_directory_model_is_deleted_and_later_cycles_still_prune(
    run_ocrd: Callable[..., Result], models: Path, policy: Path
) -> None:
    """1,000 levels (Python's recursion limit): deleted in one apply, nothing left behind,
    and the next cycle prunes as usual (it used to fail in recovery for ever)."""
    make_deep(models / "old_deep", 1000)
    delete_policy(policy, models)
    first = run_ocrd("--config", policy, "apply")
    assert first.code == 0, first
    assert os.listdir(models) == [".ocrd-lock"]
    make_model(models, "old_next")
    second = run_ocrd("--config", policy, "apply")
    assert second.code == 0, second
    assert not (models / "old_next").exists()


def test_a_leftover_that_cannot_be_removed_does_not_stop_recovery_or_the_cycle(
    run_ocrd: Callable[..., Result], models: Path, policy: Path, tmp_path: Path
) -> None:
    """Two `.ocrd-deleting-*` leftovers, one of them 1,000 levels deep and one that cannot be
    removed (it holds an immutable file, as root; a read-only dir otherwise): the deep one
    is finished, the stuck one is reported, and the cycle prunes all the same."""
    make_deep(models / ".ocrd-deleting-deep", 1000)
    stuck = models / ".ocrd-deleting-stuck"
    stuck.mkdir()
    (stuck / "f").write_bytes(b"x")
    chattr = shutil.which("chattr")
    if ROOT:
        if chattr is None or subprocess.run([chattr, "+i", str(stuck / "f")]).returncode:
            pytest.skip("needs chattr +i")
        undo = [chattr, "-i", str(stuck / "f")]
    else:
        stuck.chmod(0o555)
        undo = ["chmod", "755", str(stuck)]
    make_model(models, "old_a")
    delete_policy(policy, models)
    try:
        result = run_ocrd("--config", policy, "apply")
    finally:
        subprocess.run(undo, check=True)
    events = result.logs()
    removed = [e["path"] for e in events if e["event"] == "recovery.removed"]
    failed = [e["path"] for e in events if e["event"] == "recovery.failed"]
    assert ".ocrd-deleting-deep" in removed, result
    assert failed == [".ocrd-deleting-stuck"], result
    assert not (models / "old_a").exists()
    assert not (models / ".ocrd-deleting-deep").exists()


# -- a root run, then the service user's --------------------------------------------------


@pytest.fixture
def test_user() -> str:
    """A system user without a home, for runs as somebody other than root."""
    if not ROOT:
        pytest.skip("creates a user and runs as it: needs root")
    if not Path(SYSTEM_PYTHON).exists() or shutil.which("setpriv") is None:
        pytest.skip(f"needs {SYSTEM_PYTHON} and setpriv")
    ensure_test_user()
    probe = as_user(TEST_USER, dict(os.environ), "--version")
    if probe.returncode != 0:
        pytest.skip(f"{TEST_USER} cannot run this checkout's ocrd: {probe.stderr.strip()[-200:]}")
    return TEST_USER


def as_user(user: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """ocrd ARGS run as *user* by the system Python, on this venv's packages."""
    entry = pwd.getpwnam(user)
    site = [p for p in sys.path if p.endswith("site-packages")]
    project = str(Path(__file__).resolve().parents[2])
    return subprocess.run(
        [
            shutil.which("setpriv") or "/usr/bin/setpriv",
            f"--reuid={entry.pw_uid}",
            f"--regid={entry.pw_gid}",
            "--clear-groups",
            SYSTEM_PYTHON,
            "-m",
            "ocrd",
            *args,
        ],
        env={**env, "PYTHONPATH": os.pathsep.join([*site, project])},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_a_root_run_leaves_nothing_the_dirs_owner_cannot_use(
    run_ocrd: Callable[..., Result], shared_dir: Path, env: dict[str, str], test_user: str
) -> None:
    """`ocrd apply` as root on a model dir owned by the service user, then every command as
    that user: the lock, the trash and the state files root made belong to the user, and
    plan, list, trash list and apply all work."""
    entry = pwd.getpwnam(test_user)
    tmp_path = shared_dir
    models, state = tmp_path / "models", tmp_path / "state"
    for directory in (models, state):
        directory.mkdir()
        os.chown(directory, entry.pw_uid, entry.pw_gid)
    policy = write_policy(
        tmp_path / "policy.yaml",
        policy_data(
            models,
            state_dir=str(state),
            required=[{"name": "pinned.bin", "sha256": "0" * 64}],
        ),
    )
    policy.chmod(0o644)
    for name in ("old_a", "pinned.bin", "keep.bin"):
        make_model(models, name)
        os.chown(models / name, entry.pw_uid, entry.pw_gid)
    assert run_ocrd("--config", policy, "apply").code == 1  # the pin is wrong: a problem
    made = [models / ".ocrd-lock", models / ".ocrd-trash", *(models / ".ocrd-trash").rglob("*")]
    made += list(state.rglob("*"))
    assert state / "hashes.json" in made
    assert made and all(p.lstat().st_uid == entry.pw_uid for p in made), [
        (str(p), p.lstat().st_uid) for p in made
    ]
    make_model(models, "old_b")
    os.chown(models / "old_b", entry.pw_uid, entry.pw_gid)
    user_env = {**env, "XDG_STATE_HOME": str(state)}
    for command in (["plan"], ["list"], ["trash", "list"], ["apply"]):
        done = as_user(test_user, user_env, "--config", str(policy), *command)
        assert "internal error" not in done.stderr, (command, done.stderr)
        assert done.returncode in (0, 1), (command, done.returncode, done.stderr)
    assert not (models / "old_b").exists()


def test_a_lock_left_by_root_names_the_fix(
    shared_dir: Path, env: dict[str, str], test_user: str
) -> None:
    """A root-owned `.ocrd-lock` (left by an older ocrd) in the user's model dir: the user's
    apply fails in one line that says whose file it is and what to do."""
    entry = pwd.getpwnam(test_user)
    tmp_path = shared_dir
    models = tmp_path / "models"
    models.mkdir()
    os.chown(models, entry.pw_uid, entry.pw_gid)
    (models / ".ocrd-lock").write_text("1\n")
    policy = write_policy(tmp_path / "policy.yaml", policy_data(models))
    policy.chmod(0o644)
    done = as_user(
        test_user,
        {**env, "XDG_STATE_HOME": str(tmp_path / "xdg")},
        "--config",
        str(policy),
        "apply",
    )
    assert done.returncode == 1, done
    assert done.stderr.count("\n") == 1, done.stderr
    assert "belongs to root" in done.stderr and "chown" in done.stderr, done.stderr


def test_read_only_commands_work_without_the_trash_lock_or_cache_and_say_what_they_miss(
    shared_dir: Path, env: dict[str, str], test_user: str
) -> None:
    """A model dir the user owns, with a root-owned mode-0700 `.ocrd-trash` (holding a
    quarantined model), a root-owned mode-0600 `.ocrd-lock` and an unreadable hash cache:
    check, list, plan and trash list work as that user, each warning in one line what it
    could not see and how to see it; none is an internal error."""
    entry = pwd.getpwnam(test_user)
    models, state = shared_dir / "models", shared_dir / "state"
    for directory in (models, state):
        directory.mkdir()
        os.chown(directory, entry.pw_uid, entry.pw_gid)
    make_model(models, "pinned.bin", b"pinned")
    make_model(models, "old_a")
    batch = models / ".ocrd-trash" / "20260101T000000Z-00000000"
    batch.mkdir(parents=True)
    (batch / "old_z").write_bytes(b"quarantined")
    (models / ".ocrd-trash").chmod(0o700)
    (models / ".ocrd-lock").write_text("")
    (models / ".ocrd-lock").chmod(0o600)
    (state / "hashes.json").write_text('{"version": 1, "hashes": {}}')
    (state / "hashes.json").chmod(0o600)
    pin = [{"name": "pinned.bin", "sha256": hashlib.sha256(b"pinned").hexdigest()}]
    policy = write_policy(
        shared_dir / "policy.yaml", policy_data(models, state_dir=str(state), required=pin)
    )
    policy.chmod(0o644)
    user_env = {**env, "XDG_STATE_HOME": str(state)}
    for command in (["check"], ["list"], ["plan"], ["trash", "list"]):
        done = as_user(test_user, user_env, "--config", str(policy), *command)
        where = (command, done.returncode, done.stdout[-300:], done.stderr)
        assert "internal error" not in done.stderr and "Traceback" not in done.stderr, where
        assert done.returncode in (0, 1, 3), where
        if command != ["check"]:
            assert ".ocrd-trash cannot be read" in done.stderr, where
            assert "run as root" in done.stderr, where
            assert "old_z" not in done.stdout, where
        if command == ["list"]:  # the first to hash; its new cache is the user's from then on
            assert "hash cache" in done.stderr and "hashed again" in done.stderr, where
        if command in (["list"], ["plan"]):
            assert "old_a" in done.stdout, where


def test_a_directory_model_partly_unreadable_is_never_pruned_by_age(
    shared_dir: Path, env: dict[str, str], test_user: str
) -> None:
    """An old directory model whose subdirectory the service user cannot read (root's,
    mode 0700; it may hold a fresh file): its newest mtime is unknown, so `plan` says what
    it could not see and `apply` leaves it, while the other old model is pruned."""
    entry = pwd.getpwnam(test_user)
    models = shared_dir / "models"
    models.mkdir()
    os.chown(models, entry.pw_uid, entry.pw_gid)
    (models / "old_dir" / "closed").mkdir(parents=True)
    (models / "old_dir" / "closed" / "fresh.bin").write_bytes(b"fresh")
    (models / "old_dir" / "closed").chmod(0o700)
    for path in (models / "old_dir",):
        os.chown(path, entry.pw_uid, entry.pw_gid)
        os.utime(path, (time.time() - 7200, time.time() - 7200))
    make_model(models, "old_file", age=7200)
    os.chown(models / "old_file", entry.pw_uid, entry.pw_gid)
    policy = write_policy(shared_dir / "policy.yaml", delete_policy_data(models))
    policy.chmod(0o644)
    user_env = {**env, "XDG_STATE_HOME": str(shared_dir / "xdg")}
    planned = as_user(test_user, user_env, "--config", str(policy), "plan")
    assert "old_dir: part of it cannot be looked into" in planned.stderr, planned
    assert "never pruned by age" in planned.stderr, planned
    applied = as_user(test_user, user_env, "--config", str(policy), "apply")
    assert "internal error" not in applied.stderr, applied
    assert not (models / "old_file").exists(), applied.stdout
    assert (models / "old_dir" / "closed" / "fresh.bin").read_bytes() == b"fresh"


# -- no deletion under a holder, at any instant -------------------------------------------

STRACE = shutil.which("strace")
needs_strace = pytest.mark.skipif(STRACE is None, reason="strace is not installed")


@needs_strace
@pytest.mark.skipif(os.uname().machine != "x86_64", reason="syscall numbers are x86_64's")
def test_a_fresh_copy_put_under_a_planned_name_in_the_window_is_never_deleted(
    models: Path, policy: Path, env: dict[str, str]
) -> None:
    """strace holds ocrd at the rename that moves a delete's target out of its name; in that
    window a fresh copy replaces the file. The fresh copy is what moved, so it is put back,
    untouched, and reported `model.changed`; the old file was never deleted either (it
    was replaced by the copy, not by ocrd)."""
    make_model(models, "old_a", b"stale", age=7200)
    delete_policy(policy, models)
    assert STRACE is not None
    argv = [
        STRACE, "-f", "-qq", "-o", "/dev/null",
        "-e", "trace=renameat,renameat2",
        "-e", "inject=renameat,renameat2:delay_enter=1500000:when=1",
        str(Path(sys.executable).parent / "ocrd"), "--config", str(policy), "apply",
    ]  # fmt: skip
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        deadline = time.monotonic() + 20
        while not in_syscall(proc, RENAMES):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.005)
        fresh = models / ".fresh.tmp"
        fresh.write_bytes(b"fresh copy")
        os.replace(fresh, models / "old_a")  # a new inode under the planned name
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    logs = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert (models / "old_a").read_bytes() == b"fresh copy", (out, err)
    changed = [e for e in logs if e["event"] == "model.changed"]
    assert [e["model"] for e in changed] == ["old_a"], logs
    assert not [e for e in logs if e["event"] == "model.pruned"], logs
    assert [n for n in os.listdir(models) if n.startswith(".ocrd-deleting-")] == []


UNLINKS = {263}  # unlinkat on x86_64


def _held_apply(
    policy: Path, env: dict[str, str], syscalls: str, numbers: set[int], swap: Callable[[], None]
) -> tuple[list[dict[str, object]], str]:
    """`ocrd apply` held by strace at the first of *syscalls*; *swap* runs in that window.
    Returns the log lines and stderr."""
    assert STRACE is not None
    first = syscalls.split(",")[0]
    argv = [
        STRACE, "-f", "-qq", "-o", "/dev/null",
        "-e", f"trace={syscalls}",
        "-e", f"inject={syscalls}:delay_enter=1500000:when=1",
        str(Path(sys.executable).parent / "ocrd"), "--config", str(policy), "apply",
    ]  # fmt: skip
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        deadline = time.monotonic() + 20
        while not in_syscall(proc, numbers):
            assert proc.poll() is None, (first, proc.communicate())
            assert time.monotonic() < deadline, f"never held at {first}"
            time.sleep(0.005)
        swap()
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")], err


def _events(logs: list[dict[str, object]], event: str) -> list[dict[str, object]]:
    return [e for e in logs if e["event"] == event]


@needs_strace
@needs_mount
@pytest.mark.skipif(os.uname().machine != "x86_64", reason="syscall numbers are x86_64's")
@pytest.mark.parametrize(
    "step", ["mount-before-move-out", "link-before-move-out", "link-before-removal"]
)
def test_a_directory_model_swapped_between_the_steps_of_its_delete(
    models: Path,
    policy: Path,
    tmp_path: Path,
    env: dict[str, str],
    bind: Callable[[Path, Path], None],
    step: str,
) -> None:
    """strace holds `ocrd apply` at a step of a directory model's delete while the model is
    changed underneath: a bind mount put inside it after the mount check (held at the
    move-out rename), the model swapped for a link to an outside directory (same window),
    a subdirectory swapped for such a link once it is out of its name (held at the first
    unlink of its removal). Nothing outside is touched and each case is reported."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.bin").write_bytes(b"precious")
    model = models / "old_d"
    (model / "sub").mkdir(parents=True)
    (model / "sub" / "w.bin").write_bytes(b"weights")
    (model / "top.bin").write_bytes(b"top")
    for path in (model / "sub" / "w.bin", model / "top.bin", model / "sub", model):
        os.utime(path, (time.time() - 7200, time.time() - 7200))
    delete_policy(policy, models)

    def mount_inside() -> None:
        bind(outside, model / "sub")

    def link_for_model() -> None:
        os.rename(model, models / ".aside")
        model.symlink_to(outside)

    def link_for_sub() -> None:
        (hidden,) = [p for p in models.iterdir() if p.name.startswith(".ocrd-deleting-")]
        os.rename(hidden / "sub", models / ".aside-sub")
        (hidden / "sub").symlink_to(outside)

    if step == "mount-before-move-out":
        logs, err = _held_apply(policy, env, "renameat,renameat2", RENAMES, mount_inside)
        failed = _events(logs, "action.failed")
        assert [e["model"] for e in failed] == ["old_d"], (logs, err)
        assert "mount point" in str(failed[0]["error"]), failed
        # Checked again once out of its name: it went back whole, nothing of it deleted.
        assert (model / "top.bin").read_bytes() == b"top", failed
    elif step == "link-before-move-out":
        logs, err = _held_apply(policy, env, "renameat,renameat2", RENAMES, link_for_model)
        assert [e["model"] for e in _events(logs, "model.changed")] == ["old_d"], (logs, err)
        assert model.is_symlink()  # what moved out was the link: it went back
    else:
        logs, err = _held_apply(policy, env, "unlinkat", UNLINKS, link_for_sub)
        assert "internal error" not in err, err
    assert (outside / "precious.bin").read_bytes() == b"precious", (logs, err)
    assert sorted(p.name for p in outside.iterdir()) == ["precious.bin"], (logs, err)
    assert not _events(logs, "cycle.failed"), logs


HOLDER = r"""
import os, sys, time
path, delay, report = sys.argv[1], float(sys.argv[2]), sys.argv[3]
time.sleep(delay)
try:
    fd = os.open(path, os.O_RDONLY)
except FileNotFoundError:
    open(report, "w").write("missed")
    sys.exit(0)
open(report, "w").write("opened")
sys.stdin.read()  # hold it until the test is done
st = os.fstat(fd)
open(report, "w").write(f"held nlink={st.st_nlink}")
"""


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
def test_a_process_opening_a_target_at_a_random_instant_is_never_deleted_under(
    run_ocrd: Callable[..., Result],
    models: Path,
    policy: Path,
    tmp_path: Path,
    env: dict[str, str],
    seed: int,
) -> None:
    """A 5,000-model delete cycle; a worker opens one of the later targets at a random
    instant (seeded) while it runs. Whatever the instant, the worker either found no file
    (it had moved out of its name) or holds one that still exists (nlink 1, under its
    name, reported busy): never a deleted file."""
    import random

    rng = random.Random(seed)
    count = 5000
    for i in range(count):
        make_model(models, f"old_{i:05d}", b"m", age=10_000 - i)  # old_00000 is the oldest
    write_policy(policy, policy_data(models, prune={"action": "delete"}))
    target = models / f"old_{rng.randrange(count // 2, count):05d}"  # one of the later ones
    report = tmp_path / "holder.txt"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(target), f"{rng.uniform(0.0, 1.2):.3f}", str(report)],
        stdin=subprocess.PIPE,
        text=True,
    )
    try:
        result = run_ocrd("--config", policy, "apply", timeout=120)
    finally:
        holder.communicate(input="", timeout=30)
    outcome = report.read_text() if report.exists() else "not started"
    busy = [e for e in result.logs() if e["event"] == "model.busy"]
    if outcome.startswith("held"):
        assert outcome == "held nlink=1", (outcome, busy)
        assert target.exists()
        assert [e["model"] for e in busy] == [target.name]
        assert result.code == 1  # not converged: a model was busy
    else:
        assert outcome in ("missed", "opened"), outcome  # "opened" then still held: nlink > 0
        assert busy == [] or [e["model"] for e in busy] == [target.name]
    assert [n for n in os.listdir(models) if n.startswith(".ocrd-deleting-")] == []


def test_a_symlinked_trash_is_never_followed(
    run_ocrd: Callable[..., Result], models: Path, policy: Path, tmp_path: Path
) -> None:
    """`.ocrd-trash` made a symlink to a directory outside that looks like a quarantine (a
    record-shaped batch, an empty batch): `apply` holds the cycle back as a suspicious view
    (no recovery, no retention purge, no quarantine through it), `trash list` and `trash
    purge --all` touch nothing there, each saying why."""
    outside = tmp_path / "outside"
    (outside / "b1").mkdir(parents=True)
    (outside / "b1" / ".ocrd-record.json").write_text(
        json.dumps(
            {
                "version": 2,
                "trashed_at": 0,
                "items": [{"name": "precious.bin", "reason": "x", "size": 8, "sha256": None}],
            }
        )
    )
    (outside / "b1" / "precious.bin").write_bytes(b"precious")
    (outside / "empty").mkdir()
    (outside / "empty" / ".ocrd-record.json").write_text(
        json.dumps({"version": 2, "trashed_at": 0, "items": []})
    )
    (models / ".ocrd-trash").symlink_to(outside)
    make_model(models, "old_a", age=3600)
    write_policy(policy, policy_data(models, quarantine={"retention": "1s"}))

    def untouched() -> None:
        assert (outside / "b1" / "precious.bin").read_bytes() == b"precious"
        assert (outside / "empty").is_dir()
        assert (models / ".ocrd-trash").is_symlink()

    applied = run_ocrd("--config", policy, "apply")
    untouched()
    # One of ocrd's own names in a shape ocrd never makes: a suspicious view, nothing done.
    (suspicious,) = [e for e in applied.logs() if e["event"] == "model_dir.suspicious"]
    assert ".ocrd-trash is a symbolic link" in suspicious["reason"], applied
    assert applied.code == 1 and (models / "old_a").exists(), applied
    done = ("recovery.", "action.failed", "model.pruned", "trash.purged")
    assert not [e for e in applied.logs() if e["event"].startswith(done)], applied
    listed = run_ocrd("--config", policy, "trash", "list")
    assert "never followed" in listed.err and "precious" not in listed.out, listed
    purged = run_ocrd("--config", policy, "trash", "purge", "--all")
    assert purged.code == 1 and "never followed" in purged.err, purged
    untouched()


def _outside_link(path: Path, outside: Path) -> None:
    path.symlink_to(outside)


def _outside_file_link(path: Path, outside: Path) -> None:
    path.symlink_to(outside / "precious.bin")


def _fifo_at(path: Path, outside: Path) -> None:
    os.mkfifo(path)


def _plain_file(path: Path, outside: Path) -> None:
    path.write_bytes(b"not a directory")


@pytest.mark.parametrize(
    ("name", "make"),
    [
        (".ocrd-tmp-0123", _outside_link),
        (".ocrd-tmp-0123", _outside_file_link),
        (".ocrd-tmp-0123", _fifo_at),
        (".ocrd-deleting-0123", _fifo_at),
        (".ocrd-trash", _fifo_at),
        (".ocrd-trash", _plain_file),
        (".ocrd-trash", _outside_file_link),
    ],
    ids=[
        "tmp-dir-link",
        "tmp-file-link",
        "tmp-fifo",
        "deleting-fifo",
        "trash-fifo",
        "trash-file",
        "trash-file-link",
    ],
)
def test_an_own_name_in_a_shape_ocrd_never_makes_is_suspicious_and_left_alone(
    run_ocrd: Callable[..., Result],
    models: Path,
    policy: Path,
    tmp_path: Path,
    name: str,
    make: Callable[[Path, Path], None],
) -> None:
    """Each of ocrd's own names as a link out, a FIFO or a plain file where ocrd makes
    something else: `apply` holds the cycle back (model_dir.suspicious naming it), prunes
    nothing, never blocks, and leaves the entry and whatever it points at as they were."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.bin").write_bytes(b"precious")
    make(models / name, outside)
    before = os.lstat(models / name)
    make_model(models, "old_a", age=3600)
    delete_policy(policy, models)
    done = run_ocrd("--config", policy, "apply", timeout=20)
    logs = done.logs()
    (suspicious,) = [e for e in logs if e["event"] == "model_dir.suspicious"]
    assert name in suspicious["reason"] and "never makes" in suspicious["reason"], suspicious
    assert done.code == 1 and (models / "old_a").exists(), done
    after = os.lstat(models / name)
    assert (after.st_ino, after.st_mode) == (before.st_ino, before.st_mode)
    assert (outside / "precious.bin").read_bytes() == b"precious"
    assert sorted(p.name for p in outside.iterdir()) == ["precious.bin"]


def test_a_deleting_leftover_that_is_a_link_is_removed_as_a_link_only(
    run_ocrd: Callable[..., Result], models: Path, policy: Path, tmp_path: Path
) -> None:
    """A `.ocrd-deleting-*` link is what a crash leaves of a pruned symlink model: recovery
    removes the link itself; the directory it points at keeps every file."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.bin").write_bytes(b"precious")
    (models / ".ocrd-deleting-0123").symlink_to(outside)
    delete_policy(policy, models)
    done = run_ocrd("--config", policy, "apply")
    assert done.code == 0, done
    assert not os.path.lexists(models / ".ocrd-deleting-0123")
    assert (outside / "precious.bin").read_bytes() == b"precious"


@pytest.mark.parametrize("which", ["record", "hash-cache", "status"])
def test_a_fifo_in_place_of_an_own_state_file_never_blocks(
    run_ocrd: Callable[..., Result],
    models: Path,
    policy: Path,
    tmp_path: Path,
    env: dict[str, str],
    which: str,
) -> None:
    """A FIFO nobody writes to as a quarantine record, as the hash cache, or as the status
    file: the commands that read them finish (the FIFO is no such file), nothing blocks."""
    state = tmp_path / "state"
    state.mkdir()
    write_policy(
        policy,
        policy_data(models, state_dir=str(state), required=[{"name": "p.bin", "sha256": "0" * 64}]),
    )
    make_model(models, "p.bin")
    if which == "record":
        (models / ".ocrd-trash" / "b1").mkdir(parents=True)
        (models / ".ocrd-trash" / "b1" / "model.bin").write_bytes(b"m")
        os.mkfifo(models / ".ocrd-trash" / "b1" / ".ocrd-record.json")
        commands = [["trash", "list"], ["plan"], ["apply"]]
    elif which == "hash-cache":
        os.mkfifo(state / "hashes.json")
        commands = [["plan"], ["list"]]
    else:
        os.mkfifo(state / "status.json")
        commands = [["status"]]
    for command in commands:
        done = run_ocrd("--config", policy, *command, timeout=20)
        assert "internal error" not in done.err, (command, done)
        assert done.code in (0, 1, 3), (command, done)
    if which == "record":  # an unreadable record keeps its batch for an operator
        assert (models / ".ocrd-trash" / "b1" / "model.bin").exists()


# -- a multi-GB pinned model under a short watchdog ----------------------------------------

SPARSE = 2 * 2**30  # 2 GiB of holes: read as zeros, hashed at full speed, no disk used
SPARSE_SHA = "a7c744c13cc101ed66c29f672f92455547889cc586ce6d44fe76ae824958ea51"


def test_a_multi_gb_pinned_model_keeps_the_watchdog_fed_and_is_hashed_once(
    daemons: Daemons, models: Path, policy: Path, tmp_path: Path
) -> None:
    """Two sparse 2 GiB pinned models under WATCHDOG_USEC=2 s: while they are hashed the
    daemon pings at least once a second (a gap over 2 s gets a service killed); a SIGTERM
    while the second one is hashed stops the daemon at once; each hash is remembered as it
    finishes, so the restarted daemon hashes only the one it had not finished."""
    for name in ("big_a.bin", "big_b.bin"):
        with open(models / name, "wb") as fh:
            fh.truncate(SPARSE)
    state = tmp_path / "hash-state"
    state.mkdir()
    required = [{"name": n, "sha256": SPARSE_SHA} for n in ("big_a.bin", "big_b.bin")]
    save_policy(policy, policy_data(models, state_dir=str(state), required=required))
    with contextlib.closing(NotifySocket(str(tmp_path / "notify.sock"))) as notify:
        env = {"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "2000000"}
        env["WATCHDOG_PID"] = ""
        daemon = daemons.start(policy, extra_env=env, first_cycle=False)
        first = daemon.wait("model.hashed", timeout=120)
        assert first["bytes"] == SPARSE, first
        hashed_first = first["model"]
        code, took = daemon.stop()
        assert code == 0 and took < 2, (code, took, daemon)
        pings = notify.arrivals("WATCHDOG")
        started = epoch(daemon.seen("daemon.started")[0])
        assert pings and pings[0] - started < 2, (started, pings)
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        assert max(gaps, default=0) < 2, f"a {max(gaps):.2f} s gap between watchdog pings"
        if not daemon.seen("cycle.interrupted"):
            # The SIGTERM came after both hashes (a fast machine): nothing left to prove
            # about the restart but that neither is hashed again.
            assert len(daemon.seen("model.hashed")) == 2, daemon
    again = daemons.start(policy, first_cycle=False)
    again.wait_cycles(1, timeout=120)  # it may still have a 2 GiB hash to do
    rehashed = [e["model"] for e in again.seen("model.hashed")]
    assert hashed_first not in rehashed, f"{hashed_first} was hashed again: {rehashed}"
    assert [e["model"] for e in again.seen("model.corrupt")] == [], again
    again.stop()


def test_a_sigterm_during_a_restore_copy_stops_at_once_and_deletes_nothing_undecided(
    daemons: Daemons, models: Path, policy: Path, tmp_path: Path
) -> None:
    """A restore copying a 2 GiB source while a delete's target is already out of its
    name: a SIGTERM stops the daemon within a second or two, the copy's temp file is
    removed, and the delete's target goes back under its name (nothing is deleted that
    the cycle had not finished deciding on)."""
    source = tmp_path / "src.bin"
    with open(source, "wb") as fh:
        fh.truncate(SPARSE)
    make_model(models, "old_a", b"stale", age=7200)
    required = [{"name": "big.bin", "source": str(source)}]
    save_policy(policy, policy_data(models, prune={"action": "delete"}, required=required))
    daemon = daemons.start(policy, first_cycle=False)

    def copying() -> bool:
        names = os.listdir(models)
        return any(n.startswith(".ocrd-tmp-") for n in names) and "old_a" not in names

    wait_for(copying, timeout=60, what="a restore copying while old_a is out of its name")
    code, took = daemon.stop()
    assert code == 0 and took < 3, (code, took, daemon)
    assert daemon.seen("cycle.interrupted"), daemon
    assert (models / "old_a").read_bytes() == b"stale"
    left = sorted(n for n in os.listdir(models) if n != ".ocrd-lock")
    assert left == ["old_a"], left


@needs_strace
@pytest.mark.skipif(os.uname().machine != "x86_64", reason="syscall numbers are x86_64's")
def test_what_is_put_under_a_hidden_name_after_the_handle_check_is_left_alone(
    models: Path, policy: Path, env: dict[str, str]
) -> None:
    """Two delete targets out of their names; strace holds `ocrd apply` at the unlink of the
    first, and meanwhile the second's hidden `.ocrd-deleting-*` name is given to another
    file (one a process holds open). ocrd removes only the entry it moved out and looked
    up in the handle index, so that file survives and the second target is reported.
    (The last instant, between that check and the unlink itself, is the kernel's: an
    unlink is by name.)"""
    make_model(models, "old_a", b"stale a", age=9000)
    make_model(models, "old_b", b"stale b", age=7200)
    for name in ("keep1.bin", "keep2.bin"):
        make_model(models, name)
    make_model(models, "held.bin", b"precious")
    second = os.lstat(models / "old_b").st_ino
    delete_policy(policy, models)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; f = open(sys.argv[1]); sys.stdin.read()",
         str(models / "held.bin")],
        stdin=subprocess.PIPE,
    )  # fmt: skip
    try:

        def swap() -> None:
            # Files go out into `.ocrd-deleting-*` dirs of the cycle's own.
            dirs = [p for p in models.iterdir() if p.name.startswith(".ocrd-deleting-")]
            hidden = [p for d in dirs for p in d.iterdir()]
            (target,) = [p for p in hidden if p.lstat().st_ino == second]
            os.rename(target, models / ".aside")
            os.rename(models / "held.bin", target)
            swapped.append(target)

        swapped: list[Path] = []
        logs, err = _held_apply(policy, env, "unlinkat", UNLINKS, swap)
        assert swapped[0].read_bytes() == b"precious", (logs, err)
        failed = _events(logs, "action.failed")
        assert [e["model"] for e in failed] == ["old_b"], (logs, err)
        assert "replaced since it was checked" in str(failed[0]["error"]), failed
        assert [e["model"] for e in _events(logs, "model.pruned")] == ["old_a"], logs
    finally:
        holder.kill()
        holder.wait()
        assert holder.stdin is not None
        holder.stdin.close()


@needs_strace
@pytest.mark.skipif(os.uname().machine != "x86_64", reason="syscall numbers are x86_64's")
def test_the_deleting_dir_swapped_for_a_link_mid_cycle_touches_nothing_outside(
    models: Path, policy: Path, env: dict[str, str], tmp_path: Path
) -> None:
    """strace holds `ocrd apply` at its first move-out; meanwhile the cycle's
    `.ocrd-deleting-*` dir is moved aside and a link to a dir outside is put under its
    name. ocrd moves and unlinks through the dir's descriptor, so the targets still go,
    nothing outside is touched, and the link is not followed when the dir is dropped."""
    for i in range(3):
        make_model(models, f"old_{i}", b"stale", age=9000)
    make_model(models, "keep.bin")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_bytes(b"precious")
    delete_policy(policy, models)

    def swap() -> None:
        (made,) = [p for p in models.iterdir() if p.name.startswith(".ocrd-deleting-")]
        os.rename(made, models / ".aside")
        made.symlink_to(outside)

    logs, err = _held_apply(policy, env, "renameat,renameat2", RENAMES, swap)
    assert sorted(e["model"] for e in _events(logs, "model.pruned")) == [
        "old_0",
        "old_1",
        "old_2",
    ], (logs, err)
    assert sorted(os.listdir(outside)) == ["precious"]
    assert (outside / "precious").read_bytes() == b"precious"
    assert os.listdir(models / ".aside") == []  # the real dir, emptied through its descriptor
    assert sorted(n for n in os.listdir(models) if not n.startswith(".")) == ["keep.bin"]


def test_a_lock_that_is_a_hard_link_to_another_file_is_refused(
    run_ocrd: Callable[..., Result], models: Path, policy: Path, tmp_path: Path
) -> None:
    """`.ocrd-lock` made a hard link to a file outside: ocrd would truncate it to write its
    pid; it refuses in one line instead, and the file keeps its bytes."""
    outside = tmp_path / "important.txt"
    outside.write_text("IMPORTANT DATA\n")
    os.link(outside, models / ".ocrd-lock")
    delete_policy(policy, models)
    done = run_ocrd("--config", policy, "apply")
    assert done.code == 1 and "hard link" in done.err and done.err.count("\n") == 1, done
    assert outside.read_text() == "IMPORTANT DATA\n"


def test_a_directory_model_the_user_cannot_remove_whole_is_left_whole(
    shared_dir: Path, env: dict[str, str], test_user: str
) -> None:
    """A directory model with a root-owned subdirectory (readable, not writable for the
    service user): the user's delete would have to leave part of it behind, so it is
    left whole under its name, saying why."""
    entry = pwd.getpwnam(test_user)
    models = shared_dir / "models"
    (models / "old_d" / "rootsub").mkdir(parents=True)
    (models / "old_d" / "f1").write_bytes(b"one")
    (models / "old_d" / "rootsub" / "r").write_bytes(b"root's")
    for path in (models, models / "old_d", models / "old_d" / "f1"):
        os.chown(path, entry.pw_uid, entry.pw_gid)
    old = time.time() - 7200
    for path in (models / "old_d" / "rootsub" / "r", models / "old_d" / "rootsub"):
        os.utime(path, (old, old))
    for path in (models / "old_d" / "f1", models / "old_d"):
        os.utime(path, (old, old))
    policy = write_policy(shared_dir / "policy.yaml", delete_policy_data(models))
    policy.chmod(0o644)
    user_env = {**env, "XDG_STATE_HOME": str(shared_dir / "xdg")}
    applied = as_user(test_user, user_env, "--config", str(policy), "apply")
    assert "internal error" not in applied.stderr, applied
    assert "no write permission" in applied.stdout, applied.stdout
    assert (models / "old_d" / "f1").read_bytes() == b"one"
    assert (models / "old_d" / "rootsub" / "r").read_bytes() == b"root's"


def test_trash_list_says_which_batches_it_cannot_read(
    run_ocrd: Callable[..., Result],
    shared_dir: Path,
    env: dict[str, str],
    test_user: str,
) -> None:
    """A readable `.ocrd-trash` whose batch (mode 0700, root's) the user cannot read:
    `trash list` warns that its models are not shown instead of calling it empty."""
    models = shared_dir / "models"
    models.mkdir()
    make_model(models, "old_a")
    make_model(models, "keep.bin")
    policy = write_policy(shared_dir / "policy.yaml", policy_data(models))
    policy.chmod(0o644)
    assert run_ocrd("--config", policy, "apply").code == 0
    (models / ".ocrd-trash").chmod(0o755)
    user_env = {**env, "XDG_STATE_HOME": str(shared_dir / "xdg")}
    listed = as_user(test_user, user_env, "--config", str(policy), "trash", "list")
    assert "1 quarantine batch(es)" in listed.stderr and "not shown" in listed.stderr, listed
    assert "internal error" not in listed.stderr, listed
