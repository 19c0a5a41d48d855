"""Example tests for the pure planner: classify() and reconcile() (DESIGN §3 and §4)."""

from __future__ import annotations

import zlib
from typing import Any

import pytest

from ocrd.core.model import (
    Action,
    ActionKind,
    Class,
    Classified,
    Entry,
    Kind,
    ListedEntry,
    Pin,
    Plan,
    ReportKind,
    Snapshot,
    TrashItem,
)
from ocrd.core.plan import classify, reconcile
from ocrd.core.policy import Policy

ROOT = "/srv/models"
NOW = 1_700_000_000.0
HOUR = 3600.0
DAY = 86400.0
SHA_A = "a" * 64
SHA_B = "b" * 64


def make_policy(**overrides: Any) -> Policy:
    """A validated policy for ROOT with *overrides* on top of the defaults."""
    return Policy.model_validate({"model_dir": ROOT, **overrides})


def make_entry(
    name: str,
    *,
    kind: Kind = Kind.FILE,
    size: int = 1000,
    age: float = DAY,
    mtime: float | None = None,
    sha256: str | None = None,
) -> Entry:
    """An entry *age* seconds old at NOW (or with an explicit *mtime*)."""
    mt = NOW - age if mtime is None else mtime
    return Entry(
        name=name,
        kind=kind,
        size=size,
        mtime=mt,
        inode=zlib.crc32(name.encode()),
        device=1,
        mtime_ns=int(mt * 1e9),
        sha256=sha256,
    )


def make_listed(name: str, *, kind: Kind = Kind.FILE) -> ListedEntry:
    """An entry as the directory listing alone gives it (scan() did not look at it)."""
    return ListedEntry(name=name, kind=kind, inode=zlib.crc32(name.encode()), device=1)


def make_trash(name: str, *, age: float, size: int = 500, id_: str | None = None) -> TrashItem:
    """A quarantined item trashed *age* seconds before NOW."""
    return TrashItem(
        id=id_ or f"{name}-{int(age)}",
        name=name,
        trashed_at=NOW - age,
        reason="prefix 'old_'",
        size=size,
    )


def make_snapshot(*entries: Entry | ListedEntry, trash: tuple[TrashItem, ...] = ()) -> Snapshot:
    """A snapshot of ROOT holding *entries* and *trash*."""
    return Snapshot(root=ROOT, device=1, entries=tuple(entries), trash=trash)


def plan_for(
    policy: Policy, *entries: Entry | ListedEntry, trash: tuple[TrashItem, ...] = ()
) -> Plan:
    """Reconcile *entries* against *policy* at NOW."""
    return reconcile(policy, make_snapshot(*entries, trash=trash), now=NOW)


def actions_of(plan: Plan, kind: ActionKind) -> list[Action]:
    """The actions of *kind* in plan order."""
    return [a for a in plan.actions if a.kind is kind]


def pruned(plan: Plan) -> list[str]:
    """Names of the prune actions, in plan order."""
    return [a.name for a in actions_of(plan, ActionKind.PRUNE)]


def reported(plan: Plan, kind: ReportKind) -> list[str]:
    """Names reported with *kind*, in plan order."""
    return [r.name for r in plan.reports if r.kind is kind]


def report_reason(plan: Plan, kind: ReportKind, name: str) -> str:
    """The reason of the single *kind* report about *name*."""
    found = [r.reason for r in plan.reports if r.kind is kind and r.name == name]
    assert len(found) == 1, plan.reports
    return found[0]


def classified(plan: Plan, name: str) -> Classified:
    """The classification of *name* in *plan*."""
    found = [c for c in plan.classified if c.name == name]
    assert len(found) == 1, plan.classified
    return found[0]


# --- Classification order (DESIGN §3) -------------------------------------------------------

FULL = {
    "required": [{"name": "old_keep.gguf"}, {"name": "en.part"}, {"name": "base.bin"}],
    "whitelist": ["custom_*", "*.gguf"],
    "prune": {"prefixes": ["old_", "tmp_", "t"]},
    "ignore": ["*.part", "*.tmp"],
}


@pytest.mark.parametrize(
    ("name", "cls", "rule"),
    [
        (".ocrd-trash", Class.IGNORED, "dot-entry"),
        (".old_hidden", Class.IGNORED, "dot-entry"),
        (".cache.gguf", Class.IGNORED, "dot-entry"),
        ("old_x.part", Class.IGNORED, "ignore '*.part'"),
        ("en.part", Class.IGNORED, "ignore '*.part'"),
        ("custom_a.tmp", Class.IGNORED, "ignore '*.tmp'"),
        ("old_keep.gguf", Class.REQUIRED, "required"),
        ("base.bin", Class.REQUIRED, "required"),
        ("old_llm.gguf", Class.ALLOWED, "whitelist '*.gguf'"),
        ("custom_x.gguf", Class.ALLOWED, "whitelist 'custom_*'"),
        ("old_v1.bin", Class.PRUNE, "prefix 'old_'"),
        ("tmp_dl", Class.PRUNE, "prefix 'tmp_'"),
        ("tx", Class.PRUNE, "prefix 't'"),
        ("fresh.bin", Class.UNMANAGED, "no rule"),
    ],
)
def test_classify_takes_the_first_rule_in_design_order(name: str, cls: Class, rule: str) -> None:
    """classify() applies dot/ignore, required, whitelist, prefix, unmanaged in that order."""
    policy = make_policy(**FULL)
    got = classify(policy, make_entry(name))
    assert (got.name, got.cls, got.rule) == (name, cls, rule)
    assert got.entry == make_entry(name)


def test_first_matching_glob_and_prefix_name_the_rule() -> None:
    """When several globs or prefixes match, the rule names the first one listed."""
    policy = make_policy(whitelist=["*.gguf", "q*"], prune={"prefixes": ["o", "old_"]})
    assert classify(policy, make_entry("qwen.gguf")).rule == "whitelist '*.gguf'"
    assert classify(policy, make_entry("old_a")).rule == "prefix 'o'"


def test_default_ignore_globs_apply() -> None:
    """Without an ignore key, the default globs (*.part, *.tmp, *.download, *.lock) are ignored."""
    policy = make_policy(prune={"prefixes": ["old_"]}, unmanaged="prune")
    for name in ("old_a.part", "x.tmp", "y.download", "z.lock"):
        assert classify(policy, make_entry(name)).cls is Class.IGNORED


def test_dot_entries_are_never_targets_even_with_unmanaged_prune() -> None:
    """Dot-entries are ignored and never pruned, even with unmanaged: prune and min_age 0."""
    policy = make_policy(unmanaged="prune", prune={"min_age": 0, "max_fraction": 1.0})
    plan = plan_for(
        policy, make_entry(".ocrd-trash", kind=Kind.DIR), make_entry(".ocrd-tmp-x"), make_entry("m")
    )
    assert pruned(plan) == ["m"]
    assert classified(plan, ".ocrd-trash").cls is Class.IGNORED
    assert reported(plan, ReportKind.UNMANAGED) == ["m"]


def test_protected_entries_are_not_pruned_though_they_match_a_prefix() -> None:
    """Required and whitelisted entries that start with a prune prefix are left alone."""
    policy = make_policy(
        required=[{"name": "old_req.bin"}],
        whitelist=["old_*.gguf"],
        prune={"prefixes": ["old_"], "min_age": 0, "max_fraction": 1.0},
    )
    plan = plan_for(
        policy, make_entry("old_req.bin"), make_entry("old_m.gguf"), make_entry("old_x")
    )
    assert pruned(plan) == ["old_x"]


def test_plan_lists_every_entry_and_missing_name_sorted_by_name() -> None:
    """plan.classified holds every entry and every missing required name, sorted by name."""
    policy = make_policy(required=[{"name": "b_missing"}], prune={"prefixes": ["old_"]})
    plan = plan_for(policy, make_entry("z"), make_entry(".dot"), make_entry("old_a"))
    assert [c.name for c in plan.classified] == [".dot", "b_missing", "old_a", "z"]
    assert classified(plan, "b_missing").cls is Class.MISSING


# --- Pins ------------------------------------------------------------------------------------


def test_pinned_file_with_matching_sha_is_ok() -> None:
    """A pinned required file whose sha256 equals the pin is ok, with no report and no action."""
    policy = make_policy(required=[{"name": "en.bin", "sha256": SHA_A, "source": "/mirror/en.bin"}])
    plan = plan_for(policy, make_entry("en.bin", sha256=SHA_A))
    assert classified(plan, "en.bin").pin is Pin.OK
    assert plan.actions == ()
    assert plan.reports == ()


def test_pin_in_upper_case_still_matches() -> None:
    """A pin written in upper case is compared case-insensitively with the computed sha256."""
    policy = make_policy(required=[{"name": "en.bin", "sha256": SHA_A.upper()}])
    assert classify(policy, make_entry("en.bin", sha256=SHA_A)).pin is Pin.OK


def test_unpinned_required_entry_has_no_pin_status() -> None:
    """A required entry without a pin is unpinned whatever its sha256 or kind."""
    policy = make_policy(required=[{"name": "en.bin"}])
    assert classify(policy, make_entry("en.bin", sha256=SHA_B)).pin is Pin.NONE
    assert classify(policy, make_entry("en.bin", kind=Kind.DIR)).pin is Pin.NONE
    assert plan_for(policy, make_entry("en.bin", kind=Kind.DIR)).reports == ()


@pytest.mark.parametrize(
    ("entry", "why"),
    [
        (make_entry("en.bin", sha256=SHA_B), "differs from pin"),
        (make_entry("en.bin", sha256=None), "sha256 could not be computed"),
        (make_entry("en.bin", kind=Kind.DIR, sha256=SHA_A), "pinned model is a dir"),
        (make_entry("en.bin", kind=Kind.SYMLINK, sha256=SHA_A), "pinned model is a symlink"),
    ],
)
def test_pinned_entry_that_does_not_match_is_corrupt(entry: Entry, why: str) -> None:
    """A pinned entry with another sha, no sha, or that is not a file is corrupt and reported."""
    policy = make_policy(required=[{"name": "en.bin", "sha256": SHA_A}])
    plan = plan_for(policy, entry)
    got = classified(plan, "en.bin")
    assert (got.cls, got.pin) == (Class.REQUIRED, Pin.CORRUPT)
    assert why in report_reason(plan, ReportKind.CORRUPT, "en.bin")
    assert plan.actions == ()  # no source: only reported


def test_corrupt_with_source_is_restored_with_the_entry() -> None:
    """A corrupt model with a source gets a restore action carrying the entry, source and pin."""
    policy = make_policy(
        required=[{"name": "en.bin", "sha256": SHA_A, "source": "/srv/mirror/en.bin"}]
    )
    bad = make_entry("en.bin", sha256=SHA_B)
    plan = plan_for(policy, bad)
    [restore] = plan.actions
    assert restore.kind is ActionKind.RESTORE
    assert (restore.name, restore.rule) == ("en.bin", "required")
    assert restore.entry == bad
    assert restore.source == "/srv/mirror/en.bin"
    assert restore.sha256 == SHA_A
    assert "corrupt" in restore.reason
    assert reported(plan, ReportKind.CORRUPT) == ["en.bin"]


# --- Missing required models -------------------------------------------------------------------


def test_missing_required_without_source_is_only_reported() -> None:
    """An absent required model without a source is reported missing and nothing is planned."""
    policy = make_policy(required=[{"name": "en.bin", "sha256": SHA_A}])
    plan = plan_for(policy, make_entry("other.bin"))
    assert reported(plan, ReportKind.MISSING) == ["en.bin"]
    assert plan.actions == ()
    got = classified(plan, "en.bin")
    assert (got.cls, got.entry) == (Class.MISSING, None)


def test_missing_required_with_source_is_restored_and_reported() -> None:
    """An absent required model with a source gets a restore action and is still reported."""
    policy = make_policy(
        required=[
            {"name": "b.bin", "sha256": SHA_A, "source": "/srv/mirror/b.bin"},
            {"name": "a.bin", "source": "/srv/mirror/a.bin"},
        ]
    )
    plan = plan_for(policy)
    assert reported(plan, ReportKind.MISSING) == ["a.bin", "b.bin"]
    restores = actions_of(plan, ActionKind.RESTORE)
    assert [(a.name, a.source, a.sha256, a.entry) for a in restores] == [
        ("a.bin", "/srv/mirror/a.bin", None, None),
        ("b.bin", "/srv/mirror/b.bin", SHA_A, None),
    ]
    assert all(a.rule == "required" and "missing" in a.reason for a in restores)


def test_present_required_model_is_not_missing() -> None:
    """A required model that is present, of any kind, is not reported missing."""
    policy = make_policy(required=[{"name": "en", "source": "/srv/mirror/en"}])
    plan = plan_for(policy, make_entry("en", kind=Kind.DIR))
    assert reported(plan, ReportKind.MISSING) == []
    assert plan.actions == ()


# --- min_age ------------------------------------------------------------------------------------


def test_young_prefix_entry_waits() -> None:
    """A prefix entry younger than min_age is reported waiting, not pruned."""
    policy = make_policy(prune={"prefixes": ["old_"], "min_age": "10m"})
    plan = plan_for(policy, make_entry("old_a", age=120))
    assert pruned(plan) == []
    reason = report_reason(plan, ReportKind.WAITING, "old_a")
    assert "prefix 'old_'" in reason
    assert "2m old" in reason
    assert "10m" in reason


def test_entry_exactly_min_age_old_is_due() -> None:
    """An entry exactly min_age old is pruned; one a second younger waits."""
    policy = make_policy(prune={"prefixes": ["old_"], "min_age": "10m", "max_fraction": 1.0})
    plan = plan_for(policy, make_entry("old_a", age=600), make_entry("old_b", age=599))
    assert pruned(plan) == ["old_a"]
    assert reported(plan, ReportKind.WAITING) == ["old_b"]


def test_future_mtime_counts_as_age_zero() -> None:
    """An entry with an mtime in the future is 0s old: it waits for min_age, or is due at 0."""
    entry = make_entry("old_a", mtime=NOW + 5 * DAY)
    waiting = plan_for(make_policy(prune={"prefixes": ["old_"], "min_age": "10m"}), entry)
    assert pruned(waiting) == []
    assert "0s old" in report_reason(waiting, ReportKind.WAITING, "old_a")

    zero = make_policy(prune={"prefixes": ["old_"], "min_age": 0, "max_fraction": 1.0})
    plan = plan_for(zero, entry)
    assert pruned(plan) == ["old_a"]
    assert plan.actions[0].reason == "prefix 'old_', 0s old"


def test_directory_age_is_the_entry_mtime() -> None:
    """A directory's age comes from its entry mtime (the newest inside, as the snapshot gives)."""
    policy = make_policy(prune={"prefixes": ["old_"], "min_age": "1h", "max_fraction": 1.0})
    stale = make_entry("old_stale", kind=Kind.DIR, size=5000, age=2 * HOUR)
    touched = make_entry("old_touched", kind=Kind.DIR, size=7000, age=60)
    plan = plan_for(policy, stale, touched)
    assert pruned(plan) == ["old_stale"]
    assert plan.actions[0].bytes == 5000
    assert reported(plan, ReportKind.WAITING) == ["old_touched"]


def test_prune_reason_names_rule_and_age() -> None:
    """A prune action carries its rule and a human reason with the age."""
    policy = make_policy(prune={"prefixes": ["old_"], "max_fraction": 1.0})
    [action] = plan_for(policy, make_entry("old_a", age=3 * HOUR)).actions
    assert action.rule == "prefix 'old_'"
    assert action.reason == "prefix 'old_', 3h 0m old"


# --- max_fraction -------------------------------------------------------------------------------


def test_over_max_fraction_refuses_every_prune() -> None:
    """More than max_fraction of models due: no prune at all, an error, and REFUSED reports."""
    policy = make_policy(prune={"prefixes": ["old_"], "max_fraction": 0.5, "min_age": "1m"})
    plan = plan_for(
        policy,
        make_entry("old_a"),
        make_entry("old_b"),
        make_entry("old_c"),
        make_entry("keep"),
        make_entry(".ocrd-trash", kind=Kind.DIR),  # ignored: not a model
        make_entry("dl.part"),  # ignored: not a model
    )
    assert actions_of(plan, ActionKind.PRUNE) == []
    assert len(plan.errors) == 1
    assert "max_fraction" in plan.errors[0]
    assert "3 of 4" in plan.errors[0]
    assert reported(plan, ReportKind.REFUSED) == ["old_a", "old_b", "old_c"]
    assert reported(plan, ReportKind.DEFERRED) == []


def test_exactly_max_fraction_is_allowed() -> None:
    """Pruning exactly max_fraction of the models is allowed."""
    policy = make_policy(prune={"prefixes": ["old_"], "max_fraction": 0.5})
    plan = plan_for(
        policy, make_entry("old_a"), make_entry("old_b"), make_entry("x"), make_entry("y")
    )
    assert sorted(pruned(plan)) == ["old_a", "old_b"]
    assert plan.errors == ()
    assert reported(plan, ReportKind.REFUSED) == []


def test_waiting_entries_count_as_models_but_not_as_due() -> None:
    """Young prefix entries count towards the models but not towards the share to prune."""
    policy = make_policy(prune={"prefixes": ["old_"], "max_fraction": 0.5, "min_age": "1h"})
    plan = plan_for(
        policy,
        make_entry("old_a"),
        make_entry("old_b"),
        make_entry("old_c", age=60),
        make_entry("x"),
    )
    assert sorted(pruned(plan)) == ["old_a", "old_b"]
    assert plan.errors == ()


def test_missing_required_names_do_not_count_as_models() -> None:
    """Missing required names are not models: they do not dilute the share to prune."""
    policy = make_policy(
        required=[{"name": f"r{i}"} for i in range(4)],
        prune={"prefixes": ["old_"], "max_fraction": 0.5},
    )
    plan = plan_for(policy, make_entry("old_a"), make_entry("old_b"), make_entry("x"))
    assert pruned(plan) == []
    assert reported(plan, ReportKind.REFUSED) == ["old_a", "old_b"]


def test_refusal_still_restores_and_purges() -> None:
    """A max_fraction refusal stops prunes only; restores and purges still run."""
    policy = make_policy(
        required=[{"name": "en.bin", "source": "/srv/mirror/en.bin"}],
        prune={"prefixes": ["old_"], "max_fraction": 0.5},
    )
    plan = plan_for(policy, make_entry("old_a"), trash=(make_trash("old_z", age=30 * DAY),))
    assert [a.kind for a in plan.actions] == [ActionKind.RESTORE, ActionKind.PURGE]
    assert reported(plan, ReportKind.REFUSED) == ["old_a"]


# --- max_per_cycle ------------------------------------------------------------------------------


def test_max_per_cycle_prunes_oldest_first_and_defers_the_rest() -> None:
    """Only max_per_cycle prunes run, oldest mtime first; the rest are reported deferred."""
    policy = make_policy(prune={"prefixes": ["old_"], "max_per_cycle": 2, "max_fraction": 1.0})
    plan = plan_for(
        policy,
        make_entry("old_a", age=1 * DAY),
        make_entry("old_b", age=4 * DAY),
        make_entry("old_c", age=2 * DAY),
        make_entry("old_d", age=3 * DAY),
    )
    assert pruned(plan) == ["old_b", "old_d"]
    assert reported(plan, ReportKind.DEFERRED) == ["old_a", "old_c"]
    assert "max_per_cycle=2" in report_reason(plan, ReportKind.DEFERRED, "old_a")


def test_max_per_cycle_breaks_mtime_ties_by_name() -> None:
    """Entries with the same mtime are pruned in name order."""
    policy = make_policy(prune={"prefixes": ["old_"], "max_per_cycle": 2, "max_fraction": 1.0})
    plan = plan_for(
        policy,
        make_entry("old_c"),
        make_entry("old_a"),
        make_entry("old_b"),
        make_entry("old_0", age=2 * DAY),
    )
    assert pruned(plan) == ["old_0", "old_a"]
    assert reported(plan, ReportKind.DEFERRED) == ["old_b", "old_c"]


# --- unmanaged ----------------------------------------------------------------------------------


def test_unmanaged_report_mode_only_reports() -> None:
    """With unmanaged: report, an old entry matching no rule is reported and never pruned."""
    policy = make_policy(prune={"max_fraction": 1.0})
    plan = plan_for(policy, make_entry("stray.bin", age=365 * DAY))
    assert plan.actions == ()
    assert reported(plan, ReportKind.UNMANAGED) == ["stray.bin"]
    assert reported(plan, ReportKind.WAITING) == []


def test_unmanaged_prune_mode_prunes_old_ones_and_waits_for_young_ones() -> None:
    """With unmanaged: prune, old unmanaged entries are pruned and young ones wait."""
    policy = make_policy(unmanaged="prune", prune={"min_age": "1h", "max_fraction": 1.0})
    plan = plan_for(policy, make_entry("stray.bin", age=2 * HOUR), make_entry("new.bin", age=60))
    [action] = plan.actions
    assert (action.name, action.rule) == ("stray.bin", "unmanaged: prune")
    assert action.reason.startswith("unmanaged: prune, ")
    assert reported(plan, ReportKind.UNMANAGED) == ["new.bin", "stray.bin"]
    assert reported(plan, ReportKind.WAITING) == ["new.bin"]


# --- Quarantine purge ---------------------------------------------------------------------------


def test_quarantine_items_are_purged_after_retention_only() -> None:
    """Trash items older than quarantine.retention are purged; younger ones are kept."""
    policy = make_policy(quarantine={"retention": "2d"})
    old = make_trash("old_a", age=2 * DAY + 1, size=123, id_="t-old")
    young = make_trash("old_b", age=2 * DAY - 1, id_="t-young")
    plan = plan_for(policy, trash=(young, old))
    [purge] = plan.actions
    assert purge.kind is ActionKind.PURGE
    assert (purge.name, purge.trash_id, purge.bytes) == ("old_a", "t-old", 123)
    assert purge.rule == "quarantine.retention"
    assert "2d" in purge.reason


def test_every_expired_item_is_purged_once_even_with_a_shared_name() -> None:
    """Each trash item past retention gets one purge action, even when names repeat."""
    policy = make_policy(quarantine={"retention": "1d"})
    trash = (
        make_trash("x", age=3 * DAY, id_="t1"),
        make_trash("x", age=9 * DAY, id_="t2"),
        make_trash("a", age=5 * DAY, id_="t3"),
        make_trash("a", age=1, id_="t4"),
    )
    plan = plan_for(policy, trash=trash)
    assert sorted((a.trash_id, a.name) for a in plan.actions) == [
        ("t1", "x"),
        ("t2", "x"),
        ("t3", "a"),
    ]


# --- suspend ------------------------------------------------------------------------------------


def test_suspend_turns_every_action_into_a_report() -> None:
    """suspend: true plans no action and reports what it would do."""
    policy = make_policy(
        suspend=True,
        required=[{"name": "en.bin", "source": "/srv/mirror/en.bin"}],
        prune={"prefixes": ["old_"], "max_fraction": 1.0},
    )
    plan = plan_for(policy, make_entry("old_a"), trash=(make_trash("old_z", age=30 * DAY),))
    assert plan.actions == ()
    assert plan.suspended is True
    assert not plan.changes_disk
    assert plan.bytes_freed == 0
    suspended = {r.name: r.reason for r in plan.reports if r.kind is ReportKind.SUSPENDED}
    assert suspended["old_a"].startswith("would prune")
    assert "prefix 'old_'" in suspended["old_a"]
    assert suspended["en.bin"].startswith("would restore")
    assert suspended["old_z"].startswith("would purge")


def test_suspend_with_nothing_to_do_reports_nothing_extra() -> None:
    """suspend: true with a converged dir gives an empty, suspended plan."""
    policy = make_policy(suspend=True, prune={"prefixes": ["old_"]})
    plan = plan_for(policy, make_entry("keep.bin", age=60), make_entry("old_a", age=60))
    assert plan.suspended is True
    assert reported(plan, ReportKind.SUSPENDED) == []
    assert reported(plan, ReportKind.WAITING) == ["old_a"]


# --- Modes, bytes, order ------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["quarantine", "delete"])
def test_prune_action_mode_follows_policy(mode: str) -> None:
    """Each prune action carries prune.action as its mode and the entry it was planned on."""
    policy = make_policy(prune={"prefixes": ["old_"], "action": mode, "max_fraction": 1.0})
    entry = make_entry("old_a")
    [action] = plan_for(policy, entry).actions
    assert action.mode == mode
    assert action.entry == entry


def test_default_prune_mode_is_quarantine() -> None:
    """Without prune.action, prunes quarantine."""
    policy = make_policy(prune={"prefixes": ["old_"], "max_fraction": 1.0})
    assert plan_for(policy, make_entry("old_a")).actions[0].mode == "quarantine"


def test_bytes_freed_counts_prunes_and_purges_but_not_restores() -> None:
    """bytes_freed is the size of pruned and purged models; restores free nothing."""
    policy = make_policy(
        required=[{"name": "en.bin", "sha256": SHA_A, "source": "/srv/mirror/en.bin"}],
        prune={"prefixes": ["old_"], "max_fraction": 1.0},
    )
    plan = plan_for(
        policy,
        make_entry("old_a", size=1000),
        make_entry("old_b", kind=Kind.DIR, size=20_000),
        make_entry("en.bin", size=999_999, sha256=SHA_B),
        trash=(make_trash("old_z", age=30 * DAY, size=300),),
    )
    assert [a.kind for a in plan.actions] == [
        ActionKind.RESTORE,
        ActionKind.PRUNE,
        ActionKind.PRUNE,
        ActionKind.PURGE,
    ]
    assert plan.bytes_freed == 21_300
    assert plan.changes_disk


def test_nothing_to_do_gives_an_empty_plan() -> None:
    """A converged model dir gives no actions and no errors."""
    policy = make_policy(
        required=[{"name": "en.bin", "sha256": SHA_A}],
        whitelist=["*.gguf"],
        prune={"prefixes": ["old_"]},
    )
    plan = plan_for(policy, make_entry("en.bin", sha256=SHA_A), make_entry("q.gguf"))
    assert plan.actions == ()
    assert plan.errors == ()
    assert plan.bytes_freed == 0
    assert not plan.changes_disk


def test_plan_does_not_depend_on_entry_or_trash_order() -> None:
    """The same entries and trash in any order give an equal plan."""
    policy = make_policy(
        required=[
            {"name": "en.bin", "sha256": SHA_A, "source": "/srv/mirror/en.bin"},
            {"name": "gone.bin", "source": "/srv/mirror/gone.bin"},
        ],
        prune={"prefixes": ["old_", "tmp_"], "max_per_cycle": 2, "max_fraction": 1.0},
        unmanaged="prune",
    )
    entries = [
        make_entry("old_a", age=2 * DAY),
        make_entry("old_b", age=2 * DAY),
        make_entry("tmp_c", age=3 * DAY),
        make_entry("stray", age=1 * DAY),
        make_entry("en.bin", sha256=SHA_B),
        make_entry("old_young", age=5),
        make_entry(".ocrd-trash", kind=Kind.DIR),
    ]
    trash = [make_trash("x", age=30 * DAY, id_="t1"), make_trash("x", age=20 * DAY, id_="t2")]
    forward = reconcile(policy, make_snapshot(*entries, trash=tuple(trash)), now=NOW)
    backward = reconcile(
        policy, make_snapshot(*reversed(entries), trash=tuple(reversed(trash))), now=NOW
    )
    assert forward == backward
    assert pruned(forward) == ["tmp_c", "old_a"]
    assert reported(forward, ReportKind.DEFERRED) == ["old_b", "stray"]


def test_reconcile_is_pure() -> None:
    """Reconciling the same input twice gives equal plans and leaves the snapshot as it was."""
    policy = make_policy(prune={"prefixes": ["old_"], "max_fraction": 1.0})
    snapshot = make_snapshot(make_entry("old_a"), make_entry("keep"))
    first = reconcile(policy, snapshot, now=NOW)
    assert first == reconcile(policy, snapshot, now=NOW)
    assert snapshot == make_snapshot(make_entry("old_a"), make_entry("keep"))
    assert pruned(first) == ["old_a"]


def test_purges_run_oldest_trashed_first() -> None:
    """Expired quarantine items are purged in the order they were trashed, not by name."""
    policy = make_policy(quarantine={"retention": "1d"})
    trash = (
        make_trash("a_model", age=2 * DAY, id_="x2"),
        make_trash("z_model", age=5 * DAY, id_="x1"),
        make_trash("m_model", age=3 * DAY, id_="x3"),
    )
    plan = plan_for(policy, trash=trash)
    assert [a.trash_id for a in plan.actions] == ["x1", "x3", "x2"]


def test_held_names_become_reports_not_actions() -> None:
    """A name the caller holds back (flapping, backoff) is reported `held`, not acted on."""
    policy = make_policy(
        prune={"prefixes": ["old_"], "min_age": 0, "max_fraction": 1},
        required=[{"name": "need.bin", "source": "/srv/mirror/need.bin"}],
    )
    hold = {"old_a": "flapping", "need.bin": "failed 2x"}
    plan = reconcile(
        policy, make_snapshot(make_entry("old_a"), make_entry("old_b")), now=NOW, hold=hold
    )
    assert [(a.kind, a.name) for a in plan.actions] == [(ActionKind.PRUNE, "old_b")]
    held = {(r.name, r.reason) for r in plan.reports if r.kind is ReportKind.HELD}
    assert held == {("old_a", "flapping"), ("need.bin", "failed 2x")}


def test_next_due_is_the_earliest_time_the_plan_changes_by_itself() -> None:
    """next_due() names when a waiting model reaches min_age or a quarantine item expires."""
    from ocrd.core.plan import next_due

    policy = make_policy(
        prune={"prefixes": ["old_"], "min_age": "1h"}, quarantine={"retention": "1d"}
    )
    snap = make_snapshot(
        make_entry("old_young", age=600),
        make_entry("keep.bin", age=10),
        trash=(make_trash("gone", age=DAY - 60),),
    )
    assert next_due(policy, snap, now=NOW) == pytest.approx(NOW + 60)
    assert next_due(policy, make_snapshot(make_entry("keep.bin")), now=NOW) is None


# --- Entries known from the directory listing alone ---------------------------------------------


def test_entries_no_rule_acts_on_are_planned_from_their_names() -> None:
    """Listed-only entries are classified, counted and reported like looked-at ones."""
    policy = make_policy(whitelist=["*.gguf"], prune={"prefixes": ["old_"], "min_age": 0})
    listed = [make_listed(".cache", kind=Kind.DIR), make_listed("llm.gguf"), make_listed("stray")]
    plan = plan_for(policy, *listed, make_entry("old_a"))
    looked_at = plan_for(
        policy, *(make_entry(e.name, kind=e.kind) for e in listed), make_entry("old_a")
    )
    assert (plan.actions, plan.reports, plan.models) == (
        looked_at.actions,
        looked_at.reports,
        looked_at.models,
    )
    assert pruned(plan) == ["old_a"]
    assert reported(plan, ReportKind.UNMANAGED) == ["stray"]
    assert [(c.name, c.cls, c.entry) for c in plan.classified[:3]] == [
        (".cache", Class.IGNORED, listed[0]),
        ("llm.gguf", Class.ALLOWED, listed[1]),
        ("old_a", Class.PRUNE, make_entry("old_a")),
    ]


@pytest.mark.parametrize(
    ("policy", "name"),
    [
        ({"prune": {"prefixes": ["old_"], "min_age": 0}}, "old_a"),
        ({"prune": {"prefixes": ["old_"], "min_age": "1h"}}, "old_a"),  # waiting needs the age too
        ({"unmanaged": "prune"}, "stray"),
        ({"required": [{"name": "en.bin", "sha256": SHA_A}]}, "en.bin"),  # its pin is unverified
    ],
)
def test_a_decision_on_an_entry_never_looked_at_is_a_loud_error(
    policy: dict[str, Any], name: str
) -> None:
    """A prune candidate or a pinned model scanned without its details stops the plan."""
    with pytest.raises(ValueError, match=rf"^{name}: planned without its details; scan it with"):
        plan_for(make_policy(**policy), make_listed(name), make_entry("other"))


def test_next_due_passes_over_entries_never_looked_at() -> None:
    """next_due() reads the mtime of looked-at entries only; listed ones have none."""
    from ocrd.core.plan import next_due

    policy = make_policy(prune={"prefixes": ["old_"], "min_age": "1h"}, unmanaged="prune")
    snap = make_snapshot(
        make_listed("old_listed"), make_listed("stray"), make_entry("old_b", age=0)
    )
    assert next_due(policy, snap, now=NOW) == pytest.approx(NOW + HOUR)
    assert next_due(policy, make_snapshot(make_listed("old_listed")), now=NOW) is None
