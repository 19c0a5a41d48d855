"""The big-directory benchmark measures real work: a tiny run of its own code.

Not a timing test: it checks that each side of the comparison (ocrd apply,
find -delete, the bare loop) actually removes every old_* and nothing else.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import bigdir  # noqa: E402 - the benchmark scripts import their helpers from bench/
from _common import copy_tree, make_entries  # noqa: E402


@pytest.mark.parametrize("action", ["delete", "quarantine"])
def test_bigdir_compare_apply_prunes_every_old_entry(tmp_path: Path, action: str) -> None:
    """One small run of compare_apply: ocrd, find and the floor each act on every old_*
    (compare_apply notes any contender that exits non-zero or leaves one)."""
    template = tmp_path / "template"
    make_entries(template, 60, 20)
    floor = bigdir.build_floor(tmp_path)
    timings = bigdir.compare_apply(tmp_path, template, action, 1, floor, 20)
    assert timings.notes == []
    assert timings.ocrd[0] > 0 and timings.find[0] > 0 and timings.floor[0] > 0


@pytest.mark.parametrize("which", ["c", "python"])
@pytest.mark.parametrize("action", ["delete", "quarantine"])
def test_the_floor_leaves_what_it_does_not_match(tmp_path: Path, which: str, action: str) -> None:
    """The C floor and its Python stand-in only touch old_* names (a fair floor, not a wipe)."""
    if which == "c" and shutil.which("cc") is None:
        pytest.skip("no cc")
    floor = bigdir.build_floor(tmp_path)
    argv = list(floor.argv) if which == "c" else [sys.executable, "-c", bigdir.BARE_LOOP]
    assert which != "c" or floor.is_c
    template, work = tmp_path / "t", tmp_path / "w"
    make_entries(template, 10, 4)
    copy_tree(template, work)
    out = subprocess.run([*argv, str(work), action], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "4"
    kept = sorted(n for n in os.listdir(work) if n != bigdir.QUARANTINE)
    assert kept == sorted(f"keep_{i:07d}.bin" for i in range(4, 10))
    if action == "quarantine":
        assert len(os.listdir(work / bigdir.QUARANTINE)) == 4
