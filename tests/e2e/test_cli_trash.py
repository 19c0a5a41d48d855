"""End-to-end tests of `ocrd trash list | restore | purge` on a real quarantine (DESIGN §4, §6).

Every quarantine item here is made by a real `ocrd apply`, except the legacy (v1) ones, built
by hand as an older ocrd wrote them.
"""

from __future__ import annotations

import json
import re
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from tests.support.files import make_model
from tests.support.logs import events
from tests.support.policy import write_policy
from tests.support.trash import trash_item

HOUR = 3600.0
DAY = 86400.0
OLD = 2 * HOUR  # well past the min_age of 10m the policy sets


@pytest.fixture
def config(root: Path) -> Path:
    """A policy that quarantines old_* after 10m and keeps the quarantine for 7 days."""
    return write_policy(
        root.parent / "policy.yaml",
        {
            "model_dir": str(root),
            "required": [{"name": "en.bin"}],
            "prune": {"prefixes": ["old_"], "min_age": "10m", "max_fraction": 1.0},
            "quarantine": {"retention": "7d"},
            "engine": {"backend": "none"},
        },
    )


RECORD = ".ocrd-record.json"  # a batch's record (v2); `record.json` was one item's (v1)


def quarantine(run_ocrd: Any, root: Path, config: Path, models: dict[str, bytes]) -> dict[str, str]:
    """Create *models* (old enough to prune), run `ocrd apply`; returns {name: trash id}.

    One apply quarantines into one batch: every id is `<batch>/<name>` with the same batch.
    """
    if not (root / "en.bin").exists():
        make_model(root, "en.bin", b"required", age=OLD)
    for name, data in models.items():
        make_model(root, name, data, age=OLD)
    r = run_ocrd("--config", config, "apply")
    assert r.code == 0, r
    ids = {}
    for line in events(r.out, "model.pruned"):
        match = re.fullmatch(r"\.ocrd-trash/(([^/]+)/([^/]+))", line["dest"])
        assert match, line
        assert match.group(3) == line["model"], line
        ids[line["model"]] = match.group(1)
    assert set(ids) == set(models)
    assert len({batch_of(i) for i in ids.values()}) == 1, ids
    return ids


def batch_of(item_id: str) -> str:
    """The batch directory of a trash id `<batch>/<name>`."""
    return item_id.split("/", 1)[0]


def trash_ids(root: Path) -> set[str]:
    """Ids of the models in the quarantine on disk: every entry of a batch dir but its record."""
    trash = root / ".ocrd-trash"
    if not trash.exists():
        return set()
    return {f"{b.name}/{p.name}" for b in trash.iterdir() for p in b.iterdir() if p.name != RECORD}


def batches(root: Path) -> set[str]:
    """The batch directories in the quarantine."""
    trash = root / ".ocrd-trash"
    return {p.name for p in trash.iterdir()} if trash.exists() else set()


def age_batch(root: Path, item_id: str, seconds: float) -> None:
    """Pretend the item's batch was quarantined *seconds* ago by editing its record."""
    record_path = root / ".ocrd-trash" / batch_of(item_id) / RECORD
    record = json.loads(record_path.read_text(encoding="utf-8"))
    record["trashed_at"] = time.time() - seconds
    record_path.write_text(json.dumps(record), encoding="utf-8")


# -- list ---------------------------------------------------------------------------------


def test_trash_list_empty(run_ocrd, root, config):
    """`trash list` on a model dir with no quarantine says so and exits 0."""
    r = run_ocrd("--config", config, "trash", "list")
    assert r.code == 0, r
    assert r.out.strip() == "The quarantine is empty."


def test_trash_list_table(run_ocrd, root, config):
    """`trash list` shows each quarantined model with its id, name, size and reason."""
    ids = quarantine(run_ocrd, root, config, {"old_a.bin": b"stale", "old_b.bin": b"stale bb"})
    r = run_ocrd("--config", config, "trash", "list")
    assert r.code == 0, r
    header, *rows = r.out.splitlines()
    assert header.split() == ["ID", "NAME", "SIZE", "AGE", "REASON"]
    cells = {re.split(r"\s{2,}", row)[1]: re.split(r"\s{2,}", row) for row in rows}
    assert set(cells) == {"old_a.bin", "old_b.bin"}
    assert cells["old_a.bin"][0] == ids["old_a.bin"]
    assert cells["old_a.bin"][2] == "5 B"
    assert cells["old_b.bin"][2] == "8 B"
    assert cells["old_a.bin"][4].startswith("prefix 'old_', 2h")


def test_trash_list_json(run_ocrd, root, config):
    """`trash list --json` gives schema, model_dir and items[id, name, trashed_at, age_seconds,
    reason, size, sha256]."""
    ids = quarantine(run_ocrd, root, config, {"old_a.bin": b"stale"})
    r = run_ocrd("--config", config, "trash", "list", "--json")
    assert r.code == 0, r
    doc = r.json()
    assert set(doc) == {"schema", "model_dir", "items"}
    assert (doc["schema"], doc["model_dir"]) == (1, str(root))
    (item,) = doc["items"]
    assert set(item) == {"id", "name", "trashed_at", "age_seconds", "reason", "size", "sha256"}
    assert (item["id"], item["name"], item["size"]) == (ids["old_a.bin"], "old_a.bin", 5)
    when = datetime.fromisoformat(item["trashed_at"])
    assert when.utcoffset() == timezone.utc.utcoffset(None)
    assert abs(when.timestamp() - time.time()) < 60
    assert 0 <= item["age_seconds"] < 60


# -- restore ------------------------------------------------------------------------------


def test_trash_restore_by_name_puts_back_the_newest_copy(run_ocrd, root, config):
    """`trash restore NAME` moves the newest quarantined copy of NAME back and logs it."""
    first = quarantine(run_ocrd, root, config, {"old_a.bin": b"version 1"})
    second = quarantine(run_ocrd, root, config, {"old_a.bin": b"version 2"})
    r = run_ocrd("--config", config, "trash", "restore", "old_a.bin")
    assert r.code == 0, r
    assert (root / "old_a.bin").read_bytes() == b"version 2"
    assert trash_ids(root) == {first["old_a.bin"]}
    assert batches(root) == {batch_of(first["old_a.bin"])}  # the emptied batch is gone
    (line,) = events(r.out, "trash.restored")
    assert (line["model"], line["trash_id"], line["bytes"], line["dest"]) == (
        "old_a.bin",
        second["old_a.bin"],
        9,
        "old_a.bin",
    )


def test_trash_restore_by_id(run_ocrd, root, config):
    """`trash restore ID` puts back exactly that item, even when a newer copy exists."""
    first = quarantine(run_ocrd, root, config, {"old_a.bin": b"version 1"})
    second = quarantine(run_ocrd, root, config, {"old_a.bin": b"version 2"})
    r = run_ocrd("--config", config, "trash", "restore", first["old_a.bin"])
    assert r.code == 0, r
    assert (root / "old_a.bin").read_bytes() == b"version 1"
    assert trash_ids(root) == {second["old_a.bin"]}
    assert batches(root) == {batch_of(second["old_a.bin"])}


def test_trash_restore_refuses_to_overwrite_an_existing_name(run_ocrd, root, config):
    """`trash restore` exits 1 and changes nothing when the name exists in the model dir."""
    ids = quarantine(run_ocrd, root, config, {"old_a.bin": b"quarantined"})
    make_model(root, "old_a.bin", b"newer, in place")
    r = run_ocrd("--config", config, "trash", "restore", "old_a.bin")
    assert r.code == 1, r
    assert (root / "old_a.bin").read_bytes() == b"newer, in place"
    assert (root / ".ocrd-trash" / ids["old_a.bin"]).read_bytes() == b"quarantined"
    assert trash_ids(root) == {ids["old_a.bin"]}
    assert "already exists" in r.out + r.err
    assert "Traceback" not in r.err


def test_trash_restore_as_another_name(run_ocrd, root, config):
    """`trash restore NAME --as NEW` puts the model back under NEW, without a warning."""
    quarantine(run_ocrd, root, config, {"old_a.bin": b"quarantined"})
    r = run_ocrd("--config", config, "trash", "restore", "old_a.bin", "--as", "keep_a.bin")
    assert r.code == 0, r
    assert (root / "keep_a.bin").read_bytes() == b"quarantined"
    assert not (root / "old_a.bin").exists()
    assert trash_ids(root) == set()
    assert batches(root) == set()
    (line,) = events(r.out, "trash.restored")
    assert line["model"] == "keep_a.bin"
    assert "warning" not in r.err


def test_trash_restore_rejects_a_bad_new_name(run_ocrd, root, config):
    """`trash restore NAME --as` with a path instead of a name exits 2 and moves nothing."""
    ids = quarantine(run_ocrd, root, config, {"old_a.bin": b"quarantined"})
    r = run_ocrd("--config", config, "trash", "restore", "old_a.bin", "--as", "../escaped.bin")
    assert r.code == 2, r
    (line,) = r.err.splitlines()
    assert line.startswith("ocrd: error: --as:"), line
    assert not (root.parent / "escaped.bin").exists()
    assert trash_ids(root) == {ids["old_a.bin"]}


def test_trash_restore_warns_when_the_model_would_be_pruned_again(run_ocrd, root, config):
    """Restoring a name that matches a prune prefix works but warns on stderr."""
    quarantine(run_ocrd, root, config, {"old_a.bin": b"quarantined"})
    r = run_ocrd("--config", config, "trash", "restore", "old_a.bin")
    assert r.code == 0, r
    assert (root / "old_a.bin").read_bytes() == b"quarantined"
    (line,) = r.err.splitlines()
    assert line.startswith("ocrd: warning: 'old_a.bin'"), line
    assert "prefix 'old_'" in line
    assert "--as" in line


def test_trash_restore_one_of_a_batch_leaves_the_other(run_ocrd, root, config):
    """Restoring one model of a two-model batch leaves the other listed and restorable."""
    ids = quarantine(run_ocrd, root, config, {"old_a.bin": b"stale a", "old_b.bin": b"stale b"})
    r = run_ocrd("--config", config, "trash", "restore", ids["old_a.bin"], "--as", "a.bin")
    assert r.code == 0, r
    assert (root / "a.bin").read_bytes() == b"stale a"
    assert trash_ids(root) == {ids["old_b.bin"]}
    listed = run_ocrd("--config", config, "trash", "list", "--json")
    assert [(i["id"], i["name"]) for i in listed.json()["items"]] == [
        (ids["old_b.bin"], "old_b.bin")
    ]
    r = run_ocrd("--config", config, "trash", "restore", "old_b.bin", "--as", "b.bin")
    assert r.code == 0, r
    assert (root / "b.bin").read_bytes() == b"stale b"
    assert batches(root) == set()


def test_trash_list_and_restore_read_a_legacy_item(run_ocrd, root, config):
    """A v1 item (its own dir with record.json) is listed as `<dir>/<name>` and restored."""
    trash_item(root, "20200101T000000Z-abcd0123", "old_v1.bin", b"legacy",
               trashed_at=time.time() - HOUR)  # fmt: skip
    make_model(root, "en.bin", b"required", age=OLD)
    r = run_ocrd("--config", config, "trash", "list", "--json")
    assert r.code == 0, r
    (listed,) = r.json()["items"]
    assert (listed["id"], listed["name"], listed["size"]) == (
        "20200101T000000Z-abcd0123/old_v1.bin",
        "old_v1.bin",
        6,
    )
    r = run_ocrd("--config", config, "trash", "restore", listed["id"], "--as", "v1.bin")
    assert r.code == 0, r
    assert (root / "v1.bin").read_bytes() == b"legacy"
    (line,) = events(r.out, "trash.restored")
    assert line["trash_id"] == listed["id"]
    assert batches(root) == set()


def test_trash_restore_unknown_name(run_ocrd, root, config):
    """`trash restore` of a name that is not in the quarantine exits 2 with one line."""
    make_model(root, "en.bin")
    r = run_ocrd("--config", config, "trash", "restore", "old_nope.bin")
    assert r.code == 2, r
    (line,) = r.err.splitlines()
    assert line.startswith("ocrd: error: ")
    assert "'old_nope.bin'" in line
    assert not (root / "old_nope.bin").exists()


# -- purge --------------------------------------------------------------------------------


def test_trash_purge_removes_only_expired_items(run_ocrd, root, config):
    """`trash purge` deletes items older than quarantine.retention and keeps younger ones."""
    # Two applies, two batches: the age is the batch's.
    ids = quarantine(run_ocrd, root, config, {"old_a.bin": b"expired"})
    ids |= quarantine(run_ocrd, root, config, {"old_b.bin": b"recent"})
    age_batch(root, ids["old_a.bin"], 8 * DAY)
    age_batch(root, ids["old_b.bin"], 6 * DAY)
    r = run_ocrd("--config", config, "trash", "purge")
    assert r.code == 0, r
    assert trash_ids(root) == {ids["old_b.bin"]}
    assert batches(root) == {batch_of(ids["old_b.bin"])}  # the emptied batch is gone
    assert not [p for p in root.iterdir() if p.name.startswith(".ocrd-deleting-")]
    (line,) = events(r.out, "trash.purged")
    assert (line["model"], line["trash_id"], line["bytes"], line["dest"]) == (
        "old_a.bin",
        ids["old_a.bin"],
        7,
        "deleted",
    )
    assert line["reason"]


def test_trash_purge_all_removes_every_item(run_ocrd, root, config):
    """`trash purge --all` deletes every quarantined item, expired or not."""
    ids = quarantine(run_ocrd, root, config, {"old_a.bin": b"a", "old_b.bin": b"b"})
    r = run_ocrd("--config", config, "trash", "purge", "--all")
    assert r.code == 0, r
    assert trash_ids(root) == set()
    assert batches(root) == set()
    assert {e["trash_id"] for e in events(r.out, "trash.purged")} == set(ids.values())
    assert (root / "en.bin").read_bytes() == b"required"


def test_apply_purges_expired_quarantine_items(run_ocrd, root, config):
    """`apply` purges quarantine items older than quarantine.retention and logs each."""
    ids = quarantine(run_ocrd, root, config, {"old_a.bin": b"expired"})
    ids |= quarantine(run_ocrd, root, config, {"old_b.bin": b"recent"})
    age_batch(root, ids["old_a.bin"], 8 * DAY)
    r = run_ocrd("--config", config, "apply")
    assert r.code == 0, r
    assert trash_ids(root) == {ids["old_b.bin"]}
    assert batches(root) == {batch_of(ids["old_b.bin"])}
    (line,) = events(r.out, "trash.purged")
    assert (line["model"], line["bytes"], line["dest"]) == ("old_a.bin", 7, "deleted")
    assert line["trash_id"] == ids["old_a.bin"]
    assert re.search(r"longer than (7d|1w)", line["reason"]), line
