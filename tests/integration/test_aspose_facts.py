"""Pin the facts of /work/shared/ASPOSE.md with the real `aspose-ocr-python-net` library.

Every use of the library runs in a child process with a private working directory: it can
abort its process (ICU), writes into its cwd, and keeps a loaded model mapped until exit.
A tiny GGUF made by `tests.support.engine.make_tiny_gguf` stands in for the default model, and
llama.cpp's libraries come from the npm package `@node-llama-cpp/linux-x64@3.13.0`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.engine import (
    DEFAULT_MODEL_DIR,
    DEFAULT_MODEL_FILE,
    host_env_and_cwd,
    make_tiny_gguf,
)

CHILD_TIMEOUT = 60

# Shared head of the child scripts: load the default model the way ASPOSE.md says and
# collect what a test asserts in `out`, printed as one JSON line at the end.
LOAD = """
import gc, json, time

def gguf_maps():
    paths = set()
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.rstrip("\\n").split(None, 5)
            if len(fields) == 6 and ".gguf" in fields[5]:
                paths.add(fields[5])
    return sorted(paths)

started = time.monotonic()
from aspose.ocr.ai import AsposeAI, AsposeAIModelConfig, SpellCheckAIProcessor
imported = time.monotonic()
ai = AsposeAI()
cfg = AsposeAIModelConfig()
cfg.allow_auto_download = False
cfg.gpu_layers = 0
proc = SpellCheckAIProcessor()
error = None
try:
    ai.set_post_processor(proc, cfg)
except RuntimeError as exc:
    error = str(exc)
loaded = time.monotonic()
out = {
    "import_s": imported - started,
    "load_s": loaded - imported,
    "error": error,
    "initialized": ai.is_initialized(),
    "mapped": gguf_maps(),
    "local_path": ai.get_local_path(),
}
"""

INFER = """
if out["initialized"]:
    out["run_returned"] = repr(ai.run_postprocessor(["helo wrld"]))
    out["results"] = [type(r).__name__ for r in proc.get_result()]
"""

FREE = """
ai.free_resources()
out["initialized_after_free"] = ai.is_initialized()
out["mapped_after_free"] = gguf_maps()
gc.collect()
out["mapped_after_gc"] = gguf_maps()
"""

PRINT = """
print(json.dumps(out))
"""

LOCAL_PATH = """
import json, os, sys
from aspose.ocr.ai import AsposeAI
ai = AsposeAI()
out = {"local_path": ai.get_local_path(), "listing": list(ai.list_local())}
os.environ["XDG_DATA_HOME"] = sys.argv[1]
out["local_path_after_env_change"] = AsposeAI().get_local_path()
print(json.dumps(out))
"""

CONSTRUCT = """
import aspose.ocr.ai
print("imported", flush=True)
aspose.ocr.ai.AsposeAI()
print("constructed", flush=True)
"""


@dataclass
class Engine:
    """Where a child process loads the tiny model: its environment, cwd and the model."""

    env: dict[str, str]
    cwd: Path
    data_home: Path
    model: Path  # resolved: the path /proc/PID/maps shows


def run_child(
    script: str, env: dict[str, str], cwd: Path, *args: str
) -> subprocess.CompletedProcess[str]:
    """Run *script* with this interpreter in a child process; return its outcome."""
    return subprocess.run(
        [sys.executable, "-c", script, *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT,
        check=False,
    )


def child_json(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """The JSON a child printed on its last stdout line, after checking it exited cleanly."""
    assert proc.returncode == 0, f"child exited {proc.returncode}: {proc.stderr[-3000:]}"
    lines = proc.stdout.strip().splitlines()
    assert lines, f"child printed nothing; stderr: {proc.stderr[-3000:]}"
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def mappers(path: Path) -> list[int]:
    """The pids whose /proc/PID/maps maps *path* (deleted or not)."""
    wanted = {str(path), f"{path} (deleted)"}
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "maps").read_text(errors="replace")
        except OSError:  # gone, or not ours to read
            continue
        for line in text.splitlines():
            fields = line.split(None, 5)
            if len(fields) == 6 and fields[5] in wanted:
                pids.append(int(entry.name))
                break
    return pids


def plain_env(data_home: Path) -> dict[str, str]:
    """Environment for a child that only imports and constructs: invariant mode, own home."""
    env = {k: v for k, v in os.environ.items() if k != "CLR_ICU_VERSION_OVERRIDE"}
    env["DOTNET_SYSTEM_GLOBALIZATION_INVARIANT"] = "1"
    env["XDG_DATA_HOME"] = str(data_home)
    return env


@pytest.fixture(scope="session")
def tiny_models(aspose: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model dir holding the tiny GGUF under the default model's name."""
    models = tmp_path_factory.mktemp("models")
    make_tiny_gguf(models / DEFAULT_MODEL_DIR / DEFAULT_MODEL_FILE)
    return models


@pytest.fixture
def engine(llama_runtime: Path, tiny_models: Path, tmp_path: Path) -> Engine:
    """A private engine home and cwd in which the tiny model loads."""
    data_home = tmp_path / "home"
    env, cwd = host_env_and_cwd(llama_runtime, tmp_path / "cwd", tiny_models, data_home=data_home)
    model = (tiny_models / DEFAULT_MODEL_DIR / DEFAULT_MODEL_FILE).resolve()
    return Engine(env=env, cwd=cwd, data_home=data_home, model=model)


def test_real_load_maps_the_default_model(engine: Engine) -> None:
    """The real library loads the tiny GGUF offline as the default model and maps its file."""
    out = child_json(run_child(LOAD + INFER + PRINT, engine.env, engine.cwd))
    print(f"\nimport {out['import_s']:.3f} s, load {out['load_s']:.3f} s")
    assert out["error"] is None
    assert out["initialized"] is True
    assert str(engine.model) in out["mapped"]
    assert out["local_path"] == str(engine.data_home / "Aspose.AI.LLM" / "models")
    assert out["run_returned"] == "None"
    assert out["results"] == ["AIResult"]
    copied = sorted(p.name for p in engine.cwd.iterdir())
    assert copied == ["libggml-base.so", "libggml.so", "libllama.so"]


def test_free_resources_keeps_the_mapping_until_exit(engine: Engine) -> None:
    """free_resources() and gc leave the model mapped; only the end of the process unmaps it."""
    out = child_json(run_child(LOAD + FREE + PRINT, engine.env, engine.cwd))
    assert out["initialized"] is True
    assert str(engine.model) in out["mapped"]
    assert out["initialized_after_free"] is False
    assert str(engine.model) in out["mapped_after_free"]
    assert str(engine.model) in out["mapped_after_gc"]
    assert mappers(engine.model) == []


def test_local_path_follows_xdg_data_home_set_before_import(tmp_path: Path, aspose: None) -> None:
    """get_local_path() uses XDG_DATA_HOME as it was at import, and an empty dir lists nothing."""
    models = tmp_path / "models"
    models.mkdir()
    data_home = tmp_path / "home"
    (data_home / "Aspose.AI.LLM").mkdir(parents=True)
    (data_home / "Aspose.AI.LLM" / "models").symlink_to(models)
    other = tmp_path / "other"
    (other / "Aspose.AI.LLM" / "models").mkdir(parents=True)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    out = child_json(run_child(LOCAL_PATH, plain_env(data_home), cwd, str(other)))
    assert out["local_path"] == str(data_home / "Aspose.AI.LLM" / "models")
    assert out["listing"] == []
    assert out["local_path_after_env_change"] == out["local_path"]


def test_missing_icu_aborts_construction_unless_invariant(tmp_path: Path, aspose: None) -> None:
    """Without ICU, AsposeAI() kills the process with SIGABRT; invariant globalization avoids it."""
    no_icu = plain_env(tmp_path / "home")
    del no_icu["DOTNET_SYSTEM_GLOBALIZATION_INVARIANT"]
    no_icu["CLR_ICU_VERSION_OVERRIDE"] = "999"
    aborted = run_child(CONSTRUCT, no_icu, tmp_path)
    assert aborted.returncode in (-6, 134), aborted
    assert aborted.stdout.split() == ["imported"]
    assert "Couldn't find a valid ICU package" in aborted.stderr

    invariant = dict(no_icu, DOTNET_SYSTEM_GLOBALIZATION_INVARIANT="1")
    survived = run_child(CONSTRUCT, invariant, tmp_path)
    assert survived.returncode == 0, survived
    assert survived.stdout.split() == ["imported", "constructed"]


def test_runtime_is_looked_up_beside_the_models_not_in_the_cwd(engine: Engine) -> None:
    """With a data home, a runtime under <cwd>/Aspose.AI.LLM/runtimes is ignored."""
    runtimes = engine.data_home / "Aspose.AI.LLM" / "runtimes"
    (engine.cwd / "Aspose.AI.LLM").mkdir()
    runtimes.rename(engine.cwd / "Aspose.AI.LLM" / "runtimes")
    out = child_json(run_child(LOAD + PRINT, engine.env, engine.cwd))
    assert out["initialized"] is False
    assert out["mapped"] == []
    assert out["error"] is not None
    assert "Failed to find or download required binaries for tag 'b6451'" in out["error"]
    assert "Connection refused" in out["error"]  # the dead proxy kept it offline
