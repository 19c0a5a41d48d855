"""http(s):// sources under a real systemd 252: the shipped unit's sandbox, and the drop-in.

README "Sources on the network": the shipped unit has no network (`PrivateNetwork=yes`,
`IPAddressDeny=any`, `RestrictAddressFamilies=AF_UNIX`), a download under it fails with
an error that says so and names the drop-in `systemd/ocrd-network.conf`, and with the
drop-in installed the mirrors it allows are reachable. Everything here is real: systemd
boots as PID 1 of private namespaces (tests/support/systemd.py, SYSTEMD.md), ocrd is
installed into it the way "Running as a service" says, and the mirror is a real HTTP
server (tests/support/http.py).

Network namespaces. The booted systemd has a network namespace of its own (`unshare
--net`), with only a loopback device, which systemd brings up. The unit's service gets
yet another one under `PrivateNetwork=yes`, and shares systemd's once the drop-in sets
`PrivateNetwork=no`. So the mirror listens on 127.0.0.1 *in systemd's namespace*: the
`ModelServer` is made in a thread that has first entered that namespace (setns(2) on
/proc/PID1/ns/net; a socket stays in the namespace it was made in, whatever thread
then serves it), and the test checks, from inside, that the mirror answers there. When
the unit's download then fails, nothing but the unit's sandbox is in its way.

IPAddressDeny= (case 3). systemd's address filter is a cgroup BPF program on the
packets, not on connect(): measured here (kernel 6.18, systemd 252), a UDP send to a
denied address fails at once with EPERM, but a TCP connect() is not refused: its SYN is
dropped and connect() waits until its timeout. The probe that decides whether the filter
is in force at all uses UDP for that reason.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import random
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.http import ModelServer
from tests.support.policy import policy_data
from tests.support.systemd import Machine, can_boot
from tests.support.wait import wait_for

ROOT = Path(__file__).resolve().parents[2]
SYSTEMD_DIR = ROOT / "systemd"
SHIPPED = ("ocrd.service", "ocrd-network.conf", "ocrd.sysusers.conf", "ocrd.tmpfiles.conf")
SRC = "/opt/ocrd-src"  # the clone's files inside the machine, for the README's `install`s
MODELS = "/var/lib/ocrd/models"
POLICY = "/etc/ocrd/policy.yaml"
DROPIN = "/etc/systemd/system/ocrd.service.d/network.conf"
OCRD = "/opt/ocrd/bin/ocrd"
PYTHON = "/opt/ocrd/bin/python"
MODEL = "m.bin"
URL_PATH = "/m.bin"
BODY = random.Random(20).randbytes(256 * 1024 + 17)
SHA256 = hashlib.sha256(BODY).hexdigest()
HINT = "ocrd-network.conf"
README_SECTION = "Sources on the network"
TIMEOUT = 30.0
CLONE_NEWNET = 0x40000000

# From inside systemd's namespaces: the mirror answers there (the sha256 of what it sent).
FETCH = (
    "import hashlib, sys, urllib.request\n"
    "with urllib.request.urlopen(sys.argv[1], timeout=10) as r:\n"
    "    print(hashlib.sha256(r.read()).hexdigest())\n"
)
# Is IPAddressDeny= (systemd's cgroup BPF filter) in force? A UDP datagram to a denied
# address fails at once with EPERM under it (a TCP SYN is only dropped: connect() waits).
FILTER_PROBE = "/opt/ocrd-src/filter_probe.py"
FILTER_PROBE_CODE = """\
import errno, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect(("127.0.0.1", 9))
try:
    s.send(b"x")
except OSError as e:
    sys.exit(0 if e.errno == errno.EPERM else 4)
sys.exit(3)
"""
FILTER_PROBE_UNIT = f"""\
[Unit]
Description=ocrd e2e: does IPAddressDeny= filter here?

[Service]
Type=oneshot
IPAddressDeny=any
ExecStart={PYTHON} {FILTER_PROBE}
"""


# -- the machine ------------------------------------------------------------------------------


@pytest.fixture
def machine(request: pytest.FixtureRequest) -> Machine:
    """A booted systemd with ocrd in /opt/ocrd and the clone's systemd/ files in SRC.

    Nothing is installed yet: `_install` does what the README's steps do.
    """
    reason = can_boot()
    if reason is not None:
        pytest.skip(f"cannot boot a real systemd here: {reason}")
    venv: Path = request.getfixturevalue("ocrd_venv")
    m = Machine()
    request.addfinalizer(m.stop)
    m.add_venv(venv, "/opt/ocrd")
    for name in SHIPPED:
        m.add_file(f"{SRC}/systemd/{name}", (SYSTEMD_DIR / name).read_bytes())
    m.boot()
    return m


def _in_netns(pid: int, make: Callable[[], Any]) -> Any:
    """`make()` called in a thread that has entered the network namespace of *pid*.

    Only that thread (and the threads it starts) changes namespace; the sockets *make*
    opens stay in that namespace for good.
    """
    if os.readlink(f"/proc/{pid}/ns/net") == os.readlink("/proc/self/ns/net"):
        return make()
    libc = ctypes.CDLL(None, use_errno=True)
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    code = ctypes.get_errno()
                    raise OSError(code, f"setns(net of {pid}): {os.strerror(code)}")
            finally:
                os.close(fd)
            result["value"] = make()
        except BaseException as exc:
            result["error"] = exc

    thread = threading.Thread(target=run, name=f"netns-{pid}")
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["value"]


@contextlib.contextmanager
def _mirror(m: Machine) -> Iterator[ModelServer]:
    """A ModelServer on 127.0.0.1 of systemd's network namespace, serving BODY at URL_PATH,
    checked from inside that namespace to answer (that GET is forgotten)."""
    assert m.pid1 is not None
    server: ModelServer = _in_netns(m.pid1, ModelServer)
    try:
        server.serve(URL_PATH, BODY)
        seen = m.run(PYTHON, "-c", FETCH, server.url(URL_PATH), timeout=30)
        assert (seen.returncode, seen.stdout.strip()) == (0, SHA256), (
            f"the mirror does not answer inside the machine: {seen.stdout}{seen.stderr}"
        )
        server.seen.clear()
        yield server
    finally:
        server.close()


# -- driving it ---------------------------------------------------------------------------------


def _ok(m: Machine, *cmd: str) -> str:
    """Run *cmd* inside; its stdout, or fail with its output and ocrd's journal."""
    proc = m.run(*cmd)
    if proc.returncode != 0:
        journal = m.journal("-u", "ocrd", "-n", "40", "-o", "cat").stdout
        raise AssertionError(
            f"{' '.join(cmd)}: exit {proc.returncode}\n{proc.stdout}{proc.stderr}\n"
            f"-- journalctl -u ocrd --\n{journal}"
        )
    return proc.stdout


def _policy(url: str, **download: Any) -> str:
    data = policy_data(
        Path(MODELS),
        required=[{"name": MODEL, "sha256": SHA256, "source": url}],
        download={"retries": 0, "connect_timeout": "2s", "read_timeout": "10s", **download},
    )
    return yaml.safe_dump(data, sort_keys=False)


def _install(m: Machine, policy: str) -> None:
    """README "Running as a service", steps 2-4: user, dirs, policy, unit; enable --now."""
    sysd = f"{SRC}/systemd"
    _ok(m, "install", "-m", "0644", f"{sysd}/ocrd.sysusers.conf", "/usr/lib/sysusers.d/ocrd.conf")
    _ok(m, "systemd-sysusers", "ocrd.conf")
    _ok(m, "install", "-m", "0644", f"{sysd}/ocrd.tmpfiles.conf", "/usr/lib/tmpfiles.d/ocrd.conf")
    _ok(m, "systemd-tmpfiles", "--create", "ocrd.conf")
    m.write_file(f"{SRC}/policy.yaml", policy)
    _ok(m, "install", "-m", "0640", "-g", "ocrd", f"{SRC}/policy.yaml", POLICY)
    _ok(m, "install", "-m", "0644", f"{sysd}/ocrd.service", "/etc/systemd/system/ocrd.service")
    _ok(m, "systemctl", "daemon-reload")
    _ok(m, "systemctl", "enable", "--now", "ocrd")


def _install_dropin(m: Machine, edit: Callable[[str], str] | None = None) -> None:
    """README "Sources on the network": install the drop-in, edit it (as sudoedit does:
    a new file renamed over the old), daemon-reload."""
    _ok(m, "install", "-D", "-m", "0644", f"{SRC}/systemd/ocrd-network.conf", DROPIN)
    if edit is not None:
        text = m.host_path(DROPIN).read_text(encoding="utf-8")
        m.write_file(DROPIN, edit(text))
    _ok(m, "systemctl", "daemon-reload")


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


def _wait_event(m: Machine, name: str, *, after: int = 0, **fields: Any) -> dict[str, Any]:
    """The first `name` event (past the first *after* events) whose fields include *fields*."""

    def probe() -> dict[str, Any] | None:
        for event in _events(m)[after:]:
            if event.get("event") == name and all(event.get(k) == v for k, v in fields.items()):
                return event
        return None

    try:
        found: dict[str, Any] = wait_for(probe, timeout=TIMEOUT, what=f"{name} {fields}")
    except AssertionError as exc:
        journal = m.journal("-u", "ocrd", "-n", "60", "-o", "cat").stdout
        raise AssertionError(f"{exc}\n-- journalctl -u ocrd --\n{journal}") from None
    return found


def _events_named(m: Machine, name: str) -> list[dict[str, Any]]:
    return [e for e in _events(m) if e.get("event") == name]


def _status(m: Machine) -> tuple[int, dict[str, Any]]:
    """`ocrd status --json` inside, as root (README step 5): its exit code (0 healthy,
    1 degraded, 3 not running) and its document."""
    proc = m.run(OCRD, "--config", POLICY, "status", "--json")
    try:
        doc: dict[str, Any] = json.loads(proc.stdout)
    except ValueError:
        raise AssertionError(
            f"ocrd status --json: exit {proc.returncode}\n{proc.stdout}{proc.stderr}"
        ) from None
    return proc.returncode, doc


def _status_when(m: Machine, until: Callable[[int, dict[str, Any]], bool], what: str) -> Any:
    """`_status` as soon as *until(code, doc)* holds."""

    def probe() -> tuple[int, dict[str, Any]] | None:
        code, doc = _status(m)
        return (code, doc) if until(code, doc) else None

    return wait_for(probe, timeout=TIMEOUT, what=what)


def _model_errors(doc: dict[str, Any]) -> list[str]:
    return [str(e["error"]) for e in doc.get("errors", []) if e.get("where") == MODEL]


def _gets(server: ModelServer) -> list[Any]:
    return [s for s in server.requests_for(URL_PATH) if s.method == "GET"]


def _own_tmp(m: Machine) -> list[str]:
    """ocrd's half-done work in the model dir (`.ocrd-tmp-*`: a download file, a copy)."""
    return sorted(n for n in os.listdir(m.host_path(MODELS)) if n.startswith(".ocrd-tmp"))


class NotNamed(AssertionError):
    """The error of a blocked download does not say what blocked it."""


def _assert_active(m: Machine) -> None:
    show = m.show("ocrd", "ActiveState", "SubState")
    assert (show["ActiveState"], show["SubState"]) == ("active", "running"), show


# -- 1. the shipped unit: no network, and an error that says so ---------------------------------


@pytest.mark.root
@pytest.mark.timeout(300)
def test_shipped_unit_blocks_the_download_and_the_error_names_the_dropin(
    machine: Machine,
) -> None:
    """PrivateNetwork=yes, RestrictAddressFamilies=AF_UNIX: the mirror (reachable in
    systemd's namespace) is never asked; `download.failed`, `action.failed` and the
    status's errors say the network is blocked and point at systemd/ocrd-network.conf."""
    m = machine
    with _mirror(m) as server:
        url = server.url(URL_PATH)
        _install(m, _policy(url))
        _assert_active(m)
        show = m.show("ocrd", "PrivateNetwork", "RestrictAddressFamilies", "User")
        assert show == {
            "PrivateNetwork": "yes",
            "RestrictAddressFamilies": "AF_UNIX",
            "User": "ocrd",
        }, show

        failed = _wait_event(m, "download.failed", model=MODEL)
        assert failed["source"] == url, failed
        action = _wait_event(m, "action.failed", model=MODEL)
        assert action["action"] == "restore", action
        for event in (failed, action):
            error = event["error"]
            assert HINT in error, event
            assert README_SECTION in error, event
            assert "has no network" in error, event

        code, doc = _status_when(m, lambda c, d: bool(_model_errors(d)), "status errors")
        errors = _model_errors(doc)
        assert all(HINT in e and README_SECTION in e for e in errors), doc["errors"]
        assert (code, doc["running"], doc["degraded"]) == (1, True, True), doc
        assert any(MODEL in r for r in doc["degraded_reasons"]), doc

        assert not m.host_path(f"{MODELS}/{MODEL}").exists()
        assert _own_tmp(m) == []
        assert _gets(server) == [], "the sandboxed service reached the mirror"
        assert not _events_named(m, "model.restored")
        _assert_active(m)


# -- 2. the drop-in: the same source downloads ---------------------------------------------------


@pytest.mark.root
@pytest.mark.timeout(300)
def test_with_the_dropin_the_model_is_downloaded_and_restored(machine: Machine) -> None:
    """The operator's way: the shipped unit fails, the drop-in goes in as the README says
    (IPAddressAllow=localhost covers the mirror on 127.0.0.1), daemon-reload, restart: the
    model lands, verified, from one GET of the whole body."""
    m = machine
    with _mirror(m) as server:
        url = server.url(URL_PATH)
        _install(m, _policy(url))
        _wait_event(m, "download.failed", model=MODEL)
        assert _gets(server) == []

        _install_dropin(m)
        show = m.show(
            "ocrd", "PrivateNetwork", "RestrictAddressFamilies", "IPAddressAllow", "IPAddressDeny"
        )
        assert show["PrivateNetwork"] == "no", show
        assert {"AF_UNIX", "AF_INET", "AF_INET6"} <= set(show["RestrictAddressFamilies"].split())
        assert "127.0.0.0/8" in show["IPAddressAllow"].split(), show
        assert show["IPAddressDeny"] in ("0.0.0.0/0 ::/0", "::/0 0.0.0.0/0"), show
        mark = len(_events(m))
        _ok(m, "systemctl", "restart", "ocrd")
        _assert_active(m)

        restored = _wait_event(m, "model.restored", model=MODEL, after=mark)
        assert restored["source"] == url, restored
        model = m.host_path(f"{MODELS}/{MODEL}")
        assert hashlib.sha256(model.read_bytes()).hexdigest() == SHA256
        assert _own_tmp(m) == []
        gets = _gets(server)
        assert [g.sent for g in gets] == [len(BODY)], gets
        assert not [
            e for e in _events(m)[mark:] if e.get("event") in ("download.failed", "action.failed")
        ]
        _code, doc = _status_when(
            m,
            lambda c, d: c == 0 and d["downloads"] == [] and d.get("pending") == [],
            "a healthy status after the restore",
        )
        assert _model_errors(doc) == [], doc["errors"]
        assert (doc["running"], doc["degraded"]) == (True, False), doc
        _assert_active(m)
    m.stop()
    assert m.leftovers() == []


# -- 3. the drop-in without the mirror's address: IPAddressDeny= blocks it ----------------------


def _filter_works(m: Machine) -> str | None:
    """Why IPAddressDeny= does not filter in this machine, or None when it does."""
    m.write_file(FILTER_PROBE, FILTER_PROBE_CODE)
    m.write_file("/etc/systemd/system/ocrd-e2e-filter-probe.service", FILTER_PROBE_UNIT)
    _ok(m, "systemctl", "daemon-reload")
    proc = m.systemctl("start", "ocrd-e2e-filter-probe.service")
    if proc.returncode == 0:
        return None
    status = m.show("ocrd-e2e-filter-probe.service", "ExecMainStatus")["ExecMainStatus"]
    manager = m.journal("-b", "_PID=1", "-o", "cat", "--grep", "BPF|firewall").stdout.strip()
    return (
        "cgroup BPF address filtering (IPAddressDeny=) is not in force in the booted systemd: "
        f"a UDP send to 127.0.0.1 under IPAddressDeny=any was not refused with EPERM (probe "
        f"exit {status}; systemd says: {manager or 'nothing about BPF'})"
    )


def _only_the_example_prefix(text: str) -> str:
    """The drop-in as an operator edits it for mirrors in 10.20.0.0/16 only."""
    lines = text.splitlines()
    assert "IPAddressAllow=localhost" in lines and "IPAddressAllow=10.20.0.0/16" in lines
    return "\n".join(line for line in lines if line != "IPAddressAllow=localhost") + "\n"


@pytest.mark.root
@pytest.mark.timeout(300)
def test_dropin_without_the_mirrors_address_names_the_address_filter(machine: Machine) -> None:
    """The drop-in with IPAddressAllow=10.20.0.0/16 only (localhost taken out), the mirror
    on 127.0.0.1: the network is there but IPAddressDeny=any filters the mirror's address.
    The error says the system refused the connection and points at the drop-in."""
    m = machine
    reason = _filter_works(m)
    if reason is not None:
        pytest.skip(reason)
    with _mirror(m) as server:
        url = server.url(URL_PATH)
        _install_dropin(m, _only_the_example_prefix)
        _install(m, _policy(url, connect_timeout="1s"))
        show = m.show("ocrd", "PrivateNetwork", "IPAddressAllow")
        assert show["PrivateNetwork"] == "no", show
        assert show["IPAddressAllow"].split() == ["10.20.0.0/16"], show
        _assert_active(m)

        action = _wait_event(m, "action.failed", model=MODEL)
        failed = _events_named(m, "download.failed")
        assert not m.host_path(f"{MODELS}/{MODEL}").exists()
        assert _own_tmp(m) == []
        assert _gets(server) == [], "the address filter let a request through"
        assert failed, "no download.failed before the action.failed"
        _code, doc = _status_when(m, lambda c, d: bool(_model_errors(d)), "status errors")
        errors = [e["error"] for e in [*failed, action]] + _model_errors(doc)
        unnamed = [e for e in errors if "refused by the system" not in e or HINT not in e]
        if unnamed:
            raise NotNamed(f"errors that do not name the address filter and the drop-in: {unnamed}")
