"""The fixtures the tests share, each defined once; the helpers they use are in support/."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.cli import Result, ocrd
from tests.support.daemon import Daemons, daemon_env
from tests.support.engine import aspose_available, fetch_llama_runtime, persistent_cache
from tests.support.mounts import MOUNT, UMOUNT, mount_tmpfs, unmount
from tests.support.policy import policy_data, save_policy

# -- the CLI ------------------------------------------------------------------------------


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """An environment for the real CLI: no OCRD_* leaking in, state under tmp_path."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OCRD_")}
    clean.pop("STATE_DIRECTORY", None)
    clean["XDG_STATE_HOME"] = str(tmp_path / "xdg-state")
    return clean


@pytest.fixture
def run_ocrd(env: dict[str, str]) -> Callable[..., Result]:
    """Run the installed `ocrd` command as a subprocess: run_ocrd("--config", p, "plan")."""

    def run(
        *args: str | Path, extra_env: dict[str, str] | None = None, timeout: float = 60
    ) -> Result:
        return Result(ocrd(*args, env={**env, **(extra_env or {})}, timeout=timeout))

    return run


# -- where a test's files go ----------------------------------------------------------------


@pytest.fixture
def models(tmp_path: Path) -> Path:
    """The model dir of one test: tmp_path/models, created empty."""
    path = tmp_path / "models"
    path.mkdir()
    return path


@pytest.fixture
def root(models: Path) -> Path:
    """The model dir of one test (`models`), under the name the executor and CLI tests use."""
    return models


@pytest.fixture
def state(tmp_path: Path) -> Path:
    """Where the state dir of one test goes: tmp_path/state, not created."""
    return tmp_path / "state"


@pytest.fixture
def policy(tmp_path: Path) -> Path:
    """Where the policy file goes: tmp_path/etc/policy.yaml, in a dir of its own as /etc/ocrd is.

    The dir is created; the file is not.
    """
    path = tmp_path / "etc" / "policy.yaml"
    path.parent.mkdir()
    return path


@pytest.fixture
def saved_policy(policy: Path, models: Path) -> Path:
    """The `policy` file, saved with policy_data(models): a fast policy on the model dir."""
    return save_policy(policy, policy_data(models))


@pytest.fixture
def status_file(tmp_path: Path) -> Path:
    """Where a daemon started in `denv` writes its status: tmp_path/run/status.json."""
    return tmp_path / "run" / "status.json"


# -- daemons --------------------------------------------------------------------------------


@pytest.fixture
def denv(env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """The environment of the daemons and `ocrd status`: no service-manager variables,
    $RUNTIME_DIRECTORY at tmp_path/run (see `status_file`)."""
    return daemon_env(env, runtime=tmp_path / "run")


@pytest.fixture
def plain_denv(env: dict[str, str]) -> dict[str, str]:
    """`denv` without $RUNTIME_DIRECTORY: the status file goes to the state dir."""
    return daemon_env(env, runtime=None)


@pytest.fixture
def daemons(denv: dict[str, str]) -> Iterator[Daemons]:
    """Starts `ocrd run` daemons (in `denv`) for one test; whatever is left is ended after."""
    with Daemons(denv) as group:
        yield group


# -- filesystems (root) ---------------------------------------------------------------------


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A fresh 64 MiB tmpfs mounted at tmp_path/models (fsync is free there)."""
    path = tmp_path / "models"
    path.mkdir()
    mount_tmpfs(path, "64m")
    try:
        yield path
    finally:
        unmount(path)


@pytest.fixture
def tmpfs_at() -> Iterator[Callable[[Path, str], None]]:
    """tmpfs_at(path, size): mount a tmpfs there (skip if that fails); unmounted at the end."""
    if MOUNT is None or UMOUNT is None:
        pytest.skip("mount/umount are not installed")
    mounted: list[Path] = []

    def mount(path: Path, size: str) -> None:
        try:
            mount_tmpfs(path, size)
        except subprocess.CalledProcessError as exc:
            pytest.skip(f"cannot mount a tmpfs here: {exc.stderr.strip() or exc.returncode}")
        mounted.append(path)

    try:
        yield mount
    finally:
        for path in reversed(mounted):
            unmount(path, check=False)


@pytest.fixture
def immutable() -> Iterator[Callable[..., None]]:
    """immutable(path, on=True): chattr +i / -i (skip if that fails); all undone at the end."""
    chattr = shutil.which("chattr")
    if chattr is None:
        pytest.skip("chattr is not installed: cannot make a path un-renamable for root")
    flagged: list[Path] = []

    def flag(path: Path, on: bool = True) -> None:
        proc = subprocess.run(
            [chattr, "+i" if on else "-i", str(path)], capture_output=True, text=True, check=False
        )
        if proc.returncode != 0:
            pytest.skip(f"chattr {'+' if on else '-'}i does not work here: {proc.stderr.strip()}")
        if on:
            flagged.append(path)

    try:
        yield flag
    finally:
        for path in flagged:
            subprocess.run([chattr, "-i", str(path)], capture_output=True, check=False)


# -- the real Aspose engine -----------------------------------------------------------------


@pytest.fixture(scope="session")
def aspose() -> None:
    """Skip, with the import error, where `aspose.ocr` cannot be imported."""
    reason = aspose_available()
    if reason is not None:
        pytest.skip(reason)


@pytest.fixture(scope="session")
def llama_runtime(aspose: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The flat llama.cpp runtime dir, fetched once with npm into a persistent cache."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        runtime = fetch_llama_runtime(persistent_cache(tmp_path_factory))
    print(printed.getvalue(), end="")
    if runtime is None:
        pytest.skip(printed.getvalue().strip() or "llama.cpp runtime could not be fetched")
    return runtime


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory every user may enter (tmp_path's parents are root's alone)."""
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="ocrd-shared-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
