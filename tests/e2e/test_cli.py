"""End-to-end tests of the `ocrd` command: the real CLI as a subprocess on a real model dir.

DESIGN §2 (policy), §4 (actions and safety rules) and §6 (CLI, exit codes, logs).
The quarantine commands (`ocrd trash ...`) are in test_cli_trash.py.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import stat
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

import ocrd
from tests.support.cli import OCRD
from tests.support.files import make_model, sha256
from tests.support.logs import events, json_lines
from tests.support.policy import write_policy
from tests.support.procs import HOLD_FD, holder
from tests.support.trash import trash_item

HOUR = 3600.0
DAY = 86400.0
OLD = 2 * HOUR  # well past the min_age of 10m every policy here sets
TIMESTAMP = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|\+00:00)$")
ERROR_LINE = re.compile(r"^ocrd: error: (?P<file>.+?):(?P<line>\d+): (?P<key>[\w.\[\]]+): \S")


# -- helpers ------------------------------------------------------------------------------


def policy(root: Path, **overrides: Any) -> Path:
    """A policy for *root* next to it: prefixes old_/tmp_, min_age 10m, engine none."""
    data: dict[str, Any] = {
        "model_dir": str(root),
        "prune": {"prefixes": ["old_", "tmp_"], "min_age": "10m", "max_fraction": 1.0},
        "engine": {"backend": "none"},
    }
    prune = overrides.pop("prune", {})
    data["prune"].update(prune)
    data.update(overrides)
    return write_policy(root.parent / "policy.yaml", data)


def tree(root: Path, *, skip: tuple[str, ...] = ()) -> dict[str, tuple[Any, ...]]:
    """Every path below *root* with its type, size, mtime and (for files) content."""
    found: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            rel = str(path.relative_to(root))
            if rel in skip:
                continue
            st = path.lstat()
            regular = stat.S_ISREG(st.st_mode)
            found[rel] = (
                stat.S_IFMT(st.st_mode),
                st.st_size if regular else None,
                st.st_mtime_ns,
                path.read_bytes() if regular else None,
            )
    return found


def names(root: Path) -> set[str]:
    return {p.name for p in root.iterdir()}


def finished(out: str) -> dict[str, Any]:
    (record,) = events(out, "cycle.finished")
    return record


def assert_one_error_line(err: str, path: Path) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"ocrd: error: {path}"), err
    assert "Traceback" not in err
    return lines[0]


# -- the command itself -------------------------------------------------------------------


def test_version_prints_the_package_version(run_ocrd):
    """`ocrd --version` prints the installed version and exits 0."""
    r = run_ocrd("--version")
    assert r.code == 0, r
    assert r.out.strip() == f"ocrd, version {ocrd.__version__}"


def test_help_lists_the_commands(run_ocrd):
    """`ocrd --help` exits 0 and names every subcommand and the --config option."""
    r = run_ocrd("--help")
    assert r.code == 0, r
    assert r.out.startswith("Usage: ocrd")
    assert "--config" in r.out
    for command in ("check", "list", "plan", "apply", "trash"):
        assert re.search(rf"^\s+{command}\s", r.out, re.MULTILINE), command


def test_unknown_command_is_a_usage_error(run_ocrd):
    """An unknown subcommand exits 2 with a one-line reason and no traceback."""
    r = run_ocrd("frobnicate")
    assert r.code == 2, r
    assert "No such command 'frobnicate'" in r.err
    assert "Traceback" not in r.err
    assert r.out == ""


# -- check --------------------------------------------------------------------------------


def test_check_valid_policy_reports_ok(run_ocrd, root):
    """`check` on a valid policy and a writable model dir exits 0 with "ok:" findings."""
    path = policy(root, required=[{"name": "en.bin"}])
    r = run_ocrd("--config", path, "check")
    assert r.code == 0, r
    lines = r.out.splitlines()
    assert f"ok: policy {path} is valid" in lines
    assert f"ok: model_dir {root} exists and is writable" in lines
    assert "ok: engine backend 'none' loads" in lines
    assert not [line for line in lines if line.startswith("error:")]
    assert lines[-1].startswith(f"{path}: 0 error(s), ")


def test_check_invalid_policy_prints_one_line_per_problem(run_ocrd, root):
    """An invalid policy exits 2 with one `ocrd: error: FILE:LINE: KEY: ...` line per problem."""
    path = root.parent / "policy.yaml"
    path.write_text(
        f"model_dir: {root}\n"
        "prune:\n"
        '  prefixes: ["old_", "a/b"]\n'
        "  min_age: ten minutes\n"
        "unmanaged: maybe\n"
        "colour: blue\n",
        encoding="utf-8",
    )
    r = run_ocrd("--config", path, "check")
    assert r.code == 2, r
    assert "Traceback" not in r.err
    assert r.out == ""
    found = set()
    for line in r.err.splitlines():
        match = ERROR_LINE.match(line)
        assert match, line
        assert match["file"] == str(path)
        found.add((int(match["line"]), match["key"]))
    assert found == {
        (3, "prune.prefixes[1]"),
        (4, "prune.min_age"),
        (5, "unmanaged"),
        (6, "colour"),
    }
    assert len(r.err.splitlines()) == 4
    assert "'ten minutes'" in r.err
    assert "Valid keys here are:" in r.err  # the unknown key says what would be valid


def test_check_missing_model_dir_is_a_problem(run_ocrd, tmp_path):
    """`check` with a model_dir that does not exist prints the finding and exits 1."""
    missing = tmp_path / "nowhere"
    path = write_policy(
        tmp_path / "policy.yaml", {"model_dir": str(missing), "engine": {"backend": "none"}}
    )
    r = run_ocrd("--config", path, "check")
    assert r.code == 1, r
    assert f"error: model_dir {missing} does not exist" in r.out
    assert f"ok: policy {path} is valid" in r.out  # every finding is printed, not just the first
    assert "Traceback" not in r.err
    assert not missing.exists()


def test_check_warns_when_protection_shadows_a_prune_prefix(run_ocrd, root):
    """A required name or whitelist glob that starts with a prune prefix is a warning."""
    path = policy(root, required=[{"name": "old_keep.bin"}], whitelist=["old_*.gguf"])
    r = run_ocrd("--config", path, "check")
    assert r.code == 0, r
    warnings = [line for line in r.out.splitlines() if line.startswith("warning:")]
    assert any("'old_keep.bin'" in w and "prefix 'old_'" in w for w in warnings), r.out
    assert any("'old_*.gguf'" in w and "prefix 'old_'" in w for w in warnings), r.out


def test_check_reads_policy_from_ocrd_config(run_ocrd, root):
    """Without --config, the policy comes from $OCRD_CONFIG; a relative model_dir is resolved
    against the policy file's directory."""
    path = write_policy(root.parent / "policy.yaml", {"model_dir": "models"})
    r = run_ocrd("check", extra_env={"OCRD_CONFIG": str(path)})
    assert r.code == 0, r
    assert f"ok: policy {path} is valid" in r.out
    assert f"ok: model_dir {os.path.realpath(root)} exists and is writable" in r.out


def test_invalid_environment_override_names_the_variable(run_ocrd, root):
    """A bad OCRD_* override exits 2 with one line naming the variable and the key."""
    path = policy(root)
    r = run_ocrd("--config", path, "check", extra_env={"OCRD_PRUNE__MIN_AGE": "soon"})
    assert r.code == 2, r
    line = assert_one_error_line(r.err, path)
    assert "OCRD_PRUNE__MIN_AGE" in line
    assert "prune.min_age" in line
    assert "'soon'" in line


def test_model_dir_resolving_to_a_system_dir_is_refused(run_ocrd, tmp_path):
    """A model_dir that resolves (through a symlink) to /etc is an invalid policy, exit 2."""
    (tmp_path / "models").symlink_to("/etc")
    path = write_policy(tmp_path / "policy.yaml", {"model_dir": "models"})
    r = run_ocrd("--config", path, "plan")
    assert r.code == 2, r
    line = assert_one_error_line(r.err, path)
    assert re.match(rf"ocrd: error: {re.escape(str(path))}:1: model_dir: .*/etc", line), line
    assert r.out == ""


def test_config_pointing_at_missing_file_fails_loudly(run_ocrd, root):
    """--config naming a missing file exits 2 with one clear line, even when $OCRD_CONFIG is
    valid."""
    missing = root.parent / "typo.yaml"
    r = run_ocrd("--config", missing, "check", extra_env={"OCRD_CONFIG": str(policy(root))})
    assert r.code == 2, r
    line = assert_one_error_line(r.err, missing)
    assert "not found" in line
    assert r.out == ""


# -- policy files that must fail fast -----------------------------------------------------


def _billion_laughs(tmp_path: Path) -> bytes:
    lines = ["model_dir: models", 'a: &a ["lol", "lol", "lol", "lol"]']
    lines += [
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}]" for p, c in zip("abcdefgh", "bcdefghi", strict=True)
    ]
    return ("\n".join(lines) + "\n").encode()


def _python_tag(tmp_path: Path) -> bytes:
    marker = tmp_path / "pwned"
    return f'model_dir: !!python/object/apply:os.system ["touch {marker}"]\n'.encode()


def _two_mib(tmp_path: Path) -> bytes:
    return b"model_dir: models\n" + b"# padding\n" * (2 * 1024 * 1024 // 10)


def _not_utf8(tmp_path: Path) -> bytes:
    return b"model_dir: models\nwhitelist: ['\xff\xfe.bin']\n"


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (_billion_laughs, r"anchor|alias"),
        (_python_tag, r"tag"),
        (_two_mib, r"1 MiB"),
        (_not_utf8, r"UTF-8"),
    ],
    ids=["yaml-alias", "python-tag", "2-mib", "not-utf8"],
)
def test_hostile_policy_fails_with_one_clear_line(run_ocrd, tmp_path, make, words):
    """A policy with aliases, a python tag, 2 MiB of text or non-UTF-8 bytes exits 2 with one
    line."""
    (tmp_path / "models").mkdir()
    path = tmp_path / "policy.yaml"
    path.write_bytes(make(tmp_path))
    r = run_ocrd("--config", path, "check")
    assert r.code == 2, r
    line = assert_one_error_line(r.err, path)
    assert re.search(words, line), line
    assert r.out == ""
    assert not (tmp_path / "pwned").exists()


def test_oversized_policy_message_does_not_misstate_its_size(run_ocrd, tmp_path):
    """The error for a policy over 1 MiB states the file's real size, or only that it is too
    big."""
    path = tmp_path / "policy.yaml"
    path.write_bytes(_two_mib(tmp_path))
    size = path.stat().st_size
    r = run_ocrd("--config", path, "check")
    assert r.code == 2, r
    stated = re.search(r"(\d+) bytes", r.err.split("at most")[0])
    assert stated is None or int(stated.group(1)) == size, (
        f"the message says the {size}-byte file is {stated and stated.group(1)} bytes: {r.err}"
    )


# -- list ---------------------------------------------------------------------------------


def _mixed(root: Path) -> None:
    """One model of every class."""
    make_model(root, "en.bin", b"required", age=OLD)
    make_model(root, "qwen.gguf", b"whitelisted", age=OLD)
    make_model(root, "old_a.bin", b"stale", age=OLD)
    make_model(root, "notes.txt", b"nothing", age=OLD)


def test_list_table_shows_class_and_rule(run_ocrd, root):
    """`list` prints a table with each model's class and the rule that decided it."""
    _mixed(root)
    path = policy(root, required=[{"name": "en.bin"}], whitelist=["*.gguf"])
    r = run_ocrd("--config", path, "list")
    assert r.code == 0, r
    header, *rows = r.out.splitlines()
    assert header.split() == ["NAME", "CLASS", "RULE", "KIND", "SIZE", "AGE", "PIN"]
    cells = {row.split("  ")[0]: re.split(r"\s{2,}", row.strip()) for row in rows}
    assert cells["en.bin"][1:3] == ["required", "required"]
    assert cells["qwen.gguf"][1:3] == ["allowed", "whitelist '*.gguf'"]
    assert cells["old_a.bin"][1:3] == ["prune", "prefix 'old_'"]
    assert cells["notes.txt"][1:3] == ["unmanaged", "no rule"]
    assert cells["old_a.bin"][3:5] == ["file", "5 B"]
    assert len(rows) == 4


def test_list_json_has_the_documented_schema(run_ocrd, root):
    """`list --json` is one document: schema, model_dir, models[name, class, rule, kind, size,
    mtime, age_seconds, pin]."""
    _mixed(root)
    path = policy(root, required=[{"name": "en.bin", "sha256": sha256(b"required")}])
    r = run_ocrd("--config", path, "list", "--json")
    assert r.code == 0, r
    doc = r.json()
    assert set(doc) == {"schema", "model_dir", "models", "deleted_held", "pinned_bytes"}
    assert doc["schema"] == 1
    assert doc["model_dir"] == os.path.realpath(root)
    fields = {
        "name", "class", "rule", "kind", "size", "mtime", "age_seconds", "pin", "family", "rank"
    }  # fmt: skip
    assert all(set(m) == fields for m in doc["models"])
    by_name = {m["name"]: m for m in doc["models"]}
    assert set(by_name) == {"en.bin", "qwen.gguf", "old_a.bin", "notes.txt"}
    en = by_name["en.bin"]
    assert (en["class"], en["rule"], en["kind"], en["size"], en["pin"]) == (
        "required",
        "required",
        "file",
        8,
        "ok",
    )
    old = by_name["old_a.bin"]
    assert (old["class"], old["rule"], old["pin"]) == ("prune", "prefix 'old_'", None)
    assert OLD - 60 < old["age_seconds"] < OLD + 60
    mtime = datetime.fromisoformat(old["mtime"])
    assert mtime.utcoffset() == timezone.utc.utcoffset(None)
    assert abs(mtime.timestamp() - (root / "old_a.bin").stat().st_mtime) < 1
    # entries no rule acts on are looked at too: list shows every size and age
    for name in ("qwen.gguf", "notes.txt"):
        assert by_name[name]["size"] == (root / name).stat().st_size, name
        assert by_name[name]["age_seconds"] is not None, name


def test_list_hides_ignored_and_dot_entries_unless_all(run_ocrd, root):
    """Dot-entries and `ignore` globs are left out of `list`, and shown as ignored with
    `--all`."""
    make_model(root, "en.bin")
    make_model(root, ".hidden")
    make_model(root, "partial.part")
    make_model(root, "job.wip")
    path = policy(root, ignore=["*.part", "*.wip"])
    plain = run_ocrd("--config", path, "list", "--json")
    every = run_ocrd("--config", path, "list", "--json", "--all")
    assert plain.code == every.code == 0, (plain, every)
    assert [m["name"] for m in plain.json()["models"]] == ["en.bin"]
    shown = {m["name"]: (m["class"], m["rule"]) for m in every.json()["models"]}
    assert shown == {
        ".hidden": ("ignored", "dot-entry"),
        "en.bin": ("unmanaged", "no rule"),
        "job.wip": ("ignored", "ignore '*.wip'"),
        "partial.part": ("ignored", "ignore '*.part'"),
    }


def test_list_shows_missing_required_and_exits_1(run_ocrd, root):
    """A required model that is absent is listed with class "missing" and `list` exits 1."""
    make_model(root, "other.bin")
    path = policy(root, required=[{"name": "en.bin"}])
    r = run_ocrd("--config", path, "list", "--json")
    assert r.code == 1, r
    by_name = {m["name"]: m for m in r.json()["models"]}
    assert by_name["en.bin"]["class"] == "missing"
    assert by_name["en.bin"]["size"] is None
    assert not (root / "en.bin").exists()


def test_list_shows_corrupt_pin_and_exits_1(run_ocrd, root):
    """A required model whose sha256 differs from its pin shows "corrupt" and `list` exits 1."""
    make_model(root, "en.bin", b"bit rot")
    path = policy(root, required=[{"name": "en.bin", "sha256": sha256(b"the real weights")}])
    r = run_ocrd("--config", path, "list")
    assert r.code == 1, r
    (row,) = [line for line in r.out.splitlines() if line.startswith("en.bin ")]
    assert re.split(r"\s{2,}", row.strip())[-1] == "corrupt"
    assert (root / "en.bin").read_bytes() == b"bit rot"


# -- plan ---------------------------------------------------------------------------------


def _pending(root: Path) -> Path:
    """A model dir with a restore, a prune, a purge and some reports pending."""
    mirror = root.parent / "mirror"
    mirror.mkdir()
    make_model(mirror, "en.bin", b"weights")
    make_model(root, "qwen.gguf", b"whitelisted", age=OLD)
    make_model(root, "old_a.bin", b"stale", age=OLD)
    make_model(root, "old_young.bin", b"fresh")
    make_model(root, "notes.txt", b"nothing", age=OLD)
    expired = time.time() - 30 * DAY
    trash_item(root, "20200101T000000Z-abcd0123", "old_gone.bin", b"expired", trashed_at=expired)
    return policy(
        root,
        required=[
            {"name": "en.bin", "sha256": sha256(b"weights"), "source": str(mirror / "en.bin")}
        ],
        whitelist=["*.gguf"],
        quarantine={"retention": "7d"},
    )


def test_plan_text_lists_actions_and_reports(run_ocrd, root):
    """`plan` prints each action with its reason and bytes, then what it only reports."""
    path = _pending(root)
    r = run_ocrd("--config", path, "plan")
    assert r.code == 0, r
    lines = r.out.splitlines()
    assert lines[0].split() == ["ACTION", "MODEL", "BYTES", "REASON"]
    rows = {re.split(r"\s{2,}", line)[1]: re.split(r"\s{2,}", line) for line in lines[1:4]}
    assert rows["en.bin"][0] == "restore"
    assert rows["old_a.bin"][0] == "prune (quarantine)"
    assert rows["old_a.bin"][2] == "5 B"
    assert rows["old_a.bin"][3].startswith("prefix 'old_', 2h")
    assert rows["old_gone.bin"][0] == "purge"
    assert "3 action(s); 12 B freed." in lines
    reports = r.out.split("REPORT", 1)[1]
    assert re.search(r"^waiting\s+old_young\.bin\s+prefix 'old_'", reports, re.MULTILINE)
    assert re.search(r"^unmanaged\s+notes\.txt\s", reports, re.MULTILINE)
    assert re.search(r"^missing\s+en\.bin\s", reports, re.MULTILINE)


def test_plan_json_has_the_documented_schema(run_ocrd, root):
    """`plan --json` has schema, model_dir, suspended, actions, reports, errors and
    bytes_freed."""
    path = _pending(root)
    r = run_ocrd("--config", path, "plan", "--json")
    assert r.code == 0, r
    doc = r.json()
    assert set(doc) == {
        "schema",
        "model_dir",
        "suspended",
        "actions",
        "reports",
        "errors",
        "bytes_freed",
    }
    assert (doc["schema"], doc["model_dir"], doc["suspended"], doc["errors"]) == (
        1,
        os.path.realpath(root),
        False,
        [],
    )
    action_keys = {
        "action", "model", "reason", "rule", "bytes", "mode", "source", "sources", "trash_id"
    }  # fmt: skip
    assert all(set(a) == action_keys for a in doc["actions"])
    actions = {a["action"]: a for a in doc["actions"]}
    assert set(actions) == {"restore", "prune", "purge"}
    restore = actions["restore"]
    assert (restore["model"], restore["source"], restore["mode"]) == (
        "en.bin",
        str(root.parent / "mirror" / "en.bin"),
        None,
    )
    prune = actions["prune"]
    assert (prune["model"], prune["mode"], prune["bytes"], prune["rule"]) == (
        "old_a.bin",
        "quarantine",
        5,
        "prefix 'old_'",
    )
    purge = actions["purge"]
    assert (purge["model"], purge["trash_id"], purge["bytes"]) == (
        "old_gone.bin",
        "20200101T000000Z-abcd0123/old_gone.bin",
        7,
    )
    assert all(set(rep) == {"kind", "model", "reason"} for rep in doc["reports"])
    reports = {(rep["kind"], rep["model"]) for rep in doc["reports"]}
    assert {("missing", "en.bin"), ("unmanaged", "notes.txt"), ("waiting", "old_young.bin")} <= (
        reports
    )
    assert doc["bytes_freed"] == 5 + 7


def test_plan_exit_code_is_0_when_nothing_to_do(run_ocrd, root):
    """`plan --exit-code` exits 0 when the model dir already matches the policy."""
    make_model(root, "en.bin", age=OLD)
    make_model(root, "old_young.bin")
    path = policy(root, required=[{"name": "en.bin"}])
    r = run_ocrd("--config", path, "plan", "--exit-code")
    assert r.code == 0, r
    assert r.out.startswith("Nothing to do")


def test_plan_exit_code_is_3_when_changes_are_pending(run_ocrd, root):
    """`plan --exit-code` exits 3 when apply would change the disk."""
    make_model(root, "en.bin", age=OLD)
    make_model(root, "old_a.bin", age=OLD)
    path = policy(root, required=[{"name": "en.bin"}])
    r = run_ocrd("--config", path, "plan", "--exit-code")
    assert r.code == 3, r
    assert "old_a.bin" in r.out


def test_plan_changes_nothing_on_disk(run_ocrd, root):
    """`plan` with a restore, a prune and a purge pending leaves every file and mtime as it
    was."""
    path = _pending(root)
    before = tree(root)
    r = run_ocrd("--config", path, "plan", "--json")
    assert r.code == 0, r
    assert len(r.json()["actions"]) == 3
    assert tree(root) == before
    assert ".ocrd-lock" not in names(root)


def test_plan_refuses_to_prune_more_than_max_fraction(run_ocrd, root):
    """A plan that would prune more than prune.max_fraction of the models is an error, exit
    1."""
    for name in ("old_a.bin", "old_b.bin", "old_c.bin"):
        make_model(root, name, age=OLD)
    make_model(root, "en.bin", age=OLD)
    path = policy(root, prune={"max_fraction": 0.5})
    text = run_ocrd("--config", path, "plan", "--exit-code")
    doc = run_ocrd("--config", path, "plan", "--json")
    assert text.code == doc.code == 1, (text, doc)
    assert re.search(r"^error: refusing to prune 3 of 4 models.*max_fraction", text.out, re.M)
    plan = doc.json()
    assert plan["actions"] == []
    assert len(plan["errors"]) == 1
    assert "max_fraction" in plan["errors"][0]
    refused = {rep["model"] for rep in plan["reports"] if rep["kind"] == "refused"}
    assert refused == {"old_a.bin", "old_b.bin", "old_c.bin"}


# -- apply --------------------------------------------------------------------------------


def test_apply_quarantines_old_prefixed_models_and_keeps_the_rest(run_ocrd, root):
    """`apply` moves old prefixed models into .ocrd-trash/ and leaves protected, unmanaged and
    young ones."""
    kept = {
        "en.bin": b"required",
        "old_but_required.bin": b"required too",
        "old_custom.gguf": b"whitelisted",
        "notes.txt": b"unmanaged",
    }
    for name, data in kept.items():
        make_model(root, name, data, age=OLD)
    make_model(root, "old_young.bin", b"young")
    kept["old_young.bin"] = b"young"
    pruned = {"old_a.bin": b"stale a", "tmp_b.bin": b"stale bb"}
    for name, data in pruned.items():
        make_model(root, name, data, age=OLD)
    path = policy(
        root,
        required=[{"name": "en.bin"}, {"name": "old_but_required.bin"}],
        whitelist=["*.gguf"],
    )
    r = run_ocrd("--config", path, "apply")
    assert r.code == 0, r
    for name, data in kept.items():
        assert (root / name).read_bytes() == data, name
    logged = {e["model"]: e for e in events(r.out, "model.pruned")}
    assert set(logged) == set(pruned)
    batches: set[str] = set()
    for name, data in pruned.items():
        assert not (root / name).exists()
        line = logged[name]
        assert line["bytes"] == len(data)
        assert line["reason"].startswith(f"prefix '{name[:4]}', 2h")
        match = re.fullmatch(r"\.ocrd-trash/([^/]+)/([^/]+)", line["dest"])
        assert match and match.group(2) == name, line
        batches.add(match.group(1))
        assert (root / line["dest"]).read_bytes() == data
        batch = root / ".ocrd-trash" / match.group(1)
        record = json.loads((batch / ".ocrd-record.json").read_text(encoding="utf-8"))
        assert record["version"] == 2
        (listed,) = [i for i in record["items"] if i["name"] == name]
        assert listed["size"] == len(data)
        assert abs(record["trashed_at"] - time.time()) < 60
    (batch_id,) = batches  # one apply, one batch
    assert sorted(os.listdir(root / ".ocrd-trash" / batch_id)) == sorted(
        [".ocrd-record.json", *pruned]
    )


def test_apply_deletes_files_dirs_and_links_with_action_delete(run_ocrd, root, tmp_path):
    """With `action: delete`, old files, directories and symlinks go for good; a link's target
    stays."""
    make_model(root, "old_a.bin", b"stale", age=OLD)
    model_dir = root / "old_dir"
    (model_dir / "sub").mkdir(parents=True)
    (model_dir / "w1.bin").write_bytes(b"1234")
    (model_dir / "sub" / "w2.bin").write_bytes(b"123456")
    past = time.time() - OLD
    for p in (model_dir / "w1.bin", model_dir / "sub" / "w2.bin", model_dir / "sub", model_dir):
        os.utime(p, (past, past))
    target = make_model(tmp_path, "outside.bin", b"not in the model dir")
    (root / "old_link").symlink_to(target)
    os.utime(root / "old_link", (past, past), follow_symlinks=False)
    make_model(root, "en.bin", b"keep", age=OLD)
    path = policy(root, prune={"action": "delete"})
    r = run_ocrd("--config", path, "apply")
    assert r.code == 0, r
    assert names(root) == {"en.bin", ".ocrd-lock"}
    assert target.read_bytes() == b"not in the model dir"
    logged = {e["model"]: e for e in events(r.out, "model.pruned")}
    assert set(logged) == {"old_a.bin", "old_dir", "old_link"}
    assert {e["dest"] for e in logged.values()} == {"deleted"}
    assert logged["old_a.bin"]["bytes"] == 5
    assert logged["old_dir"]["bytes"] == 10
    assert all(e["reason"].startswith("prefix 'old_'") for e in logged.values())


def test_apply_restores_missing_pinned_model_from_source(run_ocrd, root, tmp_path):
    """A missing required model with a pin and a source is copied in, verified, and logged."""
    data = b"weights v1" * 1000
    source = make_model(tmp_path, "mirror.bin", data)
    path = policy(
        root, required=[{"name": "en.bin", "sha256": sha256(data), "source": str(source)}]
    )
    r = run_ocrd("--config", path, "apply")
    assert r.code == 0, r
    assert (root / "en.bin").read_bytes() == data
    assert source.read_bytes() == data
    assert not [n for n in names(root) if n.startswith(".ocrd-tmp-")]
    (line,) = events(r.out, "model.restored")
    assert (line["model"], line["bytes"], line["dest"], line["sha256"]) == (
        "en.bin",
        len(data),
        "en.bin",
        sha256(data),
    )
    assert str(source) in line["reason"]


def test_apply_replaces_corrupt_pinned_model_and_quarantines_the_old(run_ocrd, root, tmp_path):
    """A corrupt pinned model is replaced from its source; the corrupt copy goes to the
    quarantine."""
    data = b"good weights"
    source = make_model(tmp_path, "mirror.bin", data)
    make_model(root, "en.bin", b"bit rot", age=OLD)
    path = policy(
        root, required=[{"name": "en.bin", "sha256": sha256(data), "source": str(source)}]
    )
    r = run_ocrd("--config", path, "apply")
    assert r.code == 0, r
    assert (root / "en.bin").read_bytes() == data
    (line,) = events(r.out, "model.restored")
    assert re.fullmatch(r"\.ocrd-trash/[^/]+/en\.bin", line["replaced"]), line
    assert (root / line["replaced"]).read_bytes() == b"bit rot"


def test_apply_never_installs_a_source_that_fails_its_pin(run_ocrd, root, tmp_path):
    """A source whose sha256 is not the pin is not put in place; the corrupt model stays and
    apply exits 1."""
    source = make_model(tmp_path, "mirror.bin", b"also wrong")
    make_model(root, "en.bin", b"bit rot", age=OLD)
    path = policy(
        root, required=[{"name": "en.bin", "sha256": sha256(b"good"), "source": str(source)}]
    )
    r = run_ocrd("--config", path, "apply")
    assert r.code == 1, r
    assert (root / "en.bin").read_bytes() == b"bit rot"
    assert names(root) == {"en.bin", ".ocrd-lock"}
    (failed,) = events(r.out, "action.failed")
    assert failed["model"] == "en.bin"
    assert "nothing replaced" in failed["error"]


def test_apply_stdout_is_json_lines_with_timestamp_level_event_first(run_ocrd, root):
    """Every stdout line of `apply` is a JSON object starting with a UTC timestamp, level and
    event."""
    make_model(root, "old_a.bin", age=OLD)
    make_model(root, "en.bin", age=OLD)
    path = policy(root, required=[{"name": "missing.bin"}], engine={"backend": "none"})
    r = run_ocrd("--config", path, "apply")
    assert r.code == 1, r  # the missing required model is a problem
    assert r.err == ""
    records = json_lines(r.out)
    for record in records:
        assert list(record)[:3] == ["timestamp", "level", "event"], record
        assert TIMESTAMP.match(record["timestamp"]), record
        when = datetime.fromisoformat(record["timestamp"])
        assert when.utcoffset() == timezone.utc.utcoffset(None)
        assert abs(when.timestamp() - time.time()) < 60
        assert record["level"] in {"debug", "info", "warning", "error"}
        assert re.fullmatch(r"[a-z_]+(\.[a-z_]+)+", record["event"]), record
    seen = [r["event"] for r in records]
    assert {"model.missing", "model.pruned", "engine.cycled", "cycle.finished"} <= set(seen)
    assert seen[-1] == "cycle.finished"


def test_apply_dry_run_changes_nothing(run_ocrd, root):
    """`apply --dry-run` logs the planned actions and leaves the disk exactly as it was."""
    path = _pending(root)
    before = tree(root)
    r = run_ocrd("--config", path, "apply", "--dry-run")
    assert r.code == 1, r  # en.bin is still missing afterwards
    assert tree(root) == before
    planned = events(r.out, "action.planned")
    assert {(e["action"], e["model"]) for e in planned} == {
        ("restore", "en.bin"),
        ("prune", "old_a.bin"),
        ("purge", "old_gone.bin"),
    }
    assert all(e["dry_run"] is True for e in planned)
    assert not events(r.out, "model.pruned")
    done = finished(r.out)
    assert (done["dry_run"], done["done"]) == (True, 0)


def test_apply_with_suspend_changes_nothing(run_ocrd, root):
    """With `suspend: true`, `apply` changes no model and says the cycle was suspended."""
    make_model(root, "old_a.bin", age=OLD)
    make_model(root, "en.bin", age=OLD)
    expired = time.time() - 30 * DAY
    trash_item(root, "20200101T000000Z-abcd0123", "old_gone.bin", b"expired", trashed_at=expired)
    path = policy(root, suspend=True)
    before = tree(root)
    r = run_ocrd("--config", path, "apply")
    assert r.code == 0, r
    assert tree(root, skip=(".ocrd-lock",)) == before
    done = finished(r.out)
    assert (done["suspended"], done["planned"], done["done"]) == (True, 0, 0)
    assert not events(r.out, "model.pruned")
    assert not events(r.out, "trash.purged")


def test_apply_with_suspend_logs_what_it_holds_back(run_ocrd, root):
    """With `suspend: true`, each action `apply` holds back is still named in its log, as
    --dry-run does."""
    make_model(root, "old_a.bin", age=OLD)
    make_model(root, "en.bin", age=OLD)
    path = policy(root, suspend=True)
    r = run_ocrd("--config", path, "apply")
    assert r.code == 0, r
    assert (root / "old_a.bin").exists()
    mentioned = [e for e in json_lines(r.out) if e.get("model") == "old_a.bin"]
    assert mentioned, f"nothing in the apply log says old_a.bin would be pruned: {r.out}"


def test_apply_twice_is_a_no_op_the_second_time(run_ocrd, root):
    """A second `apply` right after the first plans nothing and changes nothing."""
    make_model(root, "old_a.bin", age=OLD)
    make_model(root, "en.bin", age=OLD)
    path = policy(root, required=[{"name": "en.bin"}])
    first = run_ocrd("--config", path, "apply")
    assert first.code == 0, first
    assert finished(first.out)["done"] == 1
    after_first = tree(root, skip=(".ocrd-lock",))
    second = run_ocrd("--config", path, "apply")
    assert second.code == 0, second
    done = finished(second.out)
    assert (done["planned"], done["done"], done["failed"], done["skipped"]) == (0, 0, 0, 0)
    assert [e["event"] for e in json_lines(second.out)] == ["cycle.finished"]
    assert tree(root, skip=(".ocrd-lock",)) == after_first


def test_apply_console_log_format_is_for_humans(run_ocrd, root):
    """OCRD_LOG__FORMAT=console makes `apply` write readable lines instead of JSON."""
    make_model(root, "old_a.bin", age=OLD)
    make_model(root, "en.bin", age=OLD)
    path = policy(root)
    r = run_ocrd("--config", path, "apply", extra_env={"OCRD_LOG__FORMAT": "console"})
    assert r.code == 0, r
    lines = r.out.splitlines()
    assert lines
    for line in lines:
        assert not line.lstrip().startswith("{"), line
        with pytest.raises(ValueError):
            json.loads(line)
    assert any("model.pruned" in line and "old_a.bin" in line for line in lines), r.out
    assert any("cycle.finished" in line for line in lines), r.out
    assert not (root / "old_a.bin").exists()


def test_apply_refuses_while_another_process_holds_the_lock(run_ocrd, root):
    """`apply` exits 1 naming the pid in `.ocrd-lock` when another process holds it, and
    changes nothing."""
    make_model(root, "old_a.bin", age=OLD)
    make_model(root, "en.bin", age=OLD)
    path = policy(root)
    fd = os.open(root / ".ocrd-lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, f"{os.getpid()}\n".encode())
        before = tree(root)
        r = run_ocrd("--config", path, "apply")
        assert tree(root) == before
    finally:
        os.close(fd)
    assert r.code == 1, r
    (line,) = r.err.splitlines()
    assert line.startswith("ocrd: error: another ocrd"), line
    assert f"pid {os.getpid()}" in line
    assert str(root) in line
    assert "model.pruned" not in r.out


def test_apply_cleans_crash_leftovers(run_ocrd, root):
    """`apply` removes `.ocrd-tmp-*` and `.ocrd-deleting-*` leftovers at the top level and logs
    each."""
    make_model(root, ".ocrd-tmp-0123456789abcdef", b"half a copy")
    deleting = root / ".ocrd-deleting-fedcba9876543210"
    (deleting / "inner").mkdir(parents=True)
    (deleting / "a.bin").write_bytes(b"a")
    (deleting / "inner" / "b.bin").write_bytes(b"b")
    make_model(root, "en.bin", b"keep", age=OLD)
    path = policy(root, required=[{"name": "en.bin"}])
    r = run_ocrd("--config", path, "apply")
    assert r.code == 0, r
    assert names(root) == {"en.bin", ".ocrd-lock"}
    assert (root / "en.bin").read_bytes() == b"keep"
    removed = {e["path"] for e in events(r.out, "recovery.removed")}
    assert removed == {".ocrd-tmp-0123456789abcdef", ".ocrd-deleting-fedcba9876543210"}


def test_apply_leaves_a_model_another_process_holds_open(run_ocrd, root):
    """A model held open by another process is reported busy with its pid and not pruned until
    it is closed."""
    busy = make_model(root, "old_busy.bin", b"in use", age=OLD)
    make_model(root, "old_free.bin", b"free", age=OLD)
    make_model(root, "en.bin", age=OLD)
    path = policy(root)
    with holder(root.parent, "ocrd-hold-fd", HOLD_FD, busy) as child:
        first = run_ocrd("--config", path, "apply")
        assert child.stdin is not None
        child.stdin.close()
        assert child.wait(timeout=10) == 0
    assert first.code == 1, first
    (report,) = events(first.out, "model.busy")
    assert report["model"] == "old_busy.bin"
    assert child.pid in report["pids"]
    assert f"pid {child.pid}" in report["holders"]
    assert busy.read_bytes() == b"in use"
    assert [e["model"] for e in events(first.out, "model.pruned")] == ["old_free.bin"]
    assert finished(first.out)["skipped"] == 1

    second = run_ocrd("--config", path, "apply")
    assert second.code == 0, second
    assert [e["model"] for e in events(second.out, "model.pruned")] == ["old_busy.bin"]
    assert not busy.exists()


def test_apply_prunes_at_most_max_per_cycle_oldest_first(run_ocrd, root):
    """With prune.max_per_cycle=1, `apply` prunes only the oldest candidate; the rest wait."""
    make_model(root, "old_newer.bin", age=OLD)
    make_model(root, "old_oldest.bin", age=3 * OLD)
    make_model(root, "en.bin", age=OLD)
    path = policy(root, prune={"max_per_cycle": 1})
    r = run_ocrd("--config", path, "apply")
    assert r.code == 0, r
    assert [e["model"] for e in events(r.out, "model.pruned")] == ["old_oldest.bin"]
    assert names(root) >= {"old_newer.bin", "en.bin"}
    assert "old_oldest.bin" not in names(root)


def test_apply_never_quarantines_through_a_symlinked_trash(run_ocrd, root, tmp_path):
    """When `.ocrd-trash` is a symlink out of the model dir, nothing is moved there and apply
    exits 1: the view is suspicious (one of ocrd's own names is not what ocrd made)."""
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (root / ".ocrd-trash").symlink_to(outside)
    make_model(root, "old_a.bin", b"stale", age=OLD)
    make_model(root, "en.bin", age=OLD)
    path = policy(root)
    r = run_ocrd("--config", path, "apply")
    assert r.code == 1, r
    assert list(outside.iterdir()) == []
    assert (root / "old_a.bin").read_bytes() == b"stale"
    (suspicious,) = events(r.out, "model_dir.suspicious")
    assert ".ocrd-trash is a symbolic link" in suspicious["reason"]
    assert not events(r.out, "model.pruned")


def test_apply_refuses_to_prune_more_than_max_fraction(run_ocrd, root):
    """`apply` prunes nothing, logs the refusal and exits 1 when over prune.max_fraction."""
    for name in ("old_a.bin", "old_b.bin", "old_c.bin"):
        make_model(root, name, age=OLD)
    make_model(root, "en.bin", age=OLD)
    path = policy(root, prune={"max_fraction": 0.5})
    before = tree(root)
    r = run_ocrd("--config", path, "apply")
    assert r.code == 1, r
    assert tree(root, skip=(".ocrd-lock",)) == before
    (refused,) = events(r.out, "plan.refused")
    assert "max_fraction" in refused["error"]
    assert not events(r.out, "model.pruned")


def test_hashing_a_big_pinned_model_shows_progress_on_a_terminal_only(
    run_ocrd: Any, root: Path, env: dict[str, str]
) -> None:
    """Hashing a pinned model over 256 MiB prints progress on a terminal's stderr, not in pipes."""
    import pty

    big = root / "big.bin"
    chunk = os.urandom(1 << 20)
    digest = hashlib.sha256()
    with open(big, "wb") as fh:
        for _ in range(300):
            fh.write(chunk)
            digest.update(chunk)
    path = policy(root, required=[{"name": "big.bin", "sha256": digest.hexdigest()}])
    piped = run_ocrd("--config", path, "plan")
    assert piped.code == 0, piped
    assert "hashing" not in piped.err
    # A terminal: stderr on a pty (the hash cache is empty again in a fresh state dir).
    leader, follower = pty.openpty()
    try:
        proc = subprocess.run(
            [OCRD, "--config", str(path), "plan"],
            stdout=subprocess.PIPE,
            stderr=follower,
            env={**env, "XDG_STATE_HOME": str(root.parent / "tty-state")},
            timeout=60,
            check=False,
        )
        os.close(follower)
        follower = -1
        seen = b""
        while True:
            try:
                chunk_read = os.read(leader, 4096)
            except OSError:  # EIO: the terminal's other side is closed and drained
                break
            if not chunk_read:
                break
            seen += chunk_read
    finally:
        if follower != -1:
            os.close(follower)
        os.close(leader)
    assert proc.returncode == 0
    assert b"hashing big.bin" in seen
    assert b"100%" in seen


EXIT_PROBE = """
import atexit, sys, threading, time
from ocrd.cli import main
atexit.register(lambda: print("exit handler ran", flush=True))
if sys.argv[1] == "thread":
    def late() -> None:
        time.sleep(0.3)
        print("thread finished", flush=True)
    threading.Thread(target=late).start()
sys.stdout.write("unflushed output\\n")  # no flush: main() must flush it
sys.argv = ["ocrd", "--version"]
main()
"""


@pytest.mark.parametrize("mode", ["alone", "thread"])
def test_exit_runs_exit_handlers_and_waits_for_threads(mode: str) -> None:
    """ocrd ends the usual way (sys.exit): it runs the exit handlers and loses
    no output, and with another thread still running it waits for it."""
    r = subprocess.run(
        [sys.executable, "-c", EXIT_PROBE, mode], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    out = r.stdout.splitlines()
    assert "unflushed output" in out
    assert any(line.startswith("ocrd") for line in out), out  # --version
    assert "exit handler ran" in out
    if mode == "thread":
        assert "thread finished" in out
