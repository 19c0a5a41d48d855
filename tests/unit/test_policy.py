"""The policy models and their validators, in memory only (DESIGN.md §2)."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from ocrd.core.policy import (
    DEFAULT_IGNORE,
    MAX_DURATION,
    Policy,
    check_glob,
    check_name,
    check_prefix,
    conflicts,
    cross_check,
    format_duration,
    human_age,
    parse_duration,
    prefix_warnings,
)

SHA = "3f5a" * 16  # 64 lowercase hex digits


def make(**fields: Any) -> Policy:
    """A policy with a model_dir and *fields* on top."""
    return Policy.model_validate({"model_dir": "/srv/models", **fields})


def errors_of(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The pydantic errors that validating *data* as a Policy raises (fails if it validates)."""
    with pytest.raises(ValidationError) as exc:
        Policy.model_validate(data)
    return [dict(e) for e in exc.value.errors(include_url=False)]


def assert_error(data: dict[str, Any], loc: tuple[str | int, ...], pattern: str) -> None:
    """Validating *data* fails with an error at *loc* whose message matches *pattern*."""
    found = errors_of(data)
    at_loc = [e for e in found if tuple(e["loc"]) == loc]
    assert at_loc, f"no error at {loc}; got {[(e['loc'], e['msg']) for e in found]}"
    assert any(re.search(pattern, e["msg"]) for e in at_loc), at_loc


# --- durations ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90s", 90.0),
        ("10m", 600.0),
        ("2h", 7200.0),
        ("7d", 604800.0),
        ("1w", 604800.0),
        ("200ms", 0.2),
        ("1.5h", 5400.0),
        (" 10 m ", 600.0),
        ("45", 45.0),
        ("0", 0.0),
        (90, 90.0),
        (2.5, 2.5),
        (0, 0.0),
        ("3650d", MAX_DURATION),
        # systemd time spans (systemd.time(7)), as operators of a systemd service type them
        ("10min", 600.0),
        ("1h 30min", 5400.0),
        ("1h30m", 5400.0),
        ("2 d", 172800.0),
        ("500ms", 0.5),
        ("500 msec", 0.5),
        ("3 hours", 10800.0),
        ("1 week 2 days", 777600.0),
        ("90 sec", 90.0),
        ("1 month", 30.44 * 86400),
        ("1y", 365.25 * 86400),
        (MAX_DURATION, MAX_DURATION),
    ],
)
def test_parse_duration_accepts_units_and_plain_seconds(text: Any, seconds: float) -> None:
    """Unit strings and plain numbers become seconds as floats."""
    result = parse_duration(text)
    assert result == pytest.approx(seconds)
    assert isinstance(result, float)


@pytest.mark.parametrize(
    ("value", "pattern"),
    [
        ("ten minutes", r"expected a duration like .*'10m'.*got 'ten minutes'"),
        ("10M", r"expected a duration like.*'M' means months in systemd"),
        ("10 Min", r"expected a duration like"),
        ("1h 30", r"expected a duration like"),
        ("10mins", r"expected a duration like"),
        ("-5s", r"expected a duration like"),
        ("1e3", r"expected a duration like"),
        ("", r"expected a duration like"),
        ("nan", r"expected a duration like"),
        ("inf", r"expected a duration like"),
        (-1, r"cannot be negative, got -1"),
        (-0.5, r"cannot be negative"),
        (True, r"expected a duration like '90s', '10m', '1h 30min' or '7d', got true"),
        (False, r"expected a duration like '90s', '10m', '1h 30min' or '7d', got false"),
        (None, r"expected a duration like .*, got nothing"),
        ([10], r"expected a duration like .*, got a list"),
        (math.inf, r"longer than ten years"),
        ("3651d", r"longer than ten years"),
        ("522w", r"longer than ten years"),
        (MAX_DURATION + 1, r"longer than ten years"),
    ],
)
def test_parse_duration_rejects_invalid_values(value: Any, pattern: str) -> None:
    """Garbage, negative, boolean, non-scalar and absurdly long durations are ValueErrors."""
    with pytest.raises(ValueError, match=pattern):
        parse_duration(value)


def test_parse_duration_rejects_nan_without_calling_it_negative() -> None:
    """A NaN duration is rejected with a message about NaN, not a claim that it is negative."""
    with pytest.raises(ValueError, match=r"nan") as exc:
        parse_duration(math.nan)
    assert "negative" not in str(exc.value)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (0.2, "200ms"),
        (1, "1s"),
        (1.5, "1.5s"),
        (90, "90s"),
        (600, "10m"),
        (3600, "1h"),
        (90000, "25h"),
        (86400, "1d"),
        (604800, "7d"),
    ],
)
def test_format_duration_uses_the_largest_exact_unit(seconds: float, text: str) -> None:
    """Seconds are shown in the largest unit that divides them exactly."""
    assert format_duration(seconds) == text


@pytest.mark.parametrize("seconds", [0.2, 1.5, 90, 600, 7200, 86400 * 3, 604800 * 2])
def test_format_duration_round_trips_through_parse_duration(seconds: float) -> None:
    """What format_duration writes, parse_duration reads back to the same number of seconds."""
    assert parse_duration(format_duration(seconds)) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (-5, "0s"),
        (0, "0s"),
        (45, "45s"),
        (59.9, "59s"),
        (60, "1m"),
        (12 * 60 + 30, "12m"),
        (2 * 3600 + 5 * 60, "2h 5m"),
        (3 * 86400 + 4 * 3600 + 59, "3d 4h"),
    ],
)
def test_human_age_is_approximate_and_never_negative(seconds: float, text: str) -> None:
    """Ages are rounded down to at most two units and clamp negative values to 0s."""
    assert human_age(seconds) == text


@pytest.mark.parametrize(
    ("fields", "attr", "seconds"),
    [
        ({"prune": {"min_age": "5m"}}, ("prune", "min_age"), 300.0),
        ({"prune": {"min_age": 0}}, ("prune", "min_age"), 0.0),
        ({"quarantine": {"retention": "2d"}}, ("quarantine", "retention"), 172800.0),
        ({"engine": {"release_timeout": "200ms"}}, ("engine", "release_timeout"), 0.2),
        ({"reconcile": {"debounce": "500ms"}}, ("reconcile", "debounce"), 0.5),
        ({"reconcile": {"resync": 90}}, ("reconcile", "resync"), 90.0),
    ],
)
def test_policy_duration_fields_parse_durations(
    fields: dict[str, Any], attr: tuple[str, str], seconds: float
) -> None:
    """Every duration key of the policy takes the duration syntax and stores seconds."""
    policy = make(**fields)
    assert getattr(getattr(policy, attr[0]), attr[1]) == pytest.approx(seconds)


# --- the policy as a whole --------------------------------------------------


def test_defaults_match_the_design() -> None:
    """A policy with only model_dir gets the defaults DESIGN.md §2 documents."""
    policy = make()
    assert policy.model_dir == Path("/srv/models")
    assert policy.state_dir is None
    assert policy.required == []
    assert policy.whitelist == []
    assert policy.prune.prefixes == []
    assert policy.prune.min_age == 600.0
    assert policy.prune.action == "quarantine"
    assert policy.prune.max_per_cycle == 50
    assert policy.prune.max_fraction == 0.5
    assert policy.unmanaged == "report"
    assert policy.suspend is False
    assert policy.ignore == list(DEFAULT_IGNORE) == ["*.part", "*.tmp", "*.download", "*.lock"]
    assert policy.quarantine.retention == 7 * 86400.0
    assert policy.engine.backend == "auto"
    assert policy.engine.runtime_dir is None
    assert policy.engine.release_timeout == 10.0
    assert policy.reconcile.debounce == 2.0
    assert policy.reconcile.resync == 300.0
    assert policy.log.format == "json"
    assert policy.log.level == "info"


def test_the_design_example_validates() -> None:
    """The example policy of DESIGN.md §2 is valid and keeps its values."""
    policy = Policy.model_validate(
        {
            "model_dir": "/var/lib/ocrd/models",
            "state_dir": None,
            "required": [
                {
                    "name": "en_ocr_v1.bin",
                    "sha256": SHA,
                    "source": "/srv/model-mirror/en_ocr_v1.bin",
                },
                {"name": "Qwen2.5-3B-Instruct-Q4_K_M.gguf"},
            ],
            "whitelist": ["*.gguf", "custom_*"],
            "prune": {
                "prefixes": ["old_", "tmp_"],
                "min_age": "10m",
                "action": "quarantine",
                "max_per_cycle": 50,
                "max_fraction": 0.5,
            },
            "unmanaged": "report",
            "suspend": False,
            "ignore": ["*.part", "*.tmp", "*.download", "*.lock"],
            "quarantine": {"retention": "7d"},
            "engine": {"backend": "auto", "runtime_dir": None, "release_timeout": "10s"},
            "reconcile": {"debounce": "2s", "resync": "5m"},
            "log": {"format": "json", "level": "info"},
        }
    )
    assert [r.name for r in policy.required] == [
        "en_ocr_v1.bin",
        "Qwen2.5-3B-Instruct-Q4_K_M.gguf",
    ]
    assert policy.required[0].source == "/srv/model-mirror/en_ocr_v1.bin"
    assert policy.pins() == {"en_ocr_v1.bin": SHA}
    assert policy.prune.prefixes == ["old_", "tmp_"]
    assert policy.reconcile.resync == 300.0
    assert cross_check(policy) == []


def test_model_dir_is_required() -> None:
    """A policy without model_dir is invalid: there is no default directory to manage."""
    found = errors_of({})
    assert [(tuple(e["loc"]), e["type"]) for e in found] == [(("model_dir",), "missing")]


@pytest.mark.parametrize(
    ("data", "loc"),
    [
        ({"model_dir": "/m", "modeldir": "/m"}, ("modeldir",)),
        ({"model_dir": "/m", "prune": {"prefix": ["old_"]}}, ("prune", "prefix")),
        ({"model_dir": "/m", "required": [{"name": "a.bin", "sha": SHA}]}, ("required", 0, "sha")),
        ({"model_dir": "/m", "quarantine": {"retension": "7d"}}, ("quarantine", "retension")),
        ({"model_dir": "/m", "engine": {"backnd": "none"}}, ("engine", "backnd")),
        ({"model_dir": "/m", "reconcile": {"debounse": "2s"}}, ("reconcile", "debounse")),
        ({"model_dir": "/m", "log": {"levl": "info"}}, ("log", "levl")),
    ],
    ids=["top", "prune", "required", "quarantine", "engine", "reconcile", "log"],
)
def test_unknown_keys_are_rejected_at_every_level(
    data: dict[str, Any], loc: tuple[str | int, ...]
) -> None:
    """A misspelt key anywhere is an error at its own key path, never silently ignored."""
    found = errors_of(data)
    assert [(tuple(e["loc"]), e["type"]) for e in found] == [(loc, "extra_forbidden")]


INVALID: list[tuple[str, dict[str, Any], tuple[str | int, ...], str]] = [
    ("model_dir-nul", {"model_dir": "/srv/mo\x00dels"}, ("model_dir",), r"directory path"),
    ("model_dir-empty", {"model_dir": ""}, ("model_dir",), r"directory path"),
    ("state_dir-nul", {"state_dir": "/var/\x00state"}, ("state_dir",), r"directory path"),
    ("prefix-empty", {"prune": {"prefixes": ["old_", ""]}}, ("prune", "prefixes", 1), r"empty"),
    ("prefix-slash", {"prune": {"prefixes": ["old_", "a/b"]}}, ("prune", "prefixes", 1), r"'/'"),
    (
        "prefix-dot",
        {"prune": {"prefixes": [".ocrd"]}},
        ("prune", "prefixes", 0),
        r"starts with '\.'",
    ),
    ("prefix-nul", {"prune": {"prefixes": ["old\x00"]}}, ("prune", "prefixes", 0), r"NUL"),
    ("whitelist-slash", {"whitelist": ["*.gguf", "sub/*"]}, ("whitelist", 1), r"'/'"),
    ("whitelist-empty", {"whitelist": [""]}, ("whitelist", 0), r"empty"),
    ("whitelist-nul", {"whitelist": ["a\x00*"]}, ("whitelist", 0), r"NUL"),
    ("ignore-slash", {"ignore": ["*.part", "*/x"]}, ("ignore", 1), r"'/'"),
    ("ignore-nul", {"ignore": ["\x00"]}, ("ignore", 0), r"NUL"),
    ("name-dot", {"required": [{"name": "."}]}, ("required", 0, "name"), r"not a model name"),
    ("name-dotdot", {"required": [{"name": ".."}]}, ("required", 0, "name"), r"not a model name"),
    ("name-hidden", {"required": [{"name": ".cache"}]}, ("required", 0, "name"), r"starts with"),
    ("name-slash", {"required": [{"name": "a/b.bin"}]}, ("required", 0, "name"), r"'/'"),
    ("name-parent", {"required": [{"name": "../x.bin"}]}, ("required", 0, "name"), r"'/'"),
    ("name-empty", {"required": [{"name": ""}]}, ("required", 0, "name"), r"empty"),
    ("name-nul", {"required": [{"name": "a\x00.bin"}]}, ("required", 0, "name"), r"NUL"),
    ("name-missing", {"required": [{"sha256": SHA}]}, ("required", 0, "name"), r"required"),
    (
        "source-nul",
        {"required": [{"name": "a", "source": "/x\x00"}]},
        ("required", 0, "source"),
        r"NUL",
    ),
    (
        "sha-short",
        {"required": [{"name": "a", "sha256": SHA[:-1]}]},
        ("required", 0, "sha256"),
        r"64 hex",
    ),
    (
        "sha-long",
        {"required": [{"name": "a", "sha256": SHA + "0"}]},
        ("required", 0, "sha256"),
        r"64 hex",
    ),
    (
        "sha-nonhex",
        {"required": [{"name": "a", "sha256": "g" * 64}]},
        ("required", 0, "sha256"),
        r"64 hex",
    ),
    (
        "sha-prefixed",
        {"required": [{"name": "a", "sha256": "sha256:" + SHA}]},
        ("required", 0, "sha256"),
        r"64 hex",
    ),
    ("fraction-0", {"prune": {"max_fraction": 0}}, ("prune", "max_fraction"), r"greater than 0"),
    (
        "fraction-negative",
        {"prune": {"max_fraction": -0.1}},
        ("prune", "max_fraction"),
        r"greater than 0",
    ),
    (
        "fraction-over-1",
        {"prune": {"max_fraction": 1.01}},
        ("prune", "max_fraction"),
        r"less than or equal to 1",
    ),
    (
        "per-cycle-0",
        {"prune": {"max_per_cycle": 0}},
        ("prune", "max_per_cycle"),
        r"greater than or equal to 1",
    ),
    (
        "per-cycle-negative",
        {"prune": {"max_per_cycle": -3}},
        ("prune", "max_per_cycle"),
        r"greater than or equal to 1",
    ),
    (
        "min_age-garbage",
        {"prune": {"min_age": "ten minutes"}},
        ("prune", "min_age"),
        r"expected a duration",
    ),
    ("min_age-bool", {"prune": {"min_age": True}}, ("prune", "min_age"), r"expected a duration"),
    ("min_age-negative", {"prune": {"min_age": -1}}, ("prune", "min_age"), r"negative"),
    (
        "retention-too-long",
        {"quarantine": {"retention": "11000d"}},
        ("quarantine", "retention"),
        r"ten years",
    ),
    ("action", {"prune": {"action": "remove"}}, ("prune", "action"), r"'quarantine' or 'delete'"),
    (
        "action-case",
        {"prune": {"action": "Delete"}},
        ("prune", "action"),
        r"'quarantine' or 'delete'",
    ),
    ("unmanaged", {"unmanaged": "delete"}, ("unmanaged",), r"'report' or 'prune'"),
    (
        "backend",
        {"engine": {"backend": "gpu"}},
        ("engine", "backend"),
        r"'auto', 'aspose' or 'none'",
    ),
    ("log-format", {"log": {"format": "text"}}, ("log", "format"), r"'json' or 'console'"),
    (
        "log-level",
        {"log": {"level": "verbose"}},
        ("log", "level"),
        r"'debug', 'info', 'warning' or 'error'",
    ),
    (
        "log-level-int",
        {"log": {"level": 10}},
        ("log", "level"),
        r"'debug', 'info', 'warning' or 'error'",
    ),
    ("debounce-0", {"reconcile": {"debounce": "0s"}}, ("reconcile", "debounce"), r"longer than 0s"),
    ("resync-0", {"reconcile": {"resync": 0}}, ("reconcile", "resync"), r"longer than 0s"),
    (
        "release_timeout-0",
        {"engine": {"release_timeout": "0ms"}},
        ("engine", "release_timeout"),
        r"longer than 0s",
    ),
    ("suspend", {"suspend": "maybe"}, ("suspend",), r"boolean"),
    ("whitelist-not-list", {"whitelist": "*.gguf"}, ("whitelist",), r"list"),
]


@pytest.mark.parametrize(
    ("fields", "loc", "pattern"),
    [row[1:] for row in INVALID],
    ids=[row[0] for row in INVALID],
)
def test_invalid_values_are_rejected_at_their_key_path(
    fields: dict[str, Any], loc: tuple[str | int, ...], pattern: str
) -> None:
    """Each invalid value fails validation at its own key path with a message saying why."""
    assert_error({"model_dir": "/srv/models", **fields}, loc, pattern)


@pytest.mark.parametrize(
    "fields",
    [
        {"prune": {"max_fraction": 1.0}},
        {"prune": {"max_fraction": 0.01}},
        {"prune": {"max_per_cycle": 1}},
        {"prune": {"min_age": 0}},
        {"prune": {"action": "delete"}},
        {"unmanaged": "prune"},
        {"engine": {"backend": "aspose"}},
        {"engine": {"backend": "none"}},
        {"log": {"format": "console", "level": "warning"}},
        {"whitelist": [".*"]},
        {"required": [{"name": "a..b.bin"}]},
        {"required": [{"name": "Qwen2.5-3B-Instruct-GGUF"}]},
    ],
)
def test_boundary_values_are_accepted(fields: dict[str, Any]) -> None:
    """Values at the edge of the valid range, and every documented enum value, validate."""
    policy = make(**fields)
    for key, value in fields.items():
        got = getattr(policy, key)
        if isinstance(value, dict):
            for sub, expected in value.items():
                assert getattr(got, sub) == expected
        elif key == "required":
            assert [r.name for r in got] == [r["name"] for r in value]
        else:
            assert got == value


@pytest.mark.parametrize("level", ["DEBUG", "Info", "WARNING", "error"])
def test_log_level_is_case_insensitive(level: str) -> None:
    """log.level accepts any case and is stored lower-case."""
    assert make(log={"level": level}).log.level == level.lower()


def test_sha256_uppercase_is_accepted_and_lowercased() -> None:
    """An upper-case (or space-padded) sha256 pin is stored as lower-case hex."""
    policy = make(required=[{"name": "a.bin", "sha256": f"  {SHA.upper()} "}])
    assert policy.required[0].sha256 == SHA
    assert policy.pins() == {"a.bin": SHA}


def test_pins_lists_only_pinned_models() -> None:
    """pins() maps each pinned required name to its hash and leaves unpinned ones out."""
    policy = make(required=[{"name": "a.bin", "sha256": SHA}, {"name": "b.bin"}])
    assert policy.pins() == {"a.bin": SHA}


def test_policy_is_frozen() -> None:
    """A validated policy cannot be changed in place."""
    policy = make()
    with pytest.raises(ValidationError, match=r"frozen"):
        policy.suspend = True


# --- the word checks --------------------------------------------------------


@pytest.mark.parametrize("name", ["en_ocr_v1.bin", "Qwen2.5-3B-Instruct-GGUF", "a..b", "x"])
def test_check_name_accepts_plain_entry_names(name: str) -> None:
    """An ordinary top-level entry name is returned unchanged."""
    assert check_name(name) == name


@pytest.mark.parametrize(
    ("name", "pattern"),
    [
        ("", r"cannot be empty"),
        (".", r"'\.' is not a model name"),
        ("..", r"'\.\.' is not a model name"),
        (".hidden", r"starts with '\.'.*always ignored"),
        ("a/b", r"contains '/'.*top-level"),
        ("/abs", r"contains '/'"),
        ("a\x00b", r"NUL byte"),
    ],
)
def test_check_name_rejects_unsafe_names(name: str, pattern: str) -> None:
    """Empty, dot, slash and NUL names are rejected with the reason."""
    with pytest.raises(ValueError, match=pattern):
        check_name(name)


@pytest.mark.parametrize(
    ("prefix", "pattern"),
    [
        ("", r"prune prefix cannot be empty"),
        ("old/", r"contains '/'"),
        (".ocrd-", r"starts with '\.'.*never pruned"),
        (".", r"starts with '\.'"),
        ("old\x00", r"NUL byte"),
    ],
)
def test_check_prefix_rejects_unsafe_prefixes(prefix: str, pattern: str) -> None:
    """Empty, slash, dot-leading and NUL prefixes are rejected (an empty one would match all)."""
    with pytest.raises(ValueError, match=pattern):
        check_prefix(prefix)


def test_check_prefix_accepts_a_plain_prefix() -> None:
    """An ordinary prefix is returned unchanged."""
    assert check_prefix("old_") == "old_"


@pytest.mark.parametrize(
    ("glob", "pattern"),
    [("", r"glob cannot be empty"), ("*/x", r"contains '/'"), ("*\x00", r"NUL byte")],
)
def test_check_glob_rejects_unsafe_globs(glob: str, pattern: str) -> None:
    """Empty, slash and NUL globs are rejected."""
    with pytest.raises(ValueError, match=pattern):
        check_glob(glob)


@pytest.mark.parametrize("glob", ["*.gguf", "custom_*", "[ab]?.bin", ".*"])
def test_check_glob_accepts_entry_name_globs(glob: str) -> None:
    """Globs on a single entry name are returned unchanged."""
    assert check_glob(glob) == glob


# --- cross_check ------------------------------------------------------------


def test_cross_check_flags_a_duplicate_required_name_at_the_second_entry() -> None:
    """A required name listed twice is blamed on ('required', i, 'name') of the repeat."""
    policy = make(required=[{"name": "a.bin"}, {"name": "b.bin"}, {"name": "a.bin"}])
    found = cross_check(policy)
    assert [loc for loc, _ in found] == [("required", 2, "name")]
    assert re.search(r"'a\.bin' is listed twice", found[0][1])


def test_cross_check_flags_every_repeat_of_a_name() -> None:
    """Each further repeat of a required name is its own finding."""
    policy = make(required=[{"name": "a.bin"}, {"name": "a.bin"}, {"name": "a.bin"}])
    assert [loc for loc, _ in cross_check(policy)] == [
        ("required", 1, "name"),
        ("required", 2, "name"),
    ]


def test_cross_check_treats_names_case_sensitively() -> None:
    """Names differing only in case are different entries on Linux, not duplicates."""
    assert cross_check(make(required=[{"name": "A.bin"}, {"name": "a.bin"}])) == []


@pytest.mark.parametrize(
    ("ignore", "name", "glob"),
    [(None, "model.part", "*.part"), (["*.bin"], "en_ocr_v1.bin", "*.bin")],
    ids=["default-ignore", "custom-ignore"],
)
def test_cross_check_flags_a_required_name_that_is_ignored(
    ignore: list[str] | None, name: str, glob: str
) -> None:
    """A required name that an ignore glob hides could never be checked, so it is an error."""
    fields: dict[str, Any] = {"required": [{"name": "keep.gguf"}, {"name": name}]}
    if ignore is not None:
        fields["ignore"] = ignore
    found = cross_check(make(**fields))
    assert len(found) == 1
    loc, message = found[0]
    assert loc == ("required", 1, "name")
    assert name in message
    assert repr(glob) in message


def test_cross_check_is_empty_for_a_consistent_policy() -> None:
    """Distinct, visible required names give no cross-key errors."""
    policy = make(required=[{"name": "a.bin"}, {"name": "b.gguf"}], ignore=["*.part"])
    assert cross_check(policy) == []


# --- conflicts --------------------------------------------------------------


def test_conflicts_warns_about_a_required_name_under_a_prune_prefix() -> None:
    """A required model whose name starts with a prune prefix is reported as protected."""
    policy = make(required=[{"name": "old_en.bin"}], prune={"prefixes": ["tmp_", "old_"]})
    found = conflicts(policy)
    assert len(found) == 1
    assert re.search(r"required 'old_en\.bin' .*prune prefix 'old_'.*never pruned", found[0])


@pytest.mark.parametrize("glob", ["old_*", "old_keep.bin", "*", "o*", "[o]ld_*"])
def test_conflicts_warns_about_a_whitelist_glob_overlapping_a_prune_prefix(glob: str) -> None:
    """A whitelist glob that matches names starting with a prune prefix is reported."""
    policy = make(whitelist=[glob], prune={"prefixes": ["old_"]})
    found = conflicts(policy)
    assert len(found) == 1
    assert f"whitelist {glob!r}" in found[0]
    assert "prune prefix 'old_'" in found[0]


def test_conflicts_is_empty_when_protections_and_prefixes_are_disjoint() -> None:
    """Protections that share no name with any prune prefix give no warning."""
    policy = make(
        required=[{"name": "en_ocr_v1.bin"}],
        whitelist=["custom_*", "old"],
        prune={"prefixes": ["old_", "tmp_"]},
    )
    assert conflicts(policy) == []


def test_conflicts_are_not_errors() -> None:
    """An overlap is only a warning: the policy still validates and cross_check is clean."""
    policy = make(required=[{"name": "old_en.bin"}], prune={"prefixes": ["old_"]})
    assert conflicts(policy)
    assert cross_check(policy) == []


def test_required_entries_may_be_plain_names() -> None:
    """`required: [en_ocr_v1.bin]` means the same as `- name: en_ocr_v1.bin`."""
    policy = make(required=["en_ocr_v1.bin", {"name": "b.gguf", "sha256": SHA}])
    assert [(r.name, r.sha256) for r in policy.required] == [
        ("en_ocr_v1.bin", None),
        ("b.gguf", SHA),
    ]


def test_a_required_entry_that_is_neither_name_nor_mapping_says_what_it_may_be() -> None:
    """A number as a required entry is an error naming both accepted forms, no class name."""
    assert_error({"required": [42]}, ("required", 0), r"a model name .* or its keys")
    messages = " ".join(e["msg"] for e in errors_of({"model_dir": "/m", "required": [42]}))
    assert "Required" not in messages


def test_a_plain_required_name_is_checked_like_a_name_key() -> None:
    """A plain name with '/' fails at required[0].name as the mapping form would."""
    assert_error({"required": ["a/b.bin"]}, ("required", 0, "name"), r"'/'")


@pytest.mark.parametrize(("prefix", "chars"), [("old_*", "*"), ("v?_", "?"), ("[ab]_", "[")])
def test_a_prefix_with_glob_characters_is_a_warning_pointing_at_whitelist(
    prefix: str, chars: str
) -> None:
    """A prefix with `*?[` is valid but warned about: prefixes are plain starts, not globs."""
    found = prefix_warnings(make(prune={"prefixes": ["old_", prefix]}))
    assert [loc for loc, _ in found] == [("prune", "prefixes", 1)]
    assert f"glob character(s) {chars!r}" in found[0][1]
    assert "plain starts of names, not globs" in found[0][1]
    assert "whitelist" in found[0][1]


def test_plain_prefixes_give_no_warning() -> None:
    """Plain prefixes are what prefixes are for: no warning."""
    assert prefix_warnings(make(prune={"prefixes": ["old_", "tmp-", "2024_"]})) == []
