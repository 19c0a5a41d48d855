"""A second user for the tests that run ocrd, or a worker, as somebody other than root."""

from __future__ import annotations

import pwd
import shutil
import subprocess

TEST_USER = "ocrdtest"
SYSTEM_PYTHON = "/usr/bin/python3"  # an interpreter every user may run (not one under /root)


def ensure_test_user() -> pwd.struct_passwd:
    """TEST_USER, a system user without a home, made first if this machine lacks it."""
    try:
        return pwd.getpwnam(TEST_USER)
    except KeyError:
        useradd = shutil.which("useradd") or "/usr/sbin/useradd"
        subprocess.run(
            [useradd, "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", TEST_USER],
            check=True,
        )
        return pwd.getpwnam(TEST_USER)
