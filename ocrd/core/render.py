"""Plans, classifications and trash as table rows or stable JSON documents.

Pure: the caller passes *now*; printing happens in cli.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

from ocrd.core.model import Class, Classified, Entry, Plan, ReportKind, TrashItem
from ocrd.core.policy import human_age
from ocrd.core.sources import shown
from ocrd.core.versions import family_note

SCHEMA = 1


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover - the loop always returns


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="seconds")


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns separated by two spaces; numbers stay as given."""
    columns = list(zip(*rows, strict=True)) if rows else [() for _ in headers]
    if len(columns) != len(headers):
        raise ValueError(f"rows have {len(columns)} cells, headers {len(headers)}")
    widths = [
        max(len(h), max(map(len, col), default=0)) for h, col in zip(headers, columns, strict=True)
    ]
    # One %-format for every row: 100,000 rows for a big model dir.
    line = "  ".join(f"%-{w}s" for w in widths[:-1]) + ("  %s" if len(widths) > 1 else "%s")
    out = [(line % tuple(h.upper() for h in headers)).rstrip()]
    out += [(line % tuple(row)).rstrip() for row in rows]
    return "\n".join(out)


def _details(c: Classified) -> Entry | None:
    """The entry lstat saw, if any: none for a missing name or one only listed."""
    return c.entry if isinstance(c.entry, Entry) else None


def _age(entry: Entry, now: float) -> float:
    return max(0.0, now - entry.mtime)  # an mtime in the future counts as 0


def models_json(root: str, classified: Sequence[Classified], *, now: float) -> dict[str, Any]:
    models = []
    for c in classified:
        entry = _details(c)
        models.append(
            {
                "name": c.name,
                "class": c.cls.value,
                "rule": c.rule,
                "kind": c.entry.kind.value if c.entry else None,
                "size": None if entry is None else entry.size,
                "mtime": None if entry is None else iso(entry.mtime),
                "age_seconds": None if entry is None else round(_age(entry, now), 3),
                "pin": c.pin.value if c.cls is Class.REQUIRED else None,
                "family": c.family,
                "rank": c.rank or None,
            }
        )
    return {"schema": SCHEMA, "model_dir": root, "models": models}


def models_table(classified: Sequence[Classified], *, now: float) -> str:
    rows = []
    for c in classified:
        entry = _details(c)
        status = c.pin.value if c.cls is Class.REQUIRED else ""
        rows.append(
            [
                c.name,
                c.cls.value,
                family_note(c),
                c.entry.kind.value if c.entry else "-",
                "-" if entry is None else human_bytes(entry.size),
                "-" if entry is None else human_age(_age(entry, now)),
                status,
            ]
        )
    return table(["name", "class", "rule", "kind", "size", "age", "pin"], rows)


def plan_json(root: str, plan: Plan) -> dict[str, Any]:
    return {
        "schema": SCHEMA,
        "model_dir": root,
        "suspended": plan.suspended,
        "actions": [
            {
                "action": a.kind.value,
                "model": a.name,
                "reason": a.reason,
                "rule": a.rule,
                "bytes": a.bytes,
                "mode": a.mode or None,
                "source": None if a.source is None else shown(a.source),
                "sources": [shown(t) for t in a.sources],
                "trash_id": a.trash_id,
            }
            for a in plan.actions
        ],
        "reports": [
            {"kind": r.kind.value, "model": r.name, "reason": r.reason} for r in plan.reports
        ],
        "errors": list(plan.errors),
        "bytes_freed": plan.bytes_freed,
    }


def plan_text(plan: Plan) -> str:
    parts = []
    if plan.actions:
        pairs = {(a.kind, a.mode) for a in plan.actions}
        labels = {(k, m): k.value + (f" ({m})" if m else "") for k, m in pairs}
        rows = [
            (
                labels[a.kind, a.mode],
                a.name,
                human_bytes(a.bytes) if a.bytes else "-",
                a.reason,
            )
            for a in plan.actions
        ]
        parts.append(table(["action", "model", "bytes", "reason"], rows))
        parts.append(f"{len(plan.actions)} action(s); {human_bytes(plan.bytes_freed)} freed.")
    else:
        parts.append("Nothing to do: the model dir matches the policy.")
    if plan.reports:
        kinds = {k: k.value for k in ReportKind}
        reports = [(kinds[r.kind], r.name, r.reason) for r in plan.reports]
        parts.append("\n" + table(["report", "model", "reason"], reports))
    if plan.suspended:
        parts.append("\nsuspend: true — nothing will be changed until it is set to false.")
    parts.extend(f"\nerror: {e}" for e in plan.errors)
    return "\n".join(parts)


def trash_json(root: str, items: Sequence[TrashItem], *, now: float) -> dict[str, Any]:
    return {
        "schema": SCHEMA,
        "model_dir": root,
        "items": [
            {
                "id": t.id,
                "name": t.name,
                "trashed_at": iso(t.trashed_at),
                "age_seconds": round(max(0.0, now - t.trashed_at), 3),
                "reason": t.reason,
                "size": t.size,
                "sha256": t.sha256,
            }
            for t in items
        ],
    }


def trash_table(items: Sequence[TrashItem], *, now: float) -> str:
    if not items:
        return "The quarantine is empty."
    rows = [
        [
            t.id,
            t.name,
            human_bytes(t.size),
            human_age(now - t.trashed_at),
            t.reason,
        ]
        for t in items
    ]
    return table(["id", "name", "size", "age", "reason"], rows)


def deleted_table(rows: Sequence[dict[str, Any]], pinned: int) -> str:
    """Files deleted from the model dir that processes still hold (rows from handles)."""
    table_rows = [
        [
            str(r["path"]),
            str(r["pid"]),
            str(r["process"]),
            str(r["how"]),
            human_bytes(int(r["bytes"])) if r["bytes"] else "?",
        ]
        for r in rows
    ]
    head = (
        f"Deleted but still held open or mapped ({human_bytes(pinned)} of disk pinned "
        "until these processes let go):"
    )
    return head + "\n" + table(["path", "pid", "process", "how", "bytes"], table_rows)
