"""The README and config.example.yaml tell the truth about the code."""

from __future__ import annotations

import re
import typing
from pathlib import Path
from typing import Any

import click
import pytest
import yaml
from pydantic import BaseModel

from ocrd import cli
from ocrd.checks import run_checks
from ocrd.config import load_policy
from ocrd.core.policy import Policy

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
EXAMPLE = ROOT / "config.example.yaml"


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside an annotation like `list[Required]` or `Prune`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_of(arg)
        if found is not None:
            return found
    return None


def _key_paths(model: type[BaseModel], prefix: str = "") -> list[str]:
    paths = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        inner = _model_of(field.annotation)
        is_list = typing.get_origin(field.annotation) is list
        if inner is None:
            paths.append(path)
        else:
            if is_list:
                paths.append(path)
            paths += _key_paths(inner, f"{path}[]." if is_list else f"{path}.")
    return paths


POLICY_KEYS = _key_paths(Policy)


def _yaml_blocks(text: str) -> list[str]:
    return re.findall(r"```yaml\n(.*?)```", text, flags=re.S)


@pytest.mark.parametrize("key", POLICY_KEYS)
def test_every_policy_key_is_in_the_readme_reference(key: str) -> None:
    """Each key path of the policy model has a row in the README's policy reference."""
    assert f"| `{key}` |" in README, f"README policy reference lacks `{key}`"


def test_readme_reference_has_no_stale_keys() -> None:
    """Every key the README's reference table documents exists in the policy model."""
    section = README.split("## Policy reference", 1)[1].split("\n## ", 1)[0]
    documented = re.findall(r"^\| `([a-z_.\[\]]+)` \|", section, flags=re.M)
    assert documented, "no reference table found"
    assert sorted(set(documented) - set(POLICY_KEYS)) == []


def _flatten(data: Any, prefix: str = "") -> set[str]:
    keys: set[str] = set()
    if isinstance(data, dict):
        for key, value in data.items():
            path = f"{prefix}{key}"
            keys.add(path)
            keys |= _flatten(value, f"{path}.")
    elif isinstance(data, list):
        for item in data:
            if isinstance(item, dict):
                keys |= _flatten(item, prefix[:-1] + "[].")
    return keys


def test_example_config_sets_every_key() -> None:
    """config.example.yaml shows (and so documents) every key of the policy."""
    data = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    assert sorted(set(POLICY_KEYS) - _flatten(data)) == []


def test_example_config_is_accepted_by_check() -> None:
    """config.example.yaml loads and `ocrd check` finds no error in it."""
    loaded = load_policy(EXAMPLE)
    errors = [text for level, text in run_checks(loaded) if level == "error"]
    assert errors == []
    assert loaded.policy.model_dir == ROOT / "tests" / "fixtures" / "models"


@pytest.mark.parametrize("block", _yaml_blocks(README))
def test_every_readme_policy_block_validates(block: str, tmp_path: Path) -> None:
    """Each YAML block in the README is a valid policy."""
    path = tmp_path / "policy.yaml"
    path.write_text(block, encoding="utf-8")
    assert load_policy(path).policy.model_dir.is_absolute()


def _events_in_code() -> set[str]:
    pattern = re.compile(
        r"(?:\.(?:debug|info|warning|error|exception)\(|_warn\(|_emit\()"
        r"\s*(?:\"[a-z]+\",\s*)?\"([a-z_]+\.[a-z_.]+)\"",
        re.S,
    )
    found: set[str] = set()
    for path in (ROOT / "ocrd").rglob("*.py"):
        found |= set(pattern.findall(path.read_text(encoding="utf-8")))
    return found


def test_every_log_event_is_in_the_readme() -> None:
    """Each event name the code logs has a row in the README's log table."""
    events = _events_in_code()
    assert len(events) > 10
    missing = sorted(e for e in events if f"| `{e}` |" not in README)
    assert missing == []


def test_readme_lists_no_event_the_code_never_logs() -> None:
    """The README's log table has no event the code does not emit."""
    section = README.split("## Logs", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `([a-z_]+\.[a-z_.]+)` \|", section, flags=re.M))
    assert sorted(documented - _events_in_code()) == []


def _commands(group: click.Group, prefix: str = "ocrd") -> list[str]:
    out = []
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            out += _commands(command, f"{prefix} {name}")
        else:
            out.append(f"{prefix} {name}")
    return out


@pytest.mark.parametrize("command", _commands(cli.cli))
def test_every_command_is_in_the_readme(command: str) -> None:
    """Each CLI subcommand appears in the README's command table."""
    assert f"| `{command}" in README


def test_ci_runs_the_readme_test_command() -> None:
    """.ci/run installs and runs tests with the command the README prints."""
    section = README.split("## Running the tests", 1)[1]
    command = re.search(r"```sh\n(.*?)\n```", section, flags=re.S)
    assert command is not None
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    for part in command.group(1).split(" && "):
        tool = part.split()[0]
        if tool.startswith("python3"):
            continue  # .ci/run makes the venv with --clear
        assert part in ci, f".ci/run does not run `{part}`"
