"""The daemon speaks systemd's notify protocol to a real AF_UNIX datagram socket bound in
tmp_path: READY, STATUS, RELOADING, WATCHDOG and STOPPING, in order (DESIGN §6).

The daemon harness is tests/support/daemon.py, started by the `daemons` fixture.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import signal
import statistics
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from tests.support.daemon import Daemon, Daemons
from tests.support.files import make_model
from tests.support.logs import epoch
from tests.support.notify import NotifySocket
from tests.support.policy import policy_data, save_policy
from tests.support.wait import wait_for

WATCHDOG_USEC = 600_000  # systemd's WatchdogSec=0.6s: a ping is due about every 0.3 s
STATUS_LINE = re.compile(r"^STATUS=models=\d+ pending=\d+ busy=\d+ done=\d+")


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    """A socket standing in for systemd's, bound at tmp_path/notify.sock."""
    with contextlib.closing(NotifySocket(str(tmp_path / "notify.sock"))) as sock:
        yield sock


def start(
    daemons: Daemons,
    policy: Path,
    notify: NotifySocket,
    *,
    wrapper: Sequence[str] = (),
    **env: str,
) -> Daemon:
    """Start `ocrd run` with NOTIFY_SOCKET naming *notify* (and more *env*)."""
    address = notify.sock.getsockname()
    if isinstance(address, bytes):  # an abstract address: NUL, then the name
        address = "@" + address[1:].decode()
    return daemons.start(policy, extra_env={"NOTIFY_SOCKET": address, **env}, wrapper=wrapper)


def test_ready_after_the_first_cycle_and_stopping_last(
    daemons: Daemons, notify: NotifySocket, saved_policy: Path, models: Path
) -> None:
    """READY=1 comes first, after the first cycle; STATUS= follows; STOPPING=1 comes last."""
    make_model(models, "keep.bin")
    daemon = start(daemons, saved_policy, notify)
    ready_at, ready = notify.wait("READY")
    assert notify.texts()[0] == ready
    assert epoch(daemon.cycles()[0]) <= ready_at
    assert "STATUS=models=1 pending=0" in ready
    notify.wait("STATUS")
    code, _ = daemon.stop()
    assert code == 0
    notify.wait("STOPPING")
    kinds = notify.kinds()
    assert kinds[0] == "READY"
    assert kinds[-1] == "STOPPING"
    assert set(kinds[1:-1]) == {"STATUS"}, kinds


def test_status_after_every_cycle(
    daemons: Daemons, notify: NotifySocket, saved_policy: Path, models: Path
) -> None:
    """Every cycle is followed by one STATUS= datagram with the counts of that cycle."""
    daemon = start(daemons, saved_policy, notify)
    for i in range(3):
        mark = daemon.mark()
        make_model(models, f"keep_{i}.bin")
        daemon.wait("cycle.finished", after=mark)
    wait_for(
        lambda: notify.kinds().count("STATUS") == len(daemon.cycles()),
        what="one STATUS= per cycle",
    )
    statuses = [t for t in notify.texts() if t.startswith("STATUS=")]
    assert all(STATUS_LINE.match(t) for t in statuses), statuses
    assert statuses[-1].startswith("STATUS=models=3 ")


def test_reload_sends_reloading_with_monotonic_usec_then_ready(
    daemons: Daemons, notify: NotifySocket, saved_policy: Path
) -> None:
    """SIGHUP brings RELOADING=1 with MONOTONIC_USEC=now, then READY=1, then the cycle's STATUS."""
    daemon = start(daemons, saved_policy, notify)
    notify.wait("STATUS")
    mark = notify.mark()
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    daemon.send(signal.SIGHUP)
    notify.wait("STATUS", after=mark)
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert notify.kinds(mark)[:3] == ["RELOADING", "READY", "STATUS"]
    reloading = notify.texts(mark)[0].split("\n")
    assert reloading[0] == "RELOADING=1"
    assert reloading[1].startswith("MONOTONIC_USEC=")
    assert before <= int(reloading[1].split("=", 1)[1]) <= after


def test_rejected_edit_still_answers_reloading_with_ready(
    daemons: Daemons, notify: NotifySocket, saved_policy: Path, models: Path
) -> None:
    """A rejected policy edit is bracketed by RELOADING=1 and READY=1 saying it was rejected."""
    daemon = start(daemons, saved_policy, notify)
    notify.wait("STATUS")
    mark = notify.mark()
    save_policy(saved_policy, policy_data(models, prune={"min_age": "ten minutes"}))
    daemon.wait("policy.rejected")
    notify.wait("READY", after=mark)
    assert notify.kinds(mark)[:2] == ["RELOADING", "READY"]
    assert "rejected" in notify.texts(mark)[1]


@pytest.mark.parametrize("pid", ["unset", "own"])
def test_watchdog_pings_at_half_the_interval(
    daemons: Daemons, notify: NotifySocket, saved_policy: Path, pid: str
) -> None:
    """With WATCHDOG_USEC (and WATCHDOG_PID unset or ours) WATCHDOG=1 comes every half period."""
    # `exec` keeps the shell's pid, so $$ is the pid ocrd will have.
    wrapper = ["/bin/sh", "-c", 'WATCHDOG_PID=$$ exec "$@"', "sh"] if pid == "own" else []
    daemon = start(daemons, saved_policy, notify, wrapper=wrapper, WATCHDOG_USEC=str(WATCHDOG_USEC))
    assert daemon.pid == daemon.proc.pid
    mark = notify.mark()
    wait_for(lambda: len(notify.arrivals("WATCHDOG", mark)) >= 5, what="5 WATCHDOG=1")
    pings = notify.arrivals("WATCHDOG", mark)
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    half = WATCHDOG_USEC / 2e6
    assert 0.6 * half <= statistics.median(gaps) <= 1.5 * half, gaps
    assert max(gaps) < 2 * half, gaps  # systemd would have killed it
    assert notify.texts(mark).count("WATCHDOG=1") == len(pings)


def test_no_watchdog_pings_when_watchdog_pid_names_another_process(
    daemons: Daemons, notify: NotifySocket, saved_policy: Path
) -> None:
    """WATCHDOG_PID naming another process means the watchdog is not ocrd's: no WATCHDOG=1."""
    env = {"WATCHDOG_USEC": str(WATCHDOG_USEC), "WATCHDOG_PID": str(os.getpid())}
    start(daemons, saved_policy, notify, **env)
    notify.wait("STATUS")
    deadline = time.monotonic() + 4 * WATCHDOG_USEC / 2e6  # 4 pings would be due
    while time.monotonic() < deadline:
        assert "WATCHDOG" not in notify.kinds()
        time.sleep(0.02)
    assert notify.kinds()[:2] == ["READY", "STATUS"]


def test_abstract_notify_socket(daemons: Daemons, saved_policy: Path) -> None:
    """NOTIFY_SOCKET starting with '@' names an abstract socket; READY and STOPPING arrive."""
    with contextlib.closing(NotifySocket(f"\0ocrd-test-{uuid.uuid4().hex}")) as notify:
        daemon = start(daemons, saved_policy, notify)
        notify.wait("READY")
        assert daemon.stop()[0] == 0
        notify.wait("STOPPING")
        assert notify.kinds()[0] == "READY"
        assert notify.kinds()[-1] == "STOPPING"
