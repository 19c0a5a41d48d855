"""act.landing: the one-pass copy and the hash of what landed, on real files."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import pytest

from ocrd.act.landing import BLOCK, COPY_STEP, Chaser, copy_into

SIZE = 2 * COPY_STEP + BLOCK + 12345  # several steps, a partial last block


def _source(tmp_path: Path, size: int = SIZE) -> tuple[Path, str]:
    data = os.urandom(size)
    path = tmp_path / "src.bin"
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


def _dst(tmp_path: Path) -> int:
    return os.open(tmp_path / "dst.bin", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)


def test_copy_lands_every_byte_and_hashes_it(tmp_path: Path) -> None:
    """copy_file_range path: the copy is byte-identical and the digest is the source's."""
    src, want = _source(tmp_path)
    steps: list[int] = []
    src_fd, dst_fd = os.open(src, os.O_RDONLY), _dst(tmp_path)
    try:
        with Chaser(dst_fd) as chaser:
            total = copy_into(src_fd, dst_fd, chaser, steps.append)
            sha, hashed = chaser.finish()
    finally:
        os.close(src_fd)
        os.close(dst_fd)
    assert (total, hashed, sha) == (SIZE, SIZE, want)
    assert (tmp_path / "dst.bin").read_bytes() == src.read_bytes()
    assert steps[-1] == SIZE and len(steps) >= 3  # progress after every step


def test_a_source_copy_file_range_cannot_serve_falls_back_to_read_write(tmp_path: Path) -> None:
    """A pipe as the source (EINVAL for copy_file_range): read/write, same bytes, same hash."""
    data = os.urandom(3 * BLOCK + 7)
    read_end, write_end = os.pipe()

    def feed() -> None:
        with os.fdopen(write_end, "wb") as fh:
            fh.write(data)

    feeder = threading.Thread(target=feed)
    feeder.start()
    dst_fd = _dst(tmp_path)
    try:
        with Chaser(dst_fd) as chaser:
            total = copy_into(read_end, dst_fd, chaser)
            sha, _ = chaser.finish()
    finally:
        feeder.join()
        os.close(read_end)
        os.close(dst_fd)
    assert total == len(data)
    assert sha == hashlib.sha256(data).hexdigest()
    assert (tmp_path / "dst.bin").read_bytes() == data


def test_the_digest_is_of_what_landed_not_of_what_was_read(tmp_path: Path) -> None:
    """Bytes changed in the destination after they were written are what gets hashed."""
    dst_fd = _dst(tmp_path)
    try:
        os.write(dst_fd, b"a" * 1000)
        os.pwrite(dst_fd, b"B", 500)  # what is on disk now differs from what was written
        with Chaser(dst_fd) as chaser:
            chaser.landed(1000)
            sha, hashed = chaser.finish()
    finally:
        os.close(dst_fd)
    assert hashed == 1000
    assert sha == hashlib.sha256(b"a" * 500 + b"B" + b"a" * 499).hexdigest()


def test_a_step_that_raises_stops_the_copy_and_the_thread(tmp_path: Path) -> None:
    """SIGTERM during a restore: the step raises, nothing more is copied, no thread is left."""
    src, _ = _source(tmp_path)

    class Stop(Exception):
        pass

    def step(done: int) -> None:
        raise Stop

    src_fd, dst_fd = os.open(src, os.O_RDONLY), _dst(tmp_path)
    try:
        with pytest.raises(Stop), Chaser(dst_fd) as chaser:
            copy_into(src_fd, dst_fd, chaser, step)
    finally:
        os.close(src_fd)
        os.close(dst_fd)
    assert os.path.getsize(tmp_path / "dst.bin") <= COPY_STEP
    assert not [t for t in threading.enumerate() if t.name == "ocrd-hash" and t.is_alive()]


def test_a_file_that_shrinks_under_the_hash_is_an_error(tmp_path: Path) -> None:
    """The writer says 1000 bytes landed but the file holds 10: the hash fails, no digest."""
    dst_fd = _dst(tmp_path)
    try:
        os.write(dst_fd, b"x" * 10)
        with Chaser(dst_fd) as chaser:
            chaser.landed(1000)
            with pytest.raises(OSError, match="shrank"):
                chaser.finish()
    finally:
        os.close(dst_fd)
