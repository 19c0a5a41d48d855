"""Leases: shared flocks read from /proc/locks into the handle index, and ocrd.lease."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest

from ocrd.act.holders import holders_text
from ocrd.act.twophase import Expect, TwoPhase
from ocrd.lease import lease
from ocrd.observe.handles import Holder, build_index
from ocrd.observe.locks import Lock, parse
from tests.support.files import make_model
from tests.support.procs import HOLD_LEASE, holder

LOCKS = """\
1: FLOCK  ADVISORY  READ  1234 fd:01:5678 0 EOF
1: -> FLOCK  ADVISORY  WRITE 99 fd:01:5678 0 EOF
2: POSIX  ADVISORY  WRITE 0 00:2d:42 0 EOF
3: OFDLCK ADVISORY  READ  -1 08:11:7 0 EOF
4: LEASE  ACTIVE    READ  5 08:11:8 0 EOF
garbage
"""


def key(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return (st.st_dev, st.st_ino)


def test_proc_locks_lines_are_parsed_and_waiters_skipped() -> None:
    """Held FLOCK, POSIX and OFD locks are read with hex device numbers; waiters,
    NFS leases and odd lines are not."""
    assert list(parse(LOCKS)) == [
        Lock("FLOCK", "READ", 1234, os.makedev(0xFD, 0x01), 5678),
        Lock("POSIX", "WRITE", 0, os.makedev(0, 0x2D), 42),
        Lock("OFDLCK", "READ", -1, os.makedev(8, 0x11), 7),
    ]


def test_a_lease_of_a_child_is_in_the_index(tmp_path: Path) -> None:
    """A child holding a lease on a file is indexed as a lease with its pid and name."""
    model = make_model(tmp_path, "model.bin")
    with holder(tmp_path, "ocrd-lease", HOLD_LEASE, model) as proc:
        found = build_index({key(model)}).who({key(model)})
    assert Holder(proc.pid, "ocrd-lease", "lease") in found
    assert f"lease, pid {proc.pid} (ocrd-lease)" in holders_text(found)


def test_a_lease_on_a_directory_model_is_in_the_index(tmp_path: Path) -> None:
    """A lease on a directory model is a lock on the directory itself."""
    model = tmp_path / "Qwen-GGUF"
    model.mkdir()
    with lease(model):
        found = build_index({key(model)}).who({key(model)})
    assert Holder(os.getpid(), Path(f"/proc/{os.getpid()}/comm").read_text().strip(), "lease") in (
        found
    )


def test_a_lease_is_shared_and_never_needs_write_access(tmp_path: Path) -> None:
    """Two leases on a read-only file coexist; an exclusive lock fails while they last."""
    model = make_model(tmp_path, "model.bin")
    model.chmod(0o444)
    with lease(model), lease(model) as fd:
        other = os.open(model, os.O_RDONLY)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(other)
        assert os.fstat(fd).st_ino == key(model)[1]
    other = os.open(model, os.O_RDONLY)
    try:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released: free again
    finally:
        os.close(other)


def test_lease_works_as_a_decorator(tmp_path: Path) -> None:
    """`@lease(path)` holds the lease for each call, and only then."""
    model = make_model(tmp_path, "model.bin")

    @lease(model)
    def leased() -> bool:
        return any(h.how == "lease" for h in build_index({key(model)}).who({key(model)}))

    assert leased()
    assert not any(h.how == "lease" for h in build_index({key(model)}).who({key(model)}))


def test_lease_on_a_missing_model_raises(tmp_path: Path) -> None:
    """No lease on what is not there: FileNotFoundError, at once."""
    with pytest.raises(FileNotFoundError), lease(tmp_path / "gone.bin"):
        pass


@pytest.mark.parametrize("is_dir", [False, True])
def test_a_lease_taken_after_the_index_keeps_the_model(tmp_path: Path, *, is_dir: bool) -> None:
    """The exclusive check before the removal finds a lease the index did not see: the
    target goes back under its name, reported held by the lease."""
    models = tmp_path / "models"
    models.mkdir()
    target = models / "old_a"
    if is_dir:
        target.mkdir()
        (target / "weights.bin").write_bytes(b"w")
    else:
        target.write_bytes(b"a")
    st = os.lstat(target)
    expect = Expect(st.st_dev, st.st_ino, st.st_mtime_ns, None if is_dir else st.st_size)
    root_fd = os.open(models, os.O_RDONLY | os.O_DIRECTORY)
    try:
        two = TwoPhase(str(models), root_fd)
        moved = two.move_out(0, back_fd=root_fd, name="old_a", expect=expect)
        with holder(tmp_path, "ocrd-lease", HOLD_LEASE, models / moved.hidden) as proc:
            (settled,) = two.settle(lambda _: [])  # the index saw nobody
        assert settled.holders == [Holder(proc.pid, "ocrd-lease", "lease")]
        assert settled.kept is None
        assert target.exists()
        moved = two.move_out(0, back_fd=root_fd, name="old_a", expect=expect)
        (settled,) = two.settle(lambda _: [])  # released: now it goes
        assert settled.removed
        two.close()  # drops the deleting dir the file went out into
        assert sorted(os.listdir(models)) == []
    finally:
        os.close(root_fd)
