"""Property tests for reconcile(): safety, caps, determinism, convergence, age monotonicity."""

from __future__ import annotations

import fnmatch
import itertools
import math
import random
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from ocrd.core.model import (
    Action,
    ActionKind,
    Class,
    Entry,
    Kind,
    ListedEntry,
    Pin,
    Plan,
    ReportKind,
    Snapshot,
    TrashItem,
)
from ocrd.core.plan import may_act_on, next_due, reconcile
from ocrd.core.policy import Policy

ROOT = "/srv/models"
NOW = 1_700_000_000.0
SHAS = ("a" * 64, "b" * 64)
CHARS = "ab_"  # small on purpose: names, prefixes and globs collide often
WHITELIST = ("a*", "*b", "b?", "*.gguf", "_*", "ab*")
IGNORE = ("*.part", "*_", "ba*", "*.tmp")
FRACTIONS = (0.1, 0.25, 0.3, 1 / 3, 0.5, 2 / 3, 0.7, 0.75, 0.9, 1.0, 1.0, 1.0)

Scenario = tuple[Policy, Snapshot]

# Every name is drawn from fixed pools (one choice each keeps generation fast).
BASES = tuple("".join(chars) for n in (1, 2, 3) for chars in itertools.product(CHARS, repeat=n))
PLAIN = tuple(b + suffix for suffix in ("", ".gguf", ".part") for b in BASES) + BASES
DOTS = tuple("." + b for b in BASES[:20]) * 3  # about a quarter of the entries
PREFIXES = BASES[:12]  # one and two characters
KIND_SHA = tuple(itertools.product([Kind.FILE, Kind.FILE, Kind.DIR, Kind.SYMLINK], [None, *SHAS]))
names = st.sampled_from(PLAIN)


REQUIRED_ROWS = st.lists(
    st.tuples(names, st.sampled_from([None, *SHAS]), st.booleans()),
    max_size=3,
    unique_by=lambda r: r[0],
)
POLICY_ROW = st.tuples(
    REQUIRED_ROWS,
    st.lists(st.sampled_from(WHITELIST), max_size=2, unique=True),
    st.lists(st.sampled_from(IGNORE), max_size=1),
    st.lists(st.sampled_from(PREFIXES), min_size=1, max_size=3),
    st.sampled_from([0, 1, 60, 600, 3600]),
    st.sampled_from([1, 1, 2, 3]),
    st.sampled_from(FRACTIONS),
    st.sampled_from(["quarantine", "delete"]),
    st.sampled_from(["report", "prune"]),
    st.sampled_from([0, 60, 3600, 86400]),
)


@st.composite
def policies(draw: st.DrawFn, suspend: st.SearchStrategy[bool]) -> Policy:
    """A random valid policy whose names, prefixes and globs overlap."""
    (
        required,
        whitelist,
        ignore,
        prefixes,
        min_age,
        max_per_cycle,
        max_fraction,
        action,
        unmanaged,
        retention,
    ) = draw(POLICY_ROW)
    data: dict[str, Any] = {
        "model_dir": ROOT,
        "required": [
            {"name": name, "sha256": sha, "source": "/srv/mirror/model" if source else None}
            for name, sha, source in required
        ],
        "whitelist": whitelist,
        "ignore": ignore,
        "prune": {
            "prefixes": prefixes,
            "min_age": min_age,
            "max_per_cycle": max_per_cycle,
            "max_fraction": max_fraction,
            "action": action,
        },
        "unmanaged": unmanaged,
        "suspend": draw(suspend),
        "quarantine": {"retention": retention},
    }
    return Policy.model_validate(data)


SUSPEND = st.booleans()
# Ages often sit right at a limit (min_age, retention): None means "use the random age".
NEAR = st.sampled_from([None, None, None, -1, 0, 1])
REQUIRED_SLOTS = 60  # name indices past the pools pick a required name
ENTRY_ROW = st.tuples(
    st.integers(0, len(PLAIN) + len(DOTS) + REQUIRED_SLOTS - 1),
    st.sampled_from(KIND_SHA),
    st.integers(0, 10**9),
    st.integers(-20_000, 600),
    NEAR,
)
# st.lists alone favours very few entries: pick the length first.
ENTRY_ROWS = st.sampled_from(range(13)).flatmap(
    lambda n: st.lists(ENTRY_ROW, min_size=n, max_size=n)
)
TRASH_ROWS = st.lists(
    st.tuples(names, st.integers(0, 200_000), st.integers(0, 10**6), NEAR), max_size=4
)


def _entry_name(index: int, required: list[str]) -> str:
    """Map a drawn index to a plain name, a dot-entry, or (mostly) a required name."""
    pool = PLAIN + DOTS
    if index < len(pool):
        return pool[index]
    if required:
        return required[index % len(required)]
    return PLAIN[index % len(PLAIN)]


@st.composite
def scenarios(draw: st.DrawFn, suspend: st.SearchStrategy[bool] | None = None) -> Scenario:
    """A random policy and a random snapshot whose names collide with its rules."""
    policy = draw(policies(SUSPEND if suspend is None else suspend))
    required = [r.name for r in policy.required]
    entries: dict[str, Entry] = {}
    min_age = int(policy.prune.min_age)
    retention = int(policy.quarantine.retention)
    for i, (index, (kind, sha), size, offset, near) in enumerate(draw(ENTRY_ROWS)):
        name = _entry_name(index, required)
        if near is not None:
            offset = -(min_age + near)  # age min_age-1, min_age or min_age+1
        entries.setdefault(
            name,
            Entry(
                name=name,
                kind=kind,
                size=size,
                mtime=NOW + offset,
                inode=i + 1,
                device=1,
                mtime_ns=(int(NOW) + offset) * 10**9,
                sha256=sha,
            ),
        )
    trash = tuple(
        TrashItem(
            id=f"t{i}",
            name=name,
            trashed_at=NOW - (age if near is None else retention + near),
            reason="prefix 'a'",
            size=size,
        )
        for i, (name, age, size, near) in enumerate(draw(TRASH_ROWS))
    )
    return policy, Snapshot(root=ROOT, device=1, entries=tuple(entries.values()), trash=trash)


def expected_class(policy: Policy, name: str) -> Class:
    """DESIGN §3 written out independently of plan.classify()."""
    if name.startswith(".") or any(fnmatch.fnmatchcase(name, g) for g in policy.ignore):
        return Class.IGNORED
    if name in {r.name for r in policy.required}:
        return Class.REQUIRED
    if any(fnmatch.fnmatchcase(name, g) for g in policy.whitelist):
        return Class.ALLOWED
    if any(name.startswith(p) for p in policy.prune.prefixes):
        return Class.PRUNE
    return Class.UNMANAGED


def prunable(policy: Policy, name: str) -> bool:
    """Whether DESIGN allows *name* to be pruned at all under *policy*."""
    cls = expected_class(policy, name)
    return cls is Class.PRUNE or (cls is Class.UNMANAGED and policy.unmanaged == "prune")


def would_prune(plan: Plan) -> set[str]:
    """Names the plan prunes, or would prune were it not suspended."""
    acted = {a.name for a in plan.actions if a.kind is ActionKind.PRUNE}
    held = {
        r.name
        for r in plan.reports
        if r.kind is ReportKind.SUSPENDED and r.reason.startswith("would prune")
    }
    return acted | held


def due(plan: Plan) -> set[str]:
    """Names old enough to prune: pruned, or held back by suspend, max_per_cycle or max_fraction."""
    held = {r.name for r in plan.reports if r.kind in (ReportKind.DEFERRED, ReportKind.REFUSED)}
    return would_prune(plan) | held


def models(policy: Policy, snapshot: Snapshot) -> int:
    """How many entries count as models (every entry that is not ignored)."""
    return sum(1 for e in snapshot.entries if expected_class(policy, e.name) is not Class.IGNORED)


def _free_id(ids: set[str]) -> str:
    """The first `simN` trash id not in *ids*."""
    n = 0
    while f"sim{n}" in ids:
        n += 1
    return f"sim{n}"


def simulate(snapshot: Snapshot, plan: Plan, now: float) -> Snapshot:
    """Apply *plan* to *snapshot* as executor.apply() would, without a disk."""
    entries = {e.name: e for e in snapshot.entries}
    trash = {t.id: t for t in snapshot.trash}

    def quarantine(entry: Entry, reason: str) -> None:
        item_id = _free_id(set(trash))
        trash[item_id] = TrashItem(item_id, entry.name, now, reason, entry.size, entry.sha256)

    for action in plan.actions:
        if action.kind is ActionKind.PRUNE:
            gone = entries.pop(action.name)
            if action.mode == "quarantine":
                quarantine(gone, action.reason)
        elif action.kind is ActionKind.PURGE:
            assert action.trash_id is not None
            del trash[action.trash_id]
        else:
            old = entries.get(action.name)
            if old is not None:
                quarantine(old, action.reason)
            entries[action.name] = Entry(
                name=action.name,
                kind=Kind.FILE,
                size=old.size if old else 1,
                mtime=now,
                inode=10_000 + len(entries) + len(trash),
                device=snapshot.device,
                mtime_ns=int(now * 1e9),
                sha256=action.sha256,
            )
    return Snapshot(
        root=snapshot.root,
        device=snapshot.device,
        entries=tuple(entries.values()),
        trash=tuple(trash.values()),
    )


@settings(max_examples=100, deadline=None)
@given(scenarios())
def test_classification_follows_design_order(scenario: Scenario) -> None:
    """Each entry gets the first DESIGN §3 rule's class; absent required names are missing."""
    policy, snapshot = scenario
    plan = reconcile(policy, snapshot, now=NOW)
    got = {c.name: c.cls for c in plan.classified}
    expected = {e.name: expected_class(policy, e.name) for e in snapshot.entries}
    present = {e.name for e in snapshot.entries}
    expected |= {r.name: Class.MISSING for r in policy.required if r.name not in present}
    assert got == expected
    assert len(plan.classified) == len(expected)


@settings(max_examples=200, deadline=None)
@given(scenarios())
def test_protected_entries_are_never_targets(scenario: Scenario) -> None:
    """No required, allowed or ignored entry is ever due to prune, and no dot-entry is a target."""
    policy, snapshot = scenario
    plan = reconcile(policy, snapshot, now=NOW)
    by_name = snapshot.by_name()
    for name in due(plan):
        assert prunable(policy, name), (name, expected_class(policy, name))
        assert max(0.0, NOW - by_name[name].mtime) >= policy.prune.min_age
    for action in plan.actions:
        assert not action.name.startswith(".")
        assert action.entry is None or not action.entry.name.startswith(".")
        if action.kind is ActionKind.PRUNE:
            assert action.entry == by_name[action.name]
    required = {r.name: r for r in policy.required}
    for action in plan.actions:
        if action.kind is ActionKind.RESTORE:
            item = required[action.name]
            assert item.source is not None
            entry = by_name.get(action.name)
            assert entry is None or (
                item.sha256 is not None
                and (entry.kind is not Kind.FILE or entry.sha256 != item.sha256)
            )
    trash = {t.id: t for t in snapshot.trash}
    for action in plan.actions:
        if action.kind is ActionKind.PURGE:
            assert action.trash_id is not None
            assert NOW - trash[action.trash_id].trashed_at >= policy.quarantine.retention


@settings(max_examples=100, deadline=None)
@given(scenarios())
def test_prunes_respect_max_per_cycle_and_max_fraction(scenario: Scenario) -> None:
    """At most max_per_cycle prunes, and never more than max_fraction of the models."""
    policy, snapshot = scenario
    plan = reconcile(policy, snapshot, now=NOW)
    pruning = would_prune(plan)
    assert len(pruning) <= policy.prune.max_per_cycle
    if pruning:
        assert len(pruning) / models(policy, snapshot) <= policy.prune.max_fraction
    refused = [r for r in plan.reports if r.kind is ReportKind.REFUSED]
    if refused:
        assert not pruning
        assert any("max_fraction" in e for e in plan.errors)
    if policy.suspend:
        assert plan.actions == ()


def age(entry: Entry, now: float) -> float:
    """Seconds since *entry* changed; an mtime in the future counts as 0."""
    return max(0.0, now - entry.mtime)


def reported(plan: Plan, kind: ReportKind) -> set[str]:
    """Names the plan reports with *kind*."""
    return {r.name for r in plan.reports if r.kind is kind}


def mismatched(policy: Policy, entry: Entry) -> bool:
    """Whether *entry* is a required model whose pin it does not satisfy."""
    pins = policy.pins()
    return (
        expected_class(policy, entry.name) is Class.REQUIRED
        and entry.name in pins
        and (entry.kind is not Kind.FILE or entry.sha256 != pins[entry.name])
    )


@settings(max_examples=200, deadline=None)
@given(scenarios(suspend=st.just(False)))
def test_plan_is_exactly_what_design_calls_for(scenario: Scenario) -> None:
    """Reports and actions match DESIGN §3/§4 written out independently of plan.py."""
    policy, snapshot = scenario
    plan = reconcile(policy, snapshot, now=NOW)
    prune = policy.prune
    by_name = snapshot.by_name()
    candidates = [e for e in snapshot.entries if prunable(policy, e.name)]
    old = sorted(
        (e for e in candidates if age(e, NOW) >= prune.min_age), key=lambda e: (e.mtime, e.name)
    )
    young = {e.name for e in candidates if age(e, NOW) < prune.min_age}
    assert reported(plan, ReportKind.WAITING) == young
    assert reported(plan, ReportKind.UNMANAGED) == {
        e.name for e in snapshot.entries if expected_class(policy, e.name) is Class.UNMANAGED
    }

    pruned = [a.name for a in plan.actions if a.kind is ActionKind.PRUNE]
    if old and len(old) / models(policy, snapshot) > prune.max_fraction:
        assert pruned == []
        assert reported(plan, ReportKind.REFUSED) == {e.name for e in old}
        assert reported(plan, ReportKind.DEFERRED) == set()
        assert len(plan.errors) == 1
        assert "max_fraction" in plan.errors[0]
    else:
        assert pruned == [e.name for e in old[: prune.max_per_cycle]]
        assert reported(plan, ReportKind.DEFERRED) == {e.name for e in old[prune.max_per_cycle :]}
        assert reported(plan, ReportKind.REFUSED) == set()
        assert plan.errors == ()
    assert all(a.mode == prune.action for a in plan.actions if a.kind is ActionKind.PRUNE)

    absent = {r.name for r in policy.required if r.name not in by_name}
    corrupt = {e.name for e in snapshot.entries if mismatched(policy, e)}
    with_source = {r.name for r in policy.required if r.source is not None}
    assert reported(plan, ReportKind.MISSING) == absent
    assert reported(plan, ReportKind.CORRUPT) == corrupt
    restores = [a for a in plan.actions if a.kind is ActionKind.RESTORE]
    assert {a.name for a in restores} == (absent | corrupt) & with_source
    required = {r.name: r for r in policy.required}
    for action in restores:
        assert action.entry == by_name.get(action.name)
        assert action.sha256 == required[action.name].sha256
        assert action.source == str(required[action.name].source)

    retention = policy.quarantine.retention
    purged = {a.trash_id for a in plan.actions if a.kind is ActionKind.PURGE}
    assert purged == {t.id for t in snapshot.trash if NOW - t.trashed_at >= retention}
    assert plan.bytes_freed == sum(by_name[n].size for n in pruned) + sum(
        t.size for t in snapshot.trash if t.id in purged
    )


@settings(max_examples=100, deadline=None)
@given(scenarios(), st.randoms(use_true_random=False))
def test_entry_and_trash_order_do_not_change_the_plan(
    scenario: Scenario, rnd: random.Random
) -> None:
    """Shuffling the snapshot's entries and trash gives an equal plan."""
    policy, snapshot = scenario
    entries = list(snapshot.entries)
    trash = list(snapshot.trash)
    rnd.shuffle(entries)
    rnd.shuffle(trash)
    shuffled = Snapshot(snapshot.root, snapshot.device, tuple(entries), tuple(trash))
    assert reconcile(policy, shuffled, now=NOW) == reconcile(policy, snapshot, now=NOW)


@settings(max_examples=200, deadline=None)
@given(scenarios())
def test_listing_what_no_rule_acts_on_changes_nothing(scenario: Scenario) -> None:
    """Entries may_act_on passes over, given as the listing alone, plan as when looked at."""
    policy, snapshot = scenario
    examine = may_act_on(policy)
    listed = tuple(
        e
        if examine is None or examine(e.name)
        else ListedEntry(name=e.name, kind=e.kind, inode=e.inode, device=e.device)
        for e in snapshot.entries
    )
    lazy = Snapshot(snapshot.root, snapshot.device, listed, snapshot.trash)
    lazy_plan, full_plan = reconcile(policy, lazy, now=NOW), reconcile(policy, snapshot, now=NOW)
    assert lazy_plan.actions == full_plan.actions
    assert lazy_plan.reports == full_plan.reports
    assert (lazy_plan.errors, lazy_plan.models) == (full_plan.errors, full_plan.models)
    verdicts = [(c.name, c.cls, c.rule, c.pin) for c in lazy_plan.classified]
    assert verdicts == [(c.name, c.cls, c.rule, c.pin) for c in full_plan.classified]
    assert next_due(policy, lazy, now=NOW) == next_due(policy, snapshot, now=NOW)


@settings(max_examples=200, deadline=None)
@given(scenarios(suspend=st.just(False)))
def test_applying_plans_converges_and_then_stays_put(scenario: Scenario) -> None:
    """Applying plans at a fixed time empties the plan within ceil(N/max_per_cycle)+2 rounds."""
    policy, snapshot = scenario
    rounds = math.ceil(len(snapshot.entries) / policy.prune.max_per_cycle) + 2
    state = snapshot
    plan = reconcile(policy, state, now=NOW)
    applied = 0
    while plan.actions:
        assert applied < rounds, f"still acting after {applied} rounds: {plan.actions}"
        state = simulate(state, plan, NOW)
        applied += 1
        plan = reconcile(policy, state, now=NOW)
    for _ in range(2):
        again = reconcile(policy, simulate(state, plan, NOW), now=NOW)
        assert again.actions == ()
        assert again == plan
    required = {r.name: r for r in policy.required}
    final = state.by_name()
    assert all(name in final for name, r in required.items() if r.source is not None)
    for c in plan.classified:
        if c.cls is Class.REQUIRED and c.pin is Pin.CORRUPT:
            assert required[c.name].source is None


@settings(max_examples=100, deadline=None)
@given(scenarios(), st.integers(0, 30_000))
def test_what_is_due_stays_due_as_time_passes(scenario: Scenario, later: int) -> None:
    """An entry due to prune at t is still due (pruned, deferred or refused) at any later t."""
    policy, snapshot = scenario
    before = due(reconcile(policy, snapshot, now=NOW))
    after = due(reconcile(policy, snapshot, now=NOW + later))
    assert before <= after


def _action_names(actions: tuple[Action, ...]) -> list[str]:
    """The names of *actions*, in order."""
    return [a.name for a in actions]


@settings(max_examples=100, deadline=None)
@given(scenarios(suspend=st.just(True)))
def test_suspend_reports_exactly_what_would_be_done(scenario: Scenario) -> None:
    """A suspended plan has no actions and one SUSPENDED report per action the live plan has."""
    policy, snapshot = scenario
    plan = reconcile(policy, snapshot, now=NOW)
    live = reconcile(policy.model_copy(update={"suspend": False}), snapshot, now=NOW)
    assert plan.actions == ()
    assert plan.suspended
    suspended = [r.name for r in plan.reports if r.kind is ReportKind.SUSPENDED]
    assert sorted(suspended) == sorted(_action_names(live.actions))
