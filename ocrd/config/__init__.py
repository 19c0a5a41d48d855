"""Loading a policy: the file read safely, environment overrides (pydantic-settings),
paths resolved.

May import ocrd.core. Errors name the file, the line, the key and a fix.
"""

from ocrd.config.load import (
    DEFAULT_PATH,
    LoadedPolicy,
    default_state_dir,
    load_policy,
    policy_path,
    resolve_model_dir,
)
from ocrd.config.messages import ignored_note

__all__ = [
    "DEFAULT_PATH",
    "LoadedPolicy",
    "default_state_dir",
    "ignored_note",
    "load_policy",
    "policy_path",
    "resolve_model_dir",
]
