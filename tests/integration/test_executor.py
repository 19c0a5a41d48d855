"""apply, recover and friends on real files with real processes (DESIGN §4, §5)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from ocrd import cycle
from ocrd.act.apply import apply
from ocrd.act.recovery import recover
from ocrd.act.trash import restore_from_trash
from ocrd.core.model import ActionKind, Outcome, Plan, ReportKind
from ocrd.core.names import DELETING_PREFIX, LEGACY_RECORD, RECORD, TMP_PREFIX, TRASH
from ocrd.core.plan import reconcile
from ocrd.core.policy import Policy
from ocrd.engine.base import EngineError
from ocrd.engine.none import NoEngine
from ocrd.log import LISTED
from ocrd.observe.handles import HandleIndex, build_index
from ocrd.observe.scan import scan
from ocrd.observe.trash import read_trash
from tests.support.files import leftovers, make_model, sha256
from tests.support.logs import matching
from tests.support.procs import HOLD_FD, HOLD_MMAP, holder
from tests.support.trash import trash_batch, trash_item

DAY = 86400.0

# --------------------------------------------------------------------------- helpers


def make_policy(
    root: Path,
    state: Path,
    *,
    action: str = "quarantine",
    min_age: str = "0s",
    required: list[dict[str, Any]] | None = None,
    **extra: Any,
) -> Policy:
    """A policy on *root*: prefix 'old_' pruned (at any age by default), '*.gguf' whitelisted."""
    data: dict[str, Any] = {
        "model_dir": str(root),
        "state_dir": str(state),
        "required": required or [],
        "whitelist": ["*.gguf"],
        "prune": {"prefixes": ["old_"], "min_age": min_age, "action": action, "max_fraction": 1.0},
        "engine": {"backend": "none"},
        **extra,
    }
    return Policy.model_validate(data)


def plan_for(policy: Policy) -> Plan:
    snap = scan(policy.model_dir, pins=policy.pins())
    return reconcile(policy, snap, now=time.time())


def run_apply(
    the_plan: Plan, root: Path, engine: Any, **kwargs: Any
) -> tuple[Outcome, list[dict[str, Any]]]:
    """apply with the log captured as dicts."""
    with capture_logs() as logs:
        outcome = apply(the_plan, root=root, engine=engine, log=structlog.get_logger(), **kwargs)
    return outcome, logs


def tree(path: Path) -> dict[str, tuple[Any, ...]]:
    """Everything at and below *path* (symlinks not followed): kind, bytes or target, inode."""
    out: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(path):
        for name in sorted(dirnames + filenames):
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, path)
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(full), st.st_ino)
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", st.st_ino)
            else:
                with open(full, "rb") as fh:
                    out[rel] = ("file", fh.read(), st.st_ino, st.st_mtime_ns)
    return out


def batch_dirs(root: Path) -> list[str]:
    """The directories in the model dir's quarantine (none if it has no quarantine)."""
    trash = root / TRASH
    return sorted(os.listdir(trash)) if trash.is_dir() else []


def read_record(batch: Path) -> dict[str, Any]:
    """A v2 batch's record, parsed."""
    record: dict[str, Any] = json.loads((batch / RECORD).read_text(encoding="utf-8"))
    return record


class FakeEngine:
    """An engine that holds a real read descriptor on *model* while open.

    release() notes whether the model was still under its name with the same
    inode (so release ran before anything moved it), then closes the
    descriptor, unless *leak* (a release that lies) or *fail* (one that raises).
    """

    name = "fake"

    def __init__(
        self, model: Path, journal: list[str], *, fail: bool = False, leak: bool = False
    ) -> None:
        self.model = model
        self.journal = journal
        self.fail = fail
        self.leak = leak
        self.fd: int | None = None
        self.released_intact: list[bool] = []
        self.opened_with_model: list[bool] = []

    hosted = False
    pid = None

    def alive(self) -> bool:
        return True

    def open(self, model_dir: Path) -> None:
        self.journal.append("open")
        assert model_dir == self.model.parent
        present = self.model.exists()
        self.opened_with_model.append(present)
        if present and self.fd is None:
            self.fd = os.open(self.model, os.O_RDONLY | os.O_CLOEXEC)

    def list_local(self) -> list[str]:
        return [self.model.name] if self.fd is not None else []

    def local_path(self) -> str | None:
        return str(self.model.parent)

    def release(self) -> None:
        self.journal.append("release")
        if self.fail:
            raise EngineError("engine host did not exit within 10s")
        intact = False
        if self.fd is not None:
            held = os.fstat(self.fd)
            try:
                now = os.lstat(self.model)
            except FileNotFoundError:
                pass
            else:
                intact = (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino)
        self.released_intact.append(intact)
        if not self.leak:
            self.close()

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


@pytest.fixture
def journal(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every rename/replace/link/unlink/rmdir in this process, as 'op:basename'."""
    calls: list[str] = []
    for op in ("rename", "replace", "link", "unlink", "rmdir"):
        real: Callable[..., Any] = getattr(os, op)

        def wrapper(*args: Any, _op: str = op, _real: Callable[..., Any] = real, **kw: Any) -> Any:
            calls.append(f"{_op}:{os.path.basename(os.fsdecode(args[0]))}")
            return _real(*args, **kw)

        monkeypatch.setattr(os, op, wrapper)
    return calls


# --------------------------------------------------------------------------- (a) ordering


@pytest.mark.parametrize(("mode", "op"), [("quarantine", "rename"), ("delete", "unlink")])
def test_release_before_act_then_open(
    root: Path, state: Path, journal: list[str], mode: str, op: str
) -> None:
    """The engine is released before its model is moved, handles are checked, then it reopens."""
    model = make_model(root, "old_model.bin", b"weights" * 100, age=7200)
    other = make_model(root, "old_other.bin", b"other", age=3600)
    make_model(root, "keep.gguf", b"keep")
    engine = FakeEngine(model, journal)
    engine.open(root)
    journal.clear()

    def index(keys: set[tuple[int, int]], paths: set[str]) -> HandleIndex:
        journal.append("index")
        return build_index(keys, paths=paths, roots=(str(root),))

    the_plan = plan_for(make_policy(root, state, action=mode))
    assert [a.name for a in the_plan.actions] == ["old_model.bin", "old_other.bin"]
    try:
        outcome, logs = run_apply(the_plan, root, engine, index=index)
    finally:
        engine.close()

    assert journal[0] == "release"
    assert journal[-1] == "open"
    assert journal.count("index") == 1  # one index for the whole cycle
    if mode == "quarantine":
        assert journal.index("index") < journal.index(f"{op}:old_model.bin")
    else:
        # Two-phase: out of its name first, then the index, then the unlink of what moved.
        assert journal.index("rename:old_model.bin") < journal.index("index")
        # The files moved into one `.ocrd-deleting-*` dir, which goes once they are gone.
        unlinks = [c for c in journal if c.startswith("unlink:")]
        assert len(unlinks) == 2, journal
        assert journal.index("index") < journal.index(unlinks[0])
        (dropped,) = [c for c in journal if c.startswith("rmdir:.ocrd-deleting-")]
        assert journal.index(unlinks[-1]) < journal.index(dropped)
    fs_ops = [c for c in journal if c not in ("release", "index", "open")]
    assert fs_ops, journal
    assert journal.index("release") < journal.index(fs_ops[0])
    assert journal.index(fs_ops[-1]) < journal.index("open")
    assert engine.released_intact == [True]  # still under its name, same inode, at release
    assert engine.opened_with_model == [True, False]  # set-up open, then reopened after the prune
    assert [a.name for a in outcome.done] == ["old_model.bin", "old_other.bin"]
    assert outcome.engine_error is None
    assert not model.exists() and not other.exists()
    assert (root / "keep.gguf").read_bytes() == b"keep"
    names = [e["event"] for e in logs]
    assert names.count("model.pruned") == 2
    assert names[-1] == "engine.cycled"
    assert matching(logs, "engine.cycled")[0]["engine"] == "fake"


def test_engine_open_failure_is_reported_not_fatal(root: Path, state: Path) -> None:
    """An engine that cannot be reopened after acting is reported; the actions stand."""

    class BrokenOpen(NoEngine):
        name = "broken"

        def open(self, model_dir: Path) -> None:
            raise EngineError("ICU missing")

    make_model(root, "old_model.bin", b"x")
    outcome, logs = run_apply(plan_for(make_policy(root, state)), root, BrokenOpen())
    assert [a.name for a in outcome.done] == ["old_model.bin"]
    assert outcome.engine_error is not None and "ICU missing" in outcome.engine_error
    (unavailable,) = matching(logs, "engine.unavailable")
    assert (unavailable["engine"], unavailable["log_level"]) == ("broken", "error")
    assert matching(logs, "engine.cycled") == []


def test_empty_plan_does_not_cycle_engine(root: Path, state: Path, journal: list[str]) -> None:
    """A plan with nothing to change neither releases nor reopens the engine."""
    model = make_model(root, "keep.gguf", b"keep")
    engine = FakeEngine(model, journal)
    the_plan = plan_for(make_policy(root, state))
    assert the_plan.actions == ()
    outcome, logs = run_apply(the_plan, root, engine)
    assert journal == []
    assert outcome == Outcome()
    assert logs == []


# --------------------------------------------------------------------------- (b) fail closed


def test_release_failure_fails_closed(
    root: Path, state: Path, tmp_path: Path, journal: list[str]
) -> None:
    """If the engine cannot be released, no action runs and nothing on disk changes."""
    model = make_model(root, "old_model.bin", b"old")
    make_model(root, "keep.gguf", b"keep")
    source = make_model(tmp_path, "req-source.bin", b"required")
    expired = time.time() - 30 * DAY
    trash_item(root, "20200101T000000Z-0001", "old_gone.bin", b"gone", trashed_at=expired)
    policy = make_policy(
        root,
        state,
        required=[{"name": "req.bin", "sha256": sha256(b"required"), "source": str(source)}],
    )
    the_plan = plan_for(policy)
    assert sorted(a.kind for a in the_plan.actions) == sorted(
        [ActionKind.RESTORE, ActionKind.PRUNE, ActionKind.PURGE]
    )
    engine = FakeEngine(model, journal, fail=True)
    engine.open(root)
    journal.clear()
    before = tree(root)
    try:
        outcome, logs = run_apply(the_plan, root, engine)
    finally:
        engine.close()

    assert tree(root) == before
    assert journal[0] == "release"
    assert [c for c in journal if ":" in c] == []  # not one rename/unlink/link
    assert outcome.engine_error is not None
    assert "release failed" in outcome.engine_error
    assert "did not exit" in outcome.engine_error
    assert outcome.done == () and outcome.failed == ()
    assert [a for a, _ in outcome.skipped] == list(the_plan.actions)
    assert all(why == "engine release failed" for _, why in outcome.skipped)
    failed = matching(logs, "engine.release_failed")
    assert len(failed) == 1
    assert failed[0]["log_level"] == "error"
    assert failed[0]["skipped"] == 3
    assert failed[0]["engine"] == "fake"
    assert not {"model.pruned", "model.restored", "trash.purged"} & {e["event"] for e in logs}


# --------------------------------------------------------------------------- (c) lying release


def test_release_that_keeps_descriptor_is_caught(
    root: Path, state: Path, journal: list[str]
) -> None:
    """A release that 'succeeds' but keeps the file open leaves the model busy with our pid."""
    held = make_model(root, "old_held.bin", b"held" * 50)
    free = make_model(root, "old_free.bin", b"free")
    engine = FakeEngine(held, journal, leak=True)
    engine.open(root)
    held_before = tree(root)["old_held.bin"]
    the_plan = plan_for(make_policy(root, state))
    try:
        outcome, logs = run_apply(the_plan, root, engine)
    finally:
        engine.close()

    me = os.getpid()
    comm = Path(f"/proc/{me}/comm").read_text(encoding="utf-8").strip()
    busy = matching(logs, "model.busy")
    assert len(busy) == 1
    assert busy[0]["model"] == "old_held.bin"
    assert busy[0]["pids"] == [me]
    assert f"pid {me} ({comm}, fd)" in busy[0]["holders"]
    assert tree(root)["old_held.bin"] == held_before  # untouched
    assert [(r.kind, r.name) for r in outcome.busy] == [(ReportKind.BUSY, "old_held.bin")]
    assert [(a.name, why.startswith("busy")) for a, why in outcome.skipped] == [
        ("old_held.bin", True)
    ]
    assert [a.name for a in outcome.done] == ["old_free.bin"]
    assert not free.exists()
    assert [e["model"] for e in matching(logs, "model.pruned")] == ["old_free.bin"]


# --------------------------------------------------------------------------- (d) other processes


@pytest.mark.parametrize(
    ("script", "comm", "how"),
    [(HOLD_FD, "ocrd-hold-fd", "fd"), (HOLD_MMAP, "ocrd-hold-map", "mmap")],
    ids=["fd", "mmap"],
)
def test_model_held_by_other_process_is_busy(
    root: Path, state: Path, tmp_path: Path, script: str, comm: str, how: str
) -> None:
    """A model another process holds (descriptor or map) is busy until that process exits."""
    model = make_model(root, "old_held.gguf.bin", b"G" * 65536)
    make_model(root, "old_other.bin", b"other")
    policy = make_policy(root, state)
    with holder(tmp_path, comm, script, model) as child:
        the_plan = plan_for(policy)
        held_before = tree(root)["old_held.gguf.bin"]
        outcome, logs = run_apply(the_plan, root, NoEngine())
        busy = matching(logs, "model.busy")
        assert len(busy) == 1
        assert busy[0]["model"] == "old_held.gguf.bin"
        assert busy[0]["pids"] == [child.pid]
        assert busy[0]["holders"] == f"pid {child.pid} ({comm}, {how})"
        assert busy[0]["action"] == "prune"
        assert tree(root)["old_held.gguf.bin"] == held_before
        assert [r.name for r in outcome.busy] == ["old_held.gguf.bin"]
        assert [a.name for a in outcome.done] == ["old_other.bin"]
    assert child.returncode is not None  # the holder is gone

    outcome, logs = run_apply(plan_for(policy), root, NoEngine())
    assert matching(logs, "model.busy") == []
    assert [e["model"] for e in matching(logs, "model.pruned")] == ["old_held.gguf.bin"]
    assert [a.name for a in outcome.done] == ["old_held.gguf.bin"]
    assert not model.exists()


def test_directory_model_with_held_file_inside_is_busy(
    root: Path, state: Path, tmp_path: Path
) -> None:
    """A directory model is busy when any file below it is held by a process."""
    model = root / "old_Qwen-GGUF"
    (model / "sub").mkdir(parents=True)
    inner = make_model(model / "sub", "weights.gguf", b"w" * 4096)
    make_model(model, "README", b"readme")
    with holder(tmp_path, "ocrd-hold-fd", HOLD_FD, inner) as child:
        before = tree(root)
        outcome, logs = run_apply(plan_for(make_policy(root, state)), root, NoEngine())
        assert [e["pids"] for e in matching(logs, "model.busy")] == [[child.pid]]
        assert tree(root) == before
        assert outcome.done == ()


# --------------------------------------------------------------------------- (e) quarantine


def test_quarantine_file_with_record(root: Path, state: Path) -> None:
    """A pruned file moves to .ocrd-trash/<batch>/<name> with a record, bytes and inode kept."""
    data = os.urandom(10_000)
    model = make_model(root, "old_model.bin", data, age=3 * 3600)
    inode = model.stat().st_ino
    the_plan = plan_for(make_policy(root, state))
    (action,) = the_plan.actions
    t0 = time.time()
    outcome, logs = run_apply(the_plan, root, NoEngine())
    t1 = time.time()

    assert outcome.done == (action,)
    assert not model.exists()
    (item,) = read_trash(str(root))
    batch_id, name = item.id.split("/")
    assert name == item.name == "old_model.bin"
    assert batch_dirs(root) == [batch_id]
    batch = root / TRASH / batch_id
    moved = batch / "old_model.bin"
    assert moved.read_bytes() == data
    assert moved.stat().st_ino == inode  # an atomic rename, not a copy
    record = read_record(batch)
    assert set(record) == {"version", "trashed_at", "items"}
    assert record["version"] == 2
    assert t0 - 1 <= record["trashed_at"] <= t1 + 1
    assert item.trashed_at == record["trashed_at"]
    (listed,) = record["items"]
    assert set(listed) >= {"name", "reason", "size", "sha256"}
    assert listed["name"] == "old_model.bin"
    assert listed["reason"] == action.reason
    assert "prefix 'old_'" in listed["reason"]
    assert listed["size"] == len(data)
    assert listed["sha256"] in (None, sha256(data))
    assert sorted(os.listdir(batch)) == sorted(["old_model.bin", RECORD])
    (pruned,) = matching(logs, "model.pruned")
    assert pruned["model"] == "old_model.bin"
    assert pruned["reason"] == action.reason
    assert pruned["bytes"] == len(data)
    assert pruned["dest"] == f"{TRASH}/{item.id}"
    assert leftovers(root) == []


def test_quarantine_directory_model(root: Path, state: Path) -> None:
    """A directory model is quarantined whole, its contents byte for byte."""
    model = root / "old_Qwen-GGUF"
    (model / "sub").mkdir(parents=True)
    make_model(model, "a.gguf", b"a" * 3000)
    make_model(model / "sub", "b.bin", b"b" * 500)
    (model / "link").symlink_to("a.gguf")
    before = tree(model)
    outcome, logs = run_apply(plan_for(make_policy(root, state)), root, NoEngine())
    assert [a.name for a in outcome.done] == ["old_Qwen-GGUF"]
    assert not model.exists()
    (item,) = read_trash(str(root))
    assert item.id.endswith("/old_Qwen-GGUF")
    assert tree(root / TRASH / item.id) == before
    assert item.size == 3500 + len("a.gguf")
    (pruned,) = matching(logs, "model.pruned")
    assert (pruned["bytes"], pruned["dest"]) == (item.size, f"{TRASH}/{item.id}")


# --------------------------------------------------------------------------- (e2) batches


def test_one_cycle_quarantines_into_one_batch(root: Path, state: Path) -> None:
    """One apply moves every model it prunes into one batch dir whose record lists exactly them."""
    files = {"old_a.bin": os.urandom(3000), "old_b.bin": b"b" * 20, "old_empty.bin": b""}
    for age, (name, data) in enumerate(files.items(), start=1):
        make_model(root, name, data, age=age * 3600)
    (root / "old_dir" / "sub").mkdir(parents=True)
    make_model(root / "old_dir" / "sub", "w.bin", b"w" * 700)
    (root / "old_link").symlink_to("keep.gguf")
    make_model(root, "keep.gguf", b"keep")
    names = sorted([*files, "old_dir", "old_link"])
    inodes = {name: os.lstat(root / name).st_ino for name in names}
    dir_before = tree(root / "old_dir")
    the_plan = plan_for(make_policy(root, state))
    assert sorted(a.name for a in the_plan.actions) == names
    t0 = time.time()
    outcome, logs = run_apply(the_plan, root, NoEngine())
    t1 = time.time()

    assert sorted(a.name for a in outcome.done) == names
    assert sorted(os.listdir(root)) == [TRASH, "keep.gguf"]
    (batch_id,) = batch_dirs(root)
    batch = root / TRASH / batch_id
    assert sorted(os.listdir(batch)) == sorted([RECORD, *names])
    assert {name: os.lstat(batch / name).st_ino for name in names} == inodes  # renamed
    for name, data in files.items():
        assert (batch / name).read_bytes() == data
    assert tree(batch / "old_dir") == dir_before
    assert os.readlink(batch / "old_link") == "keep.gguf"
    record = read_record(batch)
    assert record["version"] == 2
    assert t0 - 1 <= record["trashed_at"] <= t1 + 1
    assert sorted(i["name"] for i in record["items"]) == names  # each listed once
    planned = {a.name: a for a in the_plan.actions}
    for listed in record["items"]:
        action = planned[listed["name"]]
        assert (listed["reason"], listed["size"]) == (action.reason, action.bytes)
    items = read_trash(str(root))
    assert sorted(i.id for i in items) == [f"{batch_id}/{name}" for name in names]
    assert {i.trashed_at for i in items} == {record["trashed_at"]}
    dests = {e["model"]: e["dest"] for e in matching(logs, "model.pruned")}
    assert dests == {name: f"{TRASH}/{batch_id}/{name}" for name in names}
    assert leftovers(root) == []


def test_listed_model_that_never_moved_is_not_a_trash_item(
    root: Path, state: Path, tmp_path: Path
) -> None:
    """A model the cycle listed in its batch record but skipped stays in place, no trash item."""
    make_model(root, "old_a.bin", b"a" * 10, age=7200)
    skipped = make_model(root, "old_b.bin", b"b" * 20, age=3600)
    the_plan = plan_for(make_policy(root, state, min_age="10m"))
    assert [a.name for a in the_plan.actions] == ["old_a.bin", "old_b.bin"]
    _touch(skipped, tmp_path)
    outcome, logs = run_apply(the_plan, root, NoEngine())
    assert [e["model"] for e in matching(logs, "model.changed")] == ["old_b.bin"]

    assert [a.name for a in outcome.done] == ["old_a.bin"]
    assert [(a.name, why) for a, why in outcome.skipped] == [
        ("old_b.bin", "modified since the scan")
    ]
    assert skipped.read_bytes() == b"b" * 20
    (batch_id,) = batch_dirs(root)
    batch = root / TRASH / batch_id
    assert sorted(i["name"] for i in read_record(batch)["items"]) == ["old_a.bin", "old_b.bin"]
    assert sorted(os.listdir(batch)) == sorted([RECORD, "old_a.bin"])
    assert [i.id for i in read_trash(str(root))] == [f"{batch_id}/old_a.bin"]
    with capture_logs():
        assert recover(str(root), structlog.get_logger()) == []  # a complete batch
    assert batch_dirs(root) == [batch_id]


@pytest.mark.parametrize("how", ["changed", "immutable"])
def test_cycle_that_moves_nothing_leaves_no_batch(
    root: Path, state: Path, tmp_path: Path, request: pytest.FixtureRequest, how: str
) -> None:
    """A cycle whose quarantines are all skipped (changed) or all fail (EPERM) leaves no batch."""
    models = [
        make_model(root, "old_a.bin", b"a" * 10, age=7200),
        make_model(root, "old_b.bin", b"b" * 20, age=3600),
    ]
    make_model(root, "keep.gguf", b"keep")
    the_plan = plan_for(make_policy(root, state, min_age="10m"))
    assert [a.name for a in the_plan.actions] == ["old_a.bin", "old_b.bin"]
    if how == "changed":
        for model in models:
            _touch(model, tmp_path)  # check_unchanged skips it
    else:
        immutable: Callable[..., None] = request.getfixturevalue("immutable")
        for model in models:
            immutable(model)  # passes check_unchanged; the rename fails
    before = tree(root)

    outcome, logs = run_apply(the_plan, root, NoEngine())

    assert outcome.done == ()
    if how == "changed":
        assert [a.name for a, _ in outcome.skipped] == ["old_a.bin", "old_b.bin"]
    else:
        assert [a.name for a, _ in outcome.failed] == ["old_a.bin", "old_b.bin"]
        assert all("not permitted" in e["error"] for e in matching(logs, "action.failed"))
    assert matching(logs, "model.pruned") == []
    assert batch_dirs(root) == []
    assert {k: v for k, v in tree(root).items() if k != TRASH} == before
    assert read_trash(str(root)) == ()
    assert leftovers(root) == []


def test_restoring_from_a_batch_keeps_the_rest_and_drops_it_when_empty(
    root: Path, state: Path
) -> None:
    """Restoring one of a batch's two models leaves the other restorable; the last drops it."""
    make_model(root, "old_a.bin", b"a" * 10, age=7200)
    make_model(root, "old_b.bin", b"b" * 20, age=3600)
    run_apply(plan_for(make_policy(root, state)), root, NoEngine())
    (batch_id,) = batch_dirs(root)
    batch = root / TRASH / batch_id
    items = {i.name: i for i in read_trash(str(root))}
    assert sorted(items) == ["old_a.bin", "old_b.bin"]

    assert restore_from_trash(str(root), items["old_a.bin"]) == "old_a.bin"
    assert (root / "old_a.bin").read_bytes() == b"a" * 10
    assert batch_dirs(root) == [batch_id]
    assert sorted(os.listdir(batch)) == sorted([RECORD, "old_b.bin"])
    assert read_trash(str(root)) == (items["old_b.bin"],)

    restored = restore_from_trash(str(root), items["old_b.bin"], as_name="keep_b.bin")
    assert restored == "keep_b.bin"
    assert (root / "keep_b.bin").read_bytes() == b"b" * 20
    assert batch_dirs(root) == []
    assert read_trash(str(root)) == ()
    assert sorted(os.listdir(root)) == [TRASH, "keep_b.bin", "old_a.bin"]
    assert leftovers(root) == []


def test_purging_from_a_batch_keeps_the_rest_and_drops_it_when_empty(
    root: Path, state: Path, tmp_path: Path
) -> None:
    """Purging one of a batch's two models leaves the other in it; purging the last drops it."""
    make_model(root, "old_a.bin", b"a" * 4096, age=7200)
    (root / "old_dir" / "sub").mkdir(parents=True)
    make_model(root / "old_dir" / "sub", "w.bin", b"w" * 700, age=3600)
    policy = make_policy(root, state)
    run_apply(plan_for(policy), root, NoEngine())
    (batch_id,) = batch_dirs(root)
    batch = root / TRASH / batch_id
    later = time.time() + 8 * DAY  # past the 7d retention

    def purge_plan() -> Plan:
        the_plan = reconcile(policy, scan(root), now=later)
        assert {a.kind for a in the_plan.actions} == {ActionKind.PURGE}
        return the_plan

    with holder(tmp_path, "ocrd-hold-fd", HOLD_FD, batch / "old_a.bin") as child:
        outcome, logs = run_apply(purge_plan(), root, NoEngine())
        assert [e["pids"] for e in matching(logs, "model.busy")] == [[child.pid]]
    assert [a.trash_id for a in outcome.done] == [f"{batch_id}/old_dir"]
    assert [e["trash_id"] for e in matching(logs, "trash.purged")] == [f"{batch_id}/old_dir"]
    assert batch_dirs(root) == [batch_id]
    assert sorted(os.listdir(batch)) == sorted([RECORD, "old_a.bin"])
    assert (batch / "old_a.bin").read_bytes() == b"a" * 4096
    assert [i.id for i in read_trash(str(root))] == [f"{batch_id}/old_a.bin"]
    assert leftovers(root) == []

    outcome, logs = run_apply(purge_plan(), root, NoEngine())
    assert [a.trash_id for a in outcome.done] == [f"{batch_id}/old_a.bin"]
    assert batch_dirs(root) == []
    assert read_trash(str(root)) == ()
    assert os.listdir(root) == [TRASH]
    assert leftovers(root) == []


def test_model_named_record_json_is_quarantined_and_restored_intact(
    root: Path, state: Path
) -> None:
    """A model named record.json (the v1 record's name) survives quarantine, recovery, restore."""
    # Its bytes even look like a v1 record of another model.
    decoy = {"name": "decoy.bin", "trashed_at": 0.0, "reason": "x", "size": 1, "sha256": None}
    data = json.dumps(decoy).encode()
    model = make_model(root, LEGACY_RECORD, data, age=3600)
    inode = model.stat().st_ino
    the_plan = plan_for(make_policy(root, state, unmanaged="prune"))
    assert [a.name for a in the_plan.actions] == ["record.json"]
    outcome, logs = run_apply(the_plan, root, NoEngine())

    assert [a.name for a in outcome.done] == ["record.json"]
    assert [e["model"] for e in matching(logs, "model.pruned")] == ["record.json"]
    (item,) = read_trash(str(root))
    (batch_id,) = batch_dirs(root)
    assert (item.id, item.name, item.size) == (f"{batch_id}/record.json", "record.json", len(data))
    batch = root / TRASH / batch_id
    assert sorted(os.listdir(batch)) == sorted([RECORD, "record.json"])
    assert (batch / "record.json").read_bytes() == data
    with capture_logs() as recovery:
        assert recover(str(root), structlog.get_logger()) == []
    assert recovery == []  # a complete batch: nothing removed, nothing kept back
    assert read_trash(str(root)) == (item,)

    assert restore_from_trash(str(root), item) == "record.json"
    assert (model.read_bytes(), model.stat().st_ino) == (data, inode)
    assert batch_dirs(root) == []
    assert read_trash(str(root)) == ()


# --------------------------------------------------------------------------- (f) delete


def test_delete_file(root: Path, state: Path) -> None:
    """action: delete unlinks a file model and logs where it went."""
    model = make_model(root, "old_model.bin", b"x" * 1234)
    make_model(root, "keep.gguf", b"keep")
    outcome, logs = run_apply(plan_for(make_policy(root, state, action="delete")), root, NoEngine())
    assert [a.name for a in outcome.done] == ["old_model.bin"]
    assert not os.path.lexists(model)
    assert sorted(os.listdir(root)) == ["keep.gguf"]
    (pruned,) = matching(logs, "model.pruned")
    assert (pruned["model"], pruned["bytes"], pruned["dest"]) == ("old_model.bin", 1234, "deleted")
    assert "prefix 'old_'" in pruned["reason"]


def test_delete_directory_model(root: Path, state: Path, journal: list[str]) -> None:
    """A directory model is renamed to a .ocrd-deleting-* name, then removed without trace."""
    model = root / "old_dir"
    (model / "a" / "b").mkdir(parents=True)
    for i in range(5):
        make_model(model / "a" / "b", f"f{i}.bin", b"z" * 100)
    make_model(model, "top.bin", b"t")
    make_model(root, "keep.gguf", b"keep")
    outcome, logs = run_apply(plan_for(make_policy(root, state, action="delete")), root, NoEngine())
    assert [a.name for a in outcome.done] == ["old_dir"]
    assert sorted(os.listdir(root)) == ["keep.gguf"]
    assert leftovers(root) == []
    assert journal[0] == "rename:old_dir"  # moved away atomically before removal starts
    (pruned,) = matching(logs, "model.pruned")
    assert (pruned["bytes"], pruned["dest"]) == (501, "deleted")


@pytest.mark.parametrize("mode", ["delete", "quarantine"])
@pytest.mark.parametrize("target_kind", ["file", "dir"])
def test_symlink_to_outside_is_removed_as_link(
    root: Path, state: Path, tmp_path: Path, mode: str, target_kind: str
) -> None:
    """A symlink model pointing outside is pruned as a link; its target stays byte for byte."""
    outside = tmp_path / "outside"
    (outside / "data" / "deep").mkdir(parents=True)
    make_model(outside, "big.bin", os.urandom(20_000))
    make_model(outside / "data", "x.bin", b"x" * 700)
    make_model(outside / "data" / "deep", "y.bin", b"y" * 300)
    target = outside / ("big.bin" if target_kind == "file" else "data")
    link = root / "old_link"
    link.symlink_to(target)
    outside_before = tree(outside)

    outcome, logs = run_apply(plan_for(make_policy(root, state, action=mode)), root, NoEngine())

    assert [a.name for a in outcome.done] == ["old_link"]
    assert not os.path.lexists(link)
    assert tree(outside) == outside_before
    assert len(matching(logs, "model.pruned")) == 1
    assert leftovers(root) == []
    if mode == "quarantine":
        (item,) = read_trash(str(root))
        assert item.id.endswith("/old_link")
        moved = root / TRASH / item.id
        assert moved.is_symlink()
        assert os.readlink(moved) == str(target)
    else:
        assert not (root / TRASH).exists()


# --------------------------------------------------------------------------- (g) re-stat


def _replace(path: Path, tmp_path: Path) -> None:
    new = tmp_path / "replacement"
    new.write_bytes(b"replacement with other bytes")
    new.rename(path)


def _touch(path: Path, tmp_path: Path) -> None:
    st = path.lstat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000), follow_symlinks=False)


def _grow_same_mtime(path: Path, tmp_path: Path) -> None:
    st = path.stat()
    with open(path, "ab") as fh:
        fh.write(b"more")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _vanish(path: Path, tmp_path: Path) -> None:
    path.rename(tmp_path / "moved-away")


def _dir_gets_child(path: Path, tmp_path: Path) -> None:
    make_model(path, "new-child.bin", b"new")


def _dir_becomes_file(path: Path, tmp_path: Path) -> None:
    path.rename(tmp_path / "moved-dir")
    path.write_bytes(b"now a file")


def _dir_deep_write(path: Path, tmp_path: Path) -> None:
    (path / "sub" / "w.bin").write_bytes(b"rewritten while planned, longer")


CHANGES = {
    "replaced": (False, _replace, "replaced since the scan"),
    "mtime": (False, _touch, "modified since the scan"),
    "size": (False, _grow_same_mtime, "size changed since the scan"),
    "vanished": (False, _vanish, "vanished since the scan"),
    "dir-child": (True, _dir_gets_child, "modified since the scan"),
    "dir-to-file": (True, _dir_becomes_file, "replaced since the scan"),
    "dir-deep-write": (True, _dir_deep_write, "modified since the scan"),
}


@pytest.mark.parametrize("mode", ["quarantine", "delete"])
@pytest.mark.parametrize("change", list(CHANGES))
def test_changed_between_plan_and_apply_is_skipped(
    root: Path, state: Path, tmp_path: Path, change: str, mode: str
) -> None:
    """A model replaced or modified after planning is skipped with model.changed and left as is."""
    is_dir, mutate, reason = CHANGES[change]
    path = root / "old_model"
    if is_dir:
        (path / "sub").mkdir(parents=True)
        make_model(path / "sub", "w.bin", b"w" * 100, age=3600)
        past = time.time() - 3600
        for p in (path / "sub", path):
            os.utime(p, (past, past))
    else:
        make_model(root, "old_model", b"original", age=3600)
    # min_age 10m: whatever is written between plan and apply is too young to prune
    the_plan = plan_for(make_policy(root, state, action=mode, min_age="10m"))
    (action,) = the_plan.actions
    mutate(path, tmp_path)
    after_change = tree(root)

    outcome, logs = run_apply(the_plan, root, NoEngine())

    assert tree(root) == after_change
    assert outcome.done == ()
    assert outcome.skipped == ((action, reason),)
    (changed,) = matching(logs, "model.changed")
    assert (changed["model"], changed["reason"], changed["action"]) == (
        "old_model",
        reason,
        "prune",
    )
    assert matching(logs, "model.pruned") == []


def test_corrupt_model_replaced_before_restore_is_left(
    root: Path, state: Path, tmp_path: Path
) -> None:
    """A corrupt model replaced after planning is not quarantined by the restore; no tmp stays."""
    good = b"the good model"
    source = make_model(tmp_path, "source.bin", good)
    make_model(root, "req.bin", b"corrupt")
    policy = make_policy(
        root, state, required=[{"name": "req.bin", "sha256": sha256(good), "source": str(source)}]
    )
    the_plan = plan_for(policy)
    (action,) = the_plan.actions
    assert action.kind is ActionKind.RESTORE and action.entry is not None
    _replace(root / "req.bin", tmp_path)  # an operator fixed it by hand meanwhile
    after_change = tree(root)

    outcome, logs = run_apply(the_plan, root, NoEngine())

    assert tree(root) == after_change
    assert [(a.name, why) for a, why in outcome.skipped] == [("req.bin", "replaced since the scan")]
    assert [e["model"] for e in matching(logs, "model.changed")] == ["req.bin"]
    assert leftovers(root) == []
    assert read_trash(str(root)) == ()


# --------------------------------------------------------------------------- (h) failures


def test_trash_is_a_file_fails_prunes_not_the_rest(root: Path, state: Path, tmp_path: Path) -> None:
    """Quarantines that fail (trash is a file) are each logged; the restore still happens."""
    (root / TRASH).write_text("in the way", encoding="utf-8")
    a = make_model(root, "old_a.bin", b"a", age=7200)
    b = make_model(root, "old_b.bin", b"b", age=3600)
    good = b"required model"
    source = make_model(tmp_path, "source.bin", good)
    policy = make_policy(
        root, state, required=[{"name": "req.bin", "sha256": sha256(good), "source": str(source)}]
    )
    the_plan = plan_for(policy)
    assert [a.kind for a in the_plan.actions] == [
        ActionKind.RESTORE,
        ActionKind.PRUNE,
        ActionKind.PRUNE,
    ]

    outcome, logs = run_apply(the_plan, root, NoEngine())

    assert (root / "req.bin").read_bytes() == good
    assert [x.name for x in outcome.done] == ["req.bin"]
    assert sorted(x.name for x, _ in outcome.failed) == ["old_a.bin", "old_b.bin"]
    failed = matching(logs, "action.failed")
    assert sorted(e["model"] for e in failed) == ["old_a.bin", "old_b.bin"]
    assert all("not a directory" in e["error"] for e in failed)
    assert (a.read_bytes(), b.read_bytes()) == (b"a", b"b")
    assert (root / TRASH).read_text(encoding="utf-8") == "in the way"
    assert len(matching(logs, "engine.cycled")) == 1
    assert outcome.ok is False


def test_missing_source_fails_restore_not_prunes(root: Path, state: Path, tmp_path: Path) -> None:
    """A restore whose source vanished fails alone; the prunes after it still run."""
    make_model(root, "old_a.bin", b"a")
    policy = make_policy(
        root,
        state,
        required=[{"name": "req.bin", "source": str(tmp_path / "no-such-source.bin")}],
    )
    the_plan = plan_for(policy)
    assert [a.kind for a in the_plan.actions] == [ActionKind.RESTORE, ActionKind.PRUNE]
    outcome, logs = run_apply(the_plan, root, NoEngine())
    assert [a.name for a, _ in outcome.failed] == ["req.bin"]
    assert [a.name for a in outcome.done] == ["old_a.bin"]
    assert [e["model"] for e in matching(logs, "action.failed")] == ["req.bin"]
    assert sorted(os.listdir(root)) == [TRASH]


@pytest.mark.parametrize("mode", ["quarantine", "delete"])
def test_one_failing_prune_does_not_stop_the_next(
    root: Path, state: Path, immutable: Callable[..., None], mode: str
) -> None:
    """An immutable (un-renamable) model fails alone; the prune planned after it still happens."""
    stuck = make_model(root, "old_a_stuck.bin", b"stuck", age=7200)
    free = make_model(root, "old_b_free.bin", b"free", age=3600)
    immutable(stuck)
    the_plan = plan_for(make_policy(root, state, action=mode))
    assert [a.name for a in the_plan.actions] == ["old_a_stuck.bin", "old_b_free.bin"]
    inode = stuck.stat().st_ino

    outcome, logs = run_apply(the_plan, root, NoEngine())

    assert [a.name for a, _ in outcome.failed] == ["old_a_stuck.bin"]
    assert [a.name for a in outcome.done] == ["old_b_free.bin"]
    (failed,) = matching(logs, "action.failed")
    assert failed["model"] == "old_a_stuck.bin"
    assert "not permitted" in failed["error"]
    assert [e["model"] for e in matching(logs, "model.pruned")] == ["old_b_free.bin"]
    assert (stuck.read_bytes(), stuck.stat().st_ino) == (b"stuck", inode)
    assert not free.exists()
    assert [i.name for i in read_trash(str(root))] == (
        ["old_b_free.bin"] if mode == "quarantine" else []
    )
    assert leftovers(root) == []


# --------------------------------------------------------------------------- (i) restore


def test_restore_missing_via_tmp_name(
    root: Path, state: Path, tmp_path: Path, journal: list[str]
) -> None:
    """A missing pinned model is copied to a .ocrd-tmp-* name, verified, then put in place."""
    good = os.urandom(300_000)
    source = make_model(tmp_path, "source.bin", good)
    make_model(root, "keep.gguf", b"keep")
    policy = make_policy(
        root, state, required=[{"name": "req.bin", "sha256": sha256(good), "source": str(source)}]
    )
    the_plan = plan_for(policy)
    (action,) = the_plan.actions
    assert action.kind is ActionKind.RESTORE
    outcome, logs = run_apply(the_plan, root, NoEngine())

    assert outcome.done == (action,)
    target = root / "req.bin"
    assert target.read_bytes() == good
    assert target.stat().st_ino != source.stat().st_ino  # a copy, not a link to the source
    assert source.read_bytes() == good
    placed = [c for c in journal if c.startswith(("link:", "rename:"))]
    assert len(placed) == 1
    # Linked from the descriptor of the verified .ocrd-tmp-* copy (/proc/self/fd/N).
    assert placed[0].startswith("link:") and placed[0].split(":", 1)[1].isdigit(), placed
    assert not [c for c in journal if c.startswith("unlink:") and TMP_PREFIX not in c]
    assert leftovers(root) == []
    assert sorted(os.listdir(root)) == ["keep.gguf", "req.bin"]
    (restored,) = matching(logs, "model.restored")
    assert restored["model"] == "req.bin"
    assert restored["bytes"] == len(good)
    assert restored["sha256"] == sha256(good)
    assert restored["source"] == str(source)
    assert restored["replaced"] is None
    again = plan_for(policy)
    assert again.actions == ()


def test_restore_with_wrong_source_leaves_nothing(root: Path, state: Path, tmp_path: Path) -> None:
    """A source whose sha256 does not match the pin fails the restore; no tmp, no target."""
    source = make_model(tmp_path, "source.bin", b"not what was pinned")
    policy = make_policy(
        root,
        state,
        required=[{"name": "req.bin", "sha256": sha256(b"pinned"), "source": str(source)}],
    )
    outcome, logs = run_apply(plan_for(policy), root, NoEngine())
    assert [a.name for a, _ in outcome.failed] == ["req.bin"]
    (failed,) = matching(logs, "action.failed")
    assert "sha256" in failed["error"]
    assert os.listdir(root) == []
    assert matching(logs, "model.restored") == []


def test_restore_replaces_corrupt_model(root: Path, state: Path, tmp_path: Path) -> None:
    """A corrupt pinned model is quarantined (sha256 in its record) and replaced by the source."""
    good = b"good bytes " * 1000
    corrupt = b"bit rot " * 100
    source = make_model(tmp_path, "source.bin", good)
    make_model(root, "req.bin", corrupt)
    policy = make_policy(
        root, state, required=[{"name": "req.bin", "sha256": sha256(good), "source": str(source)}]
    )
    the_plan = plan_for(policy)
    assert [r.kind for r in the_plan.reports] == [ReportKind.CORRUPT]
    outcome, logs = run_apply(the_plan, root, NoEngine())

    assert [a.name for a in outcome.done] == ["req.bin"]
    assert (root / "req.bin").read_bytes() == good
    (item,) = read_trash(str(root))
    assert item.id.endswith("/req.bin")
    assert (root / TRASH / item.id).read_bytes() == corrupt
    assert item.sha256 == sha256(corrupt)
    assert item.size == len(corrupt)
    assert "corrupt" in item.reason
    (restored,) = matching(logs, "model.restored")
    assert restored["replaced"] == f"{TRASH}/{item.id}"
    assert leftovers(root) == []
    assert plan_for(policy).actions == ()


def test_corrupt_model_stays_when_source_is_wrong(root: Path, state: Path, tmp_path: Path) -> None:
    """The corrupt model moves only once the new one is verified; a bad source moves nothing."""
    source = make_model(tmp_path, "source.bin", b"also wrong")
    make_model(root, "req.bin", b"corrupt")
    policy = make_policy(
        root,
        state,
        required=[{"name": "req.bin", "sha256": sha256(b"good"), "source": str(source)}],
    )
    before = tree(root)
    outcome, _ = run_apply(plan_for(policy), root, NoEngine())
    assert [a.name for a, _ in outcome.failed] == ["req.bin"]
    assert tree(root) == before


def test_restore_never_overwrites_what_appeared_meanwhile(
    root: Path, state: Path, tmp_path: Path
) -> None:
    """A file that appears under a missing model's name after planning is kept; no tmp stays."""
    good = b"good"
    source = make_model(tmp_path, "source.bin", good)
    policy = make_policy(
        root, state, required=[{"name": "req.bin", "sha256": sha256(good), "source": str(source)}]
    )
    the_plan = plan_for(policy)
    make_model(root, "req.bin", b"someone else's copy")
    before = tree(root)
    outcome, logs = run_apply(the_plan, root, NoEngine())
    assert tree(root) == before
    assert [a.name for a in outcome.done] == []
    assert [e["model"] for e in matching(logs, "model.changed")] == ["req.bin"]
    assert matching(logs, "model.restored") == []


def test_restore_of_held_corrupt_model_waits(root: Path, state: Path, tmp_path: Path) -> None:
    """A corrupt model still held by a process is not replaced that cycle."""
    good = b"good"
    source = make_model(tmp_path, "source.bin", good)
    corrupt = make_model(root, "req.bin", b"corrupt but in use")
    policy = make_policy(
        root, state, required=[{"name": "req.bin", "sha256": sha256(good), "source": str(source)}]
    )
    before = tree(root)
    with holder(tmp_path, "ocrd-hold-fd", HOLD_FD, corrupt) as child:
        outcome, logs = run_apply(plan_for(policy), root, NoEngine())
        (busy,) = matching(logs, "model.busy")
        assert (busy["model"], busy["action"], busy["pids"]) == ("req.bin", "restore", [child.pid])
    assert tree(root) == before
    assert outcome.done == ()


@pytest.fixture
def small_fs(tmp_path: Path, tmpfs_at: Callable[[Path, str], None]) -> Path:
    """A 1 MiB tmpfs mounted for this test (root only), unmounted afterwards."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    tmpfs_at(mnt, "1m")
    return mnt


@pytest.mark.parametrize("present", ["missing", "corrupt"])
def test_restore_refuses_without_free_space(
    small_fs: Path, state: Path, tmp_path: Path, present: str
) -> None:
    """A restore that would not fit (plus margin) is refused before anything is written."""
    good = os.urandom(200_000)
    source = make_model(tmp_path, "source.bin", good)
    if present == "corrupt":
        make_model(small_fs, "req.bin", b"corrupt")
    policy = make_policy(
        small_fs,
        state,
        required=[{"name": "req.bin", "sha256": sha256(good), "source": str(source)}],
    )
    before = tree(small_fs)
    outcome, logs = run_apply(plan_for(policy), small_fs, NoEngine())
    assert [a.name for a, _ in outcome.failed] == ["req.bin"]
    (failed,) = matching(logs, "action.failed")
    assert "free space" in failed["error"]
    assert tree(small_fs) == before


# --------------------------------------------------------------------------- (j) purge


def test_purge_expired_quarantine_items(root: Path, state: Path) -> None:
    """Quarantine items past retention are removed for good; fresh ones and models stay."""
    now = time.time()
    trash_item(root, "20200101T000000Z-0001", "old_a.bin", b"a" * 100, trashed_at=now - 8 * DAY)
    trash_item(
        root,
        "20200101T000000Z-0002",
        "old_dir",
        {"x.bin": b"x" * 50, "sub/y.bin": b"y" * 25},
        trashed_at=now - 30 * DAY,
    )
    fresh = trash_item(root, "20990101T000000Z-0003", "old_c.bin", b"c", trashed_at=now - DAY)
    make_model(root, "keep.gguf", b"keep")
    the_plan = plan_for(make_policy(root, state))
    assert sorted(a.trash_id or "" for a in the_plan.actions) == [
        "20200101T000000Z-0001/old_a.bin",
        "20200101T000000Z-0002/old_dir",
    ]
    outcome, logs = run_apply(the_plan, root, NoEngine())

    assert len(outcome.done) == 2
    assert sorted(os.listdir(root / TRASH)) == [fresh.name]
    assert [i.name for i in read_trash(str(root))] == ["old_c.bin"]
    assert sorted(os.listdir(root)) == [TRASH, "keep.gguf"]
    assert leftovers(root) == []
    purged = sorted(matching(logs, "trash.purged"), key=lambda e: e["trash_id"])
    assert [(e["model"], e["bytes"], e["dest"], e["trash_id"]) for e in purged] == [
        ("old_a.bin", 100, "deleted", "20200101T000000Z-0001/old_a.bin"),
        ("old_dir", 75, "deleted", "20200101T000000Z-0002/old_dir"),
    ]
    assert all(e["reason"].startswith("in quarantine longer than") for e in purged)


def test_purge_skips_item_held_by_process(root: Path, state: Path, tmp_path: Path) -> None:
    """A quarantined model still held by a process is not purged that cycle."""
    item = trash_item(root, "20200101T000000Z-0001", "old_a.bin", b"a" * 4096, trashed_at=0.0)
    with holder(tmp_path, "ocrd-hold-fd", HOLD_FD, item / "old_a.bin") as child:
        outcome, logs = run_apply(plan_for(make_policy(root, state)), root, NoEngine())
        assert [e["pids"] for e in matching(logs, "model.busy")] == [[child.pid]]
    assert outcome.done == ()
    assert (item / "old_a.bin").read_bytes() == b"a" * 4096


# --------------------------------------------------------------------------- (k) recover


def test_recover_cleans_leftovers(root: Path) -> None:
    """recover() removes tmp/deleting leftovers and trash dirs without models, keeps the rest."""
    make_model(root, ".ocrd-tmp-0011223344556677", b"half a copy")
    deleting = root / ".ocrd-deleting-8899aabbccddeeff"
    (deleting / "sub").mkdir(parents=True)
    make_model(deleting / "sub", "x.bin", b"x")
    make_model(root, "model.bin", b"model")
    (root / "dir-model").mkdir()
    make_model(root / "dir-model", ".ocrd-tmp-nested", b"not top level")
    make_model(root, ".ocrd-tmpfile", b"not our prefix")
    trash = root / TRASH
    now = time.time()
    # v2 batches: one record per cycle, written before anything moves in
    complete = trash_batch(root, "complete", {"c.bin": b"c"}, trashed_at=now, never_moved=("n",))
    trash_batch(root, "record-only", {}, trashed_at=now, never_moved=("r.bin",))
    tmp_record = trash / "tmp-record"
    tmp_record.mkdir()
    (tmp_record / (RECORD + ".tmp")).write_text("{", "utf-8")
    (trash / "empty").mkdir()
    unlisted = trash_batch(root, "unlisted", {"u.bin": b"listed"}, trashed_at=now)
    make_model(unlisted, "stray.bin", b"payload its record does not list")
    orphan = trash / "payload-only"
    orphan.mkdir()
    make_model(orphan, "p.bin", b"payload without record")
    garbled = trash / "garbled-record"
    garbled.mkdir()
    (garbled / RECORD).write_text("{not json", "utf-8")
    make_model(garbled, "g.bin", b"payload with bad record")
    # v1 (legacy) items: one model and its record.json per directory
    legacy = trash_item(root, "legacy", "l.bin", b"l", trashed_at=now)
    legacy_record_only = trash_item(root, "legacy-record-only", "lr.bin", b"x", trashed_at=now)
    (legacy_record_only / "lr.bin").rename(root.parent / "lr.bin")
    legacy_tmp = trash / "legacy-tmp-record"
    legacy_tmp.mkdir()
    (legacy_tmp / (LEGACY_RECORD + ".tmp")).write_text("{", "utf-8")
    legacy_wrong = trash_item(root, "legacy-wrong-payload", "w.bin", b"w", trashed_at=now)
    (legacy_wrong / "w.bin").rename(legacy_wrong / "other.bin")

    with capture_logs() as logs:
        cleaned = recover(str(root), structlog.get_logger())

    assert sorted(cleaned) == sorted(
        [
            ".ocrd-tmp-0011223344556677",
            ".ocrd-deleting-8899aabbccddeeff",
            f"{TRASH}/empty",
            f"{TRASH}/record-only",
            f"{TRASH}/tmp-record",
            f"{TRASH}/legacy-record-only",
            f"{TRASH}/legacy-tmp-record",
        ]
    )
    assert sorted(os.listdir(root)) == [".ocrd-tmpfile", TRASH, "dir-model", "model.bin"]
    assert (root / "dir-model" / ".ocrd-tmp-nested").read_bytes() == b"not top level"
    assert sorted(os.listdir(trash)) == [
        "complete",
        "garbled-record",
        "legacy",
        "legacy-wrong-payload",
        "payload-only",
        "unlisted",
    ]
    assert (complete / "c.bin").read_bytes() == b"c"
    assert (unlisted / "u.bin").read_bytes() == b"listed"
    assert (unlisted / "stray.bin").read_bytes() == b"payload its record does not list"
    assert (orphan / "p.bin").read_bytes() == b"payload without record"
    assert (garbled / "g.bin").read_bytes() == b"payload with bad record"
    assert (legacy / "l.bin").read_bytes() == b"l"
    assert (legacy_wrong / "other.bin").read_bytes() == b"w"
    kept = matching(logs, "recovery.kept")
    assert sorted((e["path"], e["unlisted"]) for e in kept) == [
        (f"{TRASH}/garbled-record", ["g.bin"]),
        (f"{TRASH}/legacy-wrong-payload", ["other.bin"]),
        (f"{TRASH}/payload-only", ["p.bin"]),
        (f"{TRASH}/unlisted", ["stray.bin"]),
    ]
    assert all(e["log_level"] == "warning" for e in kept)
    assert sorted(e["path"] for e in matching(logs, "recovery.removed")) == sorted(cleaned)
    assert sorted(i.id for i in read_trash(str(root))) == [
        "complete/c.bin",
        "legacy/l.bin",
        "unlisted/u.bin",
    ]
    assert recover(str(root), structlog.get_logger()) == []  # idempotent


# --------------------------------------------------------------------------- (l) dry run


def _pending_changes(root: Path, state: Path, tmp_path: Path, **extra: Any) -> Policy:
    """A model dir where a real cycle would prune, restore, replace, purge and recover."""
    make_model(root, "old_a.bin", b"a" * 100)
    (root / "old_dir").mkdir()
    make_model(root / "old_dir", "x.bin", b"x")
    make_model(root, "keep.gguf", b"keep")
    make_model(root, "corrupt.bin", b"corrupt")
    make_model(root, ".ocrd-tmp-0011223344556677", b"leftover")
    trash_item(root, "20200101T000000Z-0001", "old_gone.bin", b"g", trashed_at=0.0)
    good = b"good"
    source = make_model(tmp_path, "source.bin", good)
    return make_policy(
        root,
        state,
        required=[
            {"name": "missing.bin", "sha256": sha256(good), "source": str(source)},
            {"name": "corrupt.bin", "sha256": sha256(good), "source": str(source)},
        ],
        **extra,
    )


def test_dry_run_changes_nothing(root: Path, state: Path, tmp_path: Path) -> None:
    """run_cycle(dry_run=True) logs what it would do, changes nothing and leaves the engine be."""
    policy = _pending_changes(root, state, tmp_path)
    journal: list[str] = []
    engine = FakeEngine(root / "keep.gguf", journal)
    before = tree(root)
    with capture_logs() as logs:
        result = cycle.run_cycle(policy, engine=engine, log=structlog.get_logger(), dry_run=True)
    assert tree(root) == before
    assert journal == []
    assert result.recovered == ()
    assert result.outcome == Outcome()
    planned = matching(logs, "action.planned")
    assert len(planned) == len(result.plan.actions) == 5
    assert all(e["dry_run"] is True for e in planned)

    # the same dir really had work to do: a real cycle changes it
    with capture_logs():
        real = cycle.run_cycle(policy, engine=engine, log=structlog.get_logger())
    engine.close()
    assert len(real.outcome.done) == 5
    assert tree(root) != before


def test_suspended_policy_changes_nothing(root: Path, state: Path, tmp_path: Path) -> None:
    """suspend: true turns every action into a report; apply has nothing to do."""
    policy = _pending_changes(root, state, tmp_path, suspend=True)
    (root / ".ocrd-tmp-0011223344556677").rename(tmp_path / "leftover")  # recovery is separate
    before = tree(root)
    with capture_logs():
        result = cycle.run_cycle(policy, engine=NoEngine(), log=structlog.get_logger())
    assert tree(root) == before
    assert result.plan.actions == ()
    assert len([r for r in result.plan.reports if r.kind is ReportKind.SUSPENDED]) == 5


# --------------------------------------------------------------------------- (m) crash points

STRACE = shutil.which("strace")
SYSCALLS = "rename,renameat,renameat2,unlink,unlinkat,link,linkat,rmdir"  # rmtree ends in rmdir

ONE_CYCLE = """
import json, sys
import structlog
from ocrd import cycle
from ocrd.engine.none import NoEngine
from ocrd.core.policy import Policy

structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
with open(sys.argv[1], encoding="utf-8") as fh:
    policy = Policy.model_validate(json.load(fh))
result = cycle.run_cycle(policy, engine=NoEngine(), log=structlog.get_logger())
bad = result.outcome.failed or result.outcome.skipped or result.outcome.engine_error
sys.exit(1 if bad else 0)
"""

KEEP = b"K" * 3000
NOTES = b"notes, unmanaged"
OLD_FILE = b"o" * 500
OLD_DIR = {"a.bin": b"a" * 1000, "sub/b.bin": b"b" * 2000, "sub/c.bin": b"c" * 10}
CORRUPT = b"corrupt " * 100
GOOD_REQ = b"R" * 5000
GOOD_NEW = b"N" * 7000


def _crash_setup(base: Path) -> tuple[Path, Path]:
    """Models for one cycle with a dir delete, a file delete, a replace, a restore and a purge."""
    root, src, state = base / "models", base / "source", base / "state"
    for path in (root, src, state):
        path.mkdir(parents=True)
    make_model(root, "keep.gguf", KEEP)
    make_model(root, "notes.txt", NOTES)
    make_model(root, "old_file.bin", OLD_FILE)
    for rel, data in OLD_DIR.items():
        (root / "old_dir" / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / "old_dir" / rel).write_bytes(data)
    make_model(root, "req.bin", CORRUPT)
    make_model(src, "req.bin", GOOD_REQ)
    make_model(src, "new.bin", GOOD_NEW)
    trash_item(root, "20200101T000000Z-dead", "old_gone.bin", b"g" * 100, trashed_at=0.0)
    policy = {
        "model_dir": str(root),
        "state_dir": str(state),
        "required": [
            {"name": "req.bin", "sha256": sha256(GOOD_REQ), "source": str(src / "req.bin")},
            {"name": "new.bin", "sha256": sha256(GOOD_NEW), "source": str(src / "new.bin")},
        ],
        "whitelist": ["*.gguf"],
        "prune": {"prefixes": ["old_"], "min_age": "0s", "action": "delete", "max_fraction": 1.0},
        "engine": {"backend": "none"},
    }
    policy_file = base / "policy.json"
    policy_file.write_text(json.dumps(policy), encoding="utf-8")
    return root, policy_file


def _read(path: Path) -> bytes | None:
    return path.read_bytes() if path.is_file() and not path.is_symlink() else None


def _dir_contents(path: Path) -> dict[str, bytes]:
    return {
        os.path.relpath(os.path.join(d, f), path): Path(d, f).read_bytes()
        for d, _, files in os.walk(path)
        for f in files
    }


def _trash_payloads(root: Path, name: str) -> list[bytes | None]:
    trash = root / TRASH
    if not trash.is_dir():
        return []
    return [_read(item / name) for item in trash.iterdir() if (item / name).exists()]


def _listed(batch: Path) -> tuple[str, set[str]]:
    """A quarantine dir's record file and the model names it lists (v2 batch or v1 item)."""
    if (batch / RECORD).exists():
        record = json.loads((batch / RECORD).read_text(encoding="utf-8"))
        assert record["version"] == 2, record
        return RECORD, {item["name"] for item in record["items"]}
    record = json.loads((batch / LEGACY_RECORD).read_text(encoding="utf-8"))
    return LEGACY_RECORD, {record["name"]}


def _audit_after_crash(root: Path, point: str) -> None:
    """Every model is whole under its name, or in the trash, or on its intended way out."""
    where = f"after a kill at {point}"
    assert _read(root / "keep.gguf") == KEEP, where
    assert _read(root / "notes.txt") == NOTES, where
    if os.path.lexists(root / "req.bin"):
        assert _read(root / "req.bin") in (CORRUPT, GOOD_REQ), where
    if os.path.lexists(root / "new.bin"):
        assert _read(root / "new.bin") == GOOD_NEW, where
    if os.path.lexists(root / "old_file.bin"):
        assert _read(root / "old_file.bin") == OLD_FILE, where
    if os.path.lexists(root / "old_dir"):
        assert _dir_contents(root / "old_dir") == OLD_DIR, where
    corrupt_copies = [_read(root / "req.bin"), *_trash_payloads(root, "req.bin")]
    assert CORRUPT in corrupt_copies, f"{where}: the corrupt model's bytes were lost"
    allowed = {"keep.gguf", "notes.txt", "old_file.bin", "old_dir", "req.bin", "new.bin"}
    for name in os.listdir(root):
        if name.startswith("."):
            assert name == TRASH or name.startswith((TMP_PREFIX, DELETING_PREFIX)), (
                f"{where}: unexpected {name}"
            )
        else:
            assert name in allowed, f"{where}: unexpected {name}"


def _audit_converged(root: Path, point: str) -> None:
    """After a normal cycle: converged, nothing lost, no leftovers, only complete trash items."""
    where = f"after the kill at {point} and a normal cycle"
    assert sorted(os.listdir(root)) == sorted(
        [TRASH, "keep.gguf", "new.bin", "notes.txt", "req.bin"]
    ), where
    assert _read(root / "keep.gguf") == KEEP, where
    assert _read(root / "notes.txt") == NOTES, where
    assert _read(root / "req.bin") == GOOD_REQ, where
    assert _read(root / "new.bin") == GOOD_NEW, where
    for batch in (root / TRASH).iterdir():
        # each batch: its record and at least one model it lists, nothing else
        record_file, listed = _listed(batch)
        payloads = set(os.listdir(batch)) - {record_file}
        assert payloads, f"{where}: {batch.name} holds no model"
        assert payloads <= listed, f"{where}: {batch.name} holds {payloads}, lists {listed}"
    assert [i.name for i in read_trash(str(root))] == ["req.bin"], where
    assert _trash_payloads(root, "req.bin") == [CORRUPT], where


@pytest.mark.timeout(900)
@pytest.mark.skipif(STRACE is None, reason="strace is not installed")
def test_crash_at_every_rename_and_unlink(tmp_path: Path) -> None:
    """A SIGKILL at any rename/unlink/link of a cycle loses nothing; the next cycle converges."""
    script = tmp_path / "one_cycle.py"
    script.write_text(ONE_CYCLE, encoding="utf-8")
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("OCRD_CONFIG", None)

    def run(policy_file: Path, *prefix: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*prefix, sys.executable, str(script), str(policy_file)],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
            timeout=60,
            check=False,
        )

    # strace counts injections per syscall, so walk each syscall's calls in turn:
    # together that is every rename/unlink/link the cycle makes.
    kills: dict[str, int] = {}
    for syscall in SYSCALLS.split(","):
        kills[syscall] = 0
        for n in range(1, 201):
            point = f"{syscall} #{n}"
            root, policy_file = _crash_setup(tmp_path / f"{syscall}-{n:03d}")
            strace = [
                STRACE, "-f", "-qq", "-o", "/dev/null",
                "-e", f"trace={SYSCALLS}",
                "-e", f"inject={syscall}:signal=KILL:when={n}",
            ]  # fmt: skip
            first = run(policy_file, *strace)
            killed = first.returncode in (-signal.SIGKILL, 128 + signal.SIGKILL)
            if killed:
                kills[syscall] += 1
                _audit_after_crash(root, point)
            else:
                assert first.returncode == 0, f"run {point} neither killed nor clean: {first!r}"
            second = run(policy_file)
            assert second.returncode == 0, f"normal cycle after kill at {point} failed: {second!r}"
            _audit_converged(root, point)
            shutil.rmtree(tmp_path / f"{syscall}-{n:03d}")
            if not killed:
                break
        else:
            pytest.fail(f"the cycle was still being killed after 200 {syscall} calls")
    # dir delete, file delete, quarantine + replace, two restores, purge: well over ten calls
    assert sum(kills.values()) >= 10, f"too few crash points, the plan did not run: {kills}"


def test_engine_cycled_lists_the_models_left_after_the_actions(
    root: Path, state: Path, tmp_path: Path
) -> None:
    """engine.cycled's ocrd_count and first names are the dir after prunes and restores."""
    good = b"good"
    source = make_model(tmp_path, "source.bin", good)
    for name in ("old_a.bin", "old_b.bin", "keep.gguf", "req.bin", ".hidden", "x.part"):
        make_model(root, name, b"corrupt" if name == "req.bin" else b"x")
    for i in range(55):
        make_model(root, f"m_{i:02d}.bin")
    required = [
        {"name": name, "sha256": sha256(good), "source": str(source)}
        for name in ("a.bin", "req.bin")
    ]
    the_plan = plan_for(make_policy(root, state, required=required))
    assert {a.name for a in the_plan.actions} == {"old_a.bin", "old_b.bin", "a.bin", "req.bin"}

    outcome, logs = run_apply(the_plan, root, NoEngine())

    assert len(outcome.done) == 4, outcome
    left = sorted(
        p.name for p in root.iterdir() if not p.name.startswith(".") and p.name != "x.part"
    )
    assert "a.bin" in left and "req.bin" in left and "old_a.bin" not in left
    (cycled,) = matching(logs, "engine.cycled")
    assert cycled["ocrd_count"] == len(left) == 58
    assert cycled["ocrd_models"] == left[:LISTED]
