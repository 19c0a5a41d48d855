"""handles.build_index against real processes holding real files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ocrd.observe.handles import HandleIndex, Holder, Targets, build_index
from tests.support.files import make_model
from tests.support.procs import HOLD_BOTH, HOLD_FD, HOLD_MMAP, holder


def key(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return (st.st_dev, st.st_ino)


def test_child_holding_fd_is_found(tmp_path: Path) -> None:
    """A child with an open descriptor on a file is indexed with its pid and comm name."""
    model = make_model(tmp_path, "model.bin", b"m" * 4096)
    with holder(tmp_path, "ocrd-hold-fd", HOLD_FD, model) as proc:
        index = build_index({key(model)})
        found = index.who({key(model)})
    assert Holder(proc.pid, "ocrd-hold-fd", "fd") in found
    assert all(h.how != "mmap" for h in found if h.pid == proc.pid)


def test_child_holding_only_mmap_is_found(tmp_path: Path) -> None:
    """A child that mapped a file and closed the descriptor is indexed as an mmap holder."""
    model = make_model(tmp_path, "model.gguf", b"g" * 8192)
    with holder(tmp_path, "ocrd-hold-map", HOLD_MMAP, model) as proc:
        fds = os.listdir(f"/proc/{proc.pid}/fd")
        targets = {os.readlink(f"/proc/{proc.pid}/fd/{fd}") for fd in fds}
        assert str(model) not in targets  # the descriptor really is closed
        found = build_index({key(model)}).who({key(model)})
    assert [h for h in found if h.pid == proc.pid] == [Holder(proc.pid, "ocrd-hold-map", "mmap")]


def test_holders_gone_after_child_exits(tmp_path: Path) -> None:
    """Once the holding child has exited it no longer appears in a new index."""
    model = make_model(tmp_path, "model.bin", b"m" * 4096)
    with holder(tmp_path, "ocrd-hold-fd", HOLD_FD, model) as proc:
        pid = proc.pid
        assert any(h.pid == pid for h in build_index({key(model)}).who({key(model)}))
    assert all(h.pid != pid for h in build_index({key(model)}).who({key(model)}))


def test_only_targets_are_indexed(tmp_path: Path) -> None:
    """Only the targets asked for are indexed: another open file of the same holder is not."""
    model = make_model(tmp_path, "model.bin", b"m" * 4096)
    other = make_model(tmp_path, "other.bin", b"o" * 4096)
    with holder(tmp_path, "ocrd-hold-fd", HOLD_FD, model, other):
        mine = build_index({key(model)})
        nothing = build_index(set())
    assert set(mine.holders) == {key(model)}
    assert nothing.holders == {}
    assert nothing.inspected > 0  # processes were still looked at


def test_many_targets_take_the_regex_path(tmp_path: Path) -> None:
    """Beyond Targets.FEW inodes the maps text is matched by one regex pass: still exact."""
    model = make_model(tmp_path, "model.gguf", b"g" * 8192)
    decoys = {(key(model)[0], key(model)[1] + 1_000_000 + i) for i in range(Targets.FEW + 5)}
    with holder(tmp_path, "ocrd-hold-map", HOLD_MMAP, model) as proc:
        found = build_index(decoys | {key(model)}).who({key(model)})
        missed = build_index(decoys)
    assert Holder(proc.pid, "ocrd-hold-map", "mmap") in found
    assert all(h.pid != proc.pid for hs in missed.holders.values() for h in hs)


def test_maps_prefilter() -> None:
    """A maps text is parsed only when it can mention a target's inode or root."""
    text = (
        b"7f00-7f01 r--p 00000000 fd:01 123456                     /usr/lib/libc.so.6\n"
        b"7f02-7f03 rw-p 00000000 00:00 0 \n"
    )
    assert not Targets({(1, 12345)}).maps_may_hold(text)  # a prefix of an inode is no match
    assert Targets({(1, 123456)}).maps_may_hold(text)
    assert Targets({(1, 9)}, roots=["/usr/lib"]).maps_may_hold(text)
    many = {(1, 10 + i) for i in range(Targets.FEW + 1)}
    assert not Targets(many).maps_may_hold(text)
    assert Targets(many | {(1, 123456)}).maps_may_hold(text)


def test_counts_are_sane(tmp_path: Path) -> None:
    """inspected never exceeds total, and this very process is among the inspected."""
    model = make_model(tmp_path, "model.bin", b"m")
    with open(model, "rb"):
        index = build_index()
        mine = build_index({key(model)}).who({key(model)})
    pids = {h.pid for holders in index.holders.values() for h in holders}
    assert 1 <= index.inspected <= index.total
    assert os.getpid() in pids
    assert len(pids) <= index.inspected
    assert any(h.pid == os.getpid() and h.how == "fd" for h in mine)


def _fake_proc(root: Path, model: Path) -> Path:
    proc = root / "proc"
    ok = proc / "100"
    (ok / "fd").mkdir(parents=True)
    (ok / "fd" / "3").symlink_to(model)
    (ok / "fd" / "4").symlink_to(root / "gone")  # dangling: closed meanwhile
    st = os.stat(model)
    line = (
        f"7f0000000000-7f0000001000 r--s 00000000 {os.major(st.st_dev):x}:{os.minor(st.st_dev):x}"
        f" {st.st_ino}                    {model}\n"
        "7f0000002000-7f0000003000 rw-p 00000000 00:00 0 \n"
        "garbage\n"
    )
    (ok / "maps").write_text(line, encoding="utf-8")
    (ok / "comm").write_text("fake-engine\n", encoding="utf-8")
    denied = proc / "200"
    denied.mkdir()
    (denied / "fd").write_text("not a directory", encoding="utf-8")  # stat works, scandir fails
    (proc / "300").mkdir()  # exited while we looked: no fd dir at all
    (proc / "self").mkdir()  # not a pid
    return proc


def test_counts_on_a_fake_proc(tmp_path: Path) -> None:
    """Processes we cannot inspect count in total only; vanished ones count nowhere."""
    model = make_model(tmp_path, "model.bin", b"m")
    index = build_index(None, proc=str(_fake_proc(tmp_path, model)))
    assert (index.inspected, index.total) == (1, 2)
    assert index.who({key(model)}) == [
        Holder(100, "fake-engine", "fd"),
        Holder(100, "fake-engine", "mmap"),
    ]


def test_missing_proc_gives_empty_index(tmp_path: Path) -> None:
    """Without a readable /proc the index is empty and says nothing was inspected."""
    index = build_index(None, proc=str(tmp_path / "no-proc"))
    assert (index.holders, index.inspected, index.total) == ({}, 0, 0)


def test_who_deduplicates_across_keys_and_descriptors(tmp_path: Path) -> None:
    """A process holding several files of a model, some twice, is listed once per way it holds."""
    model = tmp_path / "model-dir"
    model.mkdir()
    a = make_model(model, "a.bin", b"a" * 4096)
    b = make_model(model, "b.bin", b"b" * 4096)
    with (
        holder(tmp_path, "ocrd-hold-both", HOLD_BOTH, a) as both,
        holder(tmp_path, "ocrd-hold-fd", HOLD_FD, a, b, a) as fds,
    ):
        index = build_index({key(a), key(b)})
        found = index.who({key(a), key(b)})
    mine = [h for h in found if h.pid in (both.pid, fds.pid)]
    assert mine == sorted(
        [
            Holder(both.pid, "ocrd-hold-both", "fd"),
            Holder(both.pid, "ocrd-hold-both", "mmap"),
            Holder(fds.pid, "ocrd-hold-fd", "fd"),
        ],
        key=lambda h: (h.pid, h.how),
    )
    # the raw index holds each (pid, how) at most once per key, too
    for holders in index.holders.values():
        assert len({(h.pid, h.how) for h in holders}) == len(holders)


def test_handle_index_add_and_who() -> None:
    """HandleIndex.add ignores repeats and who() merges holders across keys, sorted."""
    index = HandleIndex()
    index.add((1, 10), Holder(5, "b", "fd"))
    index.add((1, 10), Holder(5, "b", "fd"))
    index.add((1, 11), Holder(5, "b", "fd"))
    index.add((1, 11), Holder(3, "a", "mmap"))
    index.add((1, 12), Holder(9, "c", "fd"))
    assert index.holders[(1, 10)] == [Holder(5, "b", "fd")]
    assert index.who({(1, 10), (1, 11)}) == [Holder(3, "a", "mmap"), Holder(5, "b", "fd")]
    assert index.who({(2, 10)}) == []
    assert index.who(set()) == []


@pytest.mark.parametrize("script", [HOLD_FD, HOLD_MMAP], ids=["fd", "mmap"])
def test_hardlink_is_the_same_file(tmp_path: Path, script: str) -> None:
    """A holder of another name of the same inode holds the model too."""
    model = make_model(tmp_path, "model.bin", b"m" * 4096)
    alias = tmp_path / "alias.bin"
    os.link(model, alias)
    with holder(tmp_path, "ocrd-hold-alias", script, alias) as proc:
        found = build_index({key(model)}).who({key(model)})
    assert any(h.pid == proc.pid for h in found)
