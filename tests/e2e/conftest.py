"""Fixtures of the end-to-end tests: one venv for every test that boots a real systemd."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.systemd import build_venv, can_boot, find_base_python

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def ocrd_venv() -> Iterator[Path]:
    """A venv with ocrd installed (non-editable) on an interpreter ProtectHome= leaves
    visible; built once (~40 s) for every module that boots a real systemd."""
    reason = can_boot()
    if reason is not None:  # before the pip install: it would be for nothing
        pytest.skip(f"cannot boot a real systemd here: {reason}")
    python = find_base_python()
    if python is None:
        pytest.skip("no Python >= 3.10 with venv outside /root, /home and the temp dirs")
    where = Path(tempfile.mkdtemp(prefix="ocrd-e2e-venv-", dir="/var/tmp"))
    try:
        yield build_venv(where / "venv", python, [str(ROOT)])
    finally:
        shutil.rmtree(where, ignore_errors=True)
