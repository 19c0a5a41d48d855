"""Messages that teach: where a policy value came from (file:line or an OCRD_* variable),
what was wrong with it in the user's words (never a class name of ours), and how to fix it.

`Origins` answers "where" for a key path; the functions below turn pydantic's errors, the
YAML scalars the user probably did not mean as numbers, and misnamed variables into
`Problem`s.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from ocrd.config.settings import ENV_PREFIX, NESTED, Reading
from ocrd.config.yamlsafe import Document, Scalar
from ocrd.core.errors import Problem
from ocrd.core.policy import Loc, Policy, parse_duration, plain_name
from ocrd.core.spelling import nearest

FIX = "Fix it, then run `ocrd check`."
Expected = Literal["text", "duration", "number"]


@dataclass(frozen=True)
class Expectation:
    """What the policy expects where YAML may have misread the user's text."""

    kind: Expected
    noun: str  # "a duration", "a path", "'report' or 'prune'", "text", "a number"
    nullable: bool = False
    choices: tuple[str, ...] = ()  # for a choice: the valid words


def with_fix(message: str) -> str:
    """*message* as a sentence, then how to go on."""
    end = "" if message.endswith(("?", ".", "!")) else "."
    return f"{message}{end} {FIX}"


def key_path(loc: Loc) -> str:
    """('prune', 'prefixes', 1) -> 'prune.prefixes[1]'."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def variable(path: Loc) -> str:
    """('prune', 'min_age') -> 'OCRD_PRUNE__MIN_AGE'."""
    return ENV_PREFIX + NESTED.join(map(str, path)).upper()


# -- the shape of the policy ------------------------------------------------------------


def _unwrap(annotation: Any) -> tuple[Any, list[Any]]:
    """An Annotated[...] type's base and metadata; other types as they are."""
    metadata: list[Any] = []
    while typing.get_origin(annotation) is typing.Annotated:
        metadata += list(annotation.__metadata__)
        annotation = typing.get_args(annotation)[0]
    return annotation, metadata


def _members(annotation: Any) -> tuple[Any, ...]:
    """The types of a union (without None), or the type itself."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return tuple(a for a in typing.get_args(annotation) if a is not type(None))
    return (annotation,)


def _model(annotation: Any) -> type[BaseModel] | None:
    for member in _members(annotation):
        if isinstance(member, type) and issubclass(member, BaseModel):
            return member
    return None


def _at(loc: Loc) -> tuple[Any, list[Any]] | None:
    """The annotation and validator metadata that validate the value at *loc*, if any."""
    annotation: Any = Policy
    metadata: list[Any] = []
    for part in loc:
        annotation, more = _unwrap(annotation)
        metadata += more
        if isinstance(part, int):
            if typing.get_origin(annotation) is not list:
                return None
            annotation, metadata = typing.get_args(annotation)[0], []
            continue
        model = _model(annotation)
        if model is None or part not in model.model_fields:
            return None
        info = model.model_fields[part]
        annotation, metadata = info.annotation, list(info.metadata)
    annotation, more = _unwrap(annotation)
    return annotation, metadata + more


def section(loc: Loc) -> type[BaseModel] | None:
    """The model whose keys are valid at *loc* (a mapping), if *loc* is one."""
    found = _at(loc)
    return None if found is None else _model(found[0])


def expected(loc: Loc) -> Expectation | None:
    """What the policy expects at *loc* when YAML may have misread it: text (a string, a
    path, a choice, a plain model name), a duration or a number; and whether null is valid
    there."""
    found = _at(loc)
    if found is None:
        return None
    annotation, metadata = found
    funcs = {getattr(m, "func", None) for m in metadata}
    if parse_duration in funcs:
        return Expectation("duration", "a duration")
    nullable = type(None) in typing.get_args(annotation)
    members = _members(annotation)
    if plain_name in funcs:
        return Expectation("text", "a model name")
    if members in ((int,), (float,)):
        return Expectation("number", "a number")
    if not all(_is_text(m) for m in members):
        return None
    if members == (Path,):
        return Expectation("text", "a path", nullable)
    if len(members) == 1 and typing.get_origin(members[0]) is Literal:
        choices = tuple(map(str, typing.get_args(members[0])))
        words = " or ".join(f"'{c}'" for c in choices)
        return Expectation("text", words, nullable, choices)
    return Expectation("text", "text", nullable)


def _is_text(annotation: Any) -> bool:
    if annotation in (str, Path):
        return True
    if typing.get_origin(annotation) is Literal:
        return all(isinstance(a, str) for a in typing.get_args(annotation))
    return False


def _sections() -> Iterator[tuple[str, type[BaseModel]]]:
    """('', Policy) and every section: ('prune', Prune), …, ('required', Required)."""
    yield "", Policy
    for name in Policy.model_fields:
        model = section((name,)) or section((name, 0))
        if model is not None:
            yield name, model


# -- where a value came from -----------------------------------------------------------


def _depth(data: Any, loc: Loc) -> tuple[int, bool]:
    """How far *loc* reaches into *data*, and whether *data* holds the whole value there: it
    reaches all the way, or passes a list or a single value on the way (a list from the
    environment replaces the file's as a whole; only sections merge key by key)."""
    for depth, part in enumerate(loc):
        in_list = isinstance(part, int) and isinstance(data, list) and part < len(data)
        in_section = isinstance(part, str) and isinstance(data, dict) and part in data
        if not (in_list or in_section):
            return depth, depth > 0 and not isinstance(data, dict)
        if in_list:
            return depth, True
        data = data[part]
    return len(loc), True


@dataclass(frozen=True)
class Origins:
    """Where each value of one load came from: the policy file, or an OCRD_* variable."""

    path: Path
    document: Document
    reading: Reading

    def _paths(self) -> dict[tuple[str, ...], str]:
        return {
            tuple(lower[len(ENV_PREFIX) :].split(NESTED)): name
            for lower, name in self.reading.variables.items()
        }

    def variable_for(self, loc: Loc) -> str | None:
        """The OCRD_* variable that set the value at *loc*, or None when the file did."""
        env, whole = _depth(self.reading.env, loc)
        if not whole and env <= _depth(self.document.value, loc)[0]:
            return None  # the file's value (or neither's: blamed on the file, with a line)
        paths = self._paths()
        above = [p for p in paths if loc[: len(p)] == p]
        if above:
            return paths[max(above, key=len)]
        below = sorted(p for p in paths if p[: len(loc)] == loc)
        return paths[below[0]] if below else None

    def line(self, loc: Loc) -> int | None:
        lines = self.document.lines
        for end in range(len(loc), -1, -1):
            if loc[:end] in lines:
                return lines[loc[:end]]
        return None

    def problem(
        self, loc: Loc, message: str, *, var: str | None = None, fix: bool = True
    ) -> Problem:
        """A Problem at *loc*: 'FILE:LINE' or 'FILE (environment OCRD_X)', and the fix."""
        var = var or self.variable_for(loc)
        text = with_fix(message) if fix else message
        if var is not None:
            return Problem(f"{self.path} (environment {var})", None, key_path(loc), text)
        return Problem(str(self.path), self.line(loc), key_path(loc), text)


# -- messages ----------------------------------------------------------------------------


def describe(value: Any) -> str:
    """A value as the user would say it: 'a list', 'the number 5', "'soon'"."""
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, int | float):
        return f"the number {value}"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a section of keys"
    return "a value of another kind"


def _valid_keys(model: type[BaseModel]) -> str:
    return ", ".join(model.model_fields)


def _home_of(key: str, here: str) -> str | None:
    """Where *key* is a valid key, if not here: 'at the top level', "under 'prune:'"."""
    for name, model in _sections():
        if name != here and key in model.model_fields:
            if not name:
                return "at the top level"
            if name == "required":
                return "in a 'required:' entry"
            return f"under '{name}:'"
    return None


def unknown_key(loc: Loc, *, var: str | None) -> str:
    """The message for a key that is valid nowhere at *loc*: did you mean, or where it goes."""
    key = str(loc[-1])
    model = section(loc[:-1]) or Policy
    names = [str(p) for p in loc[:-1] if isinstance(p, str)]
    guess = nearest(key, model.model_fields)
    if var is not None and var.lower() == variable((*names, key)).lower():
        owner = f"'{names[0]}:'" if names else "the policy"
        if guess is not None:
            return f"names no key of {owner}; did you mean {variable((*names, guess))}?"
        valid = ", ".join(variable((*names, k)) for k in model.model_fields)
        return f"names no key of {owner}; its keys are {valid}"
    valid = f"Valid keys here are: {_valid_keys(model)}"
    home = _home_of(key, names[0] if names else "")
    if home is not None and guess is None:
        return f"unknown key here; '{key}' belongs {home}. {valid}"
    if guess is not None:
        return f"unknown key; did you mean '{guess}'? {valid}"
    return f"unknown key. {valid}"


def pydantic_message(error: Mapping[str, Any], *, var: str | None) -> str:
    """One pydantic error in the user's words; none of pydantic's class names."""
    kind = error["type"]
    loc: Loc = tuple(error["loc"])
    given = describe(error.get("input"))
    if kind == "extra_forbidden":
        return unknown_key(loc, var=var)
    if kind == "missing":
        return "is required but not set"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"expected a mapping of keys (key: value lines), got {given}"
    if kind == "list_type":
        return f"expected a list (lines '- item', or [a, b]), got {given}"
    if kind in ("path_type", "path_parsing"):
        return f"expected a path, got {given}"
    if kind == "string_type":
        return f"expected text, got {given}"
    if kind in ("bool_parsing", "bool_type"):
        return f"expected a boolean (true or false), got {given}"
    if kind in ("int_parsing", "int_type", "int_from_float"):
        return f"expected an integer (a whole number), got {given}"
    if kind in ("float_parsing", "float_type"):
        return f"expected a number, got {given}"
    msg = str(error["msg"])
    return msg.removeprefix("Value error, ")


def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def misread(loc: Loc, scalar: Scalar) -> str | None:
    """A message when YAML read the user's unquoted text as a number, boolean, date or
    null where the policy wanted text or a duration (`10:00` is not 600 s here)."""
    want = expected(loc)
    if want is None:
        return None
    value = scalar.value
    if value is None and want.nullable:
        return None
    if scalar.text == "":
        return "has no value; write one, or remove the key to get the default"
    read = f"expected {want.noun}, but YAML read `{scalar.text}` as {scalar.reading()}"
    if want.choices and scalar.text not in want.choices:
        return read
    if want.kind == "text":
        return f"{read}; quote it: {_quoted(scalar.text)}"
    if want.kind == "number":  # pydantic would take true as 1
        return None if isinstance(value, int | float) and not isinstance(value, bool) else read
    plain_number = isinstance(value, int | float) and not isinstance(value, bool)
    if plain_number and ":" not in scalar.text:
        return None  # plain seconds are a valid duration
    return f"{read}; write it with a unit, e.g. 10min or 10h"


def variable_shape(name: str) -> str | None:
    """A message for a policy variable that goes below a key holding one value or a list
    (pydantic-settings would drop or mangle it), else None."""
    words = name[len(ENV_PREFIX) :].lower().split(NESTED)
    loc: Loc = ()
    for i, word in enumerate(words):
        model = section(loc)
        if model is None or word not in model.model_fields:
            return None  # an unknown key: pydantic's extra="forbid" reports it
        loc = (*loc, word)
        if i == len(words) - 1 or section(loc) is not None:
            continue
        found = _at(loc)
        if found is not None and typing.get_origin(found[0]) is list:
            return (
                f"'{key_path(loc)}' is a list; set it whole, as JSON, in {variable(loc)} "
                f"(e.g. {variable(loc)}='[\"…\"]')"
            )
        return f"'{key_path(loc)}' holds one value, not keys; did you mean {variable(loc)}?"
    return None


# The OCR-D framework's documented variables (its command is also `ocrd`, on the same
# servers): never "did you mean" one of ocrd's, even where they look alike
# (OCRD_DOWNLOAD_RETRIES is OCR-D's; ocrd's is OCRD_DOWNLOAD__RETRIES).
OCR_D_VARIABLES = frozenset(
    {
        "OCRD_METS_CACHING",
        "OCRD_MAX_PROCESSOR_CACHE",
        "OCRD_MAX_PARALLEL_PAGES",
        "OCRD_PROCESSING_PAGE_TIMEOUT",
        "OCRD_PROFILE",
        "OCRD_PROFILE_FILE",
        "OCRD_DOWNLOAD_RETRIES",
        "OCRD_DOWNLOAD_TIMEOUT",
        "OCRD_DOWNLOAD_INPUT",
        "OCRD_MISSING_INPUT",
        "OCRD_MISSING_OUTPUT",
        "OCRD_EXISTING_OUTPUT",
        "OCRD_NETWORK_SERVER_ADDR_PROCESSING",
        "OCRD_NETWORK_SERVER_ADDR_WORKFLOW",
        "OCRD_NETWORK_SERVER_ADDR_WORKSPACE",
        "OCRD_NETWORK_RABBITMQ_CLIENT_CONNECT_ATTEMPTS",
        "OCRD_NETWORK_SOCKETS_ROOT_DIR",
        "OCRD_NETWORK_LOGS_ROOT_DIR",
        "OCRD_LOGGING_DEBUG",
    }
)


def ignored_note(name: str) -> str:
    """The `ocrd check` line for an OCRD_* variable that names no policy key."""
    upper = name.upper()
    if upper in OCR_D_VARIABLES:
        return (
            f"ignored environment variable {name}: it names no policy key "
            "(left to other programs, such as OCR-D)"
        )
    choices = [variable((key,)) for key in Policy.model_fields]
    for key, model in _sections():
        if key:
            choices += [variable((key, sub)) for sub in model.model_fields]
    guess = nearest(upper, choices)
    hint = f"; did you mean {guess}?" if guess is not None and guess != upper else ""
    return (
        f"ignored environment variable {name}: it names no policy key "
        f"(left to other programs, such as OCR-D){hint}"
    )
