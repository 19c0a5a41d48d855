"""Loading a policy from real files: paths, defaults, environment overrides and error
messages that name file, line and key (DESIGN.md §2)."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import pytest

from ocrd import config
from ocrd.config import LoadedPolicy, load_policy, policy_path
from ocrd.config.yamlsafe import MAX_BYTES
from ocrd.core.errors import EXIT_USAGE, PolicyError, Problem

SHA = "ab" * 32


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No OCRD_* or systemd state variable leaks in; the default state dir is under tmp_path."""
    for name in list(os.environ):
        if name.upper().startswith("OCRD_"):
            monkeypatch.delenv(name)
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg-state"))


def real(path: Path | str) -> Path:
    """*path* with every symlink resolved."""
    return Path(os.path.realpath(path))


def policy_file(root: Path, text: str | bytes, *, name: str = "policy.yaml") -> Path:
    """A policy file *name* under *root* holding *text*; *root* gets a `models` dir."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "models").mkdir(exist_ok=True)
    path = root / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def where(path: Path, line: int | None, key: str = "") -> str:
    """The start of an error line: `FILE:LINE: KEY: ` as a regex."""
    out = re.escape(str(path))
    if line is not None:
        out += f":{line}"
    out += ": "
    if key:
        out += re.escape(key) + ": "
    return out


def load_error(path: Path) -> PolicyError:
    """The PolicyError that loading *path* raises (fails the test if it loads)."""
    with pytest.raises(PolicyError) as exc:
        load_policy(path)
    return exc.value


def problem_at(error: PolicyError, key: str) -> Problem:
    """The one problem of *error* blamed on *key*."""
    found = [p for p in error.problems if p.key == key]
    assert len(found) == 1, error.problems
    return found[0]


# --- a valid policy ----------------------------------------------------------


def test_a_valid_policy_loads_with_its_path_and_digest(tmp_path: Path) -> None:
    """A valid file loads into a LoadedPolicy with the file's path and the sha256 of its bytes."""
    text = "model_dir: models\nprune:\n  prefixes: [old_]\n  min_age: 5m\n"
    path = policy_file(tmp_path, text)
    loaded = load_policy(path)
    assert isinstance(loaded, LoadedPolicy)
    assert loaded.path == path
    assert loaded.digest == hashlib.sha256(text.encode()).hexdigest()
    assert loaded.policy.prune.prefixes == ["old_"]
    assert loaded.policy.prune.min_age == 300.0


# --- paths ------------------------------------------------------------------


def test_relative_model_dir_is_resolved_against_the_policy_file_not_the_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A relative model_dir means relative to the policy file's directory, wherever ocrd runs."""
    path = policy_file(tmp_path / "conf", "model_dir: models\n")
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "models").mkdir(parents=True)
    monkeypatch.chdir(elsewhere)
    assert load_policy(path).policy.model_dir == real(tmp_path / "conf" / "models")


def test_model_dir_with_dotdot_is_resolved_against_the_policy_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model_dir like ../data/models climbs from the policy file's directory."""
    (tmp_path / "data" / "models").mkdir(parents=True)
    path = policy_file(tmp_path / "conf", "model_dir: ../data/models\n")
    monkeypatch.chdir(tmp_path / "conf" / "models")
    assert load_policy(path).policy.model_dir == real(tmp_path / "data" / "models")


def test_relative_policy_path_is_resolved_against_the_cwd_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A relative --config path names a file from the cwd; model_dir is then relative to it."""
    policy_file(tmp_path / "conf", "model_dir: models\n")
    monkeypatch.chdir(tmp_path)
    loaded = load_policy(Path("conf/policy.yaml"))
    assert loaded.policy.model_dir == real(tmp_path / "conf" / "models")


def test_relative_source_is_resolved_against_the_policy_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A relative required source means relative to the policy file's directory."""
    text = (
        "model_dir: models\n"
        "required:\n"
        "  - name: a.bin\n"
        "    source: ../mirror/a.bin\n"
        "  - name: b.bin\n"
        "    source: /abs/b.bin\n"
        "  - name: c.bin\n"
    )
    path = policy_file(tmp_path / "conf", text)
    (tmp_path / "mirror").mkdir()
    monkeypatch.chdir(tmp_path / "conf" / "models")
    required = load_policy(path).policy.required
    assert [r.source for r in required] == [
        str(real(tmp_path / "mirror" / "a.bin")),
        "/abs/b.bin",
        None,
    ]


def test_relative_state_dir_is_resolved_against_the_policy_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An explicit relative state_dir means relative to the policy file's directory."""
    path = policy_file(tmp_path / "conf", "model_dir: models\nstate_dir: state\n")
    monkeypatch.chdir(tmp_path)
    assert load_policy(path).policy.state_dir == real(tmp_path / "conf" / "state")


def test_model_dir_symlink_is_resolved(tmp_path: Path) -> None:
    """A model_dir that is a symlink is replaced by the directory it points to."""
    target = tmp_path / "disk" / "models"
    target.mkdir(parents=True)
    (tmp_path / "link").symlink_to(target)
    path = policy_file(tmp_path / "conf", f"model_dir: {tmp_path / 'link'}\n")
    assert load_policy(path).policy.model_dir == real(target)


@pytest.mark.parametrize(
    "model_dir",
    ["/", "/etc", "/etc/", "/usr", "/bin", "/boot", "/dev", "/proc", "/sys", "/etc/../etc"],
)
def test_system_directories_are_rejected_as_model_dir(tmp_path: Path, model_dir: str) -> None:
    """model_dir may not be / or a system directory, however it is spelt."""
    path = policy_file(tmp_path, f"# ocrd\nmodel_dir: {model_dir}\n")
    with pytest.raises(PolicyError, match=where(path, 2, "model_dir") + r".*system") as exc:
        load_policy(path)
    assert exc.value.exit_code == EXIT_USAGE == 2
    problem = problem_at(exc.value, "model_dir")
    assert problem.file == str(path)
    assert problem.line == 2
    assert "/var/lib/ocrd/models" in problem.message  # what would be valid


@pytest.mark.parametrize("model_dir", ["/etc/ocrd", "/proc/self", "/dev/shm", "/usr/lib/ocrd"])
def test_directories_inside_system_trees_are_rejected_as_model_dir(
    tmp_path: Path, model_dir: str
) -> None:
    """model_dir may not lie inside a system tree such as /etc, /proc or /dev."""
    path = policy_file(tmp_path, f"model_dir: {model_dir}\n")
    with pytest.raises(
        PolicyError, match=where(path, 1, "model_dir") + r".*system directory"
    ) as exc:
        load_policy(path)
    assert problem_at(exc.value, "model_dir").line == 1


def test_symlink_to_etc_is_rejected_as_model_dir(tmp_path: Path) -> None:
    """A symlink to /etc is judged by its target, not its harmless-looking name."""
    link = tmp_path / "models-link"
    link.symlink_to("/etc")
    path = policy_file(tmp_path, f"model_dir: {link}\n")
    with pytest.raises(
        PolicyError, match=where(path, 1, "model_dir") + r".*resolves to /etc\b"
    ) as exc:
        load_policy(path)
    assert exc.value.exit_code == 2
    assert problem_at(exc.value, "model_dir").line == 1


def test_home_directory_is_rejected_as_model_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The user's home directory may not be the model dir."""
    home = tmp_path / "home" / "alice"
    home.mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    path = policy_file(tmp_path / "conf", "suspend: true\nmodel_dir: ~\n".replace("~", str(home)))
    with pytest.raises(PolicyError, match=where(path, 2, "model_dir") + r".*home") as exc:
        load_policy(path)
    assert problem_at(exc.value, "model_dir").line == 2


def test_a_directory_inside_home_is_allowed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A dedicated directory below the home directory is a fine model dir."""
    home = tmp_path / "home" / "alice"
    (home / "models").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    path = policy_file(tmp_path / "conf", f"model_dir: {home / 'models'}\n")
    assert load_policy(path).policy.model_dir == real(home / "models")


# --- state_dir defaults -------------------------------------------------------


def test_state_dir_defaults_to_systemd_state_directory_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """$STATE_DIRECTORY (the first of a colon list) wins over $XDG_STATE_HOME."""
    monkeypatch.setenv("STATE_DIRECTORY", f"{tmp_path / 'sd1'}:{tmp_path / 'sd2'}")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    path = policy_file(tmp_path, "model_dir: models\n")
    assert load_policy(path).policy.state_dir == real(tmp_path / "sd1")


def test_state_dir_defaults_to_xdg_state_home_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without $STATE_DIRECTORY the state dir is $XDG_STATE_HOME/ocrd."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    path = policy_file(tmp_path, "model_dir: models\n")
    assert load_policy(path).policy.state_dir == real(tmp_path / "xdg" / "ocrd")


def test_state_dir_defaults_to_local_state_under_home_last(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With neither variable set the state dir is ~/.local/state/ocrd."""
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    path = policy_file(tmp_path, "model_dir: models\n")
    expected = real(tmp_path / "home" / ".local" / "state" / "ocrd")
    assert load_policy(path).policy.state_dir == expected


def test_explicit_state_dir_wins_over_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A state_dir in the file is used even when $STATE_DIRECTORY is set."""
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path / "sd"))
    path = policy_file(tmp_path, f"model_dir: models\nstate_dir: {tmp_path / 'mine'}\n")
    assert load_policy(path).policy.state_dir == real(tmp_path / "mine")


@pytest.mark.parametrize("state_dir", ["models", "models/.state", "./models/sub/dir"])
def test_state_dir_inside_model_dir_is_rejected(tmp_path: Path, state_dir: str) -> None:
    """The state dir may be neither the model dir nor inside it."""
    path = policy_file(tmp_path, f"model_dir: models\nstate_dir: {state_dir}\n")
    with pytest.raises(
        PolicyError, match=where(path, 2, "state_dir") + r".*inside model_dir"
    ) as exc:
        load_policy(path)
    assert exc.value.exit_code == 2
    assert problem_at(exc.value, "state_dir").line == 2


def test_state_dir_symlinked_into_model_dir_is_rejected(tmp_path: Path) -> None:
    """A state_dir that is a symlink into the model dir is judged by its target."""
    path = policy_file(tmp_path, "model_dir: models\nstate_dir: state-link\n")
    (tmp_path / "state-link").symlink_to(tmp_path / "models")
    with pytest.raises(PolicyError, match=where(path, 2, "state_dir") + r".*inside model_dir"):
        load_policy(path)


def test_default_state_dir_inside_model_dir_is_rejected_naming_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A $STATE_DIRECTORY inside the model dir is rejected, and the error names $STATE_DIRECTORY."""
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path / "models" / "state"))
    path = policy_file(tmp_path, "model_dir: models\n")
    error = load_error(path)
    problem = problem_at(error, "state_dir")
    assert "inside model_dir" in problem.message
    assert "STATE_DIRECTORY" in str(problem)


# --- environment overrides ------------------------------------------------------


def test_environment_overrides_win_over_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OCRD_LOG__LEVEL, OCRD_PRUNE__MIN_AGE and OCRD_MODEL_DIR replace the file's values only."""
    other = tmp_path / "other-models"
    other.mkdir()
    text = (
        "model_dir: models\n"
        "prune:\n"
        "  prefixes: [old_]\n"
        "  min_age: 1h\n"
        "log:\n"
        "  format: console\n"
        "  level: error\n"
    )
    path = policy_file(tmp_path, text)
    monkeypatch.setenv("OCRD_LOG__LEVEL", "debug")
    monkeypatch.setenv("OCRD_PRUNE__MIN_AGE", "5m")
    monkeypatch.setenv("OCRD_MODEL_DIR", str(other))
    policy = load_policy(path).policy
    assert policy.log.level == "debug"
    assert policy.prune.min_age == 300.0
    assert policy.model_dir == real(other)
    # siblings of an overridden key keep the file's values
    assert policy.log.format == "console"
    assert policy.prune.prefixes == ["old_"]


def test_environment_can_supply_a_key_the_file_lacks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OCRD_MODEL_DIR alone is enough when the file has no model_dir."""
    monkeypatch.setenv("OCRD_MODEL_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("OCRD_LOG__LEVEL", "WARNING")
    path = policy_file(tmp_path, "suspend: true\n")
    policy = load_policy(path).policy
    assert policy.model_dir == real(tmp_path / "models")
    assert policy.log.level == "warning"
    assert policy.suspend is True


def test_non_policy_ocrd_variables_do_not_break_loading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OCRD_CONFIG and OCRD_DEBUG configure the command, not the policy, and are accepted."""
    path = policy_file(tmp_path, "model_dir: models\n")
    monkeypatch.setenv("OCRD_CONFIG", str(path))
    monkeypatch.setenv("OCRD_DEBUG", "1")
    assert load_policy(path).policy.model_dir == real(tmp_path / "models")


def test_environment_json_section_and_nested_keys_merge(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A JSON section and a nested key override merge with the file, the nested key on top."""
    path = policy_file(tmp_path, "model_dir: models\nprune:\n  prefixes: [old_]\n  min_age: 1h\n")
    monkeypatch.setenv("OCRD_PRUNE", '{"action": "delete", "min_age": "2h"}')
    monkeypatch.setenv("ocrd_prune__min_age", "5m")  # names are case-insensitive
    monkeypatch.setenv("OCRD_WHITELIST", '["*.gguf", "keep-*"]')
    policy = load_policy(path).policy
    assert policy.prune.action == "delete"
    assert policy.prune.min_age == 300.0
    assert policy.prune.prefixes == ["old_"]  # from the file
    assert policy.whitelist == ["*.gguf", "keep-*"]


def test_environment_section_that_is_no_mapping_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OCRD_PRUNE must be a JSON object; a nested variable beside it does not hide that."""
    path = policy_file(tmp_path, "model_dir: models\n")
    monkeypatch.setenv("OCRD_PRUNE", '["old_"]')
    monkeypatch.setenv("OCRD_PRUNE__MIN_AGE", "5m")
    with pytest.raises(PolicyError) as exc:
        load_policy(path)
    problem = problem_at(exc.value, "prune")
    assert problem.file == f"{path} (environment OCRD_PRUNE)"


def test_environment_list_that_is_not_json_names_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A list given as plain text is an error naming the variable and showing the JSON form."""
    path = policy_file(tmp_path, "model_dir: models\n")
    monkeypatch.setenv("OCRD_PRUNE__PREFIXES", "old_")
    with pytest.raises(PolicyError) as exc:
        load_policy(path)
    problem = problem_at(exc.value, "prune.prefixes")
    assert problem.file == f"{path} (environment OCRD_PRUNE__PREFIXES)"
    assert "is not valid JSON" in problem.message
    assert "OCRD_WHITELIST='[\"*.gguf\"]'" in problem.message


@pytest.mark.parametrize(
    ("var", "value", "key", "pattern"),
    [
        ("OCRD_LOG__LEVEL", "loud", "log.level", r"'debug', 'info', 'warning' or 'error'"),
        ("OCRD_PRUNE__MIN_AGE", "ten minutes", "prune.min_age", r"expected a duration"),
        ("OCRD_PRUNE__MAX_FRACTION", "0", "prune.max_fraction", r"greater than 0"),
        ("OCRD_PRUNE__PREFIXES", '["old_", ""]', "prune.prefixes[1]", r"cannot be empty"),
        ("OCRD_MODEL_DIR", "/etc", "model_dir", r"system"),
        ("OCRD_SUSPEND", "maybe", "suspend", r"boolean"),
    ],
)
def test_invalid_environment_value_names_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, var: str, value: str, key: str, pattern: str
) -> None:
    """An invalid override is reported against its environment variable, with no file line."""
    path = policy_file(
        tmp_path,
        "model_dir: models\nprune:\n  min_age: 1m\n  prefixes: [old_]\nlog:\n  level: info\n",
    )
    monkeypatch.setenv(var, value)
    expected = re.escape(f"{path} (environment {var}): {key}: ") + ".*" + pattern
    with pytest.raises(PolicyError, match=expected) as exc:
        load_policy(path)
    assert exc.value.exit_code == 2
    problem = problem_at(exc.value, key)
    assert problem.file == f"{path} (environment {var})"
    assert problem.line is None


def test_misspelt_environment_variable_is_rejected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A variable that names a section and then no key of it is an error with the nearest name."""
    path = policy_file(tmp_path, "model_dir: models\n")
    monkeypatch.setenv("OCRD_PRUNE__MIN_AGEE", "5m")
    with pytest.raises(PolicyError, match=r"OCRD_PRUNE__MIN_AGEE") as exc:
        load_policy(path)
    assert exc.value.exit_code == 2
    problem = problem_at(exc.value, "prune.min_agee")
    assert problem.file == f"{path} (environment OCRD_PRUNE__MIN_AGEE)"
    assert "did you mean OCRD_PRUNE__MIN_AGE?" in problem.message


def test_variables_that_name_no_policy_key_are_ignored_and_listed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OCR-D's OCRD_* variables (and any whose first segment names no key) are left alone."""
    path = policy_file(tmp_path, "model_dir: models\n")
    for name in ("OCRD_METS_CACHING", "OCRD_PROFILE", "OCRD_MAX_PARALLEL_PAGES", "OCRD_BIN"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setenv("OCRD_CONFIG", str(path))
    loaded = load_policy(path)
    assert loaded.ignored_env == (
        "OCRD_BIN",
        "OCRD_MAX_PARALLEL_PAGES",
        "OCRD_METS_CACHING",
        "OCRD_PROFILE",
    )  # OCRD_CONFIG is ocrd's own: not listed


@pytest.mark.parametrize(
    ("var", "key", "pattern"),
    [
        (
            "OCRD_MODEL_DIR__X",
            "model_dir.x",
            r"holds one value, not keys; did you mean OCRD_MODEL_DIR\?",
        ),
        ("OCRD_PRUNE__MIN_AGE__X", "prune.min_age.x", r"did you mean OCRD_PRUNE__MIN_AGE\?"),
        (
            "OCRD_WHITELIST__0",
            "whitelist.0",
            r"is a list; set it whole, as JSON, in OCRD_WHITELIST",
        ),
    ],
)
def test_a_variable_below_a_single_value_or_a_list_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, var: str, key: str, pattern: str
) -> None:
    """Keys below a value or a list cannot be set one by one; the message names the variable."""
    path = policy_file(tmp_path, "model_dir: models\n")
    monkeypatch.setenv(var, "1")
    with pytest.raises(PolicyError) as exc:
        load_policy(path)
    problem = problem_at(exc.value, key)
    assert problem.file == f"{path} (environment {var})"
    assert re.search(pattern, problem.message), problem


def test_an_environment_value_replaces_a_misread_file_value(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A base-60 `10:00` in the file is no error when OCRD_PRUNE__MIN_AGE replaces it."""
    path = policy_file(tmp_path, "model_dir: models\nprune:\n  min_age: 10:00\n")
    monkeypatch.setenv("OCRD_PRUNE__MIN_AGE", "5min")
    assert load_policy(path).policy.prune.min_age == 300.0


# --- reading the file -----------------------------------------------------------


def test_missing_policy_file_is_an_error(tmp_path: Path) -> None:
    """A policy path that does not exist is an error, never a fallback to defaults."""
    path = tmp_path / "nope.yaml"
    with pytest.raises(PolicyError, match=where(path, None) + r"policy file not found") as exc:
        load_policy(path)
    assert exc.value.exit_code == 2
    assert exc.value.problems == [
        Problem(str(path), None, "", exc.value.problems[0].message),
    ]
    assert "--config" in exc.value.problems[0].message


def test_directory_as_policy_is_an_error(tmp_path: Path) -> None:
    """A directory given as the policy file is an error that says so."""
    with pytest.raises(PolicyError, match=where(tmp_path, None) + r"is a directory") as exc:
        load_policy(tmp_path)
    assert exc.value.exit_code == 2
    assert len(exc.value.problems) == 1


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_policy_file_is_an_error(tmp_path: Path) -> None:
    """A policy file that cannot be read is an error naming the file and the reason."""
    path = policy_file(tmp_path, "model_dir: models\n")
    path.chmod(0)
    try:
        with pytest.raises(PolicyError, match=where(path, None) + r"cannot read") as exc:
            load_policy(path)
    finally:
        path.chmod(0o644)
    assert exc.value.exit_code == 2


def test_empty_policy_file_still_requires_model_dir(tmp_path: Path) -> None:
    """An empty file is not a valid policy: model_dir is still required."""
    path = policy_file(tmp_path, "")
    with pytest.raises(
        PolicyError, match=re.escape(str(path)) + r"(:\d+)?: model_dir: is required"
    ):
        load_policy(path)


@pytest.mark.parametrize(
    ("text", "kind"), [("- model_dir: models\n", "list"), ("just some words\n", "str")]
)
def test_a_document_that_is_not_a_mapping_is_an_error(tmp_path: Path, text: str, kind: str) -> None:
    """A YAML list or scalar instead of a mapping is an error at line 1."""
    path = policy_file(tmp_path, text)
    with pytest.raises(
        PolicyError, match=where(path, 1) + rf"expected a mapping.*got a {kind}"
    ) as exc:
        load_policy(path)
    assert exc.value.exit_code == 2
    assert [p.line for p in exc.value.problems] == [1]


def test_policy_over_one_mib_is_an_error(tmp_path: Path) -> None:
    """A policy file over 1 MiB is refused."""
    path = policy_file(tmp_path, b"model_dir: models\n" + b"#" * MAX_BYTES)
    with pytest.raises(PolicyError, match=where(path, None) + r".*1 MiB") as exc:
        load_policy(path)
    assert exc.value.exit_code == 2


# --- invalid policies: file, line, key ------------------------------------------------

INVALID: list[tuple[str, str | bytes, int, str, str]] = [
    (
        "unknown-top",
        "model_dir: models\nprnue:\n  prefixes: [old_]\n",
        2,
        "prnue",
        r"unknown key; did you mean 'prune'\? Valid keys here are: model_dir, .*prune",
    ),
    (
        "unknown-nested",
        "model_dir: models\nprune:\n  prefixes: [old_]\n  min_ag: 10m\n",
        4,
        "prune.min_ag",
        r"unknown key; did you mean 'min_age'\? Valid keys here are: .*min_age",
    ),
    (
        "unknown-in-list",
        "model_dir: models\nrequired:\n  - name: a.bin\n    sha: x\n",
        4,
        "required[0].sha",
        r"unknown key\. Valid keys here are: name, sha256, source",
    ),
    (
        "unknown-log",
        "model_dir: models\nlog:\n  levl: debug\n",
        3,
        "log.levl",
        r"unknown key; did you mean 'level'\? Valid keys here are: format, level",
    ),
    (
        "prefix-empty",
        "model_dir: models\nprune:\n  prefixes:\n    - old_\n    - ''\n",
        5,
        "prune.prefixes[1]",
        r"cannot be empty",
    ),
    (
        "prefix-slash",
        "model_dir: models\nprune:\n  prefixes: [old_, tmp/]\n",
        3,
        "prune.prefixes[1]",
        r"contains '/'",
    ),
    (
        "prefix-dot",
        "model_dir: models\nprune:\n  prefixes:\n    - .ocrd\n",
        4,
        "prune.prefixes[0]",
        r"starts with '\.'",
    ),
    (
        "prefix-nul",
        'model_dir: models\nprune:\n  prefixes: ["a\\0"]\n',
        3,
        "prune.prefixes[0]",
        r"NUL byte",
    ),
    (
        "whitelist-slash",
        "model_dir: models\nwhitelist:\n  - '*.gguf'\n  - 'sub/*'\n",
        4,
        "whitelist[1]",
        r"contains '/'",
    ),
    ("ignore-slash", "model_dir: models\nignore: ['*/x']\n", 2, "ignore[0]", r"contains '/'"),
    (
        "name-dotdot",
        "model_dir: models\nrequired:\n  - name: '..'\n",
        3,
        "required[0].name",
        r"not a model name",
    ),
    (
        "name-slash",
        "model_dir: models\nrequired:\n  - name: a.bin\n  - name: sub/b.bin\n",
        4,
        "required[1].name",
        r"contains '/'",
    ),
    (
        "name-nul",
        'model_dir: models\nrequired:\n  - name: "a\\0b"\n',
        3,
        "required[0].name",
        r"NUL byte",
    ),
    (
        "sha-short",
        "model_dir: models\nrequired:\n  - name: a.bin\n    sha256: abc123\n",
        4,
        "required[0].sha256",
        r"64 hex digits",
    ),
    (
        "min_age",
        "model_dir: models\nprune:\n  min_age: ten minutes\n",
        3,
        "prune.min_age",
        r"expected a duration like '90s', '10m'.*got 'ten minutes'",
    ),
    (
        "retention",
        "model_dir: models\nquarantine:\n  retention: 20000d\n",
        3,
        "quarantine.retention",
        r"longer than ten years",
    ),
    (
        "max_fraction",
        "model_dir: models\nprune:\n  max_fraction: 1.5\n",
        3,
        "prune.max_fraction",
        r"less than or equal to 1",
    ),
    (
        "max_per_cycle",
        "model_dir: models\nprune:\n  max_per_cycle: 0\n",
        3,
        "prune.max_per_cycle",
        r"greater than or equal to 1",
    ),
    (
        "action",
        "model_dir: models\nprune:\n  action: remove\n",
        3,
        "prune.action",
        r"'quarantine' or 'delete'",
    ),
    ("unmanaged", "model_dir: models\nunmanaged: delete\n", 2, "unmanaged", r"'report' or 'prune'"),
    (
        "backend",
        "model_dir: models\nengine:\n  backend: gpu\n",
        3,
        "engine.backend",
        r"'auto', 'aspose' or 'none'",
    ),
    (
        "release_timeout",
        "model_dir: models\nengine:\n  release_timeout: 0s\n",
        3,
        "engine.release_timeout",
        r"longer than 0s",
    ),
    (
        "debounce",
        "model_dir: models\nreconcile:\n  debounce: 0\n",
        3,
        "reconcile.debounce",
        r"longer than 0s",
    ),
    (
        "log-level",
        "model_dir: models\nlog:\n  level: loud\n",
        3,
        "log.level",
        r"'debug', 'info', 'warning' or 'error'",
    ),
    (
        "duplicate-required",
        "model_dir: models\nrequired:\n  - name: a.bin\n  - name: a.bin\n",
        4,
        "required[1].name",
        r"'a\.bin' is listed twice",
    ),
    (
        "required-ignored",
        "model_dir: models\nrequired:\n  - name: model.part\n",
        3,
        "required[0].name",
        r"matches ignore glob '\*\.part'",
    ),
    (
        "yaml-anchor",
        "model_dir: models\nprune: &p\n  min_age: 1m\n",
        2,
        "prune",
        r"anchor '&p' is not allowed",
    ),
    (
        "yaml-alias",
        "model_dir: models\nwhitelist:\n  - *g\n",
        3,
        "whitelist[0]",
        r"alias '\*g' is not allowed",
    ),
    (
        "yaml-tag",
        "model_dir: models\nsuspend: !!python/object/apply:os.system [id]\n",
        2,
        "suspend",
        r"tag .*python/object/apply.* is not allowed",
    ),
    (
        "yaml-duplicate",
        "model_dir: models\nsuspend: false\nmodel_dir: /srv\n",
        3,
        "model_dir",
        r"duplicate key 'model_dir'",
    ),
    (
        "yaml-not-utf8",
        b"model_dir: models\nrequired:\n  - name: caf\xe9.bin\n",
        3,
        "",
        r"not UTF-8",
    ),
    ("yaml-syntax", "model_dir: models\nwhitelist: [a, b\n", 2, "", r"invalid YAML: a list opened"),
    ("yaml-int-key", "model_dir: models\n10: x\n", 2, "", r"key 10 must be a word"),
]


@pytest.mark.parametrize(
    ("text", "line", "key", "pattern"),
    [row[1:] for row in INVALID],
    ids=[row[0] for row in INVALID],
)
def test_invalid_policy_error_names_file_line_and_key(
    tmp_path: Path, text: str | bytes, line: int, key: str, pattern: str
) -> None:
    """Each invalid policy fails with exit code 2 and a message naming file, line and key path."""
    path = policy_file(tmp_path, text)
    with pytest.raises(PolicyError, match=where(path, line, key) + ".*" + pattern) as exc:
        load_policy(path)
    assert exc.value.exit_code == 2
    problems = [p for p in exc.value.problems if p.key == key]
    assert len(problems) == 1, exc.value.problems
    assert problems[0].file == str(path)
    assert problems[0].line == line
    assert "ocrd check" in problems[0].message  # says how to fix


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    """Several invalid keys give one problem each, in one error, one line per problem."""
    text = (
        "model_dir: models\nprune:\n  prefixes: [old_, '']\n  min_age: soon\nlog:\n  level: loud\n"
    )
    path = policy_file(tmp_path, text)
    error = load_error(path)
    assert [(p.line, p.key) for p in error.problems] == [
        (3, "prune.prefixes[1]"),
        (4, "prune.min_age"),
        (6, "log.level"),
    ]
    assert str(error).splitlines() == [str(p) for p in error.problems]


def test_a_rejected_policy_does_not_touch_the_model_dir(tmp_path: Path) -> None:
    """Loading, valid or not, only reads: nothing is created in the model dir."""
    path = policy_file(tmp_path, "model_dir: models\nprune:\n  min_age: nope\n")
    load_error(path)
    path.write_text("model_dir: models\n", encoding="utf-8")
    load_policy(path)
    assert list((tmp_path / "models").iterdir()) == []


# --- which file ----------------------------------------------------------------------


def test_policy_path_prefers_the_config_option(monkeypatch: pytest.MonkeyPatch) -> None:
    """--config wins over $OCRD_CONFIG."""
    monkeypatch.setenv("OCRD_CONFIG", "/from/env.yaml")
    assert policy_path("/from/cli.yaml") == Path("/from/cli.yaml")
    assert policy_path(Path("rel/cli.yaml")) == Path("rel/cli.yaml")


def test_policy_path_falls_back_to_ocrd_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --config the path comes from $OCRD_CONFIG."""
    monkeypatch.setenv("OCRD_CONFIG", "/from/env.yaml")
    assert policy_path(None) == Path("/from/env.yaml")


@pytest.mark.parametrize("env_value", [None, ""])
def test_policy_path_defaults_to_etc(
    monkeypatch: pytest.MonkeyPatch, env_value: str | None
) -> None:
    """Without --config or a non-empty $OCRD_CONFIG the path is /etc/ocrd/policy.yaml."""
    if env_value is not None:
        monkeypatch.setenv("OCRD_CONFIG", env_value)
    assert policy_path(None) == Path("/etc/ocrd/policy.yaml") == config.DEFAULT_PATH
