"""Invalid and hostile policies and environments through the real CLI (DESIGN §2, §4, §6).

One table, `CATALOGUE`: each entry is a policy file (or an environment) that `ocrd check`
must refuse with exit 2 and one `ocrd: error:` line per problem naming the file, the line
(where YAML gives one) and the key path, with no traceback; two entries are mere warnings
(exit 0). After it: symlinked entries that point out of the model dir, which `ocrd apply`
must treat as links only.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support.cli import Result
from tests.support.files import make_model
from tests.support.logs import log_lines, matching
from tests.support.policy import write_policy

Run = Callable[..., Result]

# Placeholders in a case's text, environment and expectations.
MODELS = "@MODELS@"  # the model dir of the test (exists, empty)
TMP = "@TMP@"  # the test's tmp_path
HEAD = f"model_dir: {MODELS}\nengine: {{backend: none}}\n"  # two lines: cases start at line 3
FIFTY_MB = 50 * 1024 * 1024


@dataclass(frozen=True)
class Case:
    """One hostile input and what `ocrd check` must say about it."""

    id: str
    text: str | bytes | None = None  # the policy file's content (None: `build` makes it)
    key: str | None = None  # the key path the message must name
    line: int | None = None  # the line it must name (`FILE:N:`)
    words: str = ""  # a regex the message must match: what is wrong or what would be valid
    not_words: str | None = None  # a regex the message must not match (a misleading claim)
    code: int = 2
    problems: int = 1  # error lines expected on stderr
    env: Mapping[str, str] = field(default_factory=dict)
    env_var: str | None = None  # the message is "FILE (environment VAR): ..."
    key_anywhere: bool = False  # YAML-level errors: the key path anywhere in the line
    build: Callable[[Path], Path] | None = None  # makes the policy; returns its path
    no_config: bool = False  # run without --config (the path comes from OCRD_CONFIG)
    max_seconds: float | None = None  # must fail this fast (wall clock of the command)
    warning: str | None = None  # exit 0 cases: a regex one `warning:` line must match


def _sub(text: str, tmp_path: Path) -> str:
    return text.replace(MODELS, str(tmp_path / "models")).replace(TMP, str(tmp_path))


def _policy_path(tmp_path: Path) -> Path:
    return tmp_path / "etc" / "policy.yaml"


def _billion_laughs() -> str:
    lines = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for prev, cur in zip("abcdefgh", "bcdefghi", strict=True):
        lines.append(f"{cur}: &{cur} [{', '.join([f'*{prev}'] * 9)}]")
    return HEAD + "\n".join(lines) + "\n"


def _fifty_mb(tmp_path: Path) -> Path:
    path = _policy_path(tmp_path)
    with open(path, "wb") as fh:
        fh.write(_sub(HEAD, tmp_path).encode())
        fh.truncate(FIFTY_MB)  # the rest reads as NUL bytes; the size is what matters
    return path


def _dev_zero(tmp_path: Path) -> Path:
    return Path("/dev/zero")


def _link_to_etc(tmp_path: Path) -> Path:
    (tmp_path / "etc-link").symlink_to("/etc")
    return write_policy(_policy_path(tmp_path), {"model_dir": str(tmp_path / "etc-link")})


def _home_dir(tmp_path: Path) -> Path:
    (tmp_path / "home").mkdir()
    return write_policy(_policy_path(tmp_path), {"model_dir": str(tmp_path / "home")})


def _config_is_a_directory(tmp_path: Path) -> Path:
    path = tmp_path / "etc" / "policy.d"
    path.mkdir()
    return path


def _dangling_config(tmp_path: Path) -> Path:
    path = _policy_path(tmp_path)
    path.symlink_to(tmp_path / "gone.yaml")
    return path


# fmt: off
CATALOGUE: list[Case] = [
    # -- wrong types ------------------------------------------------------------------------
    Case("model-dir-list", "model_dir: [a, b]\nengine: {backend: none}\n", "model_dir", 1,
         r"path"),
    Case("model-dir-number", "model_dir: 42\nengine: {backend: none}\n", "model_dir", 1,
         r"path"),
    Case("suspend-not-bool", HEAD + "suspend: maybe\n", "suspend", 3, r"boolean"),
    Case("max-per-cycle-word", HEAD + "prune:\n  max_per_cycle: many\n",
         "prune.max_per_cycle", 4, r"integer"),
    Case("max-per-cycle-zero", HEAD + "prune:\n  max_per_cycle: 0\n",
         "prune.max_per_cycle", 4, r"greater than or equal to 1"),
    Case("max-per-cycle-absurd", HEAD + "prune:\n  max_per_cycle: 1000000000000\n",
         "prune.max_per_cycle", 4, r"less than or equal"),
    Case("max-fraction-zero", HEAD + "prune:\n  max_fraction: 0\n",
         "prune.max_fraction", 4, r"greater than 0"),
    Case("max-fraction-over-one", HEAD + "prune:\n  max_fraction: 1.5\n",
         "prune.max_fraction", 4, r"less than or equal to 1"),
    Case("prune-action-unknown", HEAD + "prune:\n  action: shred\n",
         "prune.action", 4, r"'quarantine' or 'delete'"),
    Case("unmanaged-unknown", HEAD + "unmanaged: delete\n", "unmanaged", 3,
         r"'report' or 'prune'"),
    Case("whitelist-a-string", HEAD + 'whitelist: "*.gguf"\n', "whitelist", 3, r"list"),
    Case("prefix-a-number", HEAD + "prune:\n  prefixes: [7]\n", "prune.prefixes[0]", 4,
         r"YAML read `7` as the number 7; quote it: \"7\""),
    Case("required-a-mapping", HEAD + "required: {name: a.bin}\n", "required", 3, r"list"),
    Case("required-item-a-number", HEAD + "required:\n  - 42\n", "required[0]", 4,
         r"expected a model name, but YAML read `42` as the number 42"),
    Case("required-item-a-list", HEAD + "required:\n  - [a.bin]\n", "required[0]", 4,
         r"expected a model name \(- en_ocr_v1\.bin\) or its keys"),
    Case("sha256-not-hex", HEAD + "required:\n  - name: a.bin\n    sha256: abc\n",
         "required[0].sha256", 5, r"64 hex digits"),
    Case("log-level-unknown", HEAD + "log:\n  level: verbose\n", "log.level", 4,
         r"'debug', 'info', 'warning' or 'error'"),
    Case("engine-backend-unknown", f"model_dir: {MODELS}\nengine:\n  backend: tensorflow\n",
         "engine.backend", 3, r"'auto', 'aspose' or 'none'"),
    Case("prune-a-list", HEAD + "prune: [old_]\n", "prune", 3, r"dictionary|mapping|object"),
    # -- unknown keys -------------------------------------------------------------------------
    Case("unknown-top-level-key", HEAD + "prunes:\n  prefixes: [old_]\n", "prunes", 3,
         r"unknown key; did you mean 'prune'\? Valid keys here are: model_dir, "),
    Case("unknown-nested-key", HEAD + "prune:\n  min_agee: 10m\n", "prune.min_agee", 4,
         r"unknown key; did you mean 'min_age'\? Valid keys here are: prefixes, min_age"),
    Case("unknown-key-in-a-list-item",
         HEAD + "required:\n  - name: a.bin\n    sha265: abc\n", "required[0].sha265", 5,
         r"unknown key; did you mean 'sha256'\? Valid keys here are: name, sha256, source"),
    Case("unknown-engine-key", f"model_dir: {MODELS}\nengine:\n  backend: none\n  gpu: true\n",
         "engine.gpu", 4, r"unknown key\. Valid keys here are: backend, runtime_dir"),
    # -- names, prefixes and globs --------------------------------------------------------------
    Case("empty-prefix", HEAD + 'prune:\n  prefixes: ["old_", ""]\n', "prune.prefixes[1]", 4,
         r"empty"),
    Case("slash-in-prefix", HEAD + 'prune:\n  prefixes:\n    - old_\n    - "a/b"\n',
         "prune.prefixes[1]", 6, r"'/'"),
    Case("slash-in-name", HEAD + "required:\n  - name: sub/x.bin\n", "required[0].name", 4,
         r"'/'"),
    Case("slash-in-whitelist-glob", HEAD + 'whitelist: ["models/*.gguf"]\n', "whitelist[0]", 3,
         r"'/'"),
    Case("slash-in-ignore-glob", HEAD + 'ignore:\n  - "*.part"\n  - "cache/*"\n', "ignore[1]",
         5, r"'/'"),
    Case("absolute-glob", HEAD + 'whitelist: ["/etc/*"]\n', "whitelist[0]", 3, r"'/'"),
    Case("absolute-name", HEAD + "required:\n  - name: /etc/passwd\n", "required[0].name", 4,
         r"'/'"),
    Case("dotdot-name", HEAD + 'required:\n  - name: ".."\n', "required[0].name", 4,
         r"not a model name"),
    Case("dot-prefix", HEAD + 'prune:\n  prefixes: [".ocrd"]\n', "prune.prefixes[0]", 4,
         r"starts with '\.'"),
    Case("nul-in-prefix", HEAD + 'prune:\n  prefixes: ["old\\0"]\n', "prune.prefixes[0]", 4,
         r"NUL"),
    Case("nul-in-name", HEAD + 'required:\n  - name: "a\\0b.bin"\n', "required[0].name", 4,
         r"NUL"),
    Case("nul-in-glob", HEAD + 'whitelist: ["*.gguf\\0"]\n', "whitelist[0]", 3, r"NUL"),
    Case("nul-in-model-dir", 'model_dir: "/srv/models\\0/x"\nengine: {backend: none}\n',
         "model_dir", 1, r"directory path"),
    Case("nul-in-source", HEAD + 'required:\n  - name: a.bin\n    source: "/srv/a\\0.bin"\n',
         "required[0].source", 5, r"NUL"),
    # -- model_dir and state_dir that must never be managed ---------------------------------------
    # Every state dir is inside "/", so that is said too: two problems, two lines.
    Case("model-dir-root", "model_dir: /\nengine: {backend: none}\n", "model_dir", 1,
         r"system or home directory", problems=2),
    Case("model-dir-etc", "model_dir: /etc\nengine: {backend: none}\n", "model_dir", 1,
         r"system or home directory"),
    Case("model-dir-usr", "model_dir: /usr\nengine: {backend: none}\n", "model_dir", 1,
         r"system or home directory"),
    Case("model-dir-inside-proc", "model_dir: /proc/sys/fs\nengine: {backend: none}\n",
         "model_dir", 1, r"system directory /proc"),
    Case("model-dir-dotdot-to-etc",
         f"model_dir: {TMP}/../../../../../../../../../etc\nengine: {{backend: none}}\n",
         "model_dir", 1, r"resolves to /etc"),
    Case("model-dir-symlink-to-etc", key="model_dir", line=1, words=r"resolves to /etc",
         build=_link_to_etc),
    Case("model-dir-home", key="model_dir", line=1, words=r"home directory",
         env={"HOME": f"{TMP}/home"}, build=_home_dir),
    Case("model-dir-empty", 'model_dir: ""\nengine: {backend: none}\n', "model_dir", 1,
         r"directory path"),
    Case("state-dir-inside-model-dir", HEAD + f"state_dir: {MODELS}/.state\n", "state_dir", 3,
         r"inside model_dir"),
    # -- YAML that must not be obeyed ------------------------------------------------------------
    # DESIGN §2: every error names the key path. Where the offending node is the value of a
    # policy key (a tag on model_dir, a duplicate prune.min_age) that path must be in the line.
    Case("billion-laughs", _billion_laughs(), line=3, words=r"anchor '&a' is not allowed",
         max_seconds=5.0),
    Case("alias", HEAD + "prune:\n  prefixes: *p\n", "prune.prefixes", 4,
         r"alias '\*p' is not allowed", key_anywhere=True),
    Case("python-tag",
         f'model_dir: !!python/object/apply:os.system ["touch {TMP}/pwned"]\n'
         "engine: {backend: none}\n",
         "model_dir", 1, r"tag .* is not allowed", key_anywhere=True),
    Case("binary-tag", HEAD + "whitelist: [!!binary aGVsbG8=]\n", "whitelist[0]", 3,
         r"tag .* is not allowed", key_anywhere=True),
    Case("local-tag", HEAD + "prune: !include prune.yaml\n", "prune", 3,
         r"tag .* is not allowed", key_anywhere=True),
    Case("fifty-mb", words=rf"{FIFTY_MB} bytes.*1 MiB", build=_fifty_mb, max_seconds=1.0),
    # An endless device has no size to state; "is 0 bytes ... at most 1 MiB" contradicts itself.
    Case("dev-zero-as-policy", words=r"not a regular file", not_words=r"\b0 bytes\b",
         build=_dev_zero, max_seconds=1.0),
    Case("not-utf8", HEAD.encode() + b"whitelist: ['\xff\xfe.bin']\n", line=3, words=r"UTF-8"),
    Case("duplicate-top-level-key", HEAD + "model_dir: /srv/other\n", "model_dir", 3,
         r"duplicate key", key_anywhere=True),
    Case("duplicate-nested-key", HEAD + "prune:\n  min_age: 1m\n  min_age: 2h\n",
         "prune.min_age", 5, r"duplicate key", key_anywhere=True),
    Case("deep-nesting", HEAD + "whitelist: " + "[" * 40 + "]" * 40 + "\n", line=3,
         words=r"nested more than 32 levels"),
    Case("list-document", f"- model_dir: {MODELS}\n", line=1, words=r"expected a mapping"),
    Case("scalar-document", "model_dir\n", line=1, words=r"expected a mapping"),
    Case("two-documents", HEAD + "---\nmodel_dir: /srv/other\n", line=3,
         words=r"another document"),
    Case("unclosed-bracket", HEAD + "prune:\n  prefixes: [old_\n", line=4,
         words=r"invalid YAML: a list opened with '\[' on this line is not closed"),
    Case("tab-indentation", HEAD + "prune:\n\tmin_age: 1m\n", line=4, words=r"invalid YAML"),
    Case("number-as-key", HEAD + "1: one\n", line=3, words=r"must be a word"),
    Case("list-as-key", HEAD + "? [a, b]\n: c\n", line=3, words=r"plain word"),
    Case("empty-file", "", "model_dir", words=r"is required but not set"),
    Case("comments-only", "# the policy goes here\n", "model_dir",
         words=r"is required but not set"),
    # -- durations ---------------------------------------------------------------------------------
    Case("duration-negative", HEAD + "prune:\n  min_age: -5\n", "prune.min_age", 4,
         r"cannot be negative"),
    Case("duration-negative-text", HEAD + 'prune:\n  min_age: "-5m"\n', "prune.min_age", 4,
         r"expected a duration like"),
    Case("duration-absurd", HEAD + "quarantine:\n  retention: 100000d\n",
         "quarantine.retention", 4, r"longer than ten years"),
    Case("duration-nan", HEAD + "prune:\n  min_age: .nan\n", "prune.min_age", 4,
         r"expected a duration"),
    Case("duration-infinite", HEAD + "prune:\n  min_age: .inf\n", "prune.min_age", 4,
         r"longer than ten years"),
    Case("duration-words", HEAD + "prune:\n  min_age: ten minutes\n", "prune.min_age", 4,
         r"expected a duration like '90s', '10m', '1h 30min' or '7d', got 'ten minutes'"),
    Case("duration-a-boolean", HEAD + "reconcile:\n  resync: yes\n", "reconcile.resync", 4,
         r"expected a duration"),
    Case("debounce-zero", HEAD + "reconcile:\n  debounce: 0s\n", "reconcile.debounce", 4,
         r"longer than 0s"),
    Case("release-timeout-zero", f"model_dir: {MODELS}\nengine:\n  release_timeout: 0\n",
         "engine.release_timeout", 3, r"longer than 0s"),
    Case("duration-months-or-minutes", HEAD + "prune:\n  min_age: 10M\n", "prune.min_age", 4,
         r"'M' means months in systemd but minutes to many; write 'min' or 'months'"),
    # -- what YAML 1.1 made of unquoted text: said, with the fix -------------------------------
    Case("prefix-yaml-int-underscore", HEAD + "prune:\n  prefixes: [old_, 2024_]\n",
         "prune.prefixes[1]", 4, r"YAML read `2024_` as the number 2024; quote it: \"2024_\""),
    Case("prefix-yaml-boolean", HEAD + "prune:\n  prefixes: [old_, no]\n", "prune.prefixes[1]",
         4, r"YAML read `no` as the boolean false; quote it: \"no\""),
    Case("min-age-base-60", HEAD + "prune:\n  min_age: 10:00\n", "prune.min_age", 4,
         r"expected a duration, but YAML read `10:00` as the base-60 number 600; write it "
         r"with a unit"),
    Case("name-yaml-date", HEAD + "required:\n  - name: 2024-01-01\n", "required[0].name", 4,
         r"YAML read `2024-01-01` as the date 2024-01-01; quote it: \"2024-01-01\""),
    Case("unmanaged-yaml-boolean", HEAD + "unmanaged: no\n", "unmanaged", 3,
         r"expected 'report' or 'prune', but YAML read `no` as the boolean false"),
    Case("misplaced-key", HEAD + "min_age: 10m\n", "min_age", 3,
         r"unknown key here; 'min_age' belongs under 'prune:'"),
    Case("over-indented-key", HEAD + "prune:\n  prefixes: [old_]\n    min_age: 10m\n", line=5,
         words=r"invalid YAML: this key is indented differently from the keys above it",
         not_words=r"block|<|>"),
    # -- problems across keys; every problem on its own line ---------------------------------------
    Case("required-twice", HEAD + "required:\n  - name: a.bin\n  - name: a.bin\n",
         "required[1].name", 5, r"listed twice"),
    Case("required-but-ignored", HEAD + "required:\n  - name: big.part\n", "required[0].name",
         4, r"ignore glob '\*\.part'"),
    Case("two-problems", HEAD + "prune:\n  min_age: soon\nunmanaged: maybe\n", "prune.min_age",
         4, r"'soon'", problems=2),
    # -- conflicts are warnings, not errors ------------------------------------------------------
    Case("required-under-a-prune-prefix",
         HEAD + "required:\n  - name: old_keep.bin\nprune:\n  prefixes: [old_]\n",
         code=0, problems=0,
         warning=r"required 'old_keep\.bin' starts with prune prefix 'old_'.*never pruned"),
    Case("whitelist-over-a-prune-prefix",
         HEAD + 'whitelist: ["old_*.gguf"]\nprune:\n  prefixes: [old_]\n', code=0, problems=0,
         warning=r"whitelist 'old_\*\.gguf' overlaps prune prefix 'old_'"),
    # -- the environment ------------------------------------------------------------------------
    Case("env-typo-nested", HEAD, "prune.min_aeg", env={"OCRD_PRUNE__MIN_AEG": "1h"},
         env_var="OCRD_PRUNE__MIN_AEG",
         words=r"names no key of 'prune:'; did you mean OCRD_PRUNE__MIN_AGE\?"),
    Case("env-below-a-value", HEAD, "model_dir.path", env={"OCRD_MODEL_DIR__PATH": "/srv/m"},
         env_var="OCRD_MODEL_DIR__PATH", words=r"holds one value, not keys; did you mean "
         r"OCRD_MODEL_DIR\?"),
    Case("env-invalid-duration", HEAD, "prune.min_age", env={"OCRD_PRUNE__MIN_AGE": "soon"},
         env_var="OCRD_PRUNE__MIN_AGE", words=r"'soon'"),
    Case("env-invalid-boolean", HEAD, "suspend", env={"OCRD_SUSPEND": "perhaps"},
         env_var="OCRD_SUSPEND", words=r"boolean"),
    Case("env-invalid-choice", HEAD, "prune.action", env={"OCRD_PRUNE__ACTION": "shred"},
         env_var="OCRD_PRUNE__ACTION", words=r"'quarantine' or 'delete'"),
    Case("env-model-dir-etc", HEAD, "model_dir", env={"OCRD_MODEL_DIR": "/etc"},
         env_var="OCRD_MODEL_DIR", words=r"system or home directory"),
    Case("env-prefix-with-slash", HEAD, "prune.prefixes[0]",
         env={"OCRD_PRUNE__PREFIXES": '["a/b"]'}, env_var="OCRD_PRUNE__PREFIXES",
         words=r"'/'"),
    Case("env-list-not-json", HEAD, "whitelist", env={"OCRD_WHITELIST": "*.gguf"},
         env_var="OCRD_WHITELIST", words=r"JSON|list"),
    Case("env-config-nowhere", None, env={"OCRD_CONFIG": f"{TMP}/etc/nowhere.yaml"},
         no_config=True, words=r"policy file not found"),
    Case("config-is-a-directory", words=r"is a directory", build=_config_is_a_directory),
    Case("config-dangling-symlink", words=r"policy file not found", build=_dangling_config),
]
# fmt: on


def _expected_prefix(case: Case, path: str) -> str:
    where = f"{path} (environment {case.env_var})" if case.env_var else path
    if case.line is not None:
        where += f":{case.line}"
    return f"ocrd: error: {where}: "


def test_catalogue_has_at_least_40_entries() -> None:
    """The catalogue of hostile inputs holds at least 40 distinct, uniquely named cases."""
    print(f"bad-input catalogue: {len(CATALOGUE)} cases")
    assert len({c.id for c in CATALOGUE}) == len(CATALOGUE)
    assert len(CATALOGUE) >= 40


@pytest.mark.parametrize("case", CATALOGUE, ids=[c.id for c in CATALOGUE])
def test_hostile_policy_is_refused_with_one_clear_line_per_problem(
    run_ocrd: Run, tmp_path: Path, models: Path, policy: Path, case: Case
) -> None:
    """`ocrd check` exits with the documented code and says file, line and key, no traceback."""
    assert policy == _policy_path(tmp_path)  # the fixture makes its dir, tmp_path/etc
    if case.build is not None:
        path = case.build(tmp_path)
    else:
        path = policy
        if case.text is not None:
            raw = case.text if isinstance(case.text, bytes) else case.text.encode()
            raw = raw.replace(MODELS.encode(), str(models).encode())
            path.write_bytes(raw.replace(TMP.encode(), str(tmp_path).encode()))
    env = {k: _sub(v, tmp_path) for k, v in case.env.items()}
    shown = env.get("OCRD_CONFIG", str(path)) if case.no_config else str(path)
    args = ("check",) if case.no_config else ("--config", path, "check")
    before = sorted(os.listdir(models))

    started = time.monotonic()
    r = run_ocrd(*args, extra_env=env, timeout=30)
    elapsed = time.monotonic() - started

    assert r.code == case.code, r
    assert "Traceback" not in r.err and "Traceback" not in r.out, r
    assert "internal error" not in r.err, r
    assert sorted(os.listdir(models)) == before  # a refused policy touches nothing
    assert not (tmp_path / "pwned").exists()
    if case.max_seconds is not None:
        assert elapsed < case.max_seconds, f"took {elapsed:.2f}s: {r!r}"
    errors = r.err.splitlines()
    assert len(errors) == case.problems, r
    if case.code == 0:
        warnings = [line for line in r.out.splitlines() if line.startswith("warning:")]
        assert case.warning is not None
        assert any(re.search(case.warning, w) for w in warnings), r
        assert not [line for line in r.out.splitlines() if line.startswith("error:")], r
        return
    assert r.out == "", r
    assert all(line.startswith("ocrd: error: ") for line in errors), r
    first = errors[0]
    prefix = _expected_prefix(case, shown)
    assert first.startswith(prefix), f"expected {prefix!r}...: {r!r}"
    if case.key is not None:
        if case.key_anywhere:
            assert case.key in first[len(prefix) :], f"key path {case.key!r} not named: {first}"
        else:
            assert first[len(prefix) :].startswith(f"{case.key}: "), (
                f"expected key path {case.key!r} right after the location: {first}"
            )
    assert re.search(case.words, r.err), f"{case.words!r} not in {r.err!r}"
    if case.not_words is not None:
        assert not re.search(case.not_words, r.err), f"misleading: {r.err!r}"


# -- symlinks out of the model dir --------------------------------------------------------

PASSWD = b"root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n"


def snapshot_tree(path: Path) -> dict[str, tuple[Any, ...]]:
    """Everything at and below *path*, links not followed: kind, bytes or target, inode, mtime."""
    out: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(path):
        for name in sorted(dirnames + filenames):
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            rel = os.path.relpath(full, path)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(full), st.st_ino)
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", st.st_ino, st.st_mode)
            else:
                out[rel] = ("file", Path(full).read_bytes(), st.st_ino, st.st_mtime_ns, st.st_mode)
    return out


def _outside(tmp_path: Path) -> Path:
    """A tree outside the model dir: a passwd-like file and a directory with data."""
    outside = tmp_path / "outside"
    (outside / "data" / "deep").mkdir(parents=True)
    make_model(outside, "passwd", PASSWD)
    make_model(outside / "data", "weights.bin", os.urandom(40_000))
    make_model(outside / "data" / "deep", "more.bin", b"m" * 3_000)
    return outside


def _events(out: str, name: str) -> list[dict[str, Any]]:
    return matching(log_lines(out), name)


@pytest.mark.parametrize("mode", ["quarantine", "delete"])
def test_symlinks_pointing_out_of_the_model_dir_are_pruned_as_links_only(
    run_ocrd: Run, tmp_path: Path, models: Path, policy: Path, mode: str
) -> None:
    """`ocrd apply` prunes prunable symlinks to outside files and dirs; the targets stay as is."""
    outside = _outside(tmp_path)
    links = {
        "old_passwd": outside / "passwd",
        "old_data": outside / "data",
        "old_relative": Path("..") / "outside" / "passwd",
    }
    for name, target in links.items():
        (models / name).symlink_to(target)
    make_model(models, "keep.bin", b"keep")
    write_policy(
        policy,
        {
            "model_dir": str(models),
            "state_dir": str(tmp_path / "state"),
            "prune": {"prefixes": ["old_"], "min_age": 0, "max_fraction": 1.0, "action": mode},
            "engine": {"backend": "none"},
        },
    )
    before = snapshot_tree(outside)

    r = run_ocrd("--config", policy, "apply")

    assert r.code == 0, r
    assert snapshot_tree(outside) == before
    assert sorted(e["model"] for e in _events(r.out, "model.pruned")) == sorted(links)
    assert sorted(n for n in os.listdir(models) if not n.startswith(".")) == ["keep.bin"]
    assert (models / "keep.bin").read_bytes() == b"keep"
    trash = models / ".ocrd-trash"
    if mode == "quarantine":
        moved = {p.name: p for p in trash.glob("*/old_*")}
        assert sorted(moved) == sorted(links)
        for name, target in links.items():
            assert moved[name].is_symlink(), name
            assert os.readlink(moved[name]) == str(target)
    else:
        assert not trash.exists() or not any(trash.iterdir())
    assert [n for n in os.listdir(models) if n.startswith((".ocrd-tmp-", ".ocrd-deleting-"))] == []


@pytest.mark.parametrize("with_source", [False, True], ids=["no-source", "with-source"])
def test_required_symlink_with_a_pin_is_not_followed_for_hashing(
    run_ocrd: Run, tmp_path: Path, models: Path, policy: Path, with_source: bool
) -> None:
    """A pinned required model that is a symlink is corrupt even if its target matches the pin."""
    outside = _outside(tmp_path)
    pin = hashlib.sha256(PASSWD).hexdigest()  # the target's bytes match the pin exactly
    (models / "need.bin").symlink_to(outside / "passwd")
    required: dict[str, Any] = {"name": "need.bin", "sha256": pin}
    if with_source:
        mirror = tmp_path / "mirror"
        mirror.mkdir()
        required["source"] = str(make_model(mirror, "need.bin", PASSWD))
    write_policy(
        policy,
        {
            "model_dir": str(models),
            "state_dir": str(tmp_path / "state"),
            "required": [required],
            "engine": {"backend": "none"},
        },
    )
    before = snapshot_tree(outside)

    listed = run_ocrd("--config", policy, "list", "--json")
    assert listed.code == 1, listed
    (row,) = [m for m in listed.json()["models"] if m["name"] == "need.bin"]
    assert (row["class"], row["kind"], row["pin"]) == ("required", "symlink", "corrupt")

    r = run_ocrd("--config", policy, "apply")

    assert snapshot_tree(outside) == before
    (corrupt,) = _events(r.out, "model.corrupt")
    assert corrupt["model"] == "need.bin"
    assert "symlink" in corrupt["reason"], corrupt
    if not with_source:
        assert r.code == 1, r  # reported, not converged
        assert (models / "need.bin").is_symlink()
        assert os.readlink(models / "need.bin") == str(outside / "passwd")
        assert _events(r.out, "model.restored") == []
    else:
        assert r.code == 0, r
        need = models / "need.bin"
        assert not need.is_symlink() and need.read_bytes() == PASSWD
        (restored,) = _events(r.out, "model.restored")
        assert restored["replaced"], restored
        (moved,) = (models / ".ocrd-trash").glob("*/need.bin")
        assert moved.is_symlink()
        assert os.readlink(moved) == str(outside / "passwd")
    assert snapshot_tree(outside) == before
