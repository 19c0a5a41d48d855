"""A real systemd as PID 1 of private namespaces, for end-to-end tests of ocrd.service.

Written from the recipe in SYSTEMD.md (measured on Debian 12, systemd 252, root, PID 1 not
systemd). One `Machine`:

1. makes a cgroup2 directory for itself (`/sys/fs/cgroup/unified/NAME` on a cgroup v1 host
   with a cgroup2 at `unified`, `/sys/fs/cgroup/NAME` where /sys/fs/cgroup is cgroup2);
2. starts, from a shell that first moves itself into that cgroup,
   `unshare --mount --pid --fork --net --uts --ipc --cgroup --propagation private INNER`;
3. INNER (a shell script written into the work dir, PID 1 of the new namespaces) mounts a
   tmpfs and an overlay with `lowerdir=/` on it, so the host's files are visible but never
   modified; a fresh proc (with /proc/sys read-only), sysfs read-only (udev and sysctl units
   then skip themselves), cgroup2 at /sys/fs/cgroup, a minimal /dev, tmpfs /run and /tmp;
   copies the staged files in; empties /etc/machine-id; pivot_roots; and execs
   `env -i container=NAME /lib/systemd/systemd --system --unit=TARGET`, TARGET being a small
   target that starts only journald;
4. is driven from outside with `nsenter -t PID1 -m -p -u -i -n -C` (`run`, `systemctl`,
   `journal`), and writes files through `/proc/PID1/root` (`write_file`);
5. is stopped with SIGRTMIN+4 to PID 1 (power off), SIGKILL as a fallback; then the cgroup
   directories are removed depth-first and the work dir is deleted (`stop`, idempotent).

All mounts live in the private mount namespace, which dies with its last process: the host
sees no new mount at any time.

The Python interpreter. A venv is only a thin layer over a base interpreter, and the unit
has `ProtectHome=yes`, which hides /root and /home (pyenv's Pythons live in /root/.pyenv on
this machine), plus `PrivateTmp=yes` (hides /tmp and /var/tmp). pyenv's interpreter also
links libpython through an absolute RUNPATH into /root/.pyenv, so copying it elsewhere
would need LD_LIBRARY_PATH in the unit. The choice made here: build the test venv from a
base interpreter that lives outside the hidden trees (`find_base_python`: the running
interpreter's base if it qualifies, else the distribution's /usr/bin/python3), which the
overlay of / makes visible, read-only, at its own path. The venv itself is copied to
/opt/ocrd inside the overlay (`add_venv`), its script shebangs rewritten to the new place.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

SYSTEMD = Path("/lib/systemd/systemd")
TOOLS = ("unshare", "nsenter", "mount", "umount", "pivot_root", "mknod", "cp", "env", "sh")
HIDDEN = ("/root", "/home", "/tmp", "/var/tmp", "/run")  # ProtectHome=, PrivateTmp=, tmpfs /run
CAP_SYS_ADMIN = 21
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
TARGET = "ocrd-e2e.target"
TARGET_UNIT = """\
[Unit]
Description=ocrd end-to-end test boot: journald only
Requires=systemd-journald.socket
Wants=systemd-journald.service
After=systemd-journald.socket systemd-journald.service
AllowIsolate=yes
"""

INNER = r"""#!/bin/sh
# PID 1 of the test's namespaces until it execs systemd. Arguments: WORK NAME TARGET.
set -eu
W=$1
NAME=$2
TARGET=$3
L=$W/layers
R=$W/root

# The host's / as the read-only lower layer; every write lands in a tmpfs.
mount -t tmpfs -o mode=0755 "$NAME" "$L"
mkdir "$L/upper" "$L/work"
mount -t overlay -o "lowerdir=/,upperdir=$L/upper,workdir=$L/work" "$NAME" "$R"

# API filesystems of the new namespaces.
mount -t proc -o nosuid,nodev,noexec proc "$R/proc"
mount --bind "$R/proc/sys" "$R/proc/sys"
mount -o remount,bind,ro,nosuid,nodev,noexec "$R/proc/sys"
mount -t sysfs -o ro,nosuid,nodev,noexec sysfs "$R/sys"
mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 "$R/sys/fs/cgroup"

# A minimal /dev.
mount -t tmpfs -o mode=0755,nosuid,size=1m dev "$R/dev"
for spec in "null 1 3" "zero 1 5" "full 1 7" "random 1 8" "urandom 1 9" "tty 5 0"; do
    set -- $spec
    mknod -m 0666 "$R/dev/$1" c "$2" "$3"
done
mkdir -m 0755 "$R/dev/pts"
mkdir -m 1777 "$R/dev/shm"
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620 devpts "$R/dev/pts"
mount -t tmpfs -o mode=1777,nosuid,nodev shm "$R/dev/shm"
ln -s pts/ptmx "$R/dev/ptmx"
ln -s /proc/self/fd "$R/dev/fd"
ln -s /proc/self/fd/0 "$R/dev/stdin"
ln -s /proc/self/fd/1 "$R/dev/stdout"
ln -s /proc/self/fd/2 "$R/dev/stderr"

mount -t tmpfs -o mode=0755,nosuid,nodev run "$R/run"
mount -t tmpfs -o mode=1777,nosuid,nodev tmp "$R/tmp"

# The test's files, and a fresh identity (systemd makes up a transient machine id).
cp -a "$W/stage/." "$R/"
: > "$R/etc/machine-id"
hostname "$NAME"

cd "$R"
mkdir -p .oldroot
pivot_root . .oldroot
umount -l /.oldroot
rmdir /.oldroot
exec /usr/bin/env -i "container=$NAME" /lib/systemd/systemd --system "--unit=$TARGET"
"""


class BootError(RuntimeError):
    """systemd did not come up; the message carries its console output."""


def _tool(name: str) -> str:
    found = shutil.which(name, path=PATH)
    if found is None:
        raise FileNotFoundError(name)
    return found


def _cgroup2_mounts() -> list[str]:
    """Mount points of cgroup2 filesystems in this mount namespace."""
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8") as fh:
        for line in fh:
            fields = line.split()
            sep = fields.index("-")
            if fields[sep + 1] == "cgroup2":
                found.append(fields[4])
    return found


def cgroup2_root() -> Path | None:
    """Where to make the test's cgroup: /sys/fs/cgroup if cgroup2, else its `unified` child."""
    mounts = _cgroup2_mounts()
    for candidate in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified"):
        if candidate in mounts:
            return Path(candidate)
    return None


def _has_cap(bit: int) -> bool:
    with open("/proc/self/status", encoding="utf-8") as fh:
        for line in fh:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> bit & 1)
    return False


def can_boot() -> str | None:
    """Why a real systemd cannot be booted here, or None when it can."""
    if os.geteuid() != 0:
        return "needs root"
    if not _has_cap(CAP_SYS_ADMIN):
        return "needs CAP_SYS_ADMIN"
    with open("/proc/filesystems", encoding="utf-8") as fh:
        filesystems = {line.split()[-1] for line in fh if line.strip()}
    for fs in ("overlay", "cgroup2", "tmpfs"):
        if fs not in filesystems:
            return f"the kernel has no {fs} filesystem"
    if cgroup2_root() is None:
        return "no cgroup2 mounted at /sys/fs/cgroup or /sys/fs/cgroup/unified"
    if not os.access(SYSTEMD, os.X_OK):
        return f"{SYSTEMD} is not installed"
    for tool in TOOLS:
        if shutil.which(tool, path=PATH) is None:
            return f"{tool} is not installed"
    return None


def find_base_python(min_version: tuple[int, int] = (3, 10)) -> str | None:
    """A base interpreter (with venv and ensurepip) that ProtectHome=/PrivateTmp= leave visible.

    Tried in order: the running interpreter's base, /usr/bin/python3, /usr/local/bin/python3.
    """
    base = getattr(sys, "_base_executable", None)
    candidates = [c for c in (base, "/usr/bin/python3", "/usr/local/bin/python3") if c]
    probe = (
        "import sys, venv, ensurepip; "
        f"sys.exit(0 if sys.version_info[:2] >= {min_version!r} else 1)"
    )
    for candidate in candidates:
        real = os.path.realpath(candidate)
        if any(real == h or real.startswith(h + "/") for h in HIDDEN):
            continue
        if not os.access(real, os.X_OK):
            continue
        ok = subprocess.run([real, "-c", probe], capture_output=True, check=False, timeout=60)
        if ok.returncode == 0:
            return real
    return None


def build_venv(dest: Path, python: str, packages: Sequence[str], *, timeout: float = 600) -> Path:
    """`python -m venv dest` and a non-editable `pip install` of *packages* into it."""
    steps = [
        [python, "-m", "venv", str(dest)],
        [
            str(dest / "bin" / "python"),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-input",
            *packages,
        ],
    ]
    for argv in steps:
        proc = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stderr}")
    return dest


class Machine:
    """One booted systemd in private namespaces over an overlay of the host's /."""

    def __init__(self, name: str | None = None, *, parent: str | None = None) -> None:
        self.name = name or f"ocrd-e2e-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        root = cgroup2_root()
        if root is None:
            raise RuntimeError("no cgroup2 hierarchy")
        self.cgroup = root / self.name
        self.work = Path(tempfile.mkdtemp(prefix=f"{self.name}-", dir=parent))
        self.stage = self.work / "stage"
        self.console = self.work / "console.log"
        for sub in ("stage", "layers", "root"):
            (self.work / sub).mkdir(mode=0o755)
        self.pid1: int | None = None
        self._launcher: subprocess.Popen[bytes] | None = None
        self._stopped = False
        self.add_file(f"/etc/systemd/system/{TARGET}", TARGET_UNIT)

    # -- before boot: what to copy in -------------------------------------------------

    def _staged(self, path: str) -> Path:
        if not path.startswith("/"):
            raise ValueError(f"{path!r}: paths inside the machine are absolute")
        dest = self.stage / path.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        # `cp -a` copies these directories' modes onto /etc, /opt, ...: never the umask's.
        for parent in [dest.parent, *dest.parent.parents]:
            parent.chmod(0o755)
            if parent == self.stage:
                break
        return dest

    def add_file(self, path: str, data: str | bytes, mode: int = 0o644) -> None:
        """Copy *data* in at *path* (owned by root) when the machine boots."""
        dest = self._staged(path)
        dest.write_bytes(data.encode() if isinstance(data, str) else data)
        dest.chmod(mode)

    def add_venv(self, venv: Path, path: str = "/opt/ocrd") -> None:
        """Copy a venv in at *path*, pointing its scripts' shebangs at the new place."""
        dest = self._staged(path)
        shutil.copytree(venv, dest, symlinks=True)
        old = f"#!{venv}/bin/".encode()
        new = f"#!{path}/bin/".encode()
        for script in (dest / "bin").iterdir():
            if script.is_symlink() or not script.is_file():
                continue
            data = script.read_bytes()
            if data.startswith(old):
                script.write_bytes(new + data[len(old) :])

    # -- boot ---------------------------------------------------------------------------

    def boot(self, timeout: float = 30.0) -> None:
        """Start systemd and wait until it has finished starting its target."""
        if self._launcher is not None:
            raise RuntimeError("already booted")
        inner = self.work / "inner.sh"
        inner.write_text(INNER, encoding="utf-8")
        inner.chmod(0o755)
        self.cgroup.mkdir()
        unshare = [
            _tool("unshare"),
            "--mount",
            "--pid",
            "--fork",
            "--net",
            "--uts",
            "--ipc",
            "--cgroup",
            "--propagation",
            "private",
            str(inner),
            str(self.work),
            self.name,
            TARGET,
        ]
        # The shell moves itself into the test's cgroup, then becomes unshare: the
        # namespaces' PID 1 is born there, and its cgroup namespace is rooted there.
        script = 'echo $$ > "$1" && shift && exec "$@"'
        with open(self.console, "wb") as console:
            self._launcher = subprocess.Popen(
                [_tool("sh"), "-c", script, "sh", str(self.cgroup / "cgroup.procs"), *unshare],
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.pid1 = self._wait(self._find_pid1, timeout, "PID 1 of the new namespaces")
        state = self._wait(self._booted, timeout, "systemd to finish booting")
        if state not in ("running", "degraded"):
            raise BootError(f"systemd is {state!r}:\n{self.console_text()}")

    def _find_pid1(self) -> int | None:
        launcher = self._launcher
        assert launcher is not None
        try:
            children = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text()
        except OSError:  # no CONFIG_PROC_CHILDREN: look for unshare's child by its ppid
            children = ""
            for stat in Path("/proc").glob("[0-9]*/stat"):
                with contextlib.suppress(OSError):
                    if int(stat.read_text().rpartition(")")[2].split()[1]) == launcher.pid:
                        children = stat.parent.name
        for pid in children.split():
            return int(pid)
        return None

    def _booted(self) -> str | None:
        proc = self.systemctl("is-system-running", timeout=10)
        state = proc.stdout.strip()
        return state if state in ("running", "degraded", "maintenance", "stopping") else None

    def _wait(self, probe: Callable[[], Any], timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = probe()
            if value:
                return value
            launcher = self._launcher
            if launcher is not None and launcher.poll() is not None:
                raise BootError(
                    f"the namespaces ended (exit {launcher.returncode}) while waiting for "
                    f"{what}:\n{self.console_text()}"
                )
            if time.monotonic() > deadline:
                raise BootError(
                    f"timed out after {timeout}s waiting for {what}:\n{self.console_text()}"
                )
            time.sleep(0.05)

    def console_text(self) -> str:
        """What INNER and systemd wrote to their stdout and stderr."""
        try:
            return self.console.read_text(encoding="utf-8", errors="replace")[-20000:]
        except OSError:
            return "(no console log)"

    # -- driving it -----------------------------------------------------------------------

    def command(self, *cmd: str, env: Mapping[str, str] | None = None) -> list[str]:
        """The host argv that runs *cmd* inside, with a clean environment."""
        if self.pid1 is None:
            raise RuntimeError("not booted")
        variables = {"PATH": PATH, "LANG": "C.UTF-8", "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": ""}
        variables.update(env or {})
        return [
            _tool("nsenter"),
            "-t",
            str(self.pid1),
            "-m",
            "-p",
            "-u",
            "-i",
            "-n",
            "-C",
            "--root",
            "--wd",
            "/usr/bin/env",
            "-i",
            *(f"{k}={v}" for k, v in variables.items()),
            *cmd,
        ]

    def run(
        self,
        *cmd: str,
        input: str | None = None,
        timeout: float = 60.0,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run *cmd* inside (all namespaces of PID 1) and wait; never raises on exit codes."""
        return subprocess.run(
            self.command(*cmd, env=env),
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def spawn(self, *cmd: str, **popen: Any) -> subprocess.Popen[str]:
        """Start *cmd* inside without waiting (text pipes as asked for in *popen*)."""
        return subprocess.Popen(self.command(*cmd), text=True, **popen)

    def systemctl(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """`systemctl ARGS` inside."""
        return self.run("systemctl", "--no-pager", *args, timeout=timeout)

    def journal(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """`journalctl ARGS` inside."""
        return self.run("journalctl", "--no-pager", *args, timeout=timeout)

    def journal_json(self, unit: str) -> list[dict[str, Any]]:
        """The unit's journal entries (`journalctl -u UNIT -o json`), oldest first."""
        out = self.journal("-u", unit, "-o", "json").stdout
        return [json.loads(line) for line in out.splitlines() if line.startswith("{")]

    def show(self, unit: str, *props: str) -> dict[str, str]:
        """`systemctl show -p P1,P2 UNIT` as a dict."""
        out = self.systemctl("show", "-p", ",".join(props), unit).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def host_path(self, path: str) -> Path:
        """Where *path* inside is reachable from the host (through /proc/PID1/root).

        Absolute symlinks met on the way resolve against the host's root: use real paths.
        """
        if self.pid1 is None:
            raise RuntimeError("not booted")
        return Path(f"/proc/{self.pid1}/root") / path.lstrip("/")

    def write_file(self, path: str, data: str | bytes, mode: int = 0o644) -> None:
        """Replace *path* inside atomically (temp file + rename, like an editor), as root."""
        dest = self.host_path(path)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.tmp")
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
        tmp.chmod(mode)
        tmp.rename(dest)

    def host_mounts(self) -> list[str]:
        """Lines of the host's /proc/self/mountinfo that belong to this machine (none, ever)."""
        with open("/proc/self/mountinfo", encoding="utf-8") as fh:
            return [line for line in fh if self.name in line or str(self.work) in line]

    def leftovers(self) -> list[str]:
        """What this machine left on the host: mounts, its cgroup, its work dir."""
        found = [f"mount: {line.strip()}" for line in self.host_mounts()]
        if self.cgroup.exists():
            found.append(f"cgroup: {self.cgroup}")
        if self.work.exists():
            found.append(f"work dir: {self.work}")
        return found

    # -- teardown ----------------------------------------------------------------------------

    def stop(self, timeout: float = 20.0) -> None:
        """Power off (SIGRTMIN+4), SIGKILL if that hangs, remove cgroups and the work dir.

        Safe to call twice, and after a failed boot.
        """
        if self._stopped:
            return
        self._stopped = True
        launcher = self._launcher
        if self.pid1 is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid1, signal.SIGRTMIN + 4)
        if launcher is not None:
            try:
                launcher.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                # SIGKILL to PID 1 kills every process of its PID namespace.
                for pid in (self.pid1, launcher.pid):
                    if pid is not None:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
                launcher.wait(timeout=timeout)
        self._remove_cgroup(timeout)
        shutil.rmtree(self.work, ignore_errors=True)

    def _remove_cgroup(self, timeout: float) -> None:
        if not self.cgroup.exists():
            return
        deadline = time.monotonic() + timeout
        while True:
            try:
                for dirpath, _dirs, _files in os.walk(self.cgroup, topdown=False):
                    with contextlib.suppress(FileNotFoundError):
                        os.rmdir(dirpath)
                return
            except OSError:  # EBUSY: a process is still in there
                if time.monotonic() > deadline:
                    raise
                kill = self.cgroup / "cgroup.kill"
                if kill.exists():
                    with contextlib.suppress(OSError):
                        kill.write_text("1")
                time.sleep(0.05)
