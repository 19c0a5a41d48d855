"""After acting: start the engine again and log its listing next to ocrd's own."""

from __future__ import annotations

import heapq
import os
import time
from collections.abc import Sequence
from pathlib import Path

from ocrd.act.fs import Log
from ocrd.core.model import Action, ActionKind, Class, Plan
from ocrd.engine.base import Engine
from ocrd.log import LISTED


def ocrd_models(plan: Plan, done: Sequence[Action]) -> set[str]:
    """ocrd's own listing after the actions: what it scanned, minus prunes, plus restores."""
    pruned = {a.name for a in done if a.kind is ActionKind.PRUNE}
    names = {
        c.name
        for c in plan.classified
        if c.entry is not None and c.cls is not Class.IGNORED and c.name not in pruned
    }
    names.update(a.name for a in done if a.kind is ActionKind.RESTORE)
    return names


def first(names: set[str]) -> list[str]:
    """The first LISTED names in order, without sorting them all."""
    return heapq.nsmallest(LISTED, names)


def open_and_compare(
    engine: Engine, root: str, *, log: Log, release_ms: float, ours: set[str]
) -> None:
    """Start the engine again and log its view of the models next to ocrd's."""
    started = time.monotonic()
    engine.open(Path(root))
    open_ms = round((time.monotonic() - started) * 1000, 1)
    where = engine.local_path()
    listed = engine.list_local()
    seen = set()
    for path in listed:
        rel = os.path.relpath(path, where) if where else path
        seen.add(rel.split(os.sep, 1)[0])
    if engine.name != "none":
        names = ours
        if seen != names:
            log.warning(
                "engine.listing_differs",
                engine=engine.name,
                only_engine=first(seen - names),
                only_ocrd=first(names - seen),
                hint="expected without a licence: the library then lists only its default "
                "model; ocrd's own scan is what it acts on",
            )
    log.info(
        "engine.cycled",
        engine=engine.name,
        pid=engine.pid,
        release_ms=release_ms,
        open_ms=open_ms,
        local_path=where,
        engine_models=first(seen),
        engine_count=len(seen),
        ocrd_models=first(ours),
        ocrd_count=len(ours),
    )
