"""Writing a policy through the real CLI: settings from pydantic-settings (environment over
the file), the OCR-D framework's OCRD_* variables left alone, messages that say how YAML
read a value and what was meant, friendlier spellings, and the JSON Schema for editors.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import jsonschema
import pytest
import yaml

from tests.support.cli import Result
from tests.support.files import make_model

Run = Callable[..., Result]
ROOT = Path(__file__).resolve().parent.parent.parent
SCHEMA_FILE = ROOT / "policy.schema.json"
EXAMPLE = ROOT / "config.example.yaml"

# The documented variables of the OCR-D framework (its command is also `ocrd`), which runs
# on the very servers ocrd is for; and a shell's OCRD_BIN.
OCRD_FRAMEWORK_ENV = {
    "OCRD_METS_CACHING": "true",
    "OCRD_MAX_PROCESSOR_CACHE": "128",
    "OCRD_PROFILE": "CPU",
    "OCRD_PROFILE_FILE": "/tmp/ocrd.prof",
    "OCRD_DOWNLOAD_RETRIES": "3",
    "OCRD_DOWNLOAD_TIMEOUT": "30",
    "OCRD_MISSING_OUTPUT": "SKIP",
    "OCRD_EXISTING_OUTPUT": "OVERWRITE",
    "OCRD_MAX_PARALLEL_PAGES": "4",
    "OCRD_PROCESSING_PAGE_TIMEOUT": "60",
    "OCRD_NETWORK_SOCKETS_ROOT_DIR": "/tmp/ocrd-sockets",
    "OCRD_LOGGING_DEBUG": "0",
    "OCRD_BIN": "/usr/local/bin/ocrd",
}

# Names of ocrd's own classes (and pydantic's) that no message may show a user.
INTERNAL_NAMES = re.compile(
    r"\b(Required|RequiredEntry|Prune|Quarantine|EngineSettings|Reconcile|Log|Policy"
    r"|PolicySettings|PositiveDuration|Duration|Prefix|Glob|NoneType|ValidationError"
    r"|SettingsError|PolicyEnvSource|PolicyFileSource|EnvSettingsSource|Loc|Scalar)\b"
    r"|<block|<class|dictionary or instance"
)


def head(models: Path) -> str:
    return f"model_dir: {models}\nengine: {{backend: none}}\n"


def check(run_ocrd: Run, policy: Path, text: str, **env: str) -> Result:
    """`ocrd --config POLICY check` on *text*, with *env* added."""
    policy.write_text(text, encoding="utf-8")
    return run_ocrd("--config", policy, "check", extra_env=env)


def one_error(r: Result) -> str:
    """The one `ocrd: error:` line of a run that exited 2."""
    assert r.code == 2, r
    assert "Traceback" not in r.err, r
    lines = r.err.splitlines()
    assert len(lines) == 1, r
    assert lines[0].startswith("ocrd: error: "), r
    return lines[0]


# -- 1. pydantic-settings: the environment over the file ---------------------------------


def test_environment_wins_over_the_file_key_by_key(
    run_ocrd: Run, policy: Path, models: Path
) -> None:
    """OCRD_PRUNE__MIN_AGE replaces the file's min_age; the file's prefixes stay (plan shows)."""
    make_model(models, "old_a.bin", age=2 * 3600)
    policy.write_text(
        head(models) + "prune:\n  prefixes: [old_]\n  min_age: 1d\n  max_fraction: 1\n"
    )
    waiting = run_ocrd("--config", policy, "plan", "--json")
    assert [a["model"] for a in waiting.json()["actions"]] == [], waiting
    r = run_ocrd(
        "--config", policy, "plan", "--json", extra_env={"OCRD_PRUNE__MIN_AGE": "1h 30min"}
    )
    assert r.code == 0, r
    assert [a["model"] for a in r.json()["actions"]] == ["old_a.bin"]


def test_an_invalid_environment_value_names_its_variable(
    run_ocrd: Run, policy: Path, models: Path
) -> None:
    """A bad value from OCRD_X says "environment OCRD_X" and the key path, no line."""
    line = one_error(check(run_ocrd, policy, head(models), OCRD_RECONCILE__RESYNC="soon"))
    assert line.startswith(f"ocrd: error: {policy} (environment OCRD_RECONCILE__RESYNC): ")
    assert "reconcile.resync: expected a duration like" in line


# -- 2. unrelated OCRD_* variables never stop ocrd ----------------------------------------


def test_the_ocr_d_frameworks_variables_do_not_stop_ocrd(
    run_ocrd: Run, policy: Path, models: Path
) -> None:
    """With OCR-D's OCRD_* set, check, plan and list work, and check lists each as ignored."""
    policy.write_text(head(models))
    r = run_ocrd("--config", policy, "check", extra_env=OCRD_FRAMEWORK_ENV)
    assert r.code == 0, r
    assert r.err == ""
    info = [line for line in r.out.splitlines() if line.startswith("info: ")]
    assert info == [
        f"info: ignored environment variable {name}: it names no policy key "
        "(left to other programs, such as OCR-D)"
        for name in sorted(OCRD_FRAMEWORK_ENV)
    ], r
    for command in (("plan",), ("list",), ("apply", "--dry-run")):
        r = run_ocrd("--config", policy, *command, extra_env=OCRD_FRAMEWORK_ENV)
        assert r.code == 0, (command, r)


def test_an_ignored_variable_close_to_a_policy_key_gets_a_hint(
    run_ocrd: Run, policy: Path, models: Path
) -> None:
    """OCRD_LOG_LEVEL (one underscore) is ignored; check's info line suggests OCRD_LOG__LEVEL."""
    r = check(run_ocrd, policy, head(models), OCRD_LOG_LEVEL="debug")
    assert r.code == 0, r
    assert (
        "info: ignored environment variable OCRD_LOG_LEVEL: it names no policy key "
        "(left to other programs, such as OCR-D); did you mean OCRD_LOG__LEVEL?"
    ) in r.out.splitlines()


def test_ocrds_own_variables_are_not_listed_as_ignored(
    run_ocrd: Run, policy: Path, models: Path
) -> None:
    """OCRD_CONFIG and OCRD_DEBUG configure the command: used, never 'ignored'."""
    policy.write_text(head(models))
    r = run_ocrd("check", extra_env={"OCRD_CONFIG": str(policy), "OCRD_DEBUG": "0"})
    assert r.code == 0, r
    assert "info:" not in r.out


def test_a_section_variable_naming_no_key_is_an_error_with_the_nearest_name(
    run_ocrd: Run, policy: Path, models: Path
) -> None:
    """OCRD_PRUNE__MIN_AGES names the prune section, then no key: exit 2, did you mean."""
    line = one_error(check(run_ocrd, policy, head(models), OCRD_PRUNE__MIN_AGES="1h"))
    assert line == (
        f"ocrd: error: {policy} (environment OCRD_PRUNE__MIN_AGES): prune.min_ages: names no "
        "key of 'prune:'; did you mean OCRD_PRUNE__MIN_AGE? Fix it, then run `ocrd check`."
    )


def test_a_variable_below_a_single_value_is_an_error(
    run_ocrd: Run, policy: Path, models: Path
) -> None:
    """OCRD_LOG__LEVEL__X goes below a key that holds one value: exit 2, the right name."""
    line = one_error(check(run_ocrd, policy, head(models), OCRD_LOG__LEVEL__X="debug"))
    assert "(environment OCRD_LOG__LEVEL__X): log.level.x: 'log.level' holds one value" in line
    assert "did you mean OCRD_LOG__LEVEL?" in line


# -- 3. messages that teach -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "where", "fragment"),
    [
        (
            "prune:\n  prefixes: [old_, 2024_]\n",
            ":4: prune.prefixes[1]: ",
            'expected text, but YAML read `2024_` as the number 2024; quote it: "2024_"',
        ),
        (
            "prune:\n  prefixes: [old_, no]\n",
            ":4: prune.prefixes[1]: ",
            'expected text, but YAML read `no` as the boolean false; quote it: "no"',
        ),
        (
            "prune:\n  min_age: 10:00\n",
            ":4: prune.min_age: ",
            "expected a duration, but YAML read `10:00` as the base-60 number 600; "
            "write it with a unit, e.g. 10min or 10h",
        ),
        (
            "required:\n  - name: 2024-01-01\n",
            ":4: required[0].name: ",
            'YAML read `2024-01-01` as the date 2024-01-01; quote it: "2024-01-01"',
        ),
        (
            "min_age: 10m\n",
            ":3: min_age: ",
            "unknown key here; 'min_age' belongs under 'prune:'. Valid keys here are: model_dir,",
        ),
        (
            "prune:\n  min_agee: 10m\n",
            ":4: prune.min_agee: ",
            "unknown key; did you mean 'min_age'? Valid keys here are: prefixes, min_age,",
        ),
        (
            "prune:\n  prefixes: [old_]\n    min_age: 10m\n",
            ":5: ",
            "invalid YAML: this key is indented differently from the keys above it",
        ),
        (
            "prune: [old_]\n",
            ":3: prune: ",
            "expected a mapping of keys (key: value lines), got a list",
        ),
        (
            "required:\n  - [en_ocr_v1.bin]\n",
            ":4: required[0]: ",
            "expected a model name (- en_ocr_v1.bin) or its keys (- name: en_ocr_v1.bin",
        ),
    ],
    ids=[
        "int-with-underscore",
        "boolean",
        "base-60",
        "date",
        "misplaced-key",
        "typo",
        "over-indented",
        "section-a-list",
        "required-a-list",
    ],
)
def test_messages_say_what_yaml_read_and_how_to_fix_it(
    run_ocrd: Run, policy: Path, models: Path, body: str, where: str, fragment: str
) -> None:
    """Each mistake of a new user gives one line: file:line, key path, what and how to fix."""
    line = one_error(check(run_ocrd, policy, head(models) + body))
    assert line.startswith(f"ocrd: error: {policy}{where}"), line
    assert fragment in line, line
    assert line.endswith("Fix it, then run `ocrd check`."), line


def test_a_prefix_with_glob_characters_is_a_warning_pointing_at_whitelist(
    run_ocrd: Run, policy: Path, models: Path
) -> None:
    """`prefixes: ["old_*"]` is valid but matches only names starting with 'old_*': warned."""
    r = check(run_ocrd, policy, head(models) + 'prune:\n  prefixes: ["old_*"]\n')
    assert r.code == 0, r
    warnings = [line for line in r.out.splitlines() if "prune.prefixes[0]" in line]
    assert warnings == [
        f"warning: {policy}:4: prune.prefixes[0]: 'old_*' contains the glob character(s) '*', "
        "but prefixes are plain starts of names, not globs: it matches only names that begin "
        "with 'old_*' itself. Write the plain start ('old_') here; globs belong in whitelist "
        "(never touched) and ignore"
    ], r


BAD_INPUTS: list[tuple[str, dict[str, str]]] = [
    ("required: [42]\n", {}),
    ("required:\n  - [a]\n", {}),
    ("required: {name: a}\n", {}),
    ("required:\n  - name: a\n    sha: x\n", {}),
    ("prune: [old_]\n", {}),
    ("prune: old_\n", {}),
    ("prune:\n  min_age: ~\n", {}),
    ("prune:\n  min_age:\n", {}),
    ("prune:\n  min_age: [1]\n", {}),
    ("prune:\n  min_age: {a: 1}\n", {}),
    ("prune:\n  prefixes: [~]\n", {}),
    ("prune:\n  prefixes: old_\n", {}),
    ("prune:\n  max_per_cycle: [1]\n", {}),
    ("prune:\n  max_fraction: yes\n", {}),
    ("prune:\n  max_per_cycle: on\n", {}),
    ("quarantine: 7d\n", {}),
    ("engine:\n  backend: none\n  release_timeout: 0\n", {}),
    ("engine:\n  backend: none\n  runtime_dir: [a]\n", {}),
    ("reconcile:\n  debounce: 2024-01-01\n", {}),
    ("log: debug\n", {}),
    ("state_dir: 5\n", {}),
    ("whitelist: {a: b}\n", {}),
    ("", {"OCRD_PRUNE": '["old_"]'}),
    ("", {"OCRD_PRUNE": "{"}),
    ("", {"OCRD_REQUIRED": "[42]"}),
    ("", {"OCRD_REQUIRED": '[{"nam": "a"}]'}),
    ("", {"OCRD_PRUNE__MIN_AGE": "[1]"}),
    ("", {"OCRD_ENGINE__RELEASE_TIMEOUT": "0"}),
    ("", {"OCRD_WHITELIST": "*.gguf"}),
    ("", {"OCRD_SUSPEND": "maybe"}),
]


@pytest.mark.parametrize(("body", "env"), BAD_INPUTS)
def test_no_message_shows_an_internal_class_name(
    run_ocrd: Run, policy: Path, models: Path, body: str, env: dict[str, str]
) -> None:
    """Whatever the mistake, the messages speak of keys and values, never of our classes."""
    start = f"model_dir: {models}\n" if body.startswith("engine:") else head(models)
    r = check(run_ocrd, policy, start + body, **env)
    assert r.code == 2, r
    assert "Traceback" not in r.err and "internal error" not in r.err, r
    assert not INTERNAL_NAMES.search(r.err), r.err
    assert all(line.startswith("ocrd: error: ") for line in r.err.splitlines()), r


# -- 4. friendlier spellings, still strict --------------------------------------------------


def test_required_entries_may_be_plain_names(run_ocrd: Run, policy: Path, models: Path) -> None:
    """`required: [en_ocr_v1.bin]` is valid; list shows the model missing by that name."""
    policy.write_text(head(models) + "required: [en_ocr_v1.bin]\n")
    assert check(run_ocrd, policy, policy.read_text()).code == 0
    r = run_ocrd("--config", policy, "list", "--json")
    assert [(m["name"], m["class"]) for m in r.json()["models"]] == [
        ("en_ocr_v1.bin", "missing")
    ], r


@pytest.mark.parametrize("span", ["10min", "1h 30min", "2 d", "500ms", "90s", "7d", "45"])
def test_durations_take_systemd_time_spans(
    run_ocrd: Run, policy: Path, models: Path, span: str
) -> None:
    """systemd's spellings and today's forms are accepted, in the file and the environment."""
    assert check(run_ocrd, policy, head(models) + f"prune:\n  min_age: {span}\n").code == 0
    r = check(run_ocrd, policy, head(models), OCRD_QUARANTINE__RETENTION=span)
    assert r.code == 0, r


@pytest.mark.parametrize(
    ("span", "fragment"),
    [
        ("ten minutes", "got 'ten minutes'"),
        ("10M", "'M' means months in systemd but minutes to many"),
        ("1h 30", "got '1h 30'"),
        ("-5m", "got '-5m'"),
    ],
)
def test_other_duration_spellings_stay_errors(
    run_ocrd: Run, policy: Path, models: Path, span: str, fragment: str
) -> None:
    """Anything that is neither a systemd time span nor plain seconds is an error."""
    line = one_error(check(run_ocrd, policy, head(models) + f'prune:\n  min_age: "{span}"\n'))
    assert "prune.min_age: expected a duration like '90s', '10m', '1h 30min' or '7d'" in line
    assert fragment in line


# -- 5. editors validate the policy ---------------------------------------------------------


def test_ocrd_schema_prints_the_committed_schema_file(run_ocrd: Run) -> None:
    """`ocrd schema` prints policy.schema.json as committed (regenerate it if this fails)."""
    r = run_ocrd("schema")
    assert r.code == 0, r
    assert r.out == SCHEMA_FILE.read_text(encoding="utf-8"), (
        "policy.schema.json is stale: run `ocrd schema > policy.schema.json`"
    )


def test_the_schema_has_descriptions_and_defaults() -> None:
    """The generated schema documents keys with descriptions and defaults, and forbids others."""
    schema = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["required"] == ["model_dir"]
    assert schema["additionalProperties"] is False
    prune = schema["$defs"]["Prune"]["properties"]
    assert prune["min_age"]["default"] == 600.0
    assert prune["min_age"]["description"]
    assert prune["action"]["default"] == "quarantine"


def test_the_example_starts_with_the_schema_comment() -> None:
    """config.example.yaml tells the YAML language server where its schema is."""
    first = EXAMPLE.read_text(encoding="utf-8").splitlines()[0]
    assert first == "# yaml-language-server: $schema=./policy.schema.json"


def _validator() -> jsonschema.protocols.Validator:
    schema = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def test_the_example_validates_against_the_schema() -> None:
    """A real JSON Schema validator accepts config.example.yaml."""
    _validator().validate(yaml.safe_load(EXAMPLE.read_text(encoding="utf-8")))


@pytest.mark.parametrize(
    "doc",
    [
        {"model_dir": "/m", "required": ["en_ocr_v1.bin"]},
        {"model_dir": "/m", "prune": {"min_age": "1h 30min"}, "quarantine": {"retention": 60}},
        {"model_dir": "/m", "reconcile": {"debounce": "500ms", "resync": "2 d"}},
    ],
)
def test_the_schema_accepts_the_friendlier_spellings(doc: dict[str, object]) -> None:
    """Plain required names and systemd spans pass the schema as they pass ocrd."""
    _validator().validate(doc)


@pytest.mark.parametrize(
    "doc",
    [
        {"prune": {}},
        {"model_dir": "/m", "prunes": {}},
        {"model_dir": "/m", "prune": {"min_age": "ten minutes"}},
        {"model_dir": "/m", "prune": {"action": "shred"}},
        {"model_dir": "/m", "required": [42]},
    ],
)
def test_the_schema_rejects_what_ocrd_rejects(doc: dict[str, object]) -> None:
    """A missing model_dir, an unknown key, a bad duration or choice fail the schema too."""
    assert list(_validator().iter_errors(doc))
