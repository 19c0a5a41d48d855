"""ocrd.act.tree.remove_at on real trees: deep, linked, mounted, special, swapped."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from ocrd.act.tree import remove_at
from ocrd.openfile import mount_id
from tests.support.files import make_deep

ROOT = os.geteuid() == 0
MOUNT, UMOUNT, CHATTR = (shutil.which(n) or n for n in ("mount", "umount", "chattr"))
needs_mount = pytest.mark.skipif(
    not ROOT or shutil.which("mount") is None, reason="bind-mounts a directory: needs root"
)


@pytest.fixture
def base(tmp_path: Path) -> Iterator[Path]:
    """A model dir (base/models) and a directory outside it (base/outside) with a file."""
    (tmp_path / "models").mkdir()
    (tmp_path / "outside" / "keep").mkdir(parents=True)
    (tmp_path / "outside" / "keep" / "precious.bin").write_bytes(b"precious")
    yield tmp_path


def remove(root: Path, name: str) -> list[tuple[str, str]]:
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return remove_at(fd, name).left
    finally:
        os.close(fd)


def test_a_tree_far_deeper_than_the_recursion_limit_is_removed(base: Path) -> None:
    """5,000 levels (recursion limit 1,000; path far over PATH_MAX): gone, no error."""
    make_deep(base / "models" / "old_deep", 5000, files=True)
    assert remove(base / "models", "old_deep") == []
    assert os.listdir(base / "models") == []


def test_links_inside_are_removed_as_links_never_followed(base: Path) -> None:
    """Symlinks to a directory and a file outside go; what they point at stays."""
    top = base / "models" / "old_dir"
    (top / "sub").mkdir(parents=True)
    (top / "to_dir").symlink_to(base / "outside")
    (top / "sub" / "to_file").symlink_to(base / "outside" / "keep" / "precious.bin")
    assert remove(base / "models", "old_dir") == []
    assert not top.exists()
    assert (base / "outside" / "keep" / "precious.bin").read_bytes() == b"precious"


def test_a_symlink_as_the_top_is_unlinked_not_followed(base: Path) -> None:
    """Removing a link to a directory removes the link only."""
    (base / "models" / "old_link").symlink_to(base / "outside")
    assert remove(base / "models", "old_link") == []
    assert not os.path.lexists(base / "models" / "old_link")
    assert (base / "outside" / "keep" / "precious.bin").exists()


def test_special_files_inside_are_unlinked_without_being_opened(base: Path) -> None:
    """A FIFO nobody writes to would block an open(); it is only unlinked."""
    top = base / "models" / "old_dir"
    top.mkdir()
    os.mkfifo(top / "fifo")
    assert remove(base / "models", "old_dir") == []
    assert not top.exists()


@needs_mount
def test_a_bind_mount_inside_is_not_entered_and_is_reported(base: Path) -> None:
    """A bind mount of a directory on the same filesystem: its files stay, the path to it
    stays, everything else goes, and the mount point is named in what was left."""
    top = base / "models" / "old_dir"
    (top / "mnt").mkdir(parents=True)
    (top / "other.bin").write_bytes(b"x")
    subprocess.run([MOUNT, "--bind", str(base / "outside"), str(top / "mnt")], check=True)
    try:
        left = remove(base / "models", "old_dir")
        assert [path for path, _ in left] == ["old_dir/mnt"]
        assert "mount point" in left[0][1]
        assert (base / "outside" / "keep" / "precious.bin").read_bytes() == b"precious"
        assert os.listdir(top) == ["mnt"]
    finally:
        subprocess.run([UMOUNT, str(top / "mnt")], check=True)
    assert remove(base / "models", "old_dir") == []
    assert not top.exists()


@needs_mount
def test_a_mount_point_as_the_top_is_not_entered(base: Path) -> None:
    """The tree itself is a mount point: nothing inside it is touched."""
    top = base / "models" / "old_dir"
    top.mkdir()
    subprocess.run([MOUNT, "--bind", str(base / "outside"), str(top)], check=True)
    try:
        left = remove(base / "models", "old_dir")
        assert [path for path, _ in left] == ["old_dir"]
        assert (base / "outside" / "keep" / "precious.bin").exists()
    finally:
        subprocess.run([UMOUNT, str(top)], check=True)


def test_what_cannot_be_removed_is_reported_and_the_rest_goes(base: Path) -> None:
    """An entry that cannot be unlinked (immutable, as root; in a directory this user may
    not write, otherwise) is left with its reason, and so is the path to it; its siblings
    are removed all the same."""
    top = base / "models" / "old_dir"
    (top / "stuck").mkdir(parents=True)
    (top / "stuck" / "f").write_bytes(b"x")
    (top / "free.bin").write_bytes(b"x")
    if ROOT:
        if shutil.which("chattr") is None:
            pytest.skip("needs chattr")
        if subprocess.run([CHATTR, "+i", str(top / "stuck" / "f")], check=False).returncode:
            pytest.skip("this filesystem has no immutable flag")
        undo = [CHATTR, "-i", str(top / "stuck" / "f")]
    else:
        (top / "stuck").chmod(0o555)
        undo = ["chmod", "755", str(top / "stuck")]
    try:
        left = remove(base / "models", "old_dir")
    finally:
        subprocess.run(undo, check=True)
    assert [path for path, _ in left] == ["old_dir/stuck/f"]
    assert sorted(os.listdir(top)) == ["stuck"]
    assert os.listdir(top / "stuck") == ["f"]


def test_mount_id_tells_mounts_apart() -> None:
    """/proc's mount ids differ across mounts and agree within one."""
    here = os.open("/proc", os.O_RDONLY | os.O_DIRECTORY)
    also = os.open("/proc/self", os.O_RDONLY | os.O_DIRECTORY)
    root = os.open("/", os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert mount_id(here) == mount_id(also) is not None
        assert mount_id(root) != mount_id(here)
    finally:
        for fd in (here, also, root):
            os.close(fd)
