"""Version families through the real `ocrd` command on a real model dir: plan, apply, list,
check, a member held open by a process, and the quarantine (README "Version families")."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.support.cli import Result
from tests.support.logs import events
from tests.support.policy import policy_data, save_policy
from tests.support.procs import HOLD_FD, holder

MATCH = "en_ocr_v{version}.bin"
HOUR = 3600.0
MINUTE = 60.0
# version -> age in seconds. v10, the newest version, has the OLDEST mtime (ranks come from
# the version, not the file's age); v0 is too young to prune (min_age 10m). Every age sits in
# the middle of its human_age bucket, so the printed "3h 30m" holds for minutes.
AGES = {
    "1": 3.5 * HOUR,
    "2": 4.5 * HOUR,
    "3": 5.5 * HOUR,
    "4": 2.5 * HOUR,
    "5": 6.5 * HOUR,
    "10": 9.5 * HOUR,
    "0": 2.5 * MINUTE,
}
RANKS = {"10": 1, "5": 2, "4": 3, "3": 4, "2": 5, "1": 6, "0": 7}
PRUNED = {"1", "3", "4"}  # beyond keep 2, not required (v2), old enough (not v0)


def member(version: str) -> str:
    return MATCH.replace("{version}", version)


def put(root: Path, name: str, data: bytes, age: float) -> Path:
    """A model file with content *data* and atime/mtime *age* seconds in the past."""
    path = root / name
    path.write_bytes(data)
    past = time.time() - age
    os.utime(path, (past, past))
    return path


def content(version: str) -> bytes:
    return f"weights of v{version}\n".encode() * 10


def family_dir(models: Path, ages: dict[str, float] = AGES) -> None:
    for version, age in ages.items():
        put(models, member(version), content(version), age)
    put(models, "notes.txt", b"not a model of the family", 5 * HOUR)


def family_policy(policy: Path, models: Path, **overrides: Any) -> Path:
    """policy_data (prefix old_, no caps) with min_age 10m, keep 2 of MATCH, v2 required."""
    prune = {"min_age": "10m", **overrides.pop("prune", {})}
    data = policy_data(
        models,
        versions=[{"match": MATCH, "keep": 2}],
        required=overrides.pop("required", [member("2")]),
        prune=prune,
        **overrides,
    )
    return save_policy(policy, data)


def visible(root: Path) -> set[str]:
    return {p.name for p in root.iterdir() if not p.name.startswith(".")}


def trashed_files(root: Path) -> dict[str, bytes]:
    """Every model file below `.ocrd-trash/` by name, with its bytes (records left out)."""
    found = {}
    for dirpath, _, filenames in os.walk(root / ".ocrd-trash"):
        for name in filenames:
            if name.startswith(".") or name == "record.json":
                continue
            found[name] = Path(dirpath, name).read_bytes()
    return found


def rule(version: str, keep: int = 2) -> str:
    return f"version {version} of {MATCH}, newest #{RANKS[version]}; the newest {keep} are kept"


Run = Callable[..., Result]


def test_plan_json_lists_the_family_prunes_with_their_reasons(
    run_ocrd: Run, models: Path, policy: Path
) -> None:
    """`plan --json`: prunes of v4, v3, v1 (ranked beyond keep 2, v2 is required), oldest
    mtime first, each with its version rule and age; v0 waits; v10 and v5 are not touched."""
    family_dir(models)
    path = family_policy(policy, models)
    r = run_ocrd("--config", path, "plan", "--json")
    assert r.code == 0, r
    doc = r.json()
    prunes = [a for a in doc["actions"] if a["action"] == "prune"]
    assert [a["model"] for a in prunes] == [member("3"), member("1"), member("4")]  # by mtime
    ages = {"1": "3h 30m", "3": "5h 30m", "4": "2h 30m"}
    for action in prunes:
        version = action["model"].removeprefix("en_ocr_v").removesuffix(".bin")
        assert action["rule"] == rule(version)
        assert action["reason"] == f"{rule(version)}, {ages[version]} old"
        assert action["mode"] == "quarantine"
        assert action["bytes"] == len(content(version))
    assert doc["actions"] == prunes  # nothing else to do
    assert doc["bytes_freed"] == sum(len(content(v)) for v in PRUNED)
    waiting = [(x["model"], x["reason"]) for x in doc["reports"] if x["kind"] == "waiting"]
    assert waiting == [(member("0"), f"{rule('0')}, 2m old, pruned once older than 10m")]
    unmanaged = {x["model"] for x in doc["reports"] if x["kind"] == "unmanaged"}
    assert unmanaged == {"notes.txt"}
    assert doc["errors"] == []


def test_apply_keeps_the_newest_two_and_the_required_one(
    run_ocrd: Run, models: Path, policy: Path
) -> None:
    """`apply` leaves v10 and v5 (natural order: v10 > v5), the required v2 and the young v0;
    v4, v3 and v1 are in `.ocrd-trash/` with their bytes; a second apply prunes nothing."""
    family_dir(models)
    path = family_policy(policy, models)
    r = run_ocrd("--config", path, "apply")
    assert r.code == 0, r
    assert {e["model"] for e in events(r.out, "model.pruned")} == {member(v) for v in PRUNED}
    kept = {"10", "5", "2", "0"}
    assert visible(models) == {member(v) for v in kept} | {"notes.txt"}
    for version in kept:
        assert (models / member(version)).read_bytes() == content(version)
    assert trashed_files(models) == {member(v): content(v) for v in PRUNED}

    listed = run_ocrd("--config", path, "trash", "list", "--json")
    assert listed.code == 0, listed
    items = {i["name"]: i for i in listed.json()["items"]}
    assert set(items) == {member(v) for v in PRUNED}
    for version in PRUNED:
        assert items[member(version)]["reason"].startswith(rule(version))

    again = run_ocrd("--config", path, "plan", "--json")
    assert again.code == 0, again
    assert again.json()["actions"] == []
    second = run_ocrd("--config", path, "apply")
    assert second.code == 0, second
    assert events(second.out, "model.pruned") == []
    assert visible(models) == {member(v) for v in kept} | {"notes.txt"}


def test_list_json_shows_family_and_rank_of_each_member(
    run_ocrd: Run, models: Path, policy: Path
) -> None:
    """`list --json`: every member has the family's match and its rank (natural order, the
    required v2 included), a class to match; notes.txt has null for both. The table shows
    the required member's place in the family."""
    family_dir(models)
    path = family_policy(policy, models)
    r = run_ocrd("--config", path, "list", "--json")
    assert r.code == 0, r
    rows = {m["name"]: m for m in r.json()["models"]}
    assert set(rows) == {member(v) for v in AGES} | {"notes.txt"}
    for version, rank in RANKS.items():
        row = rows[member(version)]
        assert (row["family"], row["rank"]) == (MATCH, rank), row
    classes = {v: rows[member(v)]["class"] for v in AGES}
    assert classes == {
        "10": "allowed",
        "5": "allowed",
        "4": "prune",
        "3": "prune",
        "2": "required",
        "1": "prune",
        "0": "prune",
    }
    assert rows[member("2")]["rule"] == "required"
    assert (
        rows[member("10")]["rule"] == f"version 10 of {MATCH}, newest #1: kept (the newest 2 are)"
    )
    assert (rows["notes.txt"]["family"], rows["notes.txt"]["rank"]) == (None, None)

    table = run_ocrd("--config", path, "list")
    assert table.code == 0, table
    (line,) = [x for x in table.out.splitlines() if x.startswith(member("2"))]
    assert f"required; newest #5 of {MATCH}" in line


def test_a_member_held_open_is_busy_and_stays_with_delete(
    run_ocrd: Run, models: Path, policy: Path, tmp_path: Path
) -> None:
    """prune.action delete: v1, held open by a real process, is reported busy (with its pid)
    and left alone; v2, also beyond keep, is deleted (not quarantined); once the process is
    gone the next apply deletes v1."""
    ages = {"1": 3 * HOUR, "2": 3 * HOUR, "3": 3 * HOUR, "10": 3 * HOUR}
    family_dir(models, ages)
    path = family_policy(policy, models, required=[], prune={"action": "delete"})
    busy = models / member("1")
    with holder(tmp_path, "ocrd-hold-fd", HOLD_FD, busy) as child:
        first = run_ocrd("--config", path, "apply")
        assert child.stdin is not None
        child.stdin.close()
        assert child.wait(timeout=10) == 0
    assert first.code == 1, first
    (report,) = events(first.out, "model.busy")
    assert report["model"] == member("1")
    assert child.pid in report["pids"]
    assert [e["model"] for e in events(first.out, "model.pruned")] == [member("2")]
    assert busy.read_bytes() == content("1")
    assert visible(models) == {member("1"), member("3"), member("10"), "notes.txt"}
    assert trashed_files(models) == {}  # deleted, not quarantined

    second = run_ocrd("--config", path, "apply")
    assert second.code == 0, second
    assert [e["model"] for e in events(second.out, "model.pruned")] == [member("1")]
    assert visible(models) == {member("3"), member("10"), "notes.txt"}
    assert trashed_files(models) == {}


def test_check_warns_when_a_prune_prefix_overlaps_the_family(
    run_ocrd: Run, models: Path, policy: Path
) -> None:
    """`check` with prefix en_ as well: a warning naming the family and the prefix (exit 0);
    and `apply` still keeps the newest 2 that the prefix alone would prune."""
    family_dir(models)
    path = family_policy(policy, models, prune={"prefixes": ["en_"]})
    r = run_ocrd("--config", path, "check")
    assert r.code == 0, r
    expected = (
        f"warning: version family {MATCH!r} overlaps prune prefix 'en_'; "
        "the newest 2 of the family are kept even so"
    )
    assert expected in r.out.splitlines(), r.out
    assert not [x for x in r.out.splitlines() if x.startswith("error:")]

    applied = run_ocrd("--config", path, "apply")
    assert applied.code == 0, applied
    assert visible(models) == {member(v) for v in ("10", "5", "2", "0")} | {"notes.txt"}


def test_check_is_quiet_about_families_a_prefix_cannot_reach(
    run_ocrd: Run, models: Path, policy: Path
) -> None:
    """With only the prefix old_, `check` prints no family overlap warning."""
    family_dir(models)
    path = family_policy(policy, models)
    r = run_ocrd("--config", path, "check")
    assert r.code == 0, r
    assert "version family" not in r.out, r.out


def test_check_names_a_bad_match_at_its_key(run_ocrd: Run, models: Path, policy: Path) -> None:
    """A match with a glob is an error at versions[0].match, exit 2, no traceback."""
    path = save_policy(
        policy, policy_data(models, versions=[{"match": "en_*{version}", "keep": 1}])
    )
    r = run_ocrd("--config", path, "check")
    assert r.code == 2, r
    assert "versions[0].match" in r.err, r.err
    assert "would be taken literally" in r.err, r.err
    assert "Traceback" not in r.err


def test_trash_restore_warns_that_an_old_member_will_be_pruned_again(
    run_ocrd: Run, models: Path, policy: Path
) -> None:
    """Restoring v1 (ranked beyond keep) from the quarantine warns, as for a prefix match,
    that the next cycle prunes it again: it does, once old enough."""
    family_dir(models)
    path = family_policy(policy, models, prune={"min_age": 0})
    applied = run_ocrd("--config", path, "apply")
    assert applied.code == 0, applied
    assert member("1") in trashed_files(models)
    r = run_ocrd("--config", path, "trash", "restore", member("1"))
    assert r.code == 0, r
    assert (models / member("1")).read_bytes() == content("1")
    again = run_ocrd("--config", path, "plan", "--json")
    assert member("1") in [a["model"] for a in again.json()["actions"]]  # it would go again
    assert r.err.startswith(f"ocrd: warning: {member('1')!r}"), r.err
