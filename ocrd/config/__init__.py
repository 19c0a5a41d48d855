"""Loading a policy: the file read safely, environment overrides, paths resolved.

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

__all__ = [
    "DEFAULT_PATH",
    "LoadedPolicy",
    "default_state_dir",
    "load_policy",
    "policy_path",
    "resolve_model_dir",
]
