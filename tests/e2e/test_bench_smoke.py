"""The big-directory benchmark measures real work: a tiny run of its own code.

Not a timing test: it checks that each side of the comparison (ocrd apply,
find -delete, the bare loop) actually removes every old_* and nothing else.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import bigdir  # noqa: E402 - the benchmark scripts import their helpers from bench/
from _common import copy_tree, make_entries  # noqa: E402


@pytest.mark.parametrize("action", ["delete", "quarantine"])
def test_bigdir_compare_apply_prunes_every_old_entry(tmp_path: Path, action: str) -> None:
    """One small run of compare_apply: ocrd and both baselines leave only the keep_* entries."""
    template = tmp_path / "template"
    make_entries(template, 60, 20)
    _, find_s, bare_s, note = bigdir.compare_apply(tmp_path, template, action, runs=1)
    assert note == ""  # ocrd exited 0 and no old_* is left in its copy
    assert find_s > 0 and bare_s > 0
    for side in ("models", "baseline", "bare"):
        left = sorted(n for n in os.listdir(tmp_path / side) if not n.startswith("."))
        assert left == [f"keep_{i:07d}.bin" for i in range(20, 60)], side
    trash = tmp_path / "models" / ".ocrd-trash"
    if action == "quarantine":
        (batch,) = trash.iterdir()
        assert len([n for n in os.listdir(batch) if n.startswith("old_")]) == 20
    else:
        assert not trash.exists() or not any(trash.iterdir())


def test_bare_loop_leaves_what_it_does_not_match(tmp_path: Path) -> None:
    """The bare-loop baseline only touches old_* names (it is a fair floor, not a wipe)."""
    template, work = tmp_path / "t", tmp_path / "w"
    make_entries(template, 10, 4)
    copy_tree(template, work)
    bigdir.time_bare(work, "delete")
    assert sorted(os.listdir(work)) == sorted(f"keep_{i:07d}.bin" for i in range(4, 10))
