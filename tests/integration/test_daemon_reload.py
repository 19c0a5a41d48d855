"""Policy hot reload in the real daemon: an editor's rename-save, a Kubernetes ConfigMap's
symlink swap, SIGHUP, rejected and deleted policies, a moved model_dir (DESIGN §2, §6).

The daemon harness is tests/support/daemon.py, started by the `daemons` fixture.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
from pathlib import Path
from typing import Any

from tests.support.cli import ocrd, ocrd_status
from tests.support.daemon import Daemons
from tests.support.files import digest, make_model
from tests.support.policy import policy_data, save_policy, status_when, write_policy

# min_age is on line 4: the rejection must say so.
INVALID = """\
model_dir: {models}
prune:
  prefixes: [new_]
  min_age: ten minutes
  max_fraction: 1.0
engine:
  backend: none
reconcile:
  debounce: 100ms
"""


def publish_configmap(root: Path, version: str, data: dict[str, Any]) -> None:
    """Publish *data* as the kubelet does: a new `..VERSION` dir, then swap `..data` to it."""
    root.mkdir(exist_ok=True)
    stamped = root / f"..{version}"
    stamped.mkdir()
    write_policy(stamped / "policy.yaml", data)
    data_link = root / "..data"
    previous = os.readlink(data_link) if data_link.is_symlink() else None
    os.symlink(stamped.name, root / "..data_tmp")
    os.rename(root / "..data_tmp", data_link)
    if not (root / "policy.yaml").is_symlink():
        os.symlink("..data/policy.yaml", root / "policy.yaml")
    if previous is not None:
        shutil.rmtree(root / previous)


def test_editor_rename_save_reloads_the_policy(
    daemons: Daemons, models: Path, policy: Path
) -> None:
    """A save that renames a temp file over the policy is picked up and the new rules apply."""
    save_policy(policy, policy_data(models))
    daemon = daemons.start(policy)
    mark = daemon.mark()
    save_policy(policy, policy_data(models, prune={"prefixes": ["new_"]}))
    event = daemon.wait("policy.reloaded", after=mark)
    assert event["digest"] == digest(policy)
    assert event["forced"] is False
    make_model(models, "old_a")
    make_model(models, "new_a")
    daemon.wait("model.pruned", after=mark, model="new_a")
    assert (models / "old_a").exists()
    assert not daemon.seen("model.pruned", after=mark, model="old_a")


def test_configmap_symlink_swap_reloads_the_policy(
    daemons: Daemons, models: Path, tmp_path: Path
) -> None:
    """A ConfigMap update (a new `..data` symlink renamed over the old) reloads the policy."""
    config = tmp_path / "config"
    publish_configmap(config, "2026_01_01_v1", policy_data(models))
    policy = config / "policy.yaml"
    daemon = daemons.start(policy)
    mark = daemon.mark()
    publish_configmap(config, "2026_01_02_v2", policy_data(models, prune={"prefixes": ["new_"]}))
    event = daemon.wait("policy.reloaded", after=mark)
    assert event["digest"] == digest(policy)
    assert event["policy"] == str(policy)
    make_model(models, "old_a")
    make_model(models, "new_a")
    daemon.wait("model.pruned", after=mark, model="new_a")
    assert (models / "old_a").exists()


def test_sighup_reloads_and_runs_a_cycle(daemons: Daemons, models: Path, policy: Path) -> None:
    """SIGHUP reloads the policy even when the file is unchanged, and a cycle follows."""
    save_policy(policy, policy_data(models))
    daemon = daemons.start(policy)
    mark = daemon.mark()
    daemon.send(signal.SIGHUP)
    event = daemon.wait("policy.reloaded", after=mark)
    assert event["forced"] is True
    assert event["digest"] == digest(policy)
    daemon.wait("cycle.finished", after=daemon.events.index(event))


def test_invalid_edit_is_rejected_and_the_old_policy_stays_in_force(
    daemons: Daemons, models: Path, policy: Path, status_file: Path
) -> None:
    """An invalid edit is rejected with file, line and key; the old rules keep working."""
    save_policy(policy, policy_data(models))
    good = digest(policy)
    daemon = daemons.start(policy)
    mark = daemon.mark()
    save_policy(policy, INVALID.format(models=models))
    event = daemon.wait("policy.rejected", after=mark)
    assert re.match(rf"^{re.escape(str(policy))}:4: prune\.min_age: ", event["errors"][0])
    assert event["kept"] == good
    make_model(models, "new_a")
    make_model(models, "old_a")
    daemon.wait("model.pruned", after=mark, model="old_a")
    assert (models / "new_a").exists()
    doc = status_when(
        status_file, lambda d: d["policy"]["rejected"], what="the rejection in the status file"
    )
    assert doc["policy"]["digest"] == good
    assert doc["degraded"] is True
    assert "prune.min_age" in doc["policy"]["rejected"]["errors"][0]


def test_rejected_edit_shows_in_the_status_file_at_once(
    daemons: Daemons, models: Path, policy: Path, status_file: Path
) -> None:
    """The status file shows a rejected edit right away, not only after some later cycle."""
    save_policy(policy, policy_data(models))
    daemon = daemons.start(policy)
    mark = daemon.mark()
    save_policy(policy, INVALID.format(models=models))
    daemon.wait("policy.rejected", after=mark)
    doc = status_when(
        status_file,
        lambda d: d["policy"]["rejected"],
        timeout=5,
        what="the rejection in the status file",
    )
    assert doc["degraded"] is True
    assert not daemon.cycles(mark)


def test_next_good_edit_after_a_rejected_one_is_picked_up(
    daemons: Daemons, models: Path, policy: Path, status_file: Path
) -> None:
    """After a rejected edit, the next valid edit is loaded and the status is healthy again."""
    save_policy(policy, policy_data(models))
    daemon = daemons.start(policy)
    mark = daemon.mark()
    save_policy(policy, INVALID.format(models=models))
    daemon.wait("policy.rejected", after=mark)
    make_model(models, "new_a")
    save_policy(policy, policy_data(models, prune={"prefixes": ["new_"]}))
    event = daemon.wait("policy.reloaded", after=mark)
    assert event["digest"] == digest(policy)
    daemon.wait("model.pruned", after=mark, model="new_a")
    doc = status_when(
        status_file,
        lambda d: d["policy"]["digest"] == digest(policy),
        what="the new policy in the status file",
    )
    assert doc["policy"]["rejected"] is None
    assert doc["degraded"] is False


def test_status_exits_1_while_a_policy_edit_is_rejected(
    daemons: Daemons, models: Path, policy: Path, status_file: Path, denv: dict[str, str]
) -> None:
    """`ocrd status` exits 1 and names the rejection while an invalid edit sits on disk."""
    save_policy(policy, policy_data(models))
    daemon = daemons.start(policy)
    mark = daemon.mark()
    save_policy(policy, INVALID.format(models=models))
    daemon.wait("policy.rejected", after=mark)
    make_model(models, "keep.bin")  # a cycle, so the status file is fresh whatever else happens
    daemon.wait("cycle.finished", after=mark)
    status_when(status_file, lambda d: d["degraded"], what="the status file to say degraded")
    shown = ocrd_status(denv, policy, "--json")
    assert shown.returncode == 1, shown
    doc = json.loads(shown.stdout)
    assert doc["running"] is True
    assert doc["policy"]["rejected"]["errors"]


def test_deleted_policy_is_rejected_never_replaced_by_defaults(
    daemons: Daemons, models: Path, policy: Path, status_file: Path
) -> None:
    """Deleting the policy file is an error: the last good policy stays until a new file comes."""
    save_policy(policy, policy_data(models))
    good = digest(policy)
    daemon = daemons.start(policy)
    mark = daemon.mark()
    policy.unlink()
    event = daemon.wait("policy.rejected", after=mark)
    assert str(policy) in event["errors"][0]
    assert event["kept"] == good
    make_model(models, "old_a")
    daemon.wait("model.pruned", after=mark, model="old_a")
    assert not daemon.seen("policy.reloaded")
    doc = status_when(
        status_file, lambda d: d["policy"]["rejected"], what="the rejection in the status file"
    )
    assert doc["degraded"] is True
    assert doc["policy"]["digest"] == good
    save_policy(policy, policy_data(models, prune={"prefixes": ["new_"]}))
    daemon.wait("policy.reloaded", after=mark, digest=digest(policy))
    make_model(models, "new_a")
    daemon.wait("model.pruned", after=mark, model="new_a")


def test_changed_model_dir_moves_the_watch_and_the_lock(
    daemons: Daemons, models: Path, tmp_path: Path, policy: Path, denv: dict[str, str]
) -> None:
    """A reload to another model_dir watches and locks the new dir and lets go of the old one."""
    other = tmp_path / "models2"
    other.mkdir()
    make_model(other, "old_b0")
    save_policy(policy, policy_data(models))
    daemon = daemons.start(policy)
    mark = daemon.mark()
    save_policy(policy, policy_data(other))
    event = daemon.wait("policy.reloaded", after=mark)
    assert event["model_dir"] == str(other)
    daemon.wait("model.pruned", after=mark, model="old_b0")
    make_model(models, "old_a1")
    make_model(other, "old_b1")
    daemon.wait("model.pruned", after=mark, model="old_b1")
    assert (models / "old_a1").exists()
    assert (other / ".ocrd-lock").read_text().strip() == str(daemon.pid)
    first = save_policy(tmp_path / "first.yaml", policy_data(models))
    applied = ocrd("--config", first, "apply", env=denv)
    assert applied.returncode == 0, applied
    assert not (models / "old_a1").exists()
