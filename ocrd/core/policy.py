"""The policy: desired state of a model dir, as pydantic models.

Validators only. Reading files, the environment and resolving paths against
the disk happen in config.py; this module is pure.
"""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from ocrd.core.sources import Source, parse_source
from ocrd.core.versions import check_match

MAX_DURATION = 10 * 365 * 86400.0  # ten years: anything longer is a typo
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
# systemd.time(7) time spans, case-sensitive as there; months and years as systemd counts them.
# Its bare "M" (months) is refused: to many people it means minutes.
SPAN_UNITS: dict[str, float] = {
    **dict.fromkeys(("us", "usec", "\N{MICRO SIGN}s", "\N{GREEK SMALL LETTER MU}s"), 1e-6),
    **dict.fromkeys(("ms", "msec"), 0.001),
    **dict.fromkeys(("s", "sec", "second", "seconds"), 1.0),
    **dict.fromkeys(("m", "min", "minute", "minutes"), 60.0),
    **dict.fromkeys(("h", "hr", "hour", "hours"), 3600.0),
    **dict.fromkeys(("d", "day", "days"), 86400.0),
    **dict.fromkeys(("w", "week", "weeks"), 604800.0),
    **dict.fromkeys(("month", "months"), 30.44 * 86400.0),
    **dict.fromkeys(("y", "year", "years"), 365.25 * 86400.0),
}
_NUMBER = r"\d+(?:\.\d+)?"
_SPAN_PART = re.compile(rf"({_NUMBER})\s*([^\d\s.]*)\s*")
DURATION_EXAMPLES = "'90s', '10m', '1h 30min' or '7d'"
DEFAULT_IGNORE = ("*.part", "*.tmp", "*.download", "*.lock")


def _span_pattern() -> str:
    """A regular expression (JSON Schema dialect) for the duration strings parse_duration takes."""
    units = "|".join(sorted(map(re.escape, SPAN_UNITS), key=len, reverse=True))
    return rf"^\s*(?:{_NUMBER}|(?:{_NUMBER}\s*(?:{units})\s*)+)\s*$"


DURATION_PATTERN = _span_pattern()


def _parse_span(text: str) -> float:
    """'10m', '1h 30min', '2 d', '500ms' or plain seconds '45' -> seconds (ValueError if not)."""
    stripped = text.strip()
    if re.fullmatch(_NUMBER, stripped):
        return float(stripped)
    expected = f"expected a duration like {DURATION_EXAMPLES}, got {text!r}"
    total, pos = 0.0, 0
    while pos < len(stripped):
        match = _SPAN_PART.match(stripped, pos)
        if match is None:
            raise ValueError(expected)
        number, unit = match.groups()
        if unit == "M":
            raise ValueError(
                f"{expected}: 'M' means months in systemd but minutes to many; "
                "write 'min' or 'months'"
            )
        if unit not in SPAN_UNITS:
            raise ValueError(expected)
        total += float(number) * SPAN_UNITS[unit]
        pos = match.end()
    if pos == 0:
        raise ValueError(expected)
    return total


def parse_duration(value: Any) -> float:
    """A systemd time span ('90s', '10min', '1h 30min', '2 d', '500ms'), or plain seconds.

    Case-sensitive as systemd is; a number without a unit (alone) is seconds.
    """
    if isinstance(value, bool) or value is None:
        shown = "nothing" if value is None else str(value).lower()
        raise ValueError(f"expected a duration like {DURATION_EXAMPLES}, got {shown}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        seconds = _parse_span(value)
    else:
        kind = (
            "a list"
            if isinstance(value, list)
            else "a mapping"
            if isinstance(value, dict)
            else "a value of another kind"
        )
        raise ValueError(f"expected a duration like {DURATION_EXAMPLES}, got {kind}")
    if seconds != seconds:  # NaN
        raise ValueError(f"expected a duration like {DURATION_EXAMPLES}, got {value!r}")
    if seconds < 0:
        raise ValueError(f"a duration cannot be negative, got {value!r}")
    if seconds > MAX_DURATION:
        raise ValueError(f"duration {value!r} is longer than ten years; use something like '7d'")
    return seconds


def format_duration(seconds: float) -> str:
    """Seconds -> the shortest exact unit string ('10m', '7d', '1.5s')."""
    for unit in ("d", "h", "m", "s"):
        size = _UNITS[unit]
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    if seconds and seconds < 1:
        return f"{round(seconds * 1000)}ms"
    return f"{seconds:g}s"


def human_age(seconds: float) -> str:
    """An approximate age for people: '45s', '12m', '2h 5m', '3d 4h'."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60}m"
    return f"{s // 86400}d {s % 86400 // 3600}h"


def check_positive(seconds: float) -> float:
    if seconds <= 0:
        raise ValueError("must be longer than 0s")
    return seconds


# Editors see what the file may hold (a time span or seconds), not the float it becomes.
_DURATION_SCHEMA = {
    "anyOf": [
        {"type": "string", "pattern": DURATION_PATTERN},
        {"type": "number", "minimum": 0},
    ],
    "examples": ["90s", "10min", "1h 30min", "7d"],
}
Duration = Annotated[
    float, BeforeValidator(parse_duration), WithJsonSchema(_DURATION_SCHEMA, mode="validation")
]
PositiveDuration = Annotated[Duration, AfterValidator(check_positive)]  # a wait that must pass


def _check_word(value: str, what: str) -> str:
    if not value:
        raise ValueError(f"{what} cannot be empty")
    if "\x00" in value:
        raise ValueError(f"{what} cannot contain a NUL byte")
    if "/" in value:
        raise ValueError(
            f"{what} {value!r} contains '/'; ocrd only manages top-level entries of model_dir"
        )
    return value


def check_name(value: str) -> str:
    _check_word(value, "a model name")
    if value in (".", ".."):
        raise ValueError(f"{value!r} is not a model name")
    if value.startswith("."):
        raise ValueError(
            f"model name {value!r} starts with '.'; dot-entries are always ignored, so it "
            "could never be checked"
        )
    return value


def check_glob(value: str) -> str:
    _check_word(value, "a glob")
    return value


def check_prefix(value: str) -> str:
    _check_word(value, "a prune prefix")
    if value.startswith("."):
        raise ValueError(
            f"prune prefix {value!r} starts with '.'; dot-entries (ocrd's own among them) "
            "are never pruned"
        )
    return value


Prefix = Annotated[str, AfterValidator(check_prefix)]
Glob = Annotated[str, AfterValidator(check_glob)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class Required(_Strict):
    """A model that must be present."""

    name: str = Field(description="Entry name in model_dir (no '/').")
    sha256: str | None = Field(
        default=None, description="Optional pin: hex sha256 of the file, verified and cached."
    )
    source: str | None = Field(
        default=None,
        description="Optional: where to restore it from; a file path (relative: to the "
        "policy file), an http(s):// URL, or hf://OWNER/REPO[@REVISION]/PATH.",
    )
    sources: list[str] = Field(
        default_factory=list,
        description="Optional mirrors, tried in order (instead of source).",
    )

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return check_name(value)

    @field_validator("sha256")
    @classmethod
    def _sha(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.strip().lower()
        if not re.fullmatch(r"[0-9a-f]{64}", value):
            raise ValueError("expected 64 hex digits (the output of `sha256sum FILE`)")
        return value

    @field_validator("source")
    @classmethod
    def _source(cls, value: str | None) -> str | None:
        if value is not None:
            parse_source(value)  # raises with what is wrong and the forms there are
        return value

    @field_validator("sources")
    @classmethod
    def _sources(cls, value: list[str]) -> list[str]:
        for i, text in enumerate(value):
            try:
                parse_source(text)
            except ValueError as exc:
                raise ValueError(f"sources[{i}]: {exc}") from None
        if len(set(value)) != len(value):
            raise ValueError("a mirror is listed twice")
        return value

    @model_validator(mode="after")
    def _one_way(self) -> Required:
        if self.source is not None and self.sources:
            raise ValueError(
                "source and sources are both set; list every mirror under sources "
                "(tried in order) and drop source"
            )
        return self

    def fetch_from(self) -> tuple[Source, ...]:
        """Where to restore this model from, in the order to try; () if nowhere."""
        texts = [self.source] if self.source is not None else self.sources
        return tuple(parse_source(t) for t in texts)


def plain_name(value: Any) -> Any:
    """`- en_ocr_v1.bin` means `- name: en_ocr_v1.bin`; a mapping is validated as it is."""
    if isinstance(value, str):
        return {"name": value}
    if isinstance(value, dict | Required):
        return value
    raise ValueError(
        "expected a model name (- en_ocr_v1.bin) or its keys (- name: en_ocr_v1.bin, "
        "with sha256: and source: if wanted)"
    )


RequiredEntry = Annotated[
    Required, BeforeValidator(plain_name, json_schema_input_type=str | Required)
]


class Prune(_Strict):
    """Which stale models go, and how carefully."""

    prefixes: list[Prefix] = Field(
        default_factory=list, description="Entry names starting with these are pruned."
    )
    min_age: Duration = Field(
        default=600.0, description="Younger entries wait (they may still be written)."
    )
    action: Literal["quarantine", "delete"] = Field(
        default="quarantine", description="quarantine: move to .ocrd-trash/; delete: remove."
    )
    max_per_cycle: int = Field(
        default=50, ge=1, le=10_000_000, description="At most this many prunes per cycle."
    )
    max_fraction: float = Field(
        default=0.5,
        gt=0.0,
        le=1.0,
        description="Refuse a cycle that would prune more than this share of models.",
    )


class Versions(_Strict):
    """One version family: keep the newest `keep` of the names `match` describes."""

    match: Annotated[str, AfterValidator(check_match)] = Field(
        description="An entry name with {version} where the version goes, e.g. "
        "'en_ocr_v{version}.bin'; versions compare naturally (v10 > v9, 1.10 > 1.9)."
    )
    keep: int = Field(
        ge=1,
        le=1_000_000,
        description="The newest this many are kept (required and whitelisted ones count); "
        "older ones are pruned like any prune candidate.",
    )


class Quarantine(_Strict):
    """How long pruned models stay restorable in model_dir/.ocrd-trash/."""

    retention: Duration = Field(
        default=7 * 86400.0, description="Quarantined entries older than this are purged."
    )


class EngineSettings(_Strict):
    """The OCR engine ocrd releases before it deletes anything."""

    backend: Literal["auto", "aspose", "none"] = Field(
        default="auto", description="auto: aspose where installed, else none."
    )
    runtime_dir: Path | None = Field(
        default=None, description="Optional llama.cpp runtime directory for the engine."
    )
    release_timeout: PositiveDuration = Field(
        default=10.0, description="The engine must be released by then, else nothing is deleted."
    )


class Download(_Strict):
    """How remote sources are fetched (http(s):// and hf://)."""

    netrc: Path | None = Field(
        default=None,
        description="Optional netrc file with HTTP credentials per host (never inline in "
        "the policy; relative: to the policy file).",
    )
    ca_bundle: Path | None = Field(
        default=None,
        description="Optional PEM file of CA certificates to trust instead of the system's.",
    )
    connect_timeout: PositiveDuration = Field(
        default=10.0, description="Give up connecting after this long (then retry)."
    )
    read_timeout: PositiveDuration = Field(
        default=60.0, description="Give up on a server silent for this long (then retry)."
    )
    retries: int = Field(
        default=5,
        ge=0,
        le=100,
        description="Retries (with backoff) after network errors and 5xx answers.",
    )
    max_redirects: int = Field(default=5, ge=0, le=30, description="Redirects followed at most.")


class Reconcile(_Strict):
    """When the daemon runs a cycle."""

    debounce: PositiveDuration = Field(
        default=2.0, description="Settle time after the last file event."
    )
    resync: PositiveDuration = Field(default=300.0, description="Full rescan even without events.")


class Log(_Strict):
    """Log lines: format and lowest level."""

    format: Literal["json", "console"] = Field(default="json", description="json | console.")
    level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="Lowest level written."
    )

    @field_validator("level", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value


class Policy(_Strict):
    """The whole policy file. `model_dir` is absolute once config.py has resolved it."""

    model_dir: Path = Field(description="The managed directory (relative: to the policy file).")
    state_dir: Path | None = Field(
        default=None,
        description="Hash cache and engine home; default $STATE_DIRECTORY, "
        "$XDG_STATE_HOME/ocrd or ~/.local/state/ocrd.",
    )
    required: list[RequiredEntry] = Field(
        default_factory=list,
        description="Models that must be present; never pruned. A plain name or "
        "name/sha256/source keys.",
    )
    whitelist: list[Glob] = Field(
        default_factory=list, description="Globs on entry names that are never touched."
    )
    prune: Prune = Field(default_factory=Prune, description="Which stale models go, and how.")
    versions: list[Versions] = Field(
        default_factory=list,
        description="Version families: the newest N of each are kept, older ones pruned.",
    )
    unmanaged: Literal["report", "prune"] = Field(
        default="report", description="What to do with entries that match nothing."
    )
    suspend: bool = Field(default=False, description="true: report only, change nothing.")
    ignore: list[Glob] = Field(
        default_factory=lambda: list(DEFAULT_IGNORE),
        description="Globs never touched nor listed (dot-entries always are).",
    )
    quarantine: Quarantine = Field(
        default_factory=Quarantine, description="How long pruned models stay restorable."
    )
    engine: EngineSettings = Field(
        default_factory=EngineSettings, description="The OCR engine released before deletes."
    )
    reconcile: Reconcile = Field(
        default_factory=Reconcile, description="When the daemon runs a cycle."
    )
    log: Log = Field(default_factory=Log, description="Log format and level.")
    download: Download = Field(
        default_factory=Download, description="How http(s):// and hf:// sources are fetched."
    )

    @field_validator("model_dir", "state_dir", mode="before")
    @classmethod
    def _path(cls, value: Any) -> Any:
        if isinstance(value, str | Path) and (not str(value).strip() or "\x00" in str(value)):
            raise ValueError("expected a directory path, e.g. /var/lib/ocrd/models")
        return value

    def pins(self) -> dict[str, str]:
        return {r.name: r.sha256 for r in self.required if r.sha256}


Loc = tuple[str | int, ...]


def cross_check(policy: Policy) -> list[tuple[Loc, str]]:
    """Errors that involve more than one key, each with the key path to blame."""
    found: list[tuple[Loc, str]] = []
    matches: set[str] = set()
    for i, family in enumerate(policy.versions):
        if family.match in matches:
            found.append((("versions", i, "match"), f"{family.match!r} is listed twice"))
        matches.add(family.match)
    seen: set[str] = set()
    for i, item in enumerate(policy.required):
        if item.name in seen:
            found.append((("required", i, "name"), f"{item.name!r} is listed twice"))
        seen.add(item.name)
        for glob in policy.ignore:
            if fnmatch.fnmatchcase(item.name, glob):
                found.append(
                    (
                        ("required", i, "name"),
                        f"{item.name!r} matches ignore glob {glob!r}, so it could never be "
                        "checked; remove one of them",
                    )
                )
    return found


SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


def json_schema() -> dict[str, Any]:
    """The JSON Schema of a policy file (what the YAML may hold), for editors: `ocrd schema`.

    Generated from the models above, with their descriptions and defaults; durations are
    strings or seconds, required entries plain names or mappings, as the file may write them.
    """
    schema = Policy.model_json_schema(mode="validation")
    schema.pop("title", None)
    schema.pop("description", None)
    return {
        "$schema": SCHEMA_DIALECT,
        "title": "ocrd policy",
        "description": "The desired state of one model directory, for ocrd (`ocrd check`).",
        **schema,
    }


GLOB_CHARS = "*?["


def prefix_warnings(policy: Policy) -> list[tuple[Loc, str]]:
    """Prefixes that look like globs: they match only names that start with them literally."""
    found: list[tuple[Loc, str]] = []
    for i, prefix in enumerate(policy.prune.prefixes):
        chars = "".join(c for c in GLOB_CHARS if c in prefix)
        if not chars:
            continue
        plain = prefix.split("*")[0].split("?")[0].split("[")[0]
        hint = f"Write the plain start ({plain!r}) " if plain else "Write a plain start "
        found.append(
            (
                ("prune", "prefixes", i),
                f"{prefix!r} contains the glob character(s) {chars!r}, but prefixes are plain "
                f"starts of names, not globs: it matches only names that begin with {prefix!r} "
                f"itself. {hint}here; globs belong in whitelist (never touched) and ignore",
            )
        )
    return found


def conflicts(policy: Policy) -> list[str]:
    """Protections that shadow a prune prefix (protection wins; `ocrd check` warns)."""
    found = []
    for prefix in policy.prune.prefixes:
        for item in policy.required:
            if item.name.startswith(prefix):
                found.append(
                    f"required {item.name!r} starts with prune prefix {prefix!r}; "
                    "it is protected and never pruned"
                )
        for family in policy.versions:
            head = family.match.partition("{version}")[0]
            if head.startswith(prefix) or prefix.startswith(head):
                found.append(
                    f"version family {family.match!r} overlaps prune prefix {prefix!r}; "
                    f"the newest {family.keep} of the family are kept even so"
                )
        for glob in policy.whitelist:
            if glob.startswith(prefix) or fnmatch.fnmatchcase(prefix, glob):
                found.append(
                    f"whitelist {glob!r} overlaps prune prefix {prefix!r}; "
                    "whitelisted entries are never pruned"
                )
    return found
