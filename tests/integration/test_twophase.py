"""ocrd.act.twophase on real files: out of the name, checked, then removed or put back."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from ocrd.act.fs import Changed
from ocrd.act.trash import quarantine
from ocrd.act.twophase import Expect, Moved, TwoPhase
from ocrd.core.names import DELETING_PREFIX
from ocrd.observe.handles import Holder
from ocrd.observe.trash import read_trash

HOLDER = [Holder(pid=1, name="worker", how="fd")]


@pytest.fixture
def fd(models: Path) -> Iterator[int]:
    """The model dir, open."""
    handle = os.open(models, os.O_RDONLY | os.O_DIRECTORY)
    yield handle
    os.close(handle)


def expect_of(path: Path) -> Expect:
    st = os.lstat(path)
    return Expect(st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


def hidden(models: Path) -> list[str]:
    return [n for n in os.listdir(models) if n.startswith(DELETING_PREFIX)]


def test_a_target_nobody_holds_is_removed_after_moving_out(models: Path, fd: int) -> None:
    """Phase 1 takes it out of its name at once; phase 3 removes it."""
    (models / "old_a").write_bytes(b"a")
    two = TwoPhase(str(models), fd)
    moved = two.move_out(0, back_fd=fd, name="old_a", expect=expect_of(models / "old_a"))
    assert not (models / "old_a").exists()
    # A file goes into one of the cycle's deleting dirs, dropped by close() once empty.
    assert hidden(models) == [moved.hidden.split("/")[0]]
    (settled,) = two.settle(lambda _: [])
    assert settled.removed
    two.close()
    assert os.listdir(models) == []


def test_a_held_target_goes_back_under_its_name(models: Path, fd: int) -> None:
    """A holder in the index: the very same inode is back under its name, nothing removed."""
    (models / "old_a").write_bytes(b"a")
    before = os.lstat(models / "old_a").st_ino
    two = TwoPhase(str(models), fd)
    two.move_out(0, back_fd=fd, name="old_a", expect=expect_of(models / "old_a"))
    (settled,) = two.settle(lambda _: HOLDER)
    assert settled.holders == HOLDER and settled.kept is None
    assert os.lstat(models / "old_a").st_ino == before
    two.close()
    assert hidden(models) == []


def test_a_held_target_whose_name_was_taken_is_kept_in_the_quarantine(
    models: Path, fd: int
) -> None:
    """A newer entry took the name meanwhile: it is not replaced, and the held target is not
    deleted either; it goes into the quarantine under its own name."""
    (models / "old_a").write_bytes(b"held")

    def keep(moved: Moved) -> str:
        # As the cycle's keep does: out of the deleting dir to a name of its own first.
        os.rename(moved.inner, DELETING_PREFIX + "kept", src_dir_fd=moved.out_fd, dst_dir_fd=fd)
        return quarantine(
            str(models), DELETING_PREFIX + "kept", as_name=moved.name, reason="kept", size=4,
            sha256=None, now=0.0,
        )  # fmt: skip

    two = TwoPhase(str(models), fd, keep=keep)
    two.move_out(0, back_fd=fd, name="old_a", expect=expect_of(models / "old_a"))
    (models / "old_a").write_bytes(b"newer")
    (settled,) = two.settle(lambda _: HOLDER)
    assert settled.kept is not None and settled.kept.endswith("/old_a")
    assert (models / "old_a").read_bytes() == b"newer"
    (item,) = read_trash(str(models))
    assert item.name == "old_a"
    assert (models / ".ocrd-trash" / item.id).read_bytes() == b"held"
    two.close()
    assert hidden(models) == []


def test_what_moved_out_is_checked_and_a_different_entry_goes_back(models: Path, fd: int) -> None:
    """The entry under the name is not the planned one (a fresh copy replaced it after the
    re-check): after the move it is recognised, put back untouched, and nothing is deleted."""
    (models / "old_a").write_bytes(b"stale")
    planned = expect_of(models / "old_a")
    (models / ".new").write_bytes(b"fresh")
    os.replace(models / ".new", models / "old_a")
    two = TwoPhase(str(models), fd)
    with pytest.raises(Changed, match="put back, nothing deleted"):
        two.move_out(0, back_fd=fd, name="old_a", expect=planned)
    assert (models / "old_a").read_bytes() == b"fresh"
    two.close()
    assert two.moved == [] and hidden(models) == []
