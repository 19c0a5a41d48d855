"""Noticing a fight: a pruned name that another actor re-creates again and again.

After FLAP_ROUNDS prunes of one name within FLAP_WINDOW the daemon stops
pruning it (`model.flapping`) until a reload, instead of fighting forever.
"""

from __future__ import annotations

from collections import deque

FLAP_ROUNDS = 3  # prunes of one name within FLAP_WINDOW before ocrd stops fighting
FLAP_WINDOW = 3600.0  # seconds


class Flapping:
    """The recent prunes of each name, and the names left alone because of them."""

    def __init__(self) -> None:
        self._prunes: dict[str, deque[float]] = {}
        self.held: dict[str, str] = {}  # name -> why it is left alone

    def pruned(self, name: str, *, now: float) -> str | None:
        """Note a prune of *name*; returns the reason when it has now become a fight."""
        rounds = self._prunes.setdefault(name, deque(maxlen=FLAP_ROUNDS))
        rounds.append(now)
        if len(rounds) == FLAP_ROUNDS and now - rounds[0] <= FLAP_WINDOW:
            reason = (
                f"pruned {FLAP_ROUNDS} times within {FLAP_WINDOW / 60:.0f} min and "
                "re-created each time; left alone until a reload"
            )
            self.held[name] = reason
            return reason
        return None

    def clear(self) -> None:
        self._prunes.clear()
        self.held.clear()
