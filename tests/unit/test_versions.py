"""Version families (`versions:`): the match syntax, natural version order, and what
reconcile() makes of a family's members (README "Version families")."""

from __future__ import annotations

import random
import re
import zlib
from itertools import groupby
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from ocrd.core.model import (
    ActionKind,
    Class,
    Entry,
    Kind,
    ListedEntry,
    Plan,
    ReportKind,
    Snapshot,
)
from ocrd.core.plan import classify_all, may_act_on, next_due, reconcile
from ocrd.core.policy import Policy, conflicts
from ocrd.core.render import models_json
from ocrd.core.versions import check_match, version_key

ROOT = "/srv/models"
NOW = 1_700_000_000.0
HOUR = 3600.0
DAY = 86400.0
EN = "en_ocr_v{version}.bin"


def make_policy(**fields: Any) -> Policy:
    """A validated policy for ROOT with *fields* on top of the defaults."""
    return Policy.model_validate({"model_dir": ROOT, **fields})


def fast(versions: list[dict[str, Any]], **fields: Any) -> Policy:
    """A policy with *versions*, no min_age and no caps (unless *fields* say otherwise)."""
    prune = {"min_age": 0, "max_fraction": 1.0, "max_per_cycle": 10_000, **fields.pop("prune", {})}
    return make_policy(versions=versions, prune=prune, **fields)


def entry(name: str, *, age: float = DAY, size: int = 100) -> Entry:
    """A file entry *age* seconds old at NOW."""
    mtime = NOW - age
    return Entry(
        name=name,
        kind=Kind.FILE,
        size=size,
        mtime=mtime,
        inode=zlib.crc32(name.encode()),
        device=1,
        mtime_ns=int(mtime * 1e9),
    )


def snap(*entries: Entry | ListedEntry) -> Snapshot:
    return Snapshot(root=ROOT, device=1, entries=tuple(sorted(entries, key=lambda e: e.name)))


def en(*versions: str, age: float = DAY) -> list[Entry]:
    return [entry(f"en_ocr_v{v}.bin", age=age) for v in versions]


def pruned(plan: Plan) -> list[str]:
    return [a.name for a in plan.actions if a.kind is ActionKind.PRUNE]


def reported(plan: Plan, kind: ReportKind) -> set[str]:
    return {r.name for r in plan.reports if r.kind is kind}


def verdicts(plan: Plan) -> dict[str, tuple[Class, str | None, int]]:
    return {c.name: (c.cls, c.family, c.rank) for c in plan.classified}


def match_errors(match: Any, **more: Any) -> list[dict[str, Any]]:
    """The errors of validating a policy whose one family has *match*."""
    family = {"match": match, "keep": 1, **more}
    with pytest.raises(ValidationError) as exc:
        make_policy(versions=[family])
    return [dict(e) for e in exc.value.errors(include_url=False)]


# --- check_match ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "match",
    [
        EN,
        "{version}",
        "{version}.gguf",
        "model-{version}",
        "llama-3-{version}-q4_K_M.gguf",
        "x {version} y",
    ],
)
def test_check_match_accepts_plain_text_around_one_placeholder(match: str) -> None:
    """Literal text (or none) around exactly one {version} is a family; it comes back as is."""
    assert check_match(match) == match
    assert make_policy(versions=[{"match": match, "keep": 1}]).versions[0].match == match


@pytest.mark.parametrize(
    ("match", "pattern"),
    [
        ("en_ocr_v1.bin", r"exactly one \{version\}"),
        ("", r"exactly one \{version\}"),
        ("a{version}b{version}", r"exactly one \{version\}"),
        ("{Version}.bin", r"exactly one \{version\}"),
        ("{ version }.bin", r"exactly one \{version\}"),
        ("models/en_{version}.bin", r"no '/'"),
        ("en_{version}/x", r"no '/'"),
        ("en\x00{version}", r"no NUL"),
        (".en_{version}.bin", r"starts with '\.'.*dot-entries are never models"),
        (".{version}", r"starts with '\.'"),
        ("en_*{version}.bin", r"'\*' would be taken literally.*globs belong in whitelist"),
        ("en_{version}?.bin", r"'\?' would be taken literally"),
        ("en_[ab]{version}", r"'\[\]' would be taken literally"),
        ("en_{version}{x}", r"'\{\}' would be taken literally"),
        ("{{version}}", r"'\{\}' would be taken literally"),
    ],
)
def test_check_match_refuses_what_is_not_one_plain_family(match: str, pattern: str) -> None:
    """No placeholder or two, a '/', NUL, a leading '.', or glob characters: a clear
    ValueError, and the same message at versions[0].match when a policy holds it."""
    with pytest.raises(ValueError, match=pattern) as exc:
        check_match(match)
    assert repr(match) in str(exc.value)  # the message quotes what was written
    errors = match_errors(match)
    assert [tuple(e["loc"]) for e in errors] == [("versions", 0, "match")]
    assert re.search(pattern, errors[0]["msg"]), errors[0]["msg"]


def test_a_match_example_in_the_message_is_itself_valid() -> None:
    """The example the message offers ('en_ocr_v{version}.bin') passes check_match."""
    with pytest.raises(ValueError) as exc:
        check_match("en_ocr_v1.bin")
    example = re.search(r"e\.g\. '([^']+)'", str(exc.value))
    assert example is not None, str(exc.value)
    assert check_match(example.group(1)) == example.group(1)


@pytest.mark.parametrize(
    ("family", "loc", "pattern"),
    [
        ({"match": EN, "keep": 0}, ("versions", 1, "keep"), r"greater than or equal to 1"),
        ({"match": EN, "keep": -2}, ("versions", 1, "keep"), r"greater than or equal to 1"),
        ({"match": EN}, ("versions", 1, "keep"), r"Field required"),
        ({"keep": 2}, ("versions", 1, "match"), r"Field required"),
        ({"match": EN, "keep": 2, "max": 3}, ("versions", 1, "max"), r"Extra inputs"),
        ({"match": EN, "keep": "two"}, ("versions", 1, "keep"), r"valid integer"),
    ],
)
def test_a_family_needs_a_keep_of_at_least_one_and_no_other_keys(
    family: dict[str, Any], loc: tuple[Any, ...], pattern: str
) -> None:
    """keep is required and ≥ 1, match is required, unknown keys are refused, each at its key
    (the second family here: the error names its index)."""
    with pytest.raises(ValidationError) as exc:
        make_policy(versions=[{"match": "ok_{version}", "keep": 1}, family])
    found = [dict(e) for e in exc.value.errors(include_url=False)]
    assert [tuple(e["loc"]) for e in found] == [loc], found
    assert re.search(pattern, found[0]["msg"]), found[0]["msg"]


def test_versions_default_to_none() -> None:
    """No `versions:` key: no family, and reconcile classifies as before."""
    policy = make_policy()
    assert policy.versions == []
    plan = reconcile(policy, snap(*en("1", "2", "3")), now=NOW)
    assert {c.cls for c in plan.classified} == {Class.UNMANAGED}
    assert {(c.family, c.rank) for c in plan.classified} == {(None, 0)}


# --- version_key ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("older", "newer"),
    [
        ("9", "10"),
        ("v9", "v10"),
        ("1.9", "1.10"),
        ("1.2", "1.10"),
        ("1.10", "1.10.1"),  # a longer version with the same start is newer
        ("1.10.1", "2"),
        ("2024-01-05", "2024-01-31"),
        ("2024-01-31", "2024-02-01"),
        ("2023-12-31", "2024-01-01"),
        ("20240105", "20240131"),
        ("99", "100"),
        ("1.0", "1.0rc1"),  # rc vs final is text order: the suffix makes it "longer"
        ("1.0-rc1", "1.0rc1"),  # '-' sorts before 'r'
        ("1.0rc1", "1.0rc2"),
        ("1.0rc9", "1.0rc10"),
        ("alpha", "beta"),
        ("beta", "1"),  # text before a number at the same place
        ("1a", "1b"),
        ("007", "7"),  # equal numbers: the digits' text breaks the tie, "007" < "7"
        ("07", "7"),
        ("007", "08"),  # 7 < 8 as numbers, whatever the zeros
    ],
)
def test_version_key_orders_naturally(older: str, newer: str) -> None:
    """Digit runs compare as numbers, the rest as text (README "Version families")."""
    assert version_key(older) < version_key(newer)
    assert version_key(newer) > version_key(older)


def test_leading_zeros_are_the_same_number_but_not_the_same_version() -> None:
    """'007' and '7' are both the number 7; what the code does with them: the keys differ
    (only in the digits' text), so they are distinct versions, '7' the newer, and both sort
    below 8 and above 6."""
    assert version_key("007") != version_key("7")
    assert [int(p[1]) for p in version_key("007")] == [int(p[1]) for p in version_key("7")]
    assert version_key("6") < version_key("007") < version_key("7") < version_key("8")
    plan = reconcile(fast([{"match": EN, "keep": 1}]), snap(*en("007", "7")), now=NOW)
    assert verdicts(plan)["en_ocr_v7.bin"] == (Class.ALLOWED, EN, 1)
    assert pruned(plan) == ["en_ocr_v007.bin"]


def test_equal_versions_have_equal_keys() -> None:
    """A version is equal only to itself: the key keeps the text, so ties come from names."""
    for v in ("1.10", "2024-01-31", "rc", "007"):
        assert version_key(v) == version_key(str(v))
    assert version_key("1.10") != version_key("1.1")


ASCENDING = [
    "alpha",
    "beta",
    "0.9",
    "1",
    "1.0",
    "1.0-rc1",
    "1.0rc1",
    "1.1",
    "1.9",
    "1.10",
    "1.10.1",
    "2",
    "07",
    "7",
    "10",
    "2024-01-05",
    "2024-01-31",
    "2024-02-01",
]


@given(st.permutations(ASCENDING))
def test_sorting_by_version_key_gives_the_natural_order(shuffled: list[str]) -> None:
    """Whatever order the versions come in, sorting by the key gives the hand-made order."""
    assert sorted(shuffled, key=version_key) == ASCENDING


# --- reconcile: examples --------------------------------------------------------------


def test_the_readme_example_keeps_v10_and_v9() -> None:
    """keep 2 of v1, v2, v3, v9, v10: v10 and v9 stay (natural order), the rest are pruned
    with the rule README quotes."""
    policy = fast([{"match": EN, "keep": 2}])
    plan = reconcile(policy, snap(*en("1", "2", "3", "9", "10")), now=NOW)
    got = verdicts(plan)
    assert got["en_ocr_v10.bin"] == (Class.ALLOWED, EN, 1)
    assert got["en_ocr_v9.bin"] == (Class.ALLOWED, EN, 2)
    assert got["en_ocr_v3.bin"] == (Class.PRUNE, EN, 3)
    assert got["en_ocr_v2.bin"] == (Class.PRUNE, EN, 4)
    assert got["en_ocr_v1.bin"] == (Class.PRUNE, EN, 5)
    assert sorted(pruned(plan)) == ["en_ocr_v1.bin", "en_ocr_v2.bin", "en_ocr_v3.bin"]
    rules = {a.name: a.rule for a in plan.actions}
    assert rules["en_ocr_v3.bin"] == (
        "version 3 of en_ocr_v{version}.bin, newest #3; the newest 2 are kept"
    )
    reasons = {a.name: a.reason for a in plan.actions}
    assert reasons["en_ocr_v1.bin"] == (
        "version 1 of en_ocr_v{version}.bin, newest #5; the newest 2 are kept, 1d 0h old"
    )
    kept = {c.name: c.rule for c in plan.classified if c.cls is Class.ALLOWED}
    assert kept["en_ocr_v10.bin"] == (
        "version 10 of en_ocr_v{version}.bin, newest #1: kept (the newest 2 are)"
    )
    assert reported(plan, ReportKind.UNMANAGED) == set()


def test_rank_follows_the_version_not_the_mtime() -> None:
    """The newest file on disk is not the newest version: v1 touched a minute ago (old
    enough) is still ranked last and pruned; v10, a year old, is kept."""
    policy = fast([{"match": EN, "keep": 1}])
    entries = [entry("en_ocr_v1.bin", age=60), entry("en_ocr_v10.bin", age=365 * DAY)]
    plan = reconcile(policy, snap(*entries), now=NOW)
    assert pruned(plan) == ["en_ocr_v1.bin"]
    assert verdicts(plan)["en_ocr_v10.bin"] == (Class.ALLOWED, EN, 1)


def test_a_required_member_counts_toward_keep_and_is_never_pruned() -> None:
    """keep 2 with the newest (v10) and the oldest (v1) required: v10 is #1 and uses one of
    the two places, v9 is #2, v8 and v7 go; v1, #5, stays required."""
    policy = fast([{"match": EN, "keep": 2}], required=["en_ocr_v10.bin", "en_ocr_v1.bin"])
    plan = reconcile(policy, snap(*en("1", "7", "8", "9", "10")), now=NOW)
    got = verdicts(plan)
    assert got["en_ocr_v10.bin"] == (Class.REQUIRED, EN, 1)
    assert got["en_ocr_v9.bin"] == (Class.ALLOWED, EN, 2)
    assert got["en_ocr_v1.bin"] == (Class.REQUIRED, EN, 5)
    assert sorted(pruned(plan)) == ["en_ocr_v7.bin", "en_ocr_v8.bin"]
    rules = {c.name: c.rule for c in plan.classified}
    assert rules["en_ocr_v1.bin"] == "required"


def test_a_whitelisted_member_takes_its_rank_and_stays() -> None:
    """A whitelisted v2 among v1..v5 with keep 2: v5, v4 kept, v3 and v1 pruned, v2 allowed
    by its whitelist glob with rank 4."""
    policy = fast([{"match": EN, "keep": 2}], whitelist=["*_v2.bin"])
    plan = reconcile(policy, snap(*en("1", "2", "3", "4", "5")), now=NOW)
    got = verdicts(plan)
    assert got["en_ocr_v2.bin"] == (Class.ALLOWED, EN, 4)
    assert {c.name: c.rule for c in plan.classified}["en_ocr_v2.bin"] == "whitelist '*_v2.bin'"
    assert sorted(pruned(plan)) == ["en_ocr_v1.bin", "en_ocr_v3.bin"]


def test_a_prune_prefix_does_not_reach_the_newest_members() -> None:
    """prefix en_ and keep 2: v10, v9 are kept in spite of it; older members are pruned by
    their version rule; an en_ name outside the family by the prefix."""
    policy = fast([{"match": EN, "keep": 2}], prune={"prefixes": ["en_"]})
    plan = reconcile(policy, snap(*en("8", "9", "10"), entry("en_notes.txt")), now=NOW)
    got = verdicts(plan)
    assert got["en_ocr_v10.bin"][0] is Class.ALLOWED
    assert got["en_ocr_v9.bin"][0] is Class.ALLOWED
    assert got["en_notes.txt"] == (Class.PRUNE, None, 0)
    rules = {a.name: a.rule for a in plan.actions}
    assert rules == {
        "en_ocr_v8.bin": "version 8 of en_ocr_v{version}.bin, newest #3; the newest 2 are kept",
        "en_notes.txt": "prefix 'en_'",
    }


def test_ignored_entries_and_missing_required_names_are_not_members() -> None:
    """An ignored v11 and a required but absent v12 take no rank: v10 and v9 are the newest
    2 and v8 is pruned."""
    policy = fast(
        [{"match": EN, "keep": 2}],
        ignore=["*_v11.bin"],
        required=["en_ocr_v12.bin"],
    )
    plan = reconcile(policy, snap(*en("8", "9", "10", "11")), now=NOW)
    got = verdicts(plan)
    assert got["en_ocr_v11.bin"] == (Class.IGNORED, None, 0)
    assert got["en_ocr_v12.bin"] == (Class.MISSING, None, 0)
    assert got["en_ocr_v10.bin"] == (Class.ALLOWED, EN, 1)
    assert got["en_ocr_v9.bin"] == (Class.ALLOWED, EN, 2)
    assert pruned(plan) == ["en_ocr_v8.bin"]


def test_a_dot_entry_is_never_a_member_even_of_a_bare_placeholder() -> None:
    """`{version}` alone would match any name; dot-entries stay ignored and unranked."""
    policy = fast([{"match": "{version}", "keep": 1}])
    plan = reconcile(policy, snap(entry(".ocrd-x"), entry("a1"), entry("a2")), now=NOW)
    got = verdicts(plan)
    assert got[".ocrd-x"] == (Class.IGNORED, None, 0)
    assert got["a2"] == (Class.ALLOWED, "{version}", 1)
    assert pruned(plan) == ["a1"]


def test_a_version_is_at_least_one_character() -> None:
    """`en_ocr_v.bin` (empty version) is not a member: it stays unmanaged."""
    policy = fast([{"match": EN, "keep": 1}])
    plan = reconcile(policy, snap(entry("en_ocr_v.bin"), *en("1", "2")), now=NOW)
    assert verdicts(plan)["en_ocr_v.bin"] == (Class.UNMANAGED, None, 0)
    assert pruned(plan) == ["en_ocr_v1.bin"]


def test_a_name_of_two_families_belongs_to_the_first() -> None:
    """`m_{version}` listed first takes m_v1.bin and m_v2.bin (versions 'v1.bin', 'v2.bin');
    listed second, it gets none of them."""
    names = ["m_v1.bin", "m_v2.bin", "m_v3.bin"]
    wide, narrow = {"match": "m_{version}", "keep": 1}, {"match": "m_v{version}.bin", "keep": 2}
    first = reconcile(fast([wide, narrow]), snap(*map(entry, names)), now=NOW)
    assert {c.family for c in first.classified} == {"m_{version}"}
    assert sorted(pruned(first)) == ["m_v1.bin", "m_v2.bin"]
    second = reconcile(fast([narrow, wide]), snap(*map(entry, names)), now=NOW)
    assert {c.family for c in second.classified} == {"m_v{version}.bin"}
    assert pruned(second) == ["m_v1.bin"]


def test_two_families_with_the_same_match_use_the_first_keep() -> None:
    """The same match twice (keep 1, then keep 3): README's "a name of two families belongs
    to the first" means keep 1 applies (or the policy refuses the repeat)."""
    try:
        policy = fast([{"match": EN, "keep": 1}, {"match": EN, "keep": 3}])
    except ValidationError:
        return  # refusing the duplicate is fine too
    plan = reconcile(policy, snap(*en("1", "2", "3", "4")), now=NOW)
    assert sorted(pruned(plan)) == ["en_ocr_v1.bin", "en_ocr_v2.bin", "en_ocr_v3.bin"]


def test_a_young_member_waits_and_next_due_says_when() -> None:
    """min_age 1h: v1 (10 minutes old, ranked beyond keep) is a waiting report with its
    version rule; next_due is exactly when it turns 1h; then it is pruned."""
    policy = fast([{"match": EN, "keep": 1}], prune={"min_age": "1h"})
    young = entry("en_ocr_v1.bin", age=600)
    snapshot = snap(young, *en("2", age=2 * HOUR))
    plan = reconcile(policy, snapshot, now=NOW)
    assert pruned(plan) == []
    (report,) = [r for r in plan.reports if r.kind is ReportKind.WAITING]
    assert report.name == "en_ocr_v1.bin"
    assert report.reason == (
        "version 1 of en_ocr_v{version}.bin, newest #2; the newest 1 are kept, 10m old, "
        "pruned once older than 1h"
    )
    when = next_due(policy, snapshot, now=NOW)
    assert when == young.mtime + HOUR
    assert pruned(reconcile(policy, snapshot, now=when - 1)) == []
    assert pruned(reconcile(policy, snapshot, now=when)) == ["en_ocr_v1.bin"]
    assert next_due(policy, snapshot, now=when) is None


def test_a_young_member_within_keep_is_not_waiting() -> None:
    """A brand-new newest member is kept, not a waiting prune candidate; next_due is None."""
    policy = fast([{"match": EN, "keep": 1}], prune={"min_age": "1h"})
    snapshot = snap(entry("en_ocr_v9.bin", age=5), *en("1", age=2 * HOUR))
    plan = reconcile(policy, snapshot, now=NOW)
    assert reported(plan, ReportKind.WAITING) == set()
    assert pruned(plan) == ["en_ocr_v1.bin"]
    assert next_due(policy, snapshot, now=NOW) is None


def test_a_held_member_is_reported_held() -> None:
    """A member the caller holds back is a held report, not a prune; the others go."""
    policy = fast([{"match": EN, "keep": 1}])
    plan = reconcile(policy, snap(*en("1", "2", "3")), now=NOW, hold={"en_ocr_v1.bin": "flapping"})
    assert pruned(plan) == ["en_ocr_v2.bin"]
    held = [(r.name, r.reason) for r in plan.reports if r.kind is ReportKind.HELD]
    assert held == [("en_ocr_v1.bin", "flapping")]


def test_max_fraction_refuses_every_prune_of_the_cycle() -> None:
    """keep 1 of 4 would prune 3 of 4 models, over max_fraction 0.5: nothing is pruned, all
    three are refused and the plan has the error."""
    policy = fast([{"match": EN, "keep": 1}], prune={"max_fraction": 0.5})
    plan = reconcile(policy, snap(*en("1", "2", "3", "4")), now=NOW)
    assert pruned(plan) == []
    assert reported(plan, ReportKind.REFUSED) == {"en_ocr_v1.bin", "en_ocr_v2.bin", "en_ocr_v3.bin"}
    assert len(plan.errors) == 1
    assert "max_fraction" in plan.errors[0]


def test_max_per_cycle_takes_the_oldest_by_mtime_first() -> None:
    """Cap 1: of v1 (1 day old) and v2 (3 days old), both beyond keep, v2 goes first."""
    policy = fast([{"match": EN, "keep": 1}], prune={"max_per_cycle": 1})
    entries = [entry("en_ocr_v1.bin", age=DAY), entry("en_ocr_v2.bin", age=3 * DAY)]
    plan = reconcile(policy, snap(*entries, *en("3")), now=NOW)
    assert pruned(plan) == ["en_ocr_v2.bin"]
    assert reported(plan, ReportKind.DEFERRED) == {"en_ocr_v1.bin"}


def test_suspend_turns_family_prunes_into_reports() -> None:
    """suspend: the family prunes are suspended reports naming the version rule."""
    policy = fast([{"match": EN, "keep": 1}], suspend=True)
    plan = reconcile(policy, snap(*en("1", "2")), now=NOW)
    assert plan.actions == ()
    (report,) = [r for r in plan.reports if r.kind is ReportKind.SUSPENDED]
    assert report.name == "en_ocr_v1.bin"
    assert report.reason.startswith("would prune: version 1 of en_ocr_v{version}.bin, newest #2")


def test_may_act_on_names_family_members_and_only_them() -> None:
    """The scan must lstat a member (it may be pruned): may_act_on says yes for members, no
    for names outside every family, prefix and required list."""
    policy = make_policy(versions=[{"match": EN, "keep": 1}, {"match": "x-{version}", "keep": 1}])
    examine = may_act_on(policy)
    assert examine is not None
    assert examine("en_ocr_v1.bin")
    assert examine("en_ocr_v2024-01-31.bin")
    assert examine("x-1")
    assert not examine("en_ocr_v.bin")
    assert not examine("en_ocr_v1.gguf")
    assert not examine("notes.txt")


def test_a_member_known_only_from_the_listing_is_refused() -> None:
    """A member to prune given as a ListedEntry (scanned without may_act_on): ValueError."""
    policy = fast([{"match": EN, "keep": 1}])
    listed = ListedEntry(name="en_ocr_v1.bin", kind=Kind.FILE, inode=7, device=1)
    with pytest.raises(ValueError, match=r"en_ocr_v1\.bin: planned without its details"):
        reconcile(policy, snap(listed, *en("2")), now=NOW)


def test_list_json_shows_family_and_rank_and_null_outside() -> None:
    """models_json: family and rank for members, null for the rest (rank 0 is not shown)."""
    policy = fast([{"match": EN, "keep": 1}])
    classified = classify_all(policy, [*en("1", "2"), entry("notes.txt")])
    rows = {m["name"]: m for m in models_json(ROOT, classified, now=NOW)["models"]}
    assert (rows["en_ocr_v2.bin"]["family"], rows["en_ocr_v2.bin"]["rank"]) == (EN, 1)
    assert (rows["en_ocr_v1.bin"]["family"], rows["en_ocr_v1.bin"]["rank"]) == (EN, 2)
    assert (rows["notes.txt"]["family"], rows["notes.txt"]["rank"]) == (None, None)


@pytest.mark.parametrize("prefix", ["en_", "e", "en_ocr_v", "en_ocr_v1", "en_ocr_v1.bin"])
def test_conflicts_warns_when_a_family_overlaps_a_prune_prefix(prefix: str) -> None:
    """A prefix that starts the family's names, or that a member name could start with."""
    policy = make_policy(versions=[{"match": EN, "keep": 2}], prune={"prefixes": [prefix]})
    assert conflicts(policy) == [
        f"version family 'en_ocr_v{{version}}.bin' overlaps prune prefix {prefix!r}; "
        "the newest 2 of the family are kept even so"
    ]


@pytest.mark.parametrize("prefix", ["old_", "en_ocr_w", "fr_"])
def test_conflicts_is_quiet_for_a_prefix_no_member_can_have(prefix: str) -> None:
    policy = make_policy(versions=[{"match": EN, "keep": 2}], prune={"prefixes": [prefix]})
    assert conflicts(policy) == []


# --- reconcile: properties ------------------------------------------------------------

MATCHES = ("m_v{version}.bin", "m_{version}", "n-{version}-q4.gguf", "{version}.gguf")
VERSIONS = (*ASCENDING, "3", "4", "5", "11", "12", "1.2.3")
OTHERS = ("m_x", "old_a", "old_b.gguf", "n-q", "notes.txt", "m_v3.bin.part", ".hidden.gguf")
WHITELIST = ("m_v1*", "*-q4.gguf", "m_v2024*", "*rc1*", "none*")
IGNORE = ("*.part", "m_v7*", "*beta*", "n-1*")
PREFIXES = ("m_", "m_v1", "n-", "old_", "2", "1")
AGES = (0, 30, 59, 60, 61, 3599, 3600, 3601, 7200, DAY, 30 * DAY)


def head_tail(match: str) -> tuple[str, str]:
    head, tail = match.split("{version}")
    return head, tail


def natural(version: str) -> tuple[tuple[int, int, str], ...]:
    """A reference natural key written apart from version_key: runs of ASCII digits are
    numbers (their text breaking ties), other runs text, text before numbers."""
    key = []
    for digits, run in groupby(version, key=lambda ch: ch in "0123456789"):
        text = "".join(run)
        key.append((1, int(text), text) if digits else (0, 0, text))
    return tuple(key)


def base_class(policy: Policy, name: str) -> Class:
    """DESIGN §3 without families."""
    if name.startswith(".") or any(re.fullmatch(_glob(g), name) for g in policy.ignore):
        return Class.IGNORED
    if name in {r.name for r in policy.required}:
        return Class.REQUIRED
    if any(re.fullmatch(_glob(g), name) for g in policy.whitelist):
        return Class.ALLOWED
    if any(name.startswith(p) for p in policy.prune.prefixes):
        return Class.PRUNE
    return Class.UNMANAGED


def _glob(glob: str) -> str:
    """The pools' globs only use `*` (and `?` nowhere): a tiny translation of our own."""
    return ".*".join(map(re.escape, glob.split("*")))


def family_of(policy: Policy, name: str) -> tuple[str, int, str] | None:
    """(match, keep, version) of the first family *name* fits, if any."""
    for family in policy.versions:
        head, tail = head_tail(family.match)
        if len(name) > len(head) + len(tail) and name.startswith(head) and name.endswith(tail):
            return family.match, family.keep, name[len(head) : len(name) - len(tail)]
    return None


Expected = dict[str, tuple[Class, str | None, int]]


def expected(policy: Policy, names: list[str]) -> Expected:
    """Each name's class, family and rank as README "Version families" describes them."""
    out: Expected = {}
    members: dict[str, list[tuple[Any, str]]] = {}
    for name in names:
        cls = base_class(policy, name)
        out[name] = (cls, None, 0)
        found = family_of(policy, name) if cls is not Class.IGNORED else None
        if found is not None:
            members.setdefault(found[0], []).append((natural(found[2]), name))
    keeps = {}
    for family in reversed(policy.versions):  # the first of a repeated match wins
        keeps[family.match] = family.keep
    for match, ranked in members.items():
        ranked.sort(reverse=True)
        for rank, (_, name) in enumerate(ranked, start=1):
            cls = out[name][0]
            if cls not in (Class.REQUIRED, Class.ALLOWED):
                cls = Class.ALLOWED if rank <= keeps[match] else Class.PRUNE
            out[name] = (cls, match, rank)
    return out


Scenario = tuple[Policy, Snapshot, dict[str, str]]


@st.composite
def scenarios(draw: st.DrawFn, *, fraction: float | None = None) -> Scenario:
    """A random policy with 1..3 families and a snapshot of their members among others."""
    matches = draw(st.lists(st.sampled_from(MATCHES), min_size=1, max_size=3, unique=True))
    families = [{"match": m, "keep": draw(st.integers(1, 4))} for m in matches]
    rows = draw(
        st.lists(
            st.tuples(st.sampled_from([*matches, *matches, *MATCHES]), st.sampled_from(VERSIONS)),
            min_size=2,
            max_size=14,
            unique=True,
        )
    )
    names = [m.replace("{version}", v) for m, v in rows]
    names += draw(st.lists(st.sampled_from(OTHERS), max_size=4, unique=True))
    names = sorted(set(names))
    plain = [n for n in names if not n.startswith(".")]
    protect = st.sampled_from([*plain, "m_v99.bin"])
    required = draw(st.lists(protect, max_size=3, unique=True))
    prune = {
        "prefixes": draw(st.lists(st.sampled_from(PREFIXES), max_size=2, unique=True)),
        "min_age": draw(st.sampled_from([0, 60, 3600])),
        "max_per_cycle": draw(st.sampled_from([1, 2, 3, 50, 50, 50])),
        "max_fraction": fraction or draw(st.sampled_from([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])),
        "action": draw(st.sampled_from(["quarantine", "delete"])),
    }
    policy = make_policy(
        versions=families,
        required=required,
        whitelist=draw(st.lists(st.sampled_from(WHITELIST), max_size=2, unique=True)),
        ignore=draw(st.lists(st.sampled_from(IGNORE), max_size=2, unique=True)),
        unmanaged=draw(st.sampled_from(["report", "report", "prune"])),
        prune=prune,
    )
    entries = [entry(n, age=draw(st.sampled_from(AGES)), size=len(n)) for n in names]
    hold_names = draw(st.lists(st.sampled_from(names), max_size=3, unique=True)) if names else []
    return policy, Snapshot(ROOT, 1, tuple(entries)), dict.fromkeys(hold_names, "held")


def due(plan: Plan) -> set[str]:
    """Prune candidates that are due: pruned, or deferred or refused by a cap."""
    capped = reported(plan, ReportKind.DEFERRED) | reported(plan, ReportKind.REFUSED)
    return set(pruned(plan)) | capped


def candidates(policy: Policy, want: Expected) -> set[str]:
    return {
        n
        for n, (cls, _, _) in want.items()
        if cls is Class.PRUNE or (cls is Class.UNMANAGED and policy.unmanaged == "prune")
    }


def age_of(e: Entry) -> float:
    return max(0.0, NOW - e.mtime)


@settings(max_examples=100, deadline=None)
@given(scenarios())
def test_classes_families_and_ranks_are_as_the_readme_says(scenario: Scenario) -> None:
    """Every entry's class, family and rank match the reference, independent of plan.py."""
    policy, snapshot, hold = scenario
    names = [e.name for e in snapshot.entries]
    plan = reconcile(policy, snapshot, now=NOW, hold=hold)
    got = {n: v for n, v in verdicts(plan).items() if n in names}
    assert got == expected(policy, names)


@settings(max_examples=100, deadline=None)
@given(scenarios())
def test_protected_and_newest_members_are_never_pruned(scenario: Scenario) -> None:
    """No required or whitelisted member, and no member ranked within keep (prune prefix or
    not), is ever pruned, deferred or refused."""
    policy, snapshot, hold = scenario
    plan = reconcile(policy, snapshot, now=NOW, hold=hold)
    keeps = {f.match: f.keep for f in reversed(policy.versions)}
    protected = {r.name for r in policy.required}
    for c in plan.classified:
        if c.family is None:
            continue
        base = base_class(policy, c.name)
        if base in (Class.REQUIRED, Class.ALLOWED):
            assert c.cls is base, c
            assert c.name in protected or base is Class.ALLOWED
            assert c.name not in due(plan), c
        if c.rank <= keeps[c.family]:
            assert c.cls is not Class.PRUNE, c
            assert c.name not in due(plan), c
            assert c.name not in reported(plan, ReportKind.WAITING), c


@settings(max_examples=100, deadline=None)
@given(scenarios())
def test_exactly_the_old_unprotected_members_beyond_keep_are_due(scenario: Scenario) -> None:
    """Before caps, the due prune candidates are exactly the unprotected members ranked
    beyond keep (plus the usual prefix/unmanaged ones) that are old enough and not held;
    the young ones wait and the held ones are held."""
    policy, snapshot, hold = scenario
    plan = reconcile(policy, snapshot, now=NOW, hold=hold)
    want = expected(policy, [e.name for e in snapshot.entries])
    by_name = snapshot.by_name()
    cands = candidates(policy, want)
    old = {n for n in cands if age_of(by_name[n]) >= policy.prune.min_age}
    assert due(plan) == old - set(hold)
    assert reported(plan, ReportKind.WAITING) == cands - old
    assert reported(plan, ReportKind.HELD) == old & set(hold)
    family_due = {n for n in due(plan) if want[n][1] is not None}
    keeps = {f.match: f.keep for f in reversed(policy.versions)}
    assert family_due == {
        n
        for n, (cls, fam, rank) in want.items()
        if fam is not None
        and cls is Class.PRUNE
        and rank > keeps[fam]
        and n in old
        and n not in hold
    }


@settings(max_examples=100, deadline=None)
@given(scenarios())
def test_caps_still_hold_with_families(scenario: Scenario) -> None:
    """At most max_per_cycle prunes, oldest first; over max_fraction of the models nothing is
    pruned and every due one is refused."""
    policy, snapshot, hold = scenario
    plan = reconcile(policy, snapshot, now=NOW, hold=hold)
    by_name = snapshot.by_name()
    models = sum(1 for e in snapshot.entries if base_class(policy, e.name) is not Class.IGNORED)
    assert plan.models == models
    ready = sorted(due(plan), key=lambda n: (by_name[n].mtime, n))
    cap = policy.prune.max_per_cycle
    if ready and len(ready) > policy.prune.max_fraction * models:
        assert pruned(plan) == []
        assert reported(plan, ReportKind.REFUSED) == set(ready)
        assert len(plan.errors) == 1
    else:
        assert pruned(plan) == ready[:cap]
        assert reported(plan, ReportKind.DEFERRED) == set(ready[cap:])
        assert plan.errors == ()
    assert len(pruned(plan)) <= cap
    if pruned(plan):
        assert len(pruned(plan)) <= policy.prune.max_fraction * models
    assert {a.mode for a in plan.actions if a.kind is ActionKind.PRUNE} <= {policy.prune.action}


@settings(max_examples=80, deadline=None)
@given(scenarios(), st.randoms(use_true_random=False))
def test_the_plan_does_not_depend_on_entry_order(scenario: Scenario, rnd: random.Random) -> None:
    """Shuffled entries give an equal plan, ranks included, and the same next_due."""
    policy, snapshot, hold = scenario
    entries = list(snapshot.entries)
    rnd.shuffle(entries)
    shuffled = Snapshot(ROOT, 1, tuple(entries))
    assert reconcile(policy, shuffled, now=NOW, hold=hold) == reconcile(
        policy, snapshot, now=NOW, hold=hold
    )
    assert next_due(policy, shuffled, now=NOW) == next_due(policy, snapshot, now=NOW)
    assert set(classify_all(policy, entries)) == set(classify_all(policy, snapshot.entries))


def without(snapshot: Snapshot, gone: set[str]) -> Snapshot:
    return Snapshot(ROOT, 1, tuple(e for e in snapshot.entries if e.name not in gone))


@settings(max_examples=100, deadline=None)
@given(scenarios())
def test_removing_the_pruned_members_leaves_nothing_more_to_prune(scenario: Scenario) -> None:
    """When no cap was hit, applying the plan's prunes and reconciling again prunes nothing
    (of any family, or at all), and the kept members keep their class and rank."""
    policy, snapshot, hold = scenario
    plan = reconcile(policy, snapshot, now=NOW, hold=hold)
    capped = reported(plan, ReportKind.DEFERRED) | reported(plan, ReportKind.REFUSED)
    if capped:
        return
    after = reconcile(policy, without(snapshot, set(pruned(plan))), now=NOW, hold=hold)
    assert pruned(after) == []
    assert due(after) == set()
    now_kept = verdicts(after)
    for name, (cls, family, rank) in verdicts(plan).items():
        kept_by_rank = base_class(policy, name) not in (Class.REQUIRED, Class.ALLOWED)
        if family is not None and cls is Class.ALLOWED and kept_by_rank:
            assert now_kept[name] == (cls, family, rank)  # within keep: the same place


@settings(max_examples=80, deadline=None)
@given(scenarios(fraction=1.0))
def test_repeated_cycles_converge_to_the_newest_keep(scenario: Scenario) -> None:
    """With max_fraction 1 and caps of any size, cycles at a fixed time stop pruning within
    ceil(N/max_per_cycle)+1 rounds; then every unprotected member beyond keep is young or
    held, and no member within keep was ever pruned."""
    policy, snapshot, hold = scenario
    rounds = len(snapshot.entries) // policy.prune.max_per_cycle + 2
    first = expected(policy, [e.name for e in snapshot.entries])
    keeps = {f.match: f.keep for f in reversed(policy.versions)}
    within = {n for n, (_, fam, rank) in first.items() if fam is not None and rank <= keeps[fam]}
    state, gone = snapshot, set()
    for _ in range(rounds):
        plan = reconcile(policy, state, now=NOW, hold=hold)
        if not pruned(plan):
            break
        gone |= set(pruned(plan))
        state = without(state, set(pruned(plan)))
    else:
        raise AssertionError(f"still pruning after {rounds} rounds: {pruned(plan)}")
    assert not gone & within
    by_name = state.by_name()
    for c in plan.classified:
        if c.family is not None and c.cls is Class.PRUNE:
            assert c.rank > keeps[c.family]
            assert c.name in hold or age_of(by_name[c.name]) < policy.prune.min_age, c


@settings(max_examples=100, deadline=None)
@given(scenarios())
def test_next_due_is_when_the_first_waiting_candidate_becomes_due(scenario: Scenario) -> None:
    """next_due is the earliest mtime+min_age of a waiting candidate (a family member or
    not), None with none waiting; at that time that candidate is no longer waiting."""
    policy, snapshot, hold = scenario
    plan = reconcile(policy, snapshot, now=NOW, hold=hold)
    by_name = snapshot.by_name()
    waiting = reported(plan, ReportKind.WAITING)
    when = next_due(policy, snapshot, now=NOW)
    if not waiting:
        assert when is None
        return
    first = min(by_name[n].mtime + policy.prune.min_age for n in waiting)
    assert when == first
    assert when > NOW
    later = reconcile(policy, snapshot, now=when, hold=hold)
    ready = {n for n in waiting if by_name[n].mtime + policy.prune.min_age == when}
    assert ready
    assert not ready & reported(later, ReportKind.WAITING)
    assert ready <= due(later) | reported(later, ReportKind.HELD)
