"""Version families: keep the newest N of `en_ocr_v{version}.bin` (pure).

A family's `match` is literal text around one `{version}`, which matches the
varying part of a name (one or more characters, no `/`). Versions compare
naturally: runs of digits as numbers, the rest as text, so `v10` > `v9`,
`1.10` > `1.9`, and dates written year first (`2024-01-31`) in date order.
The entries of a family, newest first, take ranks 1, 2, …; required and
whitelisted entries take their rank too (they count toward `keep`) but are
never pruned; entries beyond the newest `keep` become prune candidates, and
those within it are kept even where a prune prefix matches them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from ocrd.core.model import Class, Classified

PLACEHOLDER = "{version}"
_RUN = re.compile(r"(\d+)")


def check_match(value: str) -> str:
    """A family's match: literal text with exactly one {version} (ValueError if not)."""
    if value.count(PLACEHOLDER) != 1:
        raise ValueError(
            f"{value!r}: a version family needs exactly one {PLACEHOLDER}, where the "
            "version goes (e.g. 'en_ocr_v{version}.bin')"
        )
    literal = value.replace(PLACEHOLDER, "")
    if "/" in literal or "\x00" in literal:
        raise ValueError(f"{value!r}: an entry name has no '/' and no NUL")
    if value.startswith("."):
        raise ValueError(f"{value!r} starts with '.'; dot-entries are never models")
    bad = sorted({c for c in "*?[]{}" if c in literal})
    if bad:
        raise ValueError(
            f"{value!r}: {''.join(bad)!r} would be taken literally; a family is plain "
            f"text around {PLACEHOLDER} (globs belong in whitelist and ignore)"
        )
    return value


def pattern(match: str) -> re.Pattern[str]:
    """The regular expression of a family's names; group `v` is the version."""
    head, _, tail = match.partition(PLACEHOLDER)
    return re.compile(rf"{re.escape(head)}(?P<v>[^/]+?){re.escape(tail)}\Z")


def version_key(version: str) -> tuple[tuple[int, int, str], ...]:
    """The natural order of *version*: digit runs as numbers, text as text."""
    parts = _RUN.split(version)
    key = []
    for i, part in enumerate(parts):
        if not part:
            continue
        if i % 2:  # a run of digits
            key.append((1, int(part), part))
        else:
            key.append((0, 0, part))
    return tuple(key)


@dataclass(frozen=True)
class Family:
    match: str
    keep: int
    regex: re.Pattern[str]


class Families:
    """The policy's families, compiled once."""

    def __init__(self, families: Sequence[tuple[str, int]]) -> None:
        self.families = tuple(Family(m, k, pattern(m)) for m, k in families)

    def __bool__(self) -> bool:
        return bool(self.families)

    def member(self, name: str) -> tuple[Family, str] | None:
        """The first family *name* belongs to, and its version there."""
        found = self._member(name)
        return None if found is None else (self.families[found[0]], found[1])

    def _member(self, name: str) -> tuple[int, str] | None:
        for i, family in enumerate(self.families):
            found = family.regex.match(name)
            if found is not None:
                return i, found.group("v")
        return None

    def rank(self, classified: list[Classified]) -> list[Classified]:
        """*classified* with each family's entries ranked, and reclassified: beyond the
        newest `keep` a prune candidate (unless required or whitelisted), within it kept."""
        if not self.families:
            return classified
        members: dict[int, list[tuple[tuple[tuple[int, int, str], ...], str, int, str]]] = {}
        for i, c in enumerate(classified):
            if c.cls in (Class.IGNORED, Class.MISSING):
                continue
            belongs = self._member(c.name)
            if belongs is None:
                continue
            index, version = belongs
            members.setdefault(index, []).append((version_key(version), c.name, i, version))
        if not members:
            return classified
        out = list(classified)
        for index, ranked in members.items():
            family = self.families[index]
            ranked.sort(reverse=True)  # newest first; the name breaks a tie
            for rank, (_, _, i, version) in enumerate(ranked, start=1):
                out[i] = _ranked(out[i], family, rank, version)
        return out


def _ranked(c: Classified, family: Family, rank: int, version: str) -> Classified:
    name, keep = family.match, family.keep
    if c.cls in (Class.REQUIRED, Class.ALLOWED):
        return c._replace(family=name, rank=rank)  # counts toward keep; never pruned
    if rank <= keep:
        rule = f"version {version} of {name}, newest #{rank}: kept (the newest {keep} are)"
        return c._replace(cls=Class.ALLOWED, rule=rule, family=name, rank=rank)
    rule = f"version {version} of {name}, newest #{rank}; the newest {keep} are kept"
    return c._replace(cls=Class.PRUNE, rule=rule, family=name, rank=rank)


def family_note(c: Classified) -> str:
    """What `ocrd list` adds to the rule of a required or whitelisted family member."""
    if c.family is None or c.rule.startswith("version "):
        return c.rule
    return f"{c.rule}; newest #{c.rank} of {c.family}"
