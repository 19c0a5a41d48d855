"""scan, the hash cache and read_trash against real directories."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

import ocrd.observe.scan as scanning
import ocrd.observe.trash as trash_reading
from ocrd.core.errors import ModelDirError
from ocrd.core.model import Entry, Kind, ListedEntry
from ocrd.core.names import LEGACY_RECORD, RECORD, TRASH
from ocrd.observe.hashing import CACHE_FILE, HashCache
from ocrd.observe.scan import no_gc_pauses, observe, scan
from ocrd.observe.trash import Batch, read_batch, read_trash
from tests.support.files import make_model
from tests.support.policy import write_policy


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def hash_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every path scan hashes, in order (the real hash still runs)."""
    calls: list[str] = []
    real: Callable[..., str] = scanning.sha256_file

    def counting(path: str, **kwargs: Any) -> str:
        calls.append(os.path.basename(path))
        return real(path, **kwargs)

    monkeypatch.setattr(scanning, "sha256_file", counting)
    return calls


def test_kinds_of_entries(root: Path, tmp_path: Path) -> None:
    """Files, directories, symlinks (never followed) and fifos get their own kinds."""
    outside = tmp_path / "outside"
    outside.mkdir()
    big = outside / "big.bin"
    big.write_bytes(b"x" * 50_000)
    (outside / "tree").mkdir()
    (outside / "tree" / "data.bin").write_bytes(b"y" * 70_000)
    make_model(root, "file.bin", b"12345")
    (root / "dir").mkdir()
    (root / "link_file").symlink_to(big)
    (root / "link_dir").symlink_to(outside / "tree")
    os.mkfifo(root / "pipe")

    entries = scan(root).by_name()

    assert {name: e.kind for name, e in entries.items()} == {
        "file.bin": Kind.FILE,
        "dir": Kind.DIR,
        "link_file": Kind.SYMLINK,
        "link_dir": Kind.SYMLINK,
        "pipe": Kind.OTHER,
    }
    assert entries["file.bin"].size == 5
    # a link is sized and identified as the link itself, never as its target
    assert entries["link_file"].size == len(str(big))
    assert entries["link_file"].inode == os.lstat(root / "link_file").st_ino
    assert entries["link_dir"].size == len(str(outside / "tree"))
    assert entries["link_dir"].inode != os.stat(outside / "tree").st_ino


def test_scan_is_sorted_and_identifies_entries(root: Path) -> None:
    """Entries come sorted by name with the inode, device and mtime_ns lstat gives."""
    for name in ("b.bin", "a.bin", "c.bin"):
        make_model(root, name)
    snap = scan(root)
    assert [e.name for e in snap.entries] == ["a.bin", "b.bin", "c.bin"]
    st = os.lstat(root / "b.bin")
    entry = snap.by_name()["b.bin"]
    assert (entry.inode, entry.device, entry.mtime_ns) == (st.st_ino, st.st_dev, st.st_mtime_ns)
    assert snap.device == os.stat(root).st_dev
    assert snap.root == str(root)


def test_directory_size_and_newest_mtime(root: Path) -> None:
    """A directory model's size is the sum of its contents and its mtime the newest inside."""
    model = root / "Qwen-GGUF"
    (model / "sub" / "deeper").mkdir(parents=True)
    (model / "a.gguf").write_bytes(b"a" * 1000)
    (model / "sub" / "b.bin").write_bytes(b"b" * 300)
    (model / "sub" / "deeper" / "c.bin").write_bytes(b"c" * 7)
    base = time.time() - 10_000
    newest = base + 5_000
    for path in (
        model / "a.gguf",
        model / "sub" / "b.bin",
        model / "sub" / "deeper",
        model / "sub",
        model,
    ):
        os.utime(path, (base, base))
    os.utime(model / "sub" / "deeper" / "c.bin", (newest, newest))

    entry = scan(root).by_name()["Qwen-GGUF"]

    assert entry.kind is Kind.DIR
    assert entry.size == 1000 + 300 + 7
    assert entry.mtime == pytest.approx(newest, abs=1e-3)
    assert entry.mtime_ns == os.lstat(model).st_mtime_ns  # the entry's own, for re-stat


def test_directory_with_symlink_inside_is_not_followed(root: Path, tmp_path: Path) -> None:
    """A symlink inside a directory model counts as the link, not as what it points to."""
    target = tmp_path / "huge.bin"
    target.write_bytes(b"z" * 100_000)
    (root / "model").mkdir()
    (root / "model" / "w.bin").write_bytes(b"w" * 10)
    (root / "model" / "link").symlink_to(target)
    entry = scan(root).by_name()["model"]
    assert entry.size == 10 + len(str(target))


def test_entries_not_examined_keep_kind_and_inode_only(root: Path, tmp_path: Path) -> None:
    """With *examine*, other entries are listed, never looked at nor walked below."""
    make_model(root, "old_a.bin", b"12345")
    make_model(root, "keep.bin", b"123")
    (root / "keep_dir").mkdir()
    (root / "keep_dir" / "w.bin").write_bytes(b"w" * 10)
    (root / "keep_link").symlink_to(tmp_path)
    os.mkfifo(root / "keep_pipe")

    snap = scan(root, examine=lambda name: name.startswith("old_"))
    entries = snap.by_name()

    old = entries["old_a.bin"]
    st = os.lstat(root / "old_a.bin")
    assert isinstance(old, Entry)
    assert (old.size, old.mtime_ns, old.inode) == (5, st.st_mtime_ns, st.st_ino)
    kinds = {"keep.bin": Kind.FILE, "keep_dir": Kind.DIR, "keep_link": Kind.SYMLINK}
    kinds["keep_pipe"] = Kind.OTHER
    for name, kind in kinds.items():
        inode = os.lstat(root / name).st_ino
        # the kind and inode of the listing, and no size nor times to be read by mistake
        assert entries[name] == ListedEntry(name=name, kind=kind, inode=inode, device=snap.device)
        assert type(entries[name]) is ListedEntry, name


def test_an_entry_not_examined_costs_no_lstat(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the names *examine* accepts are looked at: the others, and what lies below a
    directory among them, are never stat'ed."""
    make_model(root, "old_a.bin")
    make_model(root, "keep.bin")
    (root / "keep_dir").mkdir()
    make_model(root / "keep_dir", "w.bin")
    (root / "old_dir").mkdir()
    make_model(root / "old_dir", "x.bin")
    looked_at: list[str] = []
    real_scandir, real_lstat = os.scandir, os.lstat

    class Watched:
        """A DirEntry that notes each stat of it."""

        def __init__(self, child: os.DirEntry[str]) -> None:
            self.child = child

        def __getattr__(self, attr: str) -> Any:
            return getattr(self.child, attr)

        def stat(self, *, follow_symlinks: bool = True) -> os.stat_result:
            looked_at.append(os.path.basename(self.child.path))
            return self.child.stat(follow_symlinks=follow_symlinks)

    class WatchedListing:
        """os.scandir's iterator, handing out Watched entries."""

        def __init__(self, path: Any) -> None:
            self.it = real_scandir(path)

        def __enter__(self) -> WatchedListing:
            return self

        def __exit__(self, *exc: object) -> None:
            self.it.close()

        def __iter__(self) -> Iterator[Watched]:
            return (Watched(child) for child in self.it)

    def watched_lstat(path: Any, **kwargs: Any) -> os.stat_result:
        looked_at.append(os.path.basename(path))
        return real_lstat(path, **kwargs)

    monkeypatch.setattr(scanning.os, "scandir", WatchedListing)
    monkeypatch.setattr(scanning.os, "lstat", watched_lstat)
    snap = scan(root, examine=lambda name: name.startswith("old_"))
    monkeypatch.undo()

    assert [e.name for e in snap.entries] == ["keep.bin", "keep_dir", "old_a.bin", "old_dir"]
    assert set(looked_at) - {TRASH} == {"old_a.bin", "old_dir", "x.bin"}


@pytest.mark.parametrize("unmanaged", ["report", "prune"])
def test_observe_examines_what_the_policy_may_act_on(
    root: Path, tmp_path: Path, unmanaged: str
) -> None:
    """Prefix matches and required models are looked at (all entries with unmanaged: prune),
    and the plan is the one a full scan gives."""
    from ocrd.config import load_policy
    from ocrd.core.plan import reconcile

    make_model(root, "old_a.bin", b"1234", age=7200)
    make_model(root, "old_b.bin", b"1", age=10)
    make_model(root, "req.bin", b"required")
    make_model(root, "keep.gguf", b"allowed")
    make_model(root, "stray.bin", b"unmanaged", age=7200)
    (root / "stray_dir").mkdir()
    make_model(root / "stray_dir", "w.bin", b"w", age=7200)
    os.utime(root / "stray_dir", (time.time() - 7200,) * 2)
    data = {
        "model_dir": str(root),
        "state_dir": str(tmp_path / "state"),
        "required": [{"name": "req.bin", "sha256": sha(b"required")}],
        "whitelist": ["*.gguf"],
        "prune": {"prefixes": ["old_"], "min_age": "1h", "max_fraction": 1},
        "unmanaged": unmanaged,
    }
    policy = load_policy(write_policy(tmp_path / "policy.yaml", data)).policy

    seen = observe(policy, log=structlog.get_logger())
    looked_at = {e.name for e in seen.entries if isinstance(e, Entry)}

    everything = {"old_a.bin", "old_b.bin", "req.bin", "keep.gguf", "stray.bin", "stray_dir"}
    if unmanaged == "prune":
        assert looked_at == everything
    else:
        assert looked_at == {"old_a.bin", "old_b.bin", "req.bin"}
    full = observe(policy, log=structlog.get_logger(), full=True)
    assert {e.name for e in full.entries if isinstance(e, Entry)} == everything
    now = time.time()
    lazy_plan, full_plan = reconcile(policy, seen, now=now), reconcile(policy, full, now=now)
    assert lazy_plan.actions == full_plan.actions
    assert lazy_plan.reports == full_plan.reports
    pruned = {a.name for a in lazy_plan.actions}
    assert pruned == (
        {"old_a.bin", "stray.bin", "stray_dir"} if unmanaged == "prune" else {"old_a.bin"}
    )


def test_dot_entries_are_in_the_snapshot(root: Path) -> None:
    """Dot-entries, ocrd's own among them, are observed; only classification ignores them."""
    make_model(root, ".hidden.bin")
    (root / ".ocrd-trash").mkdir()
    make_model(root, ".ocrd-tmp-0123")
    make_model(root, "model.bin")
    names = [e.name for e in scan(root).entries]
    assert names == [".hidden.bin", ".ocrd-tmp-0123", ".ocrd-trash", "model.bin"]


def test_only_pinned_files_are_hashed(root: Path, hash_calls: list[str]) -> None:
    """Files named in the pins get their real sha256; the rest are never read."""
    make_model(root, "pinned.bin", b"pinned bytes")
    make_model(root, "wrong_pin.bin", b"other bytes")
    make_model(root, "free.bin", b"not pinned")
    (root / "pinned_dir").mkdir()
    pins = {
        "pinned.bin": sha(b"pinned bytes"),
        "wrong_pin.bin": "0" * 64,
        "pinned_dir": "1" * 64,
    }
    entries = scan(root, pins=pins).by_name()
    assert entries["pinned.bin"].sha256 == sha(b"pinned bytes")
    assert entries["wrong_pin.bin"].sha256 == sha(b"other bytes")  # the real one, not the pin
    assert entries["free.bin"].sha256 is None
    assert entries["pinned_dir"].sha256 is None
    assert sorted(hash_calls) == ["pinned.bin", "wrong_pin.bin"]


def test_pinned_symlink_is_not_hashed_through(root: Path, tmp_path: Path) -> None:
    """A pinned name that is a symlink is never hashed through the link."""
    target = tmp_path / "target.bin"
    target.write_bytes(b"data")
    (root / "m.bin").symlink_to(target)
    entry = scan(root, pins={"m.bin": sha(b"data")}).by_name()["m.bin"]
    assert entry.kind is Kind.SYMLINK
    assert entry.sha256 is None


def test_hash_cache_avoids_rereading_unchanged_file(
    root: Path, tmp_path: Path, hash_calls: list[str]
) -> None:
    """A second scan of an unchanged pinned file takes the sha256 from the saved cache."""
    state = tmp_path / "state"
    make_model(root, "big.bin", b"B" * 10_000)
    pins = {"big.bin": sha(b"B" * 10_000)}

    first = HashCache(state)
    snap1 = scan(root, pins=pins, cache=first)
    assert first.save() is None
    assert hash_calls == ["big.bin"]

    second = HashCache(state)  # a fresh process would load it like this
    snap2 = scan(root, pins=pins, cache=second)
    assert hash_calls == ["big.bin"]
    assert snap2.by_name()["big.bin"].sha256 == snap1.by_name()["big.bin"].sha256 == pins["big.bin"]
    assert second.save() is None


def test_touched_file_is_rehashed(root: Path, tmp_path: Path, hash_calls: list[str]) -> None:
    """Changing a pinned file's mtime (or content) invalidates its cached sha256."""
    state = tmp_path / "state"
    path = make_model(root, "m.bin", b"version 1")
    pins = {"m.bin": sha(b"version 1")}
    cache = HashCache(state)
    scan(root, pins=pins, cache=cache)
    assert cache.save() is None

    later = time.time() + 100
    os.utime(path, (later, later))
    entry = scan(root, pins=pins, cache=HashCache(state)).by_name()["m.bin"]
    assert hash_calls == ["m.bin", "m.bin"]
    assert entry.sha256 == sha(b"version 1")

    path.write_bytes(b"version 2")
    cache = HashCache(state)
    entry = scan(root, pins=pins, cache=cache).by_name()["m.bin"]
    assert hash_calls == ["m.bin", "m.bin", "m.bin"]
    assert entry.sha256 == sha(b"version 2")


def test_cache_file_lives_in_state_dir(root: Path, tmp_path: Path) -> None:
    """The hash cache is written to the state dir and never into the model dir."""
    state = tmp_path / "state" / "nested"
    make_model(root, "m.bin", b"abc")
    before = sorted(os.listdir(root))
    cache = HashCache(state)
    scan(root, pins={"m.bin": sha(b"abc")}, cache=cache)
    assert cache.save() is None
    assert sorted(os.listdir(root)) == before
    saved = json.loads((state / CACHE_FILE).read_text(encoding="utf-8"))
    assert saved["version"] == 1
    assert list(saved["hashes"].values()) == [sha(b"abc")]
    assert [p.name for p in state.iterdir()] == [CACHE_FILE]  # no temp file left


def test_cache_drops_entries_no_longer_seen(root: Path, tmp_path: Path) -> None:
    """Entries for files that were not seen in the last scan are not kept on save."""
    state = tmp_path / "state"
    make_model(root, "a.bin", b"a")
    b = make_model(root, "b.bin", b"b")
    pins = {"a.bin": sha(b"a"), "b.bin": sha(b"b")}
    cache = HashCache(state)
    scan(root, pins=pins, cache=cache)
    assert cache.save() is None
    b.rename(root.parent / "b.bin")
    cache = HashCache(state)
    scan(root, pins=pins, cache=cache)
    assert cache.save() is None
    saved = json.loads((state / CACHE_FILE).read_text(encoding="utf-8"))
    assert list(saved["hashes"].values()) == [sha(b"a")]


def test_corrupt_cache_file_is_ignored(root: Path, tmp_path: Path, hash_calls: list[str]) -> None:
    """A cache file that is not valid JSON is treated as empty, and the file is re-hashed."""
    state = tmp_path / "state"
    state.mkdir()
    (state / CACHE_FILE).write_text("{not json", encoding="utf-8")
    make_model(root, "m.bin", b"abc")
    cache = HashCache(state)
    entry = scan(root, pins={"m.bin": sha(b"abc")}, cache=cache).by_name()["m.bin"]
    assert entry.sha256 == sha(b"abc")
    assert hash_calls == ["m.bin"]
    assert cache.save() is None
    assert json.loads((state / CACHE_FILE).read_text(encoding="utf-8"))["version"] == 1


@pytest.mark.parametrize("how", ["state dir is a file", "state dir under a file"])
def test_unusable_state_dir_save_returns_error(root: Path, tmp_path: Path, how: str) -> None:
    """save() into a state dir that cannot be created returns an error text instead of raising."""
    blocker = tmp_path / "blocker"
    blocker.write_text("a regular file", encoding="utf-8")
    state = blocker if how == "state dir is a file" else blocker / "state"
    make_model(root, "m.bin", b"abc")
    cache = HashCache(state)
    entry = scan(root, pins={"m.bin": sha(b"abc")}, cache=cache).by_name()["m.bin"]
    assert entry.sha256 == sha(b"abc")
    error = cache.save()
    assert isinstance(error, str)
    assert str(state / CACHE_FILE) in error
    assert blocker.read_text(encoding="utf-8") == "a regular file"


def test_no_state_dir_means_no_cache_file(root: Path) -> None:
    """A cache without a state dir saves nothing and reports no error."""
    make_model(root, "m.bin", b"abc")
    cache = HashCache(None)
    scan(root, pins={"m.bin": sha(b"abc")}, cache=cache)
    assert cache.save() is None
    assert sorted(os.listdir(root)) == ["m.bin"]


def _item(
    trash: Path, item_id: str, record: dict[str, Any] | str | None, payload: str | None
) -> Path:
    """A legacy (v1) quarantine dir: an optional record.json and an optional payload."""
    return _quarantine_dir(
        trash, item_id, LEGACY_RECORD, record, [] if payload is None else [payload]
    )


def _quarantine_dir(
    trash: Path,
    name: str,
    record_file: str,
    record: dict[str, Any] | str | None,
    payloads: list[str],
) -> Path:
    """trash/name holding an optional record (as *record_file*) and the payloads named."""
    path = trash / name
    path.mkdir(parents=True)
    if record is not None:
        text = record if isinstance(record, str) else json.dumps(record)
        (path / record_file).write_text(text, encoding="utf-8")
    for payload in payloads:
        (path / payload).write_bytes(b"payload")
    return path


def _record(name: str, at: float) -> dict[str, Any]:
    return {"name": name, "trashed_at": at, "reason": "test", "size": 7, "sha256": None}


def _batch(
    trash: Path, batch_id: str, record: dict[str, Any] | str | None, payloads: list[str]
) -> Path:
    """A v2 quarantine batch: an optional .ocrd-record.json and the payloads present."""
    return _quarantine_dir(trash, batch_id, RECORD, record, payloads)


def _batch_record(names: list[str], at: float) -> dict[str, Any]:
    items = [{"name": n, "reason": f"why {n}", "size": 7, "sha256": None} for n in names]
    return {"version": 2, "trashed_at": at, "items": items}


def test_read_trash_lists_only_complete_items(root: Path) -> None:
    """Only legacy trash items with both a readable record and their payload are listed."""
    trash = root / TRASH
    now = time.time()
    _item(trash, "20240101T000000Z-aaaa", _record("a.bin", now - 20), "a.bin")
    _item(trash, "20240101T000000Z-bbbb", _record("b.bin", now - 10), "b.bin")
    _item(trash, "no-payload", _record("c.bin", now), None)
    _item(trash, "no-record", None, "d.bin")
    _item(trash, "wrong-payload", _record("e.bin", now), "other.bin")
    _item(trash, "bad-json", "{oops", "f.bin")
    _item(trash, "missing-keys", {"name": "g.bin"}, "g.bin")
    _item(trash, ".hidden", _record("h.bin", now), "h.bin")
    _item(trash, "empty", None, None)
    (trash / "stray-file").write_text("x", encoding="utf-8")

    items = read_trash(str(root))

    assert [(i.id, i.name) for i in items] == [
        ("20240101T000000Z-aaaa/a.bin", "a.bin"),
        ("20240101T000000Z-bbbb/b.bin", "b.bin"),
    ]
    assert items[0].size == 7
    assert items[0].trashed_at == pytest.approx(now - 20)
    assert items[0].reason == "test"
    assert scan(root).trash == items


def test_read_trash_lists_the_models_present_in_each_batch(root: Path) -> None:
    """A v2 batch gives one item per listed model whose payload is there, ids `<batch>/<name>`."""
    trash = root / TRASH
    now = time.time()
    # c.bin never moved in (or was restored); z.bin is not in the record
    listed = _batch_record(["a.bin", "b", "c.bin"], now - 5)
    _batch(trash, "20240102T000000Z-cccc", listed, ["a.bin", "b", "z.bin"])
    _batch(trash, "20240101T000000Z-dddd", _batch_record(["d.bin"], now - 50), ["d.bin"])
    _batch(trash, "nothing-moved", _batch_record(["e.bin"], now), [])
    _batch(trash, "no-record", None, ["f.bin"])
    _batch(trash, "tmp-record-only", None, [])
    (trash / "tmp-record-only" / (RECORD + ".tmp")).write_text("{", encoding="utf-8")
    _batch(trash, "bad-json", "{oops", ["g.bin"])
    no_keys = {"version": 2, "trashed_at": now, "items": [{"name": "h.bin"}]}
    _batch(trash, "missing-keys", no_keys, ["h.bin"])
    _batch(trash, ".hidden", _batch_record(["i.bin"], now), ["i.bin"])
    # a model named like the v1 record is a payload of a v2 batch, not its record
    named_like_v1 = _batch_record(["record.json"], now - 1)
    _batch(trash, "20240103T000000Z-eeee", named_like_v1, ["record.json"])

    items = read_trash(str(root))

    assert [(i.id, i.name) for i in items] == [
        ("20240101T000000Z-dddd/d.bin", "d.bin"),
        ("20240102T000000Z-cccc/a.bin", "a.bin"),
        ("20240102T000000Z-cccc/b", "b"),
        ("20240103T000000Z-eeee/record.json", "record.json"),
    ]
    by_id = {i.id: i for i in items}
    a = by_id["20240102T000000Z-cccc/a.bin"]
    assert (a.trashed_at, a.reason, a.size, a.sha256) == (
        pytest.approx(now - 5),
        "why a.bin",
        7,
        None,
    )
    assert by_id["20240102T000000Z-cccc/b"].reason == "why b"
    assert scan(root).trash == items


def test_read_batch_tells_the_record_from_the_payloads(root: Path) -> None:
    """read_batch gives the record's items by name (None if unreadable) and every other entry."""
    trash = root / TRASH
    now = time.time()
    v2 = _batch(trash, "v2", _batch_record(["a.bin", "gone.bin"], now), ["a.bin", "x.bin"])
    (v2 / (RECORD + ".tmp")).write_text("{", encoding="utf-8")
    batch = read_batch(str(v2))
    assert batch.items is not None
    assert sorted(batch.items) == ["a.bin", "gone.bin"]
    assert batch.items["a.bin"].id == "v2/a.bin"
    assert batch.payloads == {"a.bin", "x.bin"}

    v1 = _item(trash, "v1", _record("l.bin", now), "l.bin")
    legacy = read_batch(str(v1))
    assert legacy.items is not None and list(legacy.items) == ["l.bin"]
    assert legacy.items["l.bin"].id == "v1/l.bin"
    assert legacy.payloads == {"l.bin"}

    garbled = _batch(trash, "garbled", "{oops", ["g.bin"])
    assert read_batch(str(garbled)) == Batch(None, frozenset({"g.bin"}))
    empty = _batch(trash, "empty", None, [])
    assert read_batch(str(empty)) == Batch(None, frozenset())


def test_read_trash_without_trash_dir(root: Path) -> None:
    """A model dir without a trash dir, or with a file in its place, has no trash items."""
    assert read_trash(str(root)) == ()
    (root / TRASH).write_text("not a dir", encoding="utf-8")
    assert read_trash(str(root)) == ()


def test_scan_missing_dir_raises(tmp_path: Path) -> None:
    """Scanning a model dir that does not exist raises ModelDirError."""
    with pytest.raises(ModelDirError, match=r"does not exist"):
        scan(tmp_path / "nope")


def test_scan_file_raises(tmp_path: Path) -> None:
    """Scanning a path that is a regular file raises ModelDirError."""
    path = make_model(tmp_path, "afile")
    with pytest.raises(ModelDirError, match=r"not a directory"):
        scan(path)


def test_a_dead_writers_temp_file_is_swept_by_the_next_save(tmp_path: Path) -> None:
    """A hash-cache temp file of a killed ocrd is removed by the next save; a live one stays."""
    state = tmp_path / "state"
    state.mkdir()
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    dead = state / f".hashes.json.{gone.stdout.strip()}.tmp"
    dead.write_text("{partial")
    alive = state / ".hashes.json.1.tmp"  # pid 1 always exists
    alive.write_text("{partial")
    cache = HashCache(state)
    model = tmp_path / "m.bin"
    model.write_bytes(b"x")
    cache.put(os.stat(model), "0" * 64)
    assert cache.save() is None
    assert not dead.exists()
    assert alive.exists()
    assert (state / "hashes.json").exists()


def test_no_gc_pauses_holds_the_collector_and_leaves_no_young_backlog() -> None:
    """Inside, the cyclic collector is off; after, it is on again and what the cycle
    built and still holds sits in the oldest generation (no young pass walks it)."""
    import gc

    assert gc.isenabled()
    with no_gc_pauses():
        assert not gc.isenabled()
        held = [(i, str(i)) for i in range(50_000)]
    assert gc.isenabled()
    young = {id(o) for o in gc.get_objects(generation=0)}
    assert not any(id(t) in young for t in held[::1000])
    oldest = {id(o) for o in gc.get_objects(generation=2)}
    assert all(id(t) in oldest for t in held[::1000])


def test_names_starting_finds_ocrds_own_entries(root: Path) -> None:
    """names_starting bisects the sorted entries: every match, nothing else."""
    names = [".ocrd-tmp-1", ".ocrd-deleting-x", ".ocrd-trash", "-dash", "+plus", ".a", ".ocrdx"]
    names += ["z.bin", "ocrd-tmp-2"]
    for name in names:
        make_model(root, name)
    snap = scan(root)
    assert snap.names_starting(".ocrd-") == [".ocrd-deleting-x", ".ocrd-tmp-1", ".ocrd-trash"]
    assert snap.names_starting("zz") == []
    assert snap.names_starting("") == sorted(names)


def test_a_record_is_parsed_once_while_it_is_the_same_file(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """read_batch reuses its parse of an unchanged record; a rewritten record is read again,
    and the payload listing is always fresh."""
    parses: list[str] = []
    real = trash_reading._record_items

    def counting(batch_id: str, rec: Any) -> dict[str, Any]:
        parses.append(batch_id)
        return real(batch_id, rec)

    monkeypatch.setattr(trash_reading, "_record_items", counting)
    trash = root / TRASH
    path = _batch(trash, "b1", _batch_record(["a.bin", "b.bin"], time.time()), ["a.bin", "b.bin"])

    first = read_batch(str(path))
    (path / "b.bin").unlink()  # restored or purged meanwhile
    second = read_batch(str(path))
    assert parses == ["b1"]
    assert second.items == first.items and set(first.items or ()) == {"a.bin", "b.bin"}
    assert second.payloads == {"a.bin"}
    with pytest.raises(TypeError):
        second.items["c.bin"] = second.items["a.bin"]  # type: ignore[index]  # read-only

    record = path / RECORD
    tmp = path / "new-record"
    tmp.write_text(json.dumps(_batch_record(["a.bin"], time.time())), encoding="utf-8")
    os.replace(tmp, record)  # as ocrd writes files: a new inode under the name
    third = read_batch(str(path))
    assert parses == ["b1", "b1"]
    assert set(third.items or ()) == {"a.bin"}
