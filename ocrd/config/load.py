"""Load a policy: the file (read safely), environment overrides, and paths
resolved against the disk. Every error names file, line, key and a fix."""

from __future__ import annotations

import hashlib
import json
import os
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from ocrd.config import yamlsafe
from ocrd.core.errors import PolicyError, Problem
from ocrd.core.policy import Loc, Policy, cross_check
from ocrd.openfile import NotRegularError, read_regular

DEFAULT_PATH = Path("/etc/ocrd/policy.yaml")
ENV_PREFIX = "OCRD_"
FIX = "Fix it, then run `ocrd check`."

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
    warnings: tuple[str, ...] = ()


def policy_path(cli_value: str | os.PathLike[str] | None) -> Path:
    """--config, else $OCRD_CONFIG, else /etc/ocrd/policy.yaml."""
    if cli_value:
        return Path(cli_value)
    env = os.environ.get("OCRD_CONFIG")
    return Path(env) if env else DEFAULT_PATH


def _key(loc: Loc) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _line_for(loc: Loc, lines: dict[Loc, int]) -> int | None:
    for end in range(len(loc), -1, -1):
        if loc[:end] in lines:
            return lines[loc[:end]]
    return None


def _env_var(loc: Loc) -> str | None:
    """The OCRD_* variable that set this key path, if one is set."""
    words = [p for p in loc if isinstance(p, str)]
    for end in range(len(words), 0, -1):
        name = ENV_PREFIX + "__".join(words[:end]).upper()
        if name in {k.upper() for k in os.environ}:
            return name
    return None


NON_POLICY_ENV = frozenset({"OCRD_CONFIG", "OCRD_DEBUG"})


def _submodel(annotation: Any) -> Any:
    """The pydantic model a field holds directly (not in a list), else None."""
    if hasattr(annotation, "model_fields"):
        return annotation
    if typing.get_origin(annotation) is list:
        return None
    for arg in typing.get_args(annotation):
        if hasattr(arg, "model_fields"):
            return arg
    return None


def _is_complex(annotation: Any) -> bool:
    """Does the field hold a list or a mapping (given as JSON in the environment)?"""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return True
    origin = typing.get_origin(annotation)
    if origin in (list, dict):
        return True
    return any(_is_complex(arg) for arg in typing.get_args(annotation) if arg is not type(None))


def _env_problem(name: str, path: Path, key: str, message: str) -> Problem:
    return Problem(f"{path} (environment {name})", None, key, message)


def _environment(path: Path) -> dict[str, Any]:
    """The OCRD_* overrides as a nested mapping of policy keys (PolicyError if any is bad).

    `OCRD_PRUNE__MIN_AGE=5m` sets prune.min_age; names are case-insensitive.
    Lists and mappings are JSON (`OCRD_WHITELIST='["*.gguf"]'`); other values are
    strings the policy model parses as it would the file's. A name that is no
    policy key is an error: a typo must not be silently ignored.
    """
    overrides: dict[str, Any] = {}
    problems: list[Problem] = []
    # Shallow names first, so OCRD_PRUNE__MIN_AGE lands inside a JSON OCRD_PRUNE.
    for name in sorted(os.environ, key=lambda n: (n.count("__"), n.upper())):
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or upper in NON_POLICY_ENV:
            continue
        parts = upper[len(ENV_PREFIX) :].lower().split("__")
        model: Any = Policy
        annotation: Any = None
        for part in parts:
            field = None if model is None else model.model_fields.get(part)
            if field is None:
                valid = ", ".join(model.model_fields) if model is not None else "none"
                problems.append(
                    _env_problem(
                        name,
                        path,
                        "",
                        f"names no policy key (valid at {part!r}: {valid}); unset it or fix "
                        "the name, e.g. OCRD_PRUNE__MIN_AGE",
                    )
                )
                break
            annotation = field.annotation
            model = _submodel(annotation)
        else:
            value: Any = os.environ[name]
            if _is_complex(annotation):
                try:
                    value = json.loads(value)
                except ValueError as exc:
                    problems.append(
                        _env_problem(
                            name,
                            path,
                            ".".join(parts),
                            f"is not valid JSON ({exc}). Lists and mappings must be JSON in "
                            f"the environment, e.g. OCRD_WHITELIST='[\"*.gguf\"]'. {FIX}",
                        )
                    )
                    continue
            _set_nested(overrides, parts, value)
    if problems:
        raise PolicyError(problems)
    return overrides


def _set_nested(target: dict[str, Any], parts: list[str], value: Any) -> None:
    for part in parts[:-1]:
        inner = target.get(part)
        if inner is None:
            inner = target[part] = {}
        elif not isinstance(inner, dict):
            return  # a JSON section that is no mapping: validation reports it
        target = inner
    target[parts[-1]] = value


def _merged(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """*base* with *overrides* on top, mappings merged key by key (the overrides win)."""
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merged(out[key], value)
        else:
            out[key] = value
    return out


def _valid_keys(loc: Loc) -> str:
    model: Any = Policy
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return ""
        annotation = field.annotation
        inner = getattr(annotation, "__args__", None)
        if inner:
            annotation = next((a for a in inner if hasattr(a, "model_fields")), annotation)
        if not hasattr(annotation, "model_fields"):
            return ""
        model = annotation
    return ", ".join(model.model_fields)


def _message(error: Any) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        valid = _valid_keys(tuple(error["loc"]))
        return f"unknown key; valid keys here are: {valid}" if valid else "unknown key"
    if kind == "missing":
        return "is required but not set"
    msg = str(error["msg"])
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    return msg


def _problems_from(exc: ValidationError, path: Path, lines: dict[Loc, int]) -> list[Problem]:
    problems = []
    for error in exc.errors(include_url=False):
        loc: Loc = tuple(error["loc"])
        env = _env_var(loc)
        where = f"{path} (environment {env})" if env else str(path)
        line = None if env else _line_for(loc, lines)
        problems.append(Problem(where, line, _key(loc), f"{_message(error)}. {FIX}"))
    return problems


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


def _resolve(policy: Policy, path: Path, lines: dict[Loc, int]) -> Policy:
    base = path.resolve().parent
    problems: list[Problem] = []

    def fail(loc: Loc, message: str) -> None:
        env = _env_var(loc)
        where = f"{path} (environment {env})" if env else str(path)
        problems.append(
            Problem(where, None if env else _line_for(loc, lines), _key(loc), f"{message}. {FIX}")
        )

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
    required = []
    for item in policy.required:
        if item.source is not None and not item.source.is_absolute():
            item = item.model_copy(update={"source": (base / item.source).resolve()})
        required.append(item)
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
        }
    )


def load_policy(path: Path) -> LoadedPolicy:
    """Read, validate and resolve the policy at *path*; PolicyError lists every problem."""
    data = _read(path)
    try:
        raw, lines = yamlsafe.load(data)
    except yamlsafe.YamlError as exc:
        raise PolicyError([Problem(str(path), exc.line, _key(exc.loc), f"{exc}. {FIX}")]) from None
    if raw is None:
        raw = {}
    overrides = _environment(path)
    if not isinstance(raw, dict):
        raise PolicyError(
            [
                Problem(
                    str(path),
                    1,
                    "",
                    "expected a mapping of keys (model_dir: …, "
                    f"prune: …), got a {type(raw).__name__}. {FIX}",
                )
            ]
        )
    try:
        policy = Policy.model_validate(_merged(raw, overrides))
    except ValidationError as exc:
        raise PolicyError(_problems_from(exc, path, lines)) from None
    resolved = _resolve(policy, path, lines)
    return LoadedPolicy(
        policy=resolved,
        path=path,
        digest=hashlib.sha256(data).hexdigest(),
    )
