"""The policy as pydantic-settings reads it: the environment over the policy file.

`PolicySettings` is the core `Policy` (the same fields, defaults and validators) made a
pydantic-settings `BaseSettings`, so that pydantic-settings reads the `OCRD_*` variables,
nests them at `__` and decodes lists and sections from JSON. It lives here, not in
ocrd.core, because it reads the environment; `build()` hands back a plain core `Policy`,
so no room above this one ever sees the settings class.

The policy file is not read by pydantic-settings' own YAML source (it would follow YAML
tags and aliases, and silently skip a missing file): load_policy() reads and checks the
file, ocrd's safe reader parses it, and `PolicyFileSource` hands that document over.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from ocrd.core.policy import Policy

ENV_PREFIX = "OCRD_"
NESTED = "__"
# Variables that configure the command itself, not the policy.
OWN_VARIABLES = frozenset({"OCRD_CONFIG", "OCRD_DEBUG"})


@dataclass
class Reading:
    """One load: the file's document going in, and what the environment source saw."""

    document: Mapping[str, Any]  # the policy file, as the safe YAML reader parsed it
    env: dict[str, Any] = field(default_factory=dict)  # what the environment contributed
    variables: dict[str, str] = field(default_factory=dict)  # lower-case name -> name as set
    ignored: list[str] = field(default_factory=list)  # OCRD_* names that name no policy key
    undecodable: tuple[str, str] | None = None  # (key, value) whose JSON did not decode


# The load in progress, for settings_customise_sources (which pydantic-settings calls
# without arguments of ours). A ContextVar: the daemon may load in more than one thread.
_READING: ContextVar[Reading] = ContextVar("ocrd_policy_reading")


class PolicyFileSource(PydanticBaseSettingsSource):
    """The policy file's document: no tags, anchors, aliases or duplicate keys (yamlsafe)."""

    def __init__(self, settings_cls: type[BaseSettings], document: Mapping[str, Any]) -> None:
        super().__init__(settings_cls)
        self.document = document

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self.document.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        # Every key, known or not: extra="forbid" then names the unknown ones.
        return dict(self.document)


def first_segment(name: str) -> str:
    """The policy key an OCRD_* name starts with: OCRD_PRUNE__MIN_AGE -> 'prune'."""
    return name[len(ENV_PREFIX) :].split(NESTED, 1)[0].lower()


class PolicyEnvSource(EnvSettingsSource):
    """The OCRD_* variables whose first segment names a policy key; no others.

    The OCR-D framework (whose command is also `ocrd`) documents OCRD_METS_CACHING,
    OCRD_PROFILE, OCRD_MAX_PARALLEL_PAGES, …, and runs on the same servers: a variable
    like those is left alone (and listed by `ocrd check`), never an error. Reading,
    nesting and JSON decoding are pydantic-settings' own.
    """

    def __init__(self, settings_cls: type[BaseSettings], reading: Reading) -> None:
        super().__init__(settings_cls)
        self.reading = reading
        keys = set(settings_cls.model_fields)
        named = {name.lower(): name for name in os.environ if name.upper().startswith(ENV_PREFIX)}
        for lower, name in sorted(named.items()):
            if first_segment(lower) in keys:
                reading.variables[lower] = name
            elif name.upper() not in OWN_VARIABLES:
                reading.ignored.append(name)
        # env_vars: what pydantic-settings read from os.environ (names lower-cased, as
        # case_sensitive=False asks); it goes on from here with the policy's own only.
        self.env_vars = {k: v for k, v in self.env_vars.items() if k in reading.variables}

    def decode_complex_value(self, field_name: str, field: FieldInfo, value: Any) -> Any:
        try:
            return super().decode_complex_value(field_name, field, value)
        except ValueError:
            self.reading.undecodable = (field_name, str(value))
            raise

    def __call__(self) -> dict[str, Any]:
        data = super().__call__()
        self.reading.env = data
        return data


class PolicySettings(BaseSettings, Policy):
    """The core Policy, read by pydantic-settings from the environment and the file."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=NESTED,
        case_sensitive=False,
        extra="forbid",
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """The one place where the sources and their order are set: the environment over
        the policy file, key by key (a variable replaces one key; its siblings keep the
        file's values). No init arguments, no .env file, no secrets directory."""
        reading = _READING.get()
        return (
            PolicyEnvSource(settings_cls, reading),
            PolicyFileSource(settings_cls, reading.document),
        )


def build(reading: Reading) -> Policy:
    """The core Policy from *reading*'s document and the environment.

    Raises pydantic's ValidationError (invalid values) or pydantic-settings' SettingsError
    (a variable's JSON does not decode); *reading* then tells where each value came from.
    """
    token = _READING.set(reading)
    try:
        settings = PolicySettings()
    finally:
        _READING.reset(token)
    values = {name: getattr(settings, name) for name in Policy.model_fields}
    # Already validated by the very same fields and validators: construct, do not re-check.
    return Policy.model_construct(_fields_set=settings.model_fields_set, **values)
