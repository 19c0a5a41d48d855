"""The read-only walker below directory models, the own-name checks, and how an OSError on
one of ocrd's files reads: against real directories."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from ocrd.act.tree import remove_whole
from ocrd.core.model import Kind
from ocrd.core.own import own_leftover_problem
from ocrd.observe.scan import tree_members, tree_stats
from ocrd.observe.walk import below
from ocrd.openfile import DIR_FLAGS, explain_os_error
from tests.support.files import make_deep


def _open(path: Path) -> int:
    return os.open(path, DIR_FLAGS)


def test_below_walks_a_tree_deeper_than_path_max(tmp_path: Path) -> None:
    """3,000 levels, each holding a file: paths of ~6,000 bytes, beyond PATH_MAX (4,096),
    are walked whole through descriptors (a path-based walk fails with ENAMETOOLONG)."""
    make_deep(tmp_path / "deep", 3000, files=True)
    fd = _open(tmp_path)
    try:
        seen = list(below(fd, "deep"))
        size, _ = tree_stats(fd, "deep")
    finally:
        # pytest's own clean-up (shutil.rmtree) recurses: too deep for it.
        remove_whole(fd, "deep")
        os.close(fd)
    assert len(seen) == 6000
    assert max(len(p) for p, _ in seen) > 4096
    assert size == 0  # empty files; directories do not count


def test_below_never_follows_a_link_and_sees_what_vanishes_as_gone(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.bin").write_bytes(b"x" * 100)
    model = tmp_path / "m" / "model"
    (model / "sub").mkdir(parents=True)
    (model / "sub" / "w.bin").write_bytes(b"abc")
    (model / "link").symlink_to(outside)
    fd = _open(tmp_path / "m")
    try:
        paths = {p for p, _ in below(fd, "model")}
        keys, full = tree_members(fd, "model", str(tmp_path / "m"))
    finally:
        os.close(fd)
    assert paths == {"model/sub", "model/sub/w.bin", "model/link"}
    assert str(tmp_path / "m" / "model" / "link") in full
    secret = os.lstat(outside / "secret.bin")
    assert (secret.st_dev, secret.st_ino) not in keys


def test_own_names_must_have_the_shape_ocrd_gives_them() -> None:
    ok = [
        (".ocrd-trash", Kind.DIR),
        (".ocrd-lock", Kind.FILE),
        (".ocrd-tmp-1", Kind.FILE),
        (".ocrd-deleting-1", Kind.FILE),
        (".ocrd-deleting-2", Kind.DIR),
        (".ocrd-deleting-3", Kind.SYMLINK),  # a symlink model on its way out
        (".ocrd-other", Kind.OTHER),  # not one of ocrd's names
    ]
    for name, kind in ok:
        assert own_leftover_problem(name, kind, 1, 1) is None, (name, kind)
    bad = [
        (".ocrd-trash", Kind.SYMLINK),
        (".ocrd-lock", Kind.DIR),
        (".ocrd-tmp-1", Kind.SYMLINK),
        (".ocrd-deleting-1", Kind.OTHER),
    ]
    for name, kind in bad:
        problem = own_leftover_problem(name, kind, 1, 1)
        assert problem is not None and "never makes" in problem, (name, kind)
    assert "another filesystem" in (own_leftover_problem(".ocrd-trash", Kind.DIR, 2, 1) or "")
    # A file's device may be its lower layer's on overlayfs: only directories are compared.
    assert own_leftover_problem(".ocrd-lock", Kind.FILE, 2, 1) is None


def test_an_os_error_reads_as_the_path_and_the_fix(tmp_path: Path) -> None:
    link = tmp_path / "link"
    link.symlink_to(tmp_path)
    with pytest.raises(OSError) as looped:
        os.open(link, os.O_RDONLY | os.O_NOFOLLOW)
    text = explain_os_error(looped.value)
    assert text.startswith(f"{link}: ") and "symbolic link" in text, text
    with pytest.raises(OSError) as missing:
        os.open(tmp_path / "none", os.O_RDONLY)
    assert "does not exist" in explain_os_error(missing.value)
    denied = PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "x"))
    text = explain_os_error(denied)
    assert "run ocrd as" in text and "(its owner)" in text and "\n" not in text, text
