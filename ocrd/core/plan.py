"""Classification and reconciliation: the pure heart of ocrd.

`reconcile(policy, snapshot, now=...)` decides; executor.apply() acts.
No I/O and no clock here: the caller passes *now*, and the same input gives
the same plan whatever the order of the snapshot's entries.
"""

from __future__ import annotations

import fnmatch
import operator
import re
from collections.abc import Callable, Mapping, Sequence

from ocrd.core.model import (
    Action,
    ActionKind,
    Class,
    Classified,
    Entry,
    Kind,
    Pin,
    Plan,
    Report,
    ReportKind,
    Snapshot,
)
from ocrd.core.policy import Policy, Required, format_duration, human_age


def _glob_regex(globs: Sequence[str]) -> Callable[[str], re.Match[str] | None] | None:
    """One compiled regex for a list of globs (its match method; None for no globs).

    A match's `lastgroup` names the first glob that matched: see _which.
    """
    if not globs:
        return None
    parts = [f"(?P<g{i}>{fnmatch.translate(glob)})" for i, glob in enumerate(globs)]
    return re.compile("|".join(parts)).match


def _which(globs: Sequence[str], found: re.Match[str]) -> str:
    assert found.lastgroup is not None
    return globs[int(found.lastgroup[1:])]


class Classifier:
    """DESIGN §3 for one policy, with its globs compiled once (100,000 entries
    are classified in a fraction of a second)."""

    def __init__(self, policy: Policy) -> None:
        self.ignore = tuple(policy.ignore)
        self.whitelist = tuple(policy.whitelist)
        self.required = {item.name: item.sha256 for item in policy.required}
        self.prefixes = tuple(policy.prune.prefixes)
        self.classify = self._compile()  # the rule as a plain function

    def __call__(self, entry: Entry) -> Classified:
        """The first rule of DESIGN §3 that applies to *entry*."""
        return self.classify(entry)

    def _compile(self) -> Callable[[Entry], Classified]:
        # This runs once per entry, 100,000 times for a big model dir: everything
        # it needs is a local of the closure, the common path makes no Python
        # call but this one (the globs are one C regex match each), and the
        # result is built with tuple.__new__ (a NamedTuple's own __new__ is
        # Python code).
        ignore_globs, whitelist_globs, required, prefixes = (
            self.ignore,
            self.whitelist,
            self.required,
            self.prefixes,
        )
        ignore, whitelist = _glob_regex(ignore_globs), _glob_regex(whitelist_globs)
        rules = {p: f"prefix {p!r}" for p in prefixes}
        only_rule = rules[prefixes[0]] if len(prefixes) == 1 else None
        required_cls, allowed_cls, file_kind = Class.REQUIRED, Class.ALLOWED, Kind.FILE
        no_pin, new = Pin.NONE, tuple.__new__

        def classify(entry: Entry) -> Classified:
            name = entry.name
            if name[:1] == ".":
                return new(Classified, (name, IGNORED, "dot-entry", entry, no_pin))
            if ignore is not None and (found := ignore(name)) is not None:
                rule = f"ignore {_which(ignore_globs, found)!r}"
                return new(Classified, (name, IGNORED, rule, entry, no_pin))
            if name in required:
                pinned = required[name]
                if pinned is None:
                    pin = Pin.NONE
                elif entry.kind is file_kind and entry.sha256 == pinned:
                    pin = Pin.OK
                else:
                    pin = Pin.CORRUPT
                return new(Classified, (name, required_cls, "required", entry, pin))
            if whitelist is not None and (found := whitelist(name)) is not None:
                rule = f"whitelist {_which(whitelist_globs, found)!r}"
                return new(Classified, (name, allowed_cls, rule, entry, no_pin))
            if prefixes and name.startswith(prefixes):
                rule = only_rule or rules[next(p for p in prefixes if name.startswith(p))]
                return new(Classified, (name, PRUNE, rule, entry, no_pin))
            return new(Classified, (name, UNMANAGED, "no rule", entry, no_pin))

        return classify


IGNORED, PRUNE, UNMANAGED = Class.IGNORED, Class.PRUNE, Class.UNMANAGED
_by_name = operator.attrgetter("name")
_by_kind_name = operator.attrgetter("kind", "name")


def classify(policy: Policy, entry: Entry) -> Classified:
    """The first rule of DESIGN §3 that applies to *entry* (see Classifier for many)."""
    return Classifier(policy)(entry)


def count_models(policy: Policy, snapshot: Snapshot) -> int:
    """Entries that are models: everything not ignored (Plan.models, without planning)."""
    classify_one = Classifier(policy)
    return sum(1 for e in snapshot.entries if classify_one(e).cls is not IGNORED)


def may_act_on(policy: Policy) -> Callable[[str], bool] | None:
    """Which names reconcile may need the size and times of (None: every name).

    A superset of the entries it can act on: a required name or a name with a
    prune prefix. Any other entry can only be ignored, allowed or reported as
    unmanaged, for which its name is enough, unless `unmanaged: prune`.
    """
    if policy.unmanaged == "prune":
        return None
    required = frozenset(item.name for item in policy.required)
    prefixes = tuple(policy.prune.prefixes)
    return lambda name: name.startswith(prefixes) or name in required


def _corrupt_reason(entry: Entry, pin: str) -> str:
    if entry.kind is not Kind.FILE:
        return f"pinned model is a {entry.kind.value}, not a file"
    if entry.sha256 is None:
        return "sha256 could not be computed"
    return f"sha256 {entry.sha256[:12]}… differs from pin {pin[:12]}…"


def _restore(
    item: Required,
    state: str,
    entry: Entry | None,
    hold: Mapping[str, str],
    reports: list[Report],
    actions: list[Action],
) -> None:
    """A restore of a missing or corrupt required model, if it has a source and is not held."""
    if item.source is None:
        return
    if item.name in hold:
        reports.append(Report(ReportKind.HELD, item.name, hold[item.name]))
        return
    actions.append(
        Action(
            ActionKind.RESTORE,
            item.name,
            reason=f"{state}; restore from {item.source}",
            rule="required",
            entry=entry,
            source=str(item.source),
            sha256=item.sha256,
        )
    )


def reconcile(
    policy: Policy,
    snapshot: Snapshot,
    *,
    now: float,
    hold: Mapping[str, str] | None = None,
) -> Plan:
    """Actions that bring *snapshot* in line with *policy*, plus reports.

    Pure: no I/O, no clock (the caller passes *now*); entries are sorted so
    the result does not depend on their order. executor.apply() carries it out.
    *hold* maps model names the caller wants left alone this time (flapping,
    retry backoff) to the reason; they become `held` reports instead of actions.
    """
    hold = hold or {}
    entries = sorted(snapshot.entries, key=_by_name)
    classified = list(map(Classifier(policy).classify, entries))
    reports: list[Report] = []
    add_report = reports.append
    actions: list[Action] = []
    errors: list[str] = []
    sources = {r.name: r for r in policy.required}

    # One pass over what is there (100,000 entries: every lookup here counts):
    # count the models, note corrupt pins, and find the prune candidates that are due.
    min_age = policy.prune.min_age
    prune_unmanaged = policy.unmanaged == "prune"
    waiting = f"pruned once older than {format_duration(min_age)}"
    due: list[tuple[float, str, Classified]] = []  # (mtime, name, c): sorts oldest first
    new, unmanaged_report = tuple.__new__, ReportKind.UNMANAGED
    corrupt: list[Classified] = []
    models = 0
    for c in classified:
        cls = c.cls
        if cls is IGNORED:
            continue
        models += 1
        if cls is UNMANAGED:
            add_report(new(Report, (unmanaged_report, c.name, "matches no rule")))
            if not prune_unmanaged:
                continue
        elif cls is not PRUNE:
            if c.pin is Pin.CORRUPT:
                corrupt.append(c)
            continue
        mtime = c.entry.mtime  # type: ignore[union-attr]  # every classified entry has one here
        if mtime is None:  # scanned without may_act_on's names: a bug, never a prune
            raise ValueError(f"{c.name}: planned without its details; scan it with may_act_on")
        age = now - mtime
        if age < min_age:
            age = max(age, 0.0)  # modified "in the future" (clock skew): as new as can be
            if age < min_age:
                add_report(
                    Report(ReportKind.WAITING, c.name, f"{c.rule}, {human_age(age)} old, {waiting}")
                )
                continue
        if hold and c.name in hold:
            add_report(Report(ReportKind.HELD, c.name, hold[c.name]))
            continue
        due.append((mtime, c.name, c))

    # Required models: missing or corrupt ones are restored when a source is known.
    present = {c.name for c in classified if c.name in sources}
    for item in sorted(policy.required, key=lambda r: r.name):
        if item.name in present:
            continue
        classified.append(Classified(item.name, Class.MISSING, "required"))
        reports.append(Report(ReportKind.MISSING, item.name, "required model is absent"))
        _restore(item, "missing", None, hold, reports, actions)
    for c in corrupt:
        assert c.entry is not None
        item = sources[c.name]
        why = _corrupt_reason(c.entry, item.sha256 or "")
        reports.append(Report(ReportKind.CORRUPT, c.name, why))
        _restore(item, f"corrupt ({why})", c.entry, hold, reports, actions)

    # Prune candidates: prefix matches, and unmanaged entries when asked to.
    if due and len(due) > policy.prune.max_fraction * models:
        errors.append(
            f"refusing to prune {len(due)} of {models} models: more than "
            f"prune.max_fraction={policy.prune.max_fraction:g}; nothing is pruned this cycle. "
            "Check the policy (a typo in prune.prefixes?), or raise max_fraction."
        )
        for _, name, _c in due:
            reports.append(Report(ReportKind.REFUSED, name, "over prune.max_fraction"))
        due = []
    due.sort()
    cap = policy.prune.max_per_cycle
    for _, name, _c in due[cap:]:
        reports.append(
            Report(ReportKind.DEFERRED, name, f"over prune.max_per_cycle={cap}; next cycle")
        )
    mode, prune_kind = policy.prune.action, ActionKind.PRUNE
    reasons: dict[tuple[str, int], str] = {}  # 50,000 prunes share a few reason texts
    prunes: list[Action] = []
    for mtime, name, c in due[:cap]:
        rule = "unmanaged: prune" if c.cls is UNMANAGED else c.rule
        key = (rule, int(now - mtime))  # all human_age looks at
        reason = reasons.get(key)
        if reason is None:
            reason = reasons[key] = f"{rule}, {human_age(now - mtime)} old"
        entry = c.entry
        assert entry is not None
        size = entry.size or 0
        prunes.append(
            new(Action, (prune_kind, name, reason, rule, size, entry, mode, None, None, None))
        )

    # Quarantine retention.
    retention = policy.quarantine.retention
    purges: list[Action] = []
    for trashed in sorted(snapshot.trash, key=lambda t: (t.trashed_at, t.id)):
        if now - trashed.trashed_at >= retention:
            purges.append(
                Action(
                    ActionKind.PURGE,
                    trashed.name,
                    reason=f"in quarantine longer than {format_duration(retention)}",
                    rule="quarantine.retention",
                    bytes=trashed.size,
                    trash_id=trashed.id,
                )
            )

    # Restores first (by name), then prunes oldest first, then purges oldest-trashed first.
    actions.sort(key=lambda a: a.name)
    actions += prunes + purges
    reports.sort(key=_by_kind_name)
    if len(classified) != len(entries):
        classified.sort(key=_by_name)  # missing names were appended
    if policy.suspend and actions:
        reports.extend(
            Report(ReportKind.SUSPENDED, a.name, f"would {a.kind.value}: {a.reason}")
            for a in actions
        )
        actions = []
    return Plan(
        actions=tuple(actions),
        reports=tuple(reports),
        classified=tuple(classified),
        errors=tuple(errors),
        suspended=policy.suspend,
        models=models,
    )


def next_due(policy: Policy, snapshot: Snapshot, *, now: float) -> float | None:
    """The earliest future time at which the plan changes by time alone, if any.

    A waiting entry reaches min_age, or a quarantine item reaches its retention.
    The daemon sleeps until then instead of polling.
    """
    times: list[float] = []
    classify_one = Classifier(policy)
    for entry in snapshot.entries:
        c = classify_one(entry)
        if entry.mtime is None:
            continue  # not looked at: no rule acts on it
        if c.cls is Class.PRUNE or (c.cls is Class.UNMANAGED and policy.unmanaged == "prune"):
            due = entry.mtime + policy.prune.min_age
            if due > now:
                times.append(due)
    for item in snapshot.trash:
        due = item.trashed_at + policy.quarantine.retention
        if due > now:
            times.append(due)
    return min(times) if times else None
