"""Child processes that hold a model open or mapped, and what /proc says about processes."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

# Children that hold every path of their argv until their stdin closes, saying "ready"
# first: by descriptor, by a mapping with no descriptor left (mapped through libc as
# llama.cpp does; Python's mmap.mmap keeps a dup of the descriptor), or both.
HOLD_FD = """
import sys
handles = [open(p, "rb") for p in sys.argv[1:]]
print("ready", flush=True)
sys.stdin.read()
"""

MAP_ONLY = """
import ctypes, mmap, os

libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [
    ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long
]


def map_only(path):
    fd = os.open(path, os.O_RDONLY)
    size = os.fstat(fd).st_size
    addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    os.close(fd)
    if addr is None or addr == ctypes.c_void_p(-1).value:
        raise OSError(ctypes.get_errno(), "mmap failed")
    return addr
"""

HOLD_MMAP = (
    MAP_ONLY
    + """
import sys
maps = [map_only(p) for p in sys.argv[1:]]
print("ready", flush=True)
sys.stdin.read()
"""
)

HOLD_BOTH = (
    MAP_ONLY
    + """
import sys
path = sys.argv[1]
first, second = open(path, "rb"), open(path, "rb")
mapped = map_only(path)
print("ready", flush=True)
sys.stdin.read()
"""
)


@contextlib.contextmanager
def holder(tmp_path: Path, comm: str, script: str, *paths: Path) -> Iterator[subprocess.Popen[str]]:
    """A child process named *comm* running *script* on *paths*, ready when it says so.

    It is killed when the block ends (or ends by itself when the test closes its stdin).
    """
    exe = tmp_path / comm
    if not exe.exists():
        exe.symlink_to(sys.executable)  # the kernel names the process after this link
    proc = subprocess.Popen(
        [str(exe), "-c", script, *map(str, paths)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == "ready", f"child {comm} did not get ready: {line!r}"
        yield proc
    finally:
        proc.kill()
        proc.wait()
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                pipe.close()


def host_environ(pid: int) -> dict[str, str]:
    """The environment the kernel recorded for *pid* at exec."""
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    pairs = (item.decode().partition("=") for item in raw.split(b"\0") if item)
    return {key: value for key, _, value in pairs}


def fd_targets(pid: int) -> list[str]:
    """Where each open descriptor of *pid* points."""
    targets = []
    for link in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            targets.append(os.readlink(link))
    return targets


def mapped_paths(pid: int) -> list[str]:
    """The path of every file mapping of *pid* (from /proc/PID/maps)."""
    lines = Path(f"/proc/{pid}/maps").read_text(errors="replace").splitlines()
    return [f[5].strip() for f in (line.split(None, 5) for line in lines) if len(f) == 6]


RENAMES = {264, 316}  # renameat, renameat2 on x86_64, as /proc/PID/syscall shows them


def in_syscall(proc: subprocess.Popen[str], numbers: set[int]) -> bool:
    """Whether a process below *proc* (strace's tracee, held by delay_enter) is in one of
    the syscalls *numbers* right now."""
    import psutil

    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return False
    for child in children:
        try:
            first = Path(f"/proc/{child.pid}/syscall").read_text().split()[0]
        except (OSError, IndexError):
            continue
        if first.isdigit() and int(first) in numbers:
            return True
    return False


# A child holding a lease (ocrd.lease) on every path of its argv until its stdin closes.
HOLD_LEASE = """
import contextlib, sys
from ocrd.lease import lease
with contextlib.ExitStack() as stack:
    for p in sys.argv[1:]:
        stack.enter_context(lease(p))
    print("ready", flush=True)
    sys.stdin.read()
"""
