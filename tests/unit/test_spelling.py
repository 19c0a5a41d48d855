"""Nearest words for "did you mean": edit distance and its threshold."""

from __future__ import annotations

import pytest

from ocrd.core.spelling import distance, nearest


@pytest.mark.parametrize(
    ("a", "b", "d"),
    [
        ("min_age", "min_age", 0),
        ("min_agee", "min_age", 1),
        ("sha265", "sha256", 1),
        ("levl", "level", 1),
        ("prnue", "prune", 1),
        ("", "abc", 3),
        ("kitten", "sitting", 3),
    ],
)
def test_distance_counts_edits_and_transpositions_as_one(a: str, b: str, d: int) -> None:
    """Insertions, deletions, substitutions and adjacent swaps each cost one edit."""
    assert distance(a, b) == d == distance(b, a)


def test_nearest_finds_a_typo_and_ignores_unrelated_words() -> None:
    """A close word is suggested; a word with nothing near gets no suggestion."""
    keys = ["prefixes", "min_age", "action", "max_per_cycle", "max_fraction"]
    assert nearest("min_ages", keys) == "min_age"
    assert nearest("mets_caching", ["model_dir", "prune", "log"]) is None
    assert nearest("OCRD_PROFILE", ["OCRD_PRUNE", "OCRD_LOG"]) is None
    assert nearest("OCRD_LOG_LEVEL", ["OCRD_LOG", "OCRD_LOG__LEVEL"]) == "OCRD_LOG__LEVEL"
