"""Classification and reconciliation: the pure heart of ocrd.

`reconcile(policy, snapshot, now=...)` decides; ocrd.act.apply.apply() acts.
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
    ListedEntry,
    Pin,
    Plan,
    Report,
    ReportKind,
    Snapshot,
)
from ocrd.core.policy import Policy, Required, format_duration, human_age
from ocrd.core.sources import Source, shown
from ocrd.core.versions import Families


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
    """DESIGN §3 for one policy, with each glob list compiled once into one regex
    (100,000 entries are classified in a fraction of a second)."""

    def __init__(self, policy: Policy) -> None:
        self.ignore = tuple(policy.ignore)
        self.whitelist = tuple(policy.whitelist)
        self.required = {item.name: item.sha256 for item in policy.required}
        self.prefixes = tuple(policy.prune.prefixes)
        self.ignore_match = _glob_regex(self.ignore)
        self.whitelist_match = _glob_regex(self.whitelist)
        # One rule text per prefix, shared by the (maybe 50,000) entries it matches.
        self.prefix_rules = {prefix: f"prefix {prefix!r}" for prefix in self.prefixes}

    def __call__(self, entry: Entry | ListedEntry) -> Classified:
        """The first rule of DESIGN §3 that applies to *entry*."""
        name = entry.name
        if name.startswith("."):
            return Classified(name=name, cls=Class.IGNORED, rule="dot-entry", entry=entry)
        if self.ignore_match is not None and (found := self.ignore_match(name)) is not None:
            rule = f"ignore {_which(self.ignore, found)!r}"
            return Classified(name=name, cls=Class.IGNORED, rule=rule, entry=entry)
        if name in self.required:
            pin = _pin(entry, self.required[name])
            return Classified(name=name, cls=Class.REQUIRED, rule="required", entry=entry, pin=pin)
        if self.whitelist_match is not None and (found := self.whitelist_match(name)) is not None:
            rule = f"whitelist {_which(self.whitelist, found)!r}"
            return Classified(name=name, cls=Class.ALLOWED, rule=rule, entry=entry)
        for prefix in self.prefixes:
            if name.startswith(prefix):
                rule = self.prefix_rules[prefix]
                return Classified(name=name, cls=Class.PRUNE, rule=rule, entry=entry)
        return Classified(name=name, cls=Class.UNMANAGED, rule="no rule", entry=entry)


def _pin(entry: Entry | ListedEntry, pinned: str | None) -> Pin:
    """What *pinned* says of a required *entry*; one never looked at is not verified."""
    if pinned is None:
        return Pin.NONE
    if isinstance(entry, Entry) and entry.kind is Kind.FILE and entry.sha256 == pinned:
        return Pin.OK
    return Pin.CORRUPT


_by_name = operator.attrgetter("name")
_by_kind_name = operator.attrgetter("kind", "name")


def classify(policy: Policy, entry: Entry | ListedEntry) -> Classified:
    """The first rule of DESIGN §3 that applies to *entry* (see Classifier for many)."""
    return Classifier(policy)(entry)


def families(policy: Policy) -> Families:
    return Families([(v.match, v.keep) for v in policy.versions])


def classify_all(policy: Policy, entries: Sequence[Entry | ListedEntry]) -> list[Classified]:
    """Every entry classified (DESIGN §3), then the version families ranked: an entry's
    class may depend on the others of its family."""
    return families(policy).rank(list(map(Classifier(policy), entries)))


def count_models(policy: Policy, snapshot: Snapshot) -> int:
    """Entries that are models: everything not ignored (Plan.models, without planning)."""
    classify_one = Classifier(policy)
    return sum(1 for e in snapshot.entries if classify_one(e).cls is not Class.IGNORED)


def may_act_on(policy: Policy) -> Callable[[str], bool] | None:
    """Which names reconcile may need the size and times of (None: every name).

    A superset of the entries it can act on: a required name, a name with a
    prune prefix, or one of a version family. Any other entry can only be
    ignored, allowed or reported as unmanaged, for which its name is enough,
    unless `unmanaged: prune`.
    """
    if policy.unmanaged == "prune":
        return None
    required = frozenset(item.name for item in policy.required)
    prefixes = tuple(policy.prune.prefixes)
    family = families(policy)
    if family:
        return lambda name: (
            name.startswith(prefixes) or name in required or family.member(name) is not None
        )
    return lambda name: name.startswith(prefixes) or name in required


def _examined(c: Classified) -> Entry:
    """The entry of *c* as lstat saw it, for a decision that needs its details.

    One known from the directory listing alone means the snapshot was scanned
    without may_act_on's names: a bug upstream, never a prune or a restore.
    """
    if not isinstance(c.entry, Entry):
        raise ValueError(f"{c.name}: planned without its details; scan it with may_act_on")
    return c.entry


def _corrupt_reason(entry: Entry, pin: str) -> str:
    if entry.kind is not Kind.FILE:
        return f"pinned model is a {entry.kind.value}, not a file"
    if entry.sha256 is None:
        return "sha256 could not be computed"
    return f"sha256 {entry.sha256[:12]}… differs from pin {pin[:12]}…"


def _where(sources: Sequence[Source]) -> str:
    first = shown(sources[0].text)
    more = len(sources) - 1
    return first if not more else f"{first} (or {more} more mirror{'s' if more > 1 else ''})"


def _restore(
    item: Required,
    state: str,
    entry: Entry | None,
    hold: Mapping[str, str],
    reports: list[Report],
    actions: list[Action],
) -> None:
    """A restore of a missing or corrupt required model, if it has a source and is not held."""
    sources = item.fetch_from()
    if not sources:
        return
    if item.name in hold:
        reports.append(Report(kind=ReportKind.HELD, name=item.name, reason=hold[item.name]))
        return
    actions.append(
        Action(
            kind=ActionKind.RESTORE,
            name=item.name,
            reason=f"{state}; restore from {_where(sources)}",
            rule="required",
            entry=entry,
            source=sources[0].text,
            sources=tuple(s.text for s in sources),
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
    the result does not depend on their order. ocrd.act.apply.apply() carries it out.
    *hold* maps model names the caller wants left alone this time (flapping,
    retry backoff) to the reason; they become `held` reports instead of actions.
    A prune candidate or a corrupt pinned model known from the directory
    listing alone (scan() without may_act_on's names) is a ValueError.
    """
    hold = hold or {}
    entries = sorted(snapshot.entries, key=_by_name)
    classified = classify_all(policy, entries)
    reports: list[Report] = []
    actions: list[Action] = []
    errors: list[str] = []
    sources = {r.name: r for r in policy.required}

    # One pass over what is there: count the models, note corrupt pins, and
    # find the prune candidates that are due.
    min_age = policy.prune.min_age
    prune_unmanaged = policy.unmanaged == "prune"
    waiting = f"pruned once older than {format_duration(min_age)}"
    due: list[tuple[float, str, str, Entry]] = []  # (mtime, name, rule, entry): oldest first
    corrupt: list[Entry] = []
    models = 0
    for c in classified:
        if c.cls is Class.IGNORED:
            continue
        models += 1
        if c.cls is Class.UNMANAGED:
            reports.append(Report(kind=ReportKind.UNMANAGED, name=c.name, reason="matches no rule"))
            if not prune_unmanaged:
                continue
        elif c.cls is not Class.PRUNE:
            if c.pin is Pin.CORRUPT:
                corrupt.append(_examined(c))
            continue
        entry = _examined(c)
        age = max(now - entry.mtime, 0.0)  # modified "in the future" (clock skew): as new as can be
        if age < min_age:
            why = f"{c.rule}, {human_age(age)} old, {waiting}"
            reports.append(Report(kind=ReportKind.WAITING, name=c.name, reason=why))
            continue
        if c.name in hold:
            reports.append(Report(kind=ReportKind.HELD, name=c.name, reason=hold[c.name]))
            continue
        rule = "unmanaged: prune" if c.cls is Class.UNMANAGED else c.rule
        due.append((entry.mtime, c.name, rule, entry))

    # Required models: missing or corrupt ones are restored when a source is known.
    present = {c.name for c in classified if c.name in sources}
    for item in sorted(policy.required, key=lambda r: r.name):
        if item.name in present:
            continue
        classified.append(Classified(name=item.name, cls=Class.MISSING, rule="required"))
        reports.append(
            Report(kind=ReportKind.MISSING, name=item.name, reason="required model is absent")
        )
        _restore(item, "missing", None, hold, reports, actions)
    for entry in corrupt:
        item = sources[entry.name]
        why = _corrupt_reason(entry, item.sha256 or "")
        reports.append(Report(kind=ReportKind.CORRUPT, name=entry.name, reason=why))
        _restore(item, f"corrupt ({why})", entry, hold, reports, actions)

    # Prune candidates: prefix matches, and unmanaged entries when asked to.
    if due and len(due) > policy.prune.max_fraction * models:
        errors.append(
            f"refusing to prune {len(due)} of {models} models: more than "
            f"prune.max_fraction={policy.prune.max_fraction:g}; nothing is pruned this cycle. "
            "Check the policy (a typo in prune.prefixes?), or raise max_fraction."
        )
        for _, name, _, _ in due:
            reports.append(
                Report(kind=ReportKind.REFUSED, name=name, reason="over prune.max_fraction")
            )
        due = []
    due.sort()
    cap = policy.prune.max_per_cycle
    for _, name, _, _ in due[cap:]:
        why = f"over prune.max_per_cycle={cap}; next cycle"
        reports.append(Report(kind=ReportKind.DEFERRED, name=name, reason=why))
    reasons: dict[tuple[str, int], str] = {}  # 50,000 prunes share a few reason texts
    prunes: list[Action] = []
    for mtime, name, rule, entry in due[:cap]:
        key = (rule, int(now - mtime))  # all human_age looks at
        reason = reasons.get(key)
        if reason is None:
            reason = reasons[key] = f"{rule}, {human_age(now - mtime)} old"
        prunes.append(
            Action(
                kind=ActionKind.PRUNE,
                name=name,
                reason=reason,
                rule=rule,
                bytes=entry.size,
                entry=entry,
                mode=policy.prune.action,
            )
        )

    # Quarantine retention.
    retention = policy.quarantine.retention
    expired = f"in quarantine longer than {format_duration(retention)}"
    purges = [
        Action(
            kind=ActionKind.PURGE,
            name=trashed.name,
            reason=expired,
            rule="quarantine.retention",
            bytes=trashed.size,
            trash_id=trashed.id,
        )
        for trashed in sorted(snapshot.trash, key=lambda t: (t.trashed_at, t.id))
        if now - trashed.trashed_at >= retention
    ]

    # Restores first (by name), then prunes oldest first, then purges oldest-trashed first.
    actions.sort(key=lambda a: a.name)
    actions += prunes + purges
    reports.sort(key=_by_kind_name)
    if len(classified) != len(entries):
        classified.sort(key=_by_name)  # missing names were appended
    if policy.suspend and actions:
        reports.extend(
            Report(
                kind=ReportKind.SUSPENDED, name=a.name, reason=f"would {a.kind.value}: {a.reason}"
            )
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
    for c in classify_all(policy, snapshot.entries):
        entry = c.entry
        if not isinstance(entry, Entry):
            continue  # listed only: no rule acts on it
        if c.cls is Class.PRUNE or (c.cls is Class.UNMANAGED and policy.unmanaged == "prune"):
            due = entry.mtime + policy.prune.min_age
            if due > now:
                times.append(due)
    for item in snapshot.trash:
        due = item.trashed_at + policy.quarantine.retention
        if due > now:
            times.append(due)
    return min(times) if times else None
