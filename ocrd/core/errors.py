"""Errors that say what went wrong, where, and how to fix it."""

from __future__ import annotations

from dataclasses import dataclass

EXIT_OK = 0
EXIT_PROBLEMS = 1
EXIT_USAGE = 2
EXIT_PENDING = 3


class OcrdError(Exception):
    """Base of every error ocrd reports to a user (one line, no traceback)."""

    exit_code = EXIT_PROBLEMS


@dataclass(frozen=True, slots=True)
class Problem:
    """One finding in a policy: file, line (when known), key path, message."""

    file: str
    line: int | None
    key: str
    message: str

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        key = f"{self.key}: " if self.key else ""
        return f"{where}: {key}{self.message}"


class PolicyError(OcrdError):
    """The policy file (or its environment overrides) is invalid."""

    exit_code = EXIT_USAGE

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class UsageError(OcrdError):
    """A command was called in a way that cannot work."""

    exit_code = EXIT_USAGE


class LockedError(OcrdError):
    """Another ocrd process already manages this model dir."""


class ModelDirError(OcrdError):
    """The model dir cannot be read as a trustworthy view of the models."""


class Interrupted(Exception):
    """A long step (a hash, a copy) was stopped because the daemon is shutting down."""
