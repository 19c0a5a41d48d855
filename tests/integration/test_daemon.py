"""The daemon (`ocrd run`) as a real subprocess: when it cycles, signals, the model dir
coming and going, the one-instance lock, and the status file (DESIGN §4, §6).

Hot reload is in test_daemon_reload.py and sd_notify in test_notify.py; both reuse the
helpers defined here.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest
from conftest import OCRD, make_model, wait_for
from daemonkit import DEBOUNCE, epoch, policy_data, read_status, save_policy

from ocrd.core.names import TRASH
from ocrd.observe.trash import read_batch, read_trash

CAP = 5 * DEBOUNCE  # the daemon's hard cap on settling under constant writes
# Longer than any debounce the daemon may still be in, and than the 0.5 s watchdog waits
# to pair a move out of the model dir (a prune) with its other half before reporting it.
QUIET = CAP + 0.4
HOUR = 3600.0
# Variables a service manager sets; none may leak in from the shell running the tests.
SERVICE_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "RUNTIME_DIRECTORY")

MOUNT, UMOUNT, STRACE = shutil.which("mount"), shutil.which("umount"), shutil.which("strace")
root_only = pytest.mark.skipif(
    os.geteuid() != 0 or MOUNT is None or UMOUNT is None, reason="mounts a tmpfs; needs root"
)


# -- helpers shared with test_daemon_reload.py and test_notify.py -------------------------


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def daemon_env(env: dict[str, str], tmp_path: Path, *, runtime: bool = True) -> dict[str, str]:
    """The `env` fixture without service-manager variables; status goes to tmp_path/run."""
    clean = {k: v for k, v in env.items() if k not in SERVICE_VARS}
    if runtime:
        clean["RUNTIME_DIRECTORY"] = str(tmp_path / "run")
    return clean


def ocrd_status(env: dict[str, str], policy: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`ocrd --config POLICY status ARGS` with exactly *env*."""
    return subprocess.run(
        [OCRD, "--config", str(policy), "status", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


class Daemon:
    """One `ocrd run` subprocess and every JSON line it logged, read by a thread."""

    def __init__(self, argv: Sequence[str], env: dict[str, str]) -> None:
        self.argv = list(argv)
        self.events: list[dict[str, Any]] = []
        self.noise: list[str] = []
        self.stderr: list[str] = []
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self._readers = [
            threading.Thread(target=self._read_stdout, daemon=True),
            threading.Thread(target=self._read_stderr, daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self.events.append(json.loads(line))
            except ValueError:
                self.noise.append(line)

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line)

    def __repr__(self) -> str:
        return (
            f"Daemon(rc={self.proc.poll()}, events={self.names()}, "
            f"stderr={''.join(self.stderr)!r}, noise={self.noise[:5]!r})"
        )

    @property
    def pid(self) -> int:
        """The pid of ocrd itself (not of a wrapper such as strace), from `daemon.started`."""
        return int(self.wait("daemon.started")["pid"])

    def mark(self) -> int:
        """A position in the log; pass it as *after* to look only at what came later."""
        return len(self.events)

    def names(self, after: int = 0) -> list[str]:
        return [e["event"] for e in self.events[after:]]

    def seen(self, event: str, *, after: int = 0, **fields: Any) -> list[dict[str, Any]]:
        return [
            e
            for e in self.events[after:]
            if e["event"] == event and all(e.get(k) == v for k, v in fields.items())
        ]

    def cycles(self, after: int = 0) -> list[dict[str, Any]]:
        return self.seen("cycle.finished", after=after)

    def _gone(self) -> bool:
        """True once the process has ended and its output is fully read."""
        if self.proc.poll() is None:
            return False
        for reader in self._readers:
            reader.join(timeout=5)
        return True

    def wait(
        self, event: str, *, after: int = 0, timeout: float = 10.0, **fields: Any
    ) -> dict[str, Any]:
        """The first *event* (with these field values) logged after *after*; fail on a deadline."""

        def found() -> list[dict[str, Any]]:
            hits = self.seen(event, after=after, **fields)
            if not hits and self._gone():
                hits = self.seen(event, after=after, **fields)
                if not hits:
                    raise AssertionError(f"ocrd ended before logging {event} {fields}")
            return hits

        try:
            return wait_for(found, timeout=timeout, what=f"{event} {fields}")[0]
        except AssertionError as exc:
            raise AssertionError(f"{exc}; {self!r}") from None

    def wait_cycles(self, count: int, *, after: int = 0, timeout: float = 10.0) -> None:
        try:
            wait_for(
                lambda: len(self.cycles(after)) >= count,
                timeout=timeout,
                what=f"{count} cycle(s)",
            )
        except AssertionError as exc:
            raise AssertionError(f"{exc}; {self!r}") from None

    def quiet(self, seconds: float = QUIET, *, event: str = "cycle.finished") -> None:
        """Assert that no new *event* is logged for *seconds* (a negative needs a window)."""
        start = self.mark()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            new = self.seen(event, after=start)
            assert not new, f"unexpected {event} within {seconds}s: {new}"
            assert self.proc.poll() is None, f"ocrd ended: {self!r}"
            time.sleep(0.02)

    def settle(self, *, quiet: float = QUIET, timeout: float = 15.0) -> int:
        """Wait until no cycle has finished for *quiet* s; fail if cycles keep coming."""
        deadline = time.monotonic() + timeout
        count, changed = len(self.cycles()), time.monotonic()
        while time.monotonic() - changed < quiet:
            assert time.monotonic() < deadline, f"cycles never stopped within {timeout}s: {self!r}"
            assert self.proc.poll() is None, f"ocrd ended: {self!r}"
            time.sleep(0.02)
            now = len(self.cycles())
            if now != count:
                count, changed = now, time.monotonic()
        return count

    def send(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def stop(self, signum: int = signal.SIGTERM, *, timeout: float = 10.0) -> tuple[int, float]:
        """Send *signum*; the exit code and how long the process took to end."""
        pid = self.pid
        started = time.monotonic()
        os.kill(pid, signum)
        code = self.proc.wait(timeout=timeout)
        elapsed = time.monotonic() - started
        self._gone()
        return code, elapsed

    def kill(self) -> None:
        """End ocrd (and a wrapper around it) by pid, whatever state it is in."""
        started = self.seen("daemon.started")
        if started and started[0]["pid"] != self.proc.pid and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(started[0]["pid"]), signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        self._gone()
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


class Daemons:
    """Starts daemons for one test and kills whatever is left of them at the end."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.started: list[Daemon] = []

    def start(
        self,
        policy: Path,
        *args: str,
        extra_env: dict[str, str] | None = None,
        wrapper: Sequence[str] = (),
        first_cycle: bool = True,
    ) -> Daemon:
        """`ocrd --config POLICY run ARGS`; by default returns once the first cycle finished."""
        daemon = Daemon(
            [*wrapper, OCRD, "--config", str(policy), "run", *args],
            {**self.env, **(extra_env or {})},
        )
        self.started.append(daemon)
        daemon.wait("daemon.started", timeout=20)
        if first_cycle:
            daemon.wait_cycles(1)
        return daemon

    def close(self) -> None:
        for daemon in self.started:
            daemon.kill()

    def __enter__(self) -> Daemons:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


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


def mount_tmpfs(path: Path, size: str) -> None:
    assert MOUNT is not None
    subprocess.run([MOUNT, "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)


def unmount(path: Path) -> None:
    """Unmount lazily: a daemon killed a moment ago may still hold the lock file open."""
    assert UMOUNT is not None
    subprocess.run([UMOUNT, "--lazy", str(path)], check=True)


# -- fixtures -----------------------------------------------------------------------------


@pytest.fixture
def denv(env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """The environment of every daemon and `ocrd status` in a test."""
    return daemon_env(env, tmp_path)


@pytest.fixture
def daemons(denv: dict[str, str]) -> Iterator[Daemons]:
    with Daemons(denv) as group:
        yield group


@pytest.fixture
def models(tmp_path: Path) -> Path:
    path = tmp_path / "models"
    path.mkdir()
    return path


@pytest.fixture
def policy(tmp_path: Path) -> Path:
    """Where the policy file goes: its own directory, as /etc/ocrd is."""
    return tmp_path / "etc" / "policy.yaml"


@pytest.fixture
def status_file(tmp_path: Path) -> Path:
    return tmp_path / "run" / "status.json"


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A fresh tmpfs mounted at tmp_path/models (fsync is free there)."""
    path = tmp_path / "models"
    path.mkdir()
    mount_tmpfs(path, "64m")
    try:
        yield path
    finally:
        unmount(path)


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
    wait_for(
        lambda: not any(name.startswith("old_") for name in os.listdir(root)),
        timeout=60,
        what="every old_ file pruned",
    )
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
    doc = wait_for(
        lambda: (d := read_status(status_file)) and d["suspicious"] and d, what="suspicious"
    )
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
        daemon.kill()
        unmount(models)


def test_replaced_model_dir_is_followed(
    daemons: Daemons, models: Path, tmp_path: Path, policy: Path
) -> None:
    """A model dir replaced by a new directory is managed and watched in its new form."""
    make_model(models, "keep.bin")
    save_policy(policy, policy_data(models, reconcile={"resync": "500ms"}))
    daemon = daemons.start(policy)
    staged = tmp_path / "models.new"
    staged.mkdir()
    make_model(staged, "keep.bin")
    make_model(staged, "old_a")
    os.rename(models, tmp_path / "models.old")
    os.rename(staged, models)
    daemon.wait("model.pruned", model="old_a")
    make_model(tmp_path / "models.old", "old_z")
    mark = daemon.mark()
    make_model(models, "old_b")
    daemon.wait("model.pruned", after=mark, model="old_b")
    assert (tmp_path / "models.old" / "old_z").exists()
    assert daemon.proc.poll() is None


def test_replaced_model_dir_is_still_locked_against_a_second_instance(
    daemons: Daemons, models: Path, tmp_path: Path, policy: Path, denv: dict[str, str]
) -> None:
    """After the model dir is replaced, the daemon manages the new one and locks it too."""
    make_model(models, "keep.bin")
    save_policy(policy, policy_data(models, reconcile={"resync": "500ms"}))
    first = daemons.start(policy)
    staged = tmp_path / "models.new"
    staged.mkdir()
    make_model(staged, "keep.bin")
    make_model(staged, "old_a")
    os.rename(models, tmp_path / "models.old")
    os.rename(staged, models)
    first.wait("model.pruned", model="old_a")
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

HOLD = (
    "import sys, time\nf = open(sys.argv[1], 'rb')\nprint('ready', flush=True)\ntime.sleep(120)\n"
)


@contextlib.contextmanager
def held_open(path: Path) -> Iterator[int]:
    """A child process that keeps *path* open meanwhile; yields its pid."""
    with subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE) as proc:
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == b"ready"
            yield proc.pid
        finally:
            proc.kill()


def test_status_file_describes_the_last_cycle(
    daemons: Daemons,
    models: Path,
    policy: Path,
    status_file: Path,
    denv: dict[str, str],
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
    with held_open(held) as holder:
        daemon = daemons.start(policy)
        daemon.wait("model.pruned", model="old_aged")
        daemon.settle()
        doc = read_status(status_file)
        assert doc is not None
        assert doc["state"] == "running"
        assert doc["pid"] == daemon.pid
        assert doc["policy"]["path"] == str(policy)
        assert doc["policy"]["digest"] == sha256(policy)
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
        assert str(holder) in doc["busy"][0]["reason"]
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
    assert [p.name for p in status_file.parent.iterdir()] == ["status.json"]


@pytest.fixture
def plain_daemons(env: dict[str, str], tmp_path: Path) -> Iterator[Daemons]:
    """Daemons started without $RUNTIME_DIRECTORY."""
    with Daemons(daemon_env(env, tmp_path, runtime=False)) as group:
        yield group


def test_status_file_falls_back_to_the_state_dir(
    plain_daemons: Daemons, tmp_path: Path, models: Path, policy: Path
) -> None:
    """Without $RUNTIME_DIRECTORY the status file is in the state dir, where `ocrd status` looks."""
    save_policy(policy, policy_data(models))
    daemon = plain_daemons.start(policy)
    path = tmp_path / "xdg-state" / "ocrd" / "status.json"
    doc = wait_for(lambda: read_status(path), what=str(path))
    assert doc["pid"] == daemon.pid
    assert not (tmp_path / "run").exists()
    shown = ocrd_status(plain_daemons.env, policy)
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
    wait_for(
        lambda: (doc := read_status(status_file)) and doc["degraded"],
        what="the status file to say degraded",
    )
    degraded = ocrd_status(denv, policy, "--json")
    assert degraded.returncode == 1, degraded
    assert "need.bin: missing" in json.loads(degraded.stdout)["degraded_reasons"]
    assert daemon.stop()[0] == 0
    stopped = ocrd_status(denv, policy, "--json")
    assert stopped.returncode == 3, stopped
    assert json.loads(stopped.stdout)["running"] is False
