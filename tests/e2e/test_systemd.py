"""systemd/ocrd.service for real: offline checks, then ocrd under a real systemd 252.

DESIGN §6 (daemon: Type=notify, reload, watchdog, JSON logs) and SYSTEMD.md (the recipe
for booting systemd as PID 1 of private namespaces; see tests/support/systemd.py).
"""

from __future__ import annotations

import hashlib
import json
import re
import select
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.cli import OCRD
from tests.support.systemd import Machine, can_boot
from tests.support.wait import wait_for

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "ocrd.service"
SYSUSERS = ROOT / "systemd" / "ocrd.sysusers.conf"
TMPFILES = ROOT / "systemd" / "ocrd.tmpfiles.conf"
ANALYZE = shutil.which("systemd-analyze")
EXPOSURE = re.compile(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)")

MODELS = "/var/lib/ocrd/models"
POLICY = "/etc/ocrd/policy.yaml"
REQUIRED = b"the english model\n"
WATCHDOG_SEC = 3
# The worker: an OCR process (same uid as ocrd, the supported setup) reading a model.
WORKER = "import sys\nf = open(sys.argv[1], 'rb')\nprint('held', flush=True)\nsys.stdin.read()\n"

needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")


# -- offline checks of the unit file ---------------------------------------------------------


def _unit_copy(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at an ocrd that exists here (verify insists)."""
    text = UNIT.read_text(encoding="utf-8")
    assert "/opt/ocrd/bin/ocrd " in text
    copy = tmp_path / "ocrd.service"
    copy.write_text(text.replace("/opt/ocrd/bin/ocrd ", f"{OCRD} "), encoding="utf-8")
    return copy


@needs_analyze
def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    """`systemd-analyze verify --man=no` has nothing to say about the unit."""
    assert ANALYZE is not None
    proc = subprocess.run(
        [ANALYZE, "verify", "--man=no", str(_unit_copy(tmp_path))],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert (proc.returncode, proc.stdout + proc.stderr) == (0, "")


@needs_analyze
def test_unit_exposure_is_below_threshold(tmp_path: Path) -> None:
    """`systemd-analyze security --offline=true --threshold=25` accepts the unit."""
    assert ANALYZE is not None
    proc = subprocess.run(
        [ANALYZE, "security", "--offline=true", "--threshold=25", str(_unit_copy(tmp_path))],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    found = EXPOSURE.search(proc.stdout)
    assert found, proc.stdout + proc.stderr
    print(f"\nocrd.service exposure: {found.group(1)} (threshold 2.5)")
    assert proc.returncode == 0, proc.stdout


# -- ocrd under a real systemd -------------------------------------------------------------


@pytest.fixture
def machine(request: pytest.FixtureRequest) -> Machine:
    """A booted systemd with ocrd, its unit, sysusers/tmpfiles configs and a 3 s watchdog."""
    reason = can_boot()
    if reason is not None:
        pytest.skip(f"cannot boot a real systemd here: {reason}")
    venv: Path = request.getfixturevalue("ocrd_venv")
    m = Machine()
    request.addfinalizer(m.stop)
    m.add_venv(venv, "/opt/ocrd")
    m.add_file("/etc/systemd/system/ocrd.service", UNIT.read_bytes())
    m.add_file(
        "/etc/systemd/system/ocrd.service.d/e2e.conf", f"[Service]\nWatchdogSec={WATCHDOG_SEC}s\n"
    )
    m.add_file("/usr/lib/sysusers.d/ocrd.conf", SYSUSERS.read_bytes())
    m.add_file("/usr/lib/tmpfiles.d/ocrd.conf", TMPFILES.read_bytes())
    m.boot()
    return m


def _policy(prefixes: list[str]) -> str:
    return yaml.safe_dump(
        {
            "model_dir": MODELS,
            "required": [{"name": "en_ocr_v1.bin", "sha256": hashlib.sha256(REQUIRED).hexdigest()}],
            "prune": {"prefixes": prefixes, "min_age": "0s", "max_fraction": 1},
            "engine": {"backend": "none"},
            "reconcile": {"debounce": "200ms"},
        },
        sort_keys=False,
    )


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _events(m: Machine) -> list[dict[str, Any]]:
    """ocrd's own JSON log lines, from the MESSAGE field of `journalctl -u ocrd -o json`."""
    found = []
    for entry in m.journal_json("ocrd"):
        message = entry.get("MESSAGE")
        if isinstance(message, list):  # journald's form for non-UTF-8 data
            message = bytes(message).decode("utf-8", "replace")
        text = str(message)
        if entry.get("_SYSTEMD_UNIT") == "ocrd.service" and text.startswith("{"):
            found.append(json.loads(text))
    return found


def _event(m: Machine, name: str, **fields: Any) -> Callable[[], dict[str, Any] | None]:
    """A probe: the first `name` event whose fields include *fields*, or None."""

    def probe() -> dict[str, Any] | None:
        for event in _events(m):
            if event.get("event") == name and all(event.get(k) == v for k, v in fields.items()):
                return event
        return None

    return probe


def _exists(m: Machine, name: str) -> bool:
    return m.host_path(f"{MODELS}/{name}").exists()


def _ok(m: Machine, proc: subprocess.CompletedProcess[str]) -> str:
    """*proc*'s stdout; on a non-zero exit, fail with its output and ocrd's journal."""
    if proc.returncode != 0:
        journal = m.journal("-u", "ocrd", "-n", "40", "-o", "cat").stdout
        raise AssertionError(
            f"{' '.join(proc.args[len(m.command()) :])}: exit {proc.returncode}\n"
            f"{proc.stdout}{proc.stderr}\n-- journalctl -u ocrd --\n{journal}"
        )
    return proc.stdout


@pytest.mark.root
@pytest.mark.timeout(300)
def test_ocrd_under_real_systemd(machine: Machine) -> None:
    """Start, prune, busy worker, reload, rejected reload, watchdog, journal and stop all work."""
    m = machine
    started = time.monotonic()

    # Install: the user and the dirs, as the README says.
    _ok(m, m.run("systemd-sysusers", "/usr/lib/sysusers.d/ocrd.conf"))
    _ok(m, m.run("systemd-tmpfiles", "--create", "/usr/lib/tmpfiles.d/ocrd.conf"))
    assert _ok(m, m.run("getent", "passwd", "ocrd")).startswith("ocrd:")
    policy1 = _policy(["old_"])
    m.write_file(POLICY, policy1)
    m.write_file(f"{MODELS}/en_ocr_v1.bin", REQUIRED)
    m.write_file(f"{MODELS}/old_en_ocr_v0.bin", b"an old model\n")
    m.write_file(f"{MODELS}/notes.txt", b"unmanaged: reported, not pruned\n")

    # Type=notify: `systemctl start` returns after READY=1, which follows the first cycle.
    _ok(m, m.systemctl("start", "ocrd"))
    show = m.show("ocrd", "ActiveState", "SubState", "MainPID", "StatusText", "NRestarts")
    assert (show["ActiveState"], show["SubState"]) == ("active", "running"), show
    assert show["StatusText"].startswith("models="), show
    pid = show["MainPID"]
    assert _ok(m, m.run("ps", "-o", "user=", "-p", pid)).strip() == "ocrd"
    assert not _exists(m, "old_en_ocr_v0.bin"), "the first cycle ran before READY=1"
    assert _exists(m, "en_ocr_v1.bin")
    assert _exists(m, "notes.txt")
    pruned = wait_for(_event(m, "model.pruned", model="old_en_ocr_v0.bin"), what="model.pruned")
    assert pruned["dest"].startswith(".ocrd-trash/")
    assert m.host_mounts() == [], "a mount of the machine leaked into the host"

    # A file event wakes the daemon: a new prunable model goes after the debounce.
    m.write_file(f"{MODELS}/old_tmp.bin", b"x")
    wait_for(lambda: not _exists(m, "old_tmp.bin"), what="old_tmp.bin pruned")

    # A worker (user ocrd, like the unit) holds a model open: it stays, reported busy.
    m.write_file(f"{MODELS}/inuse.bin", b"a model in use\n")
    worker = m.spawn(
        "setpriv",
        "--reuid=ocrd",
        "--regid=ocrd",
        "--init-groups",
        "/opt/ocrd/bin/python",
        "-c",
        WORKER,
        f"{MODELS}/inuse.bin",
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert worker.stdin is not None and worker.stdout is not None
        ready, _, _ = select.select([worker.stdout], [], [], 20)
        assert ready and worker.stdout.readline() == "held\n", worker.poll()
        m.host_path(f"{MODELS}/inuse.bin").rename(m.host_path(f"{MODELS}/old_inuse.bin"))
        busy = wait_for(_event(m, "model.busy", model="old_inuse.bin"), what="model.busy")
        assert busy["pids"] and "python" in busy["holders"], busy
        assert _exists(m, "old_inuse.bin")
        wait_for(
            lambda: "busy=1" in m.show("ocrd", "StatusText")["StatusText"], what="busy=1 status"
        )
        status = json.loads(
            _ok(m, m.run("/opt/ocrd/bin/ocrd", "--config", POLICY, "status", "--json"))
        )
        assert status["running"] is True
        assert [b["model"] for b in status["busy"]] == ["old_inuse.bin"], status
        assert _exists(m, "old_inuse.bin")
    finally:
        worker.communicate(timeout=20)  # closes stdin: the worker reads it to its end, exits
    released = time.time()
    wait_for(lambda: not _exists(m, "old_inuse.bin"), timeout=30, what="old_inuse.bin pruned")
    late = _event(m, "model.pruned", model="old_inuse.bin")()
    assert late is not None and late["timestamp"] >= time.strftime(
        "%Y-%m-%dT%H:%M:%S", time.gmtime(released - 1)
    ), late

    # `systemctl reload` (SIGHUP) with an edited policy: a forced reload of the new digest.
    policy2 = _policy(["old_", "tmp_"])
    m.write_file(POLICY, policy2)
    _ok(m, m.systemctl("reload", "ocrd"))
    wait_for(
        _event(m, "policy.reloaded", digest=_digest(policy2), forced=True), what="SIGHUP reload"
    )
    m.write_file(f"{MODELS}/tmp_download.bin", b"x")
    wait_for(lambda: not _exists(m, "tmp_download.bin"), what="the new prefix to apply")
    assert m.show("ocrd", "MainPID")["MainPID"] == pid

    # A broken policy is rejected; the service stays up with the previous one.
    m.write_file(POLICY, policy2.replace("max_fraction: 1", "max_fraction: 7"))
    _ok(m, m.systemctl("reload", "ocrd"))
    rejected = wait_for(_event(m, "policy.rejected"), what="policy.rejected")
    assert rejected["kept"] == _digest(policy2), rejected
    assert any("max_fraction" in e for e in rejected["errors"]), rejected
    wait_for(
        lambda: "rejected" in m.show("ocrd", "StatusText")["StatusText"], what="degraded status"
    )
    show = m.show("ocrd", "ActiveState", "MainPID")
    assert show == {"ActiveState": "active", "MainPID": pid}, show
    m.write_file(f"{MODELS}/tmp_second.bin", b"x")
    wait_for(lambda: not _exists(m, "tmp_second.bin"), what="the kept policy to apply")
    m.write_file(POLICY, policy2)
    wait_for(_event(m, "policy.restored", digest=_digest(policy2)), what="policy.restored")

    # The journal carries ocrd's JSON lines in MESSAGE.
    events = _events(m)
    assert all({"timestamp", "level", "event"} <= set(e) for e in events), events
    first = events[0]
    assert (first["event"], first["level"], first["pid"]) == ("daemon.started", "info", int(pid))

    # The watchdog (3 s here) was fed all along; a stopped daemon is aborted and restarted.
    assert m.show("ocrd", "NRestarts")["NRestarts"] == "0"
    _ok(m, m.run("kill", "-STOP", pid))

    def restarted() -> dict[str, str] | None:
        now = m.show("ocrd", "ActiveState", "MainPID", "NRestarts")
        fresh = now["MainPID"] not in ("0", pid) and now["ActiveState"] == "active"
        return now if fresh and now["NRestarts"] == "1" else None

    wait_for(restarted, timeout=40, what="the watchdog restart")
    messages = [str(e.get("MESSAGE")) for e in m.journal_json("ocrd")]
    assert any("Watchdog timeout" in text for text in messages), messages[-20:]
    new_pid = m.show("ocrd", "MainPID")["MainPID"]
    assert _exists(m, "en_ocr_v1.bin")

    # `systemctl stop`: SIGTERM, STOPPING=1, exit 0.
    _ok(m, m.systemctl("stop", "ocrd"))
    show = m.show("ocrd", "ActiveState", "Result", "ExecMainStatus", "MainPID")
    assert show == {
        "ActiveState": "inactive",
        "Result": "success",
        "ExecMainStatus": "0",
        "MainPID": "0",
    }, show
    assert _event(m, "daemon.stopped", pid=int(new_pid))()

    m.stop()
    assert m.leftovers() == []
    print(f"\nreal-systemd test: {time.monotonic() - started:.1f}s after boot")
