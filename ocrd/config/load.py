"""Load a policy: the file (read safely), environment overrides, and paths
resolved against the disk. Every error names file, line, key and a fix.

pydantic-settings reads the environment over the file (config/settings.py); this module
reads the file, turns every error into a Problem (config/messages.py) and resolves paths.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from pydantic_settings import SettingsError

from ocrd.config import settings, yamlsafe
from ocrd.config.messages import FIX, Origins, key_path, misread, pydantic_message, variable_shape
from ocrd.core.errors import PolicyError, Problem
from ocrd.core.policy import Loc, Policy, Required, cross_check, prefix_warnings
from ocrd.core.sources import SourceKind, parse_source
from ocrd.openfile import NotRegularError, read_regular

DEFAULT_PATH = Path("/etc/ocrd/policy.yaml")

# model_dir may be none of these, nor below the second group (pseudo or system trees).
FORBIDDEN_EXACT = frozenset(
    [
        "/",
        "/etc",
        "/usr",
        "/bin",
        "/sbin",
        "/lib",
        "/lib32",
        "/lib64",
        "/boot",
        "/dev",
        "/proc",
        "/sys",
        "/run",
        "/var",
        "/var/lib",
        "/home",
        "/root",
        "/tmp",  # noqa: S108 - a value model_dir may not take, not a temp file
        "/opt",
        "/srv",
        "/usr/bin",
        "/usr/lib",
        "/usr/sbin",
        "/usr/local",
    ]
)
FORBIDDEN_TREES = (
    "/proc",
    "/sys",
    "/dev",
    "/boot",
    "/etc",
    "/bin",
    "/sbin",
    "/lib",
    "/usr/bin",
    "/usr/sbin",
    "/usr/lib",
)


@dataclass(frozen=True, slots=True)
class LoadedPolicy:
    """A validated policy and where it came from."""

    policy: Policy
    path: Path
    digest: str  # sha256 of the file's bytes: which version is in force
    warnings: tuple[str, ...] = ()  # "FILE:LINE: KEY: text" for valid but doubtful values
    ignored_env: tuple[str, ...] = ()  # OCRD_* variables that name no policy key


def policy_path(cli_value: str | os.PathLike[str] | None) -> Path:
    """--config, else $OCRD_CONFIG, else /etc/ocrd/policy.yaml."""
    if cli_value:
        return Path(cli_value)
    env = os.environ.get("OCRD_CONFIG")
    return Path(env) if env else DEFAULT_PATH


def _problem(path: Path, message: str) -> PolicyError:
    return PolicyError([Problem(str(path), None, "", message)])


def _read(path: Path) -> bytes:
    """The policy file's bytes; opened without blocking, whatever is at *path* (a FIFO
    swapped in after a check would block a plain open() forever)."""
    try:
        data = read_regular(path, limit=yamlsafe.MAX_BYTES, follow=True)
    except NotRegularError as exc:
        if exc.kind == "a directory":
            raise _problem(
                path, "is a directory, not a policy file. Pass the YAML file itself with --config."
            ) from None
        raise _problem(
            path, "is not a regular file. Pass the YAML policy file itself with --config."
        ) from None
    except FileNotFoundError:
        raise _problem(
            path,
            "policy file not found. Pass --config PATH or set OCRD_CONFIG; "
            "see config.example.yaml.",
        ) from None
    except OSError as exc:
        raise _problem(path, f"cannot read: {exc.strerror}. Check its permissions.") from None
    if len(data) > yamlsafe.MAX_BYTES:
        try:
            size = os.stat(path).st_size
        except OSError:
            size = len(data)
        raise _problem(
            path,
            f"file is {size} bytes; a policy may be at most "
            f"{yamlsafe.MAX_BYTES} bytes (1 MiB). Is this the right file?",
        )
    return data


def resolve_model_dir(raw: Path, base: Path) -> Path:
    """Absolute, symlinks resolved, and not a system directory."""
    path = raw if raw.is_absolute() else base / raw
    resolved = Path(os.path.realpath(path))
    text = str(resolved)
    home = os.path.realpath(os.path.expanduser("~"))
    if text in FORBIDDEN_EXACT or text == home:
        raise ValueError(
            f"{raw} resolves to {text}, a system or home directory; point model_dir at a "
            "directory that holds only models, e.g. /var/lib/ocrd/models"
        )
    for tree in FORBIDDEN_TREES:
        if text.startswith(tree + "/"):
            raise ValueError(
                f"{raw} resolves to {text}, inside the system directory {tree}; point "
                "model_dir at a directory that holds only models, e.g. /var/lib/ocrd/models"
            )
    return resolved


def default_state_dir() -> Path:
    """$STATE_DIRECTORY (systemd), else $XDG_STATE_HOME/ocrd, else ~/.local/state/ocrd."""
    return _default_state_dir()[0]


def _default_state_dir() -> tuple[Path, str]:
    """The default state dir and where it came from (for error messages)."""
    systemd = os.environ.get("STATE_DIRECTORY")
    if systemd:
        return Path(systemd.split(":")[0]), "$STATE_DIRECTORY"
    xdg = os.environ.get("XDG_STATE_HOME")
    if xdg:
        return Path(xdg) / "ocrd", "$XDG_STATE_HOME"
    return Path(os.path.expanduser("~")) / ".local" / "state" / "ocrd", "the home directory"


def _local(text: str, base: Path) -> str:
    """A local source made absolute against the policy file's directory; others as they are."""
    source = parse_source(text)
    local = source.path if source.kind is SourceKind.LOCAL else None
    if local is not None and not local.is_absolute():  # a file:// URL always is
        return str((base / local).resolve())
    return text


def _resolve_sources(item: Required, base: Path) -> Required:
    update: dict[str, object] = {}
    if item.source is not None:
        update["source"] = _local(item.source, base)
    if item.sources:
        update["sources"] = [_local(t, base) for t in item.sources]
    return item.model_copy(update=update) if update else item


def _resolve(policy: Policy, origins: Origins) -> Policy:
    path = origins.path
    base = path.resolve().parent
    problems: list[Problem] = []

    def fail(loc: Loc, message: str) -> None:
        problems.append(origins.problem(loc, message))

    model_dir = policy.model_dir
    try:
        model_dir = resolve_model_dir(policy.model_dir, base)
    except ValueError as exc:
        fail(("model_dir",), str(exc))
    origin = None
    if policy.state_dir is None:
        state_dir, origin = _default_state_dir()
    else:
        state_dir = policy.state_dir
        state_dir = state_dir if state_dir.is_absolute() else base / state_dir
    state_dir = Path(os.path.realpath(state_dir))
    if state_dir == model_dir or model_dir in state_dir.parents:
        message = (
            f"{state_dir} is inside model_dir {model_dir}; keep ocrd's state outside the models"
        )
        if origin is None:
            fail(("state_dir",), message)
        else:
            problems.append(
                Problem(
                    str(path),
                    None,
                    "state_dir",
                    f"not set, so it defaults from {origin} to {message}. Set state_dir or "
                    f"change {origin}.",
                )
            )
    required = [_resolve_sources(item, base) for item in policy.required]
    download = policy.download
    for key in ("netrc", "ca_bundle"):
        value = getattr(download, key)
        if value is not None and not value.is_absolute():
            download = download.model_copy(update={key: (base / value).resolve()})
    runtime = policy.engine.runtime_dir
    engine = policy.engine
    if runtime is not None and not runtime.is_absolute():
        engine = engine.model_copy(update={"runtime_dir": (base / runtime).resolve()})
    for loc, message in cross_check(policy):
        fail(loc, message)
    if problems:
        raise PolicyError(problems)
    return policy.model_copy(
        update={
            "model_dir": model_dir,
            "state_dir": state_dir,
            "required": required,
            "engine": engine,
            "download": download,
        }
    )


def _parse(path: Path, data: bytes) -> yamlsafe.Document:
    """The file's document, a mapping of keys (PolicyError with file:line if not)."""
    try:
        doc = yamlsafe.read(data)
    except yamlsafe.YamlError as exc:
        key = key_path(exc.loc)
        raise PolicyError([Problem(str(path), exc.line, key, f"{exc}. {FIX}")]) from None
    if doc.value is None:
        return yamlsafe.Document({})
    if not isinstance(doc.value, dict):
        raise PolicyError(
            [
                Problem(
                    str(path),
                    1,
                    "",
                    "expected a mapping of keys (model_dir: …, "
                    f"prune: …), got a {type(doc.value).__name__}. {FIX}",
                )
            ]
        )
    return doc


def _undecodable(exc: SettingsError, origins: Origins) -> PolicyError:
    """The variable whose list or section is not JSON, named with an example."""
    reading = origins.reading
    key, value = reading.undecodable or ("", "")
    names = [
        name
        for lower, name in reading.variables.items()
        if lower.endswith(key.lower()) and os.environ.get(name) == value
    ]
    if not names:  # not a JSON problem: say what pydantic-settings said, without its classes
        cause = exc.__cause__ or exc
        message = f"cannot read the OCRD_* variables ({cause}). Check them, then run `ocrd check`."
        return PolicyError([Problem(str(origins.path), None, "", message)])
    name = names[0]
    loc = _env_loc(name.lower())
    detail = exc.__cause__ or exc
    message = (
        f"is not valid JSON ({detail}). Lists and sections must be JSON in the environment, "
        "e.g. OCRD_WHITELIST='[\"*.gguf\"]'"
    )
    return PolicyError([origins.problem(loc, message, var=name)])


def _problems(origins: Origins, errors: list[Any]) -> list[Problem]:
    """Every problem of one load: misnamed variables, YAML misreads, invalid values."""
    problems: list[Problem] = []
    shaped: set[str] = set()
    for lower, name in sorted(origins.reading.variables.items()):
        message = variable_shape(lower)
        if message is not None:
            shaped.add(name)
            problems.append(origins.problem(_env_loc(lower), message, var=name))
    misread_at: set[Loc] = set()
    for at, scalar in origins.document.scalars.items():
        message = misread(at, scalar)
        if message is not None and origins.variable_for(at) is None:
            misread_at.add(at)
            problems.append(origins.problem(at, message))
    for error in errors:
        loc: Loc = tuple(error["loc"])
        var = origins.variable_for(loc)
        if loc in misread_at or var in shaped:
            continue
        problems.append(origins.problem(loc, pydantic_message(error, var=var), var=var))
    return problems


def _env_loc(lower: str) -> Loc:
    return tuple(lower[len(settings.ENV_PREFIX) :].split(settings.NESTED))


def _warnings(policy: Policy, origins: Origins) -> tuple[str, ...]:
    return tuple(
        str(origins.problem(loc, message, fix=False)) for loc, message in prefix_warnings(policy)
    )


def load_policy(path: Path) -> LoadedPolicy:
    """Read, validate and resolve the policy at *path*; PolicyError lists every problem."""
    data = _read(path)
    doc = _parse(path, data)
    reading = settings.Reading(document=doc.value)
    origins = Origins(path, doc, reading)
    policy: Policy | None = None
    errors: list[Any] = []
    try:
        policy = settings.build(reading)
    except ValidationError as exc:
        errors = list(exc.errors(include_url=False))
    except SettingsError as exc:
        raise _undecodable(exc, origins) from None
    problems = _problems(origins, errors)
    if problems or policy is None:
        raise PolicyError(problems)
    resolved = _resolve(policy, origins)
    return LoadedPolicy(
        policy=resolved,
        path=path,
        digest=hashlib.sha256(data).hexdigest(),
        warnings=_warnings(resolved, origins),
        ignored_env=tuple(reading.ignored),
    )
