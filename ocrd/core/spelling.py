"""Nearest words for "did you mean …?" in messages: edit distance, pure."""

from __future__ import annotations

from collections.abc import Iterable


def distance(a: str, b: str) -> int:
    """Levenshtein distance with adjacent transpositions counted as one edit."""
    prev2: list[int] = []
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cost = 0 if ca == cb else 1
            best = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + cost)
            if i > 1 and j > 1 and ca == b[j - 2] and a[i - 2] == cb:
                best = min(best, prev2[j - 2] + 1)
            cur.append(best)
        prev2, prev = prev, cur
    return prev[-1]


def nearest(word: str, choices: Iterable[str]) -> str | None:
    """The choice closest to *word* when it is close enough to be a typo, else None.

    Close enough: at most a third of the word's letters (at least one, at most three) differ.
    Ties go to the earlier choice, so callers list the likelier words first.
    """
    limit = max(1, min(3, len(word) // 3))
    best: tuple[int, str] | None = None
    for choice in choices:
        d = distance(word.lower(), choice.lower())
        if d <= limit and (best is None or d < best[0]):
            best = (d, choice)
    return None if best is None else best[1]
