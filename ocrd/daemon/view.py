"""The suspicious-view guard: never act on a model dir that may not be the real one.

A model dir that vanished, became unreadable or locked elsewhere, became
empty after holding models, moved to another filesystem (a mount went
away), or is no longer the directory it was (renamed away and replaced, a
symlink to another directory, a mount over it: its device and inode
changed) is a suspicious view (DESIGN §4): the cycle only reports until an
operator confirms with a reload.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ocrd.core.model import Snapshot
from ocrd.core.own import own_reason


@dataclass(slots=True)
class _View:
    """What a confirmed view of the model dir looked like."""

    device: int
    models: int


class ViewGuard:
    """The last trusted view, and why the current one is not trusted (if it is not)."""

    def __init__(self, log: Any) -> None:
        self.log = log
        self._view: _View | None = None
        self._identity: tuple[int, int] | None = None  # (device, inode) of the confirmed dir
        self.suspicious: str | None = None

    @property
    def seen(self) -> bool:
        """Whether a view was ever trusted since the last confirmation."""
        return self._view is not None

    def trusts(self, identity: tuple[int, int]) -> bool:
        """Whether *identity* is the directory confirmed (or none is confirmed yet)."""
        return self._identity is None or identity == self._identity

    def vanished(self) -> None:
        """The model dir is gone: whatever directory comes back under its path is new."""
        self._identity = None

    def gate(
        self,
        snapshot: Snapshot,
        *,
        models: int,
        model_dir: str,
        identity: tuple[int, int],
        own: list[str] | None = None,
    ) -> str | None:
        """A reason not to act on this view of the model dir, or None.

        *identity* is the model dir's (device, inode) as the cycle found it; the
        first one seen (after a start, a reload, or its return after it vanished)
        is taken as confirmed. *own*: ocrd's own names in a shape ocrd never
        made (ocrd.core.own); suspicious for as long as they are there.
        """
        reason = None
        was = self._identity
        if self._view is not None and snapshot.device != self._view.device:
            reason = (
                f"model_dir is on another filesystem than before (device "
                f"{self._view.device} -> {snapshot.device}): a mount may have gone away"
            )
        elif was is not None and identity != was:
            reason = (
                f"model_dir {model_dir} is not the directory it was (device:inode "
                f"{was[0]}:{was[1]} -> {identity[0]}:{identity[1]}): renamed and replaced, "
                "a symlink to another directory, or a mount over it"
            )
        elif self._view is not None and models == 0 and self._view.models > 0:
            reason = f"model_dir became empty (it held {self._view.models} models)"
        elif own:
            reason = own_reason(own)
        if reason is None:
            self._view = _View(snapshot.device, models)
            self._identity = identity
        return self.suspect(reason, model_dir=model_dir)

    def suspect(self, reason: str | None, *, model_dir: str) -> str | None:
        """Record *reason* (None: trusted again), logging each change once."""
        if reason is not None and reason != self.suspicious:
            self.log.error(
                "model_dir.suspicious",
                model_dir=model_dir,
                reason=reason,
                hint="nothing is pruned or restored until an operator confirms with a reload "
                "(systemctl reload ocrd, or SIGHUP)",
            )
        elif reason is None and self.suspicious is not None:
            self.log.info("model_dir.trusted", model_dir=model_dir)
        self.suspicious = reason
        return reason

    def acted(self, *, pruned: int, restored: int) -> None:
        """ocrd's own prunes and restores change what "normal" looks like: emptying
        the dir by policy is not a suspicious view at the next cycle."""
        if self._view is not None:
            self._view.models = max(0, self._view.models - pruned + restored)

    def confirm(self) -> None:
        """An operator's reload: accept whatever view comes next."""
        self._view = None
        self._identity = None
        self.suspicious = None
