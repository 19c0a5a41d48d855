"""Retrying what keeps failing: one small state per thing retried.

The daemon keeps one Backoff for the model dir, one for the cycle, one for
the engine host, and one per model whose action failed. Delays follow kopf's
series (1, 1, 2, 3, 5, 8, … s, capped at 5 minutes).
"""

from __future__ import annotations

SERIES = (1, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144, 233, 300)  # seconds


def delay_after(failures: int) -> int:
    """Seconds to wait after *failures* failures in a row (at least one)."""
    return SERIES[min(max(failures, 1) - 1, len(SERIES) - 1)]


class Backoff:
    """How often one thing failed in a row, why, and when to try it again."""

    __slots__ = ("failures", "not_before", "reason")

    def __init__(self) -> None:
        self.failures = 0
        self.not_before: float | None = None  # time.monotonic()
        self.reason = ""

    @property
    def failing(self) -> bool:
        return self.failures > 0

    def failed(self, reason: str = "", *, now: float) -> int:
        """Count one more failure; returns the delay before the next try."""
        self.failures += 1
        delay = delay_after(self.failures)
        self.not_before = now + delay
        self.reason = reason
        return delay

    def succeeded(self) -> None:
        self.failures = 0
        self.not_before = None
        self.reason = ""

    def due(self, now: float) -> bool:
        """Whether it may be tried now (always, while it is not failing)."""
        return self.not_before is None or now >= self.not_before
