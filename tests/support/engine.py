"""Run the real Aspose engine (`aspose-ocr-python-net`) on a real, tiny model, offline.

The `aspose` and `llama_runtime` fixtures of tests/conftest.py are built on this.

/work/shared/ASPOSE.md records the library's measured behaviour; what had to be found out
beyond it is written down in `host_env_and_cwd` and `fetch_llama_runtime`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import pytest

DEFAULT_MODEL_DIR = "lmstudio-community_Llama-3.2-3B-Instruct-GGUF"
DEFAULT_MODEL_FILE = "Llama-3.2-3B-Instruct-Q4_K_M.gguf"

NPM_PACKAGE = "@node-llama-cpp/linux-x64@3.13.0"
NPM_TARBALL = "node-llama-cpp-linux-x64-3.13.0.tgz"
NPM_BINS = "package/bins/linux-x64/"
LLAMA_BUILD = "b6431"  # the llama.cpp build inside the npm package
RUNTIME_TAG = "b6451"  # the llama.cpp tag the library asks for
RID_CPU = "linux-x64-noavx"  # chosen when no nvcc is found
RID_CUDA = "linux-x64-cuda13.0"  # chosen when an nvcc (CUDA 13.0) is found
DEAD_PROXY = "http://127.0.0.1:9"
LIBDL_DIRS = (
    "/usr/lib/x86_64-linux-gnu",
    "/lib/x86_64-linux-gnu",
    "/usr/lib64",
    "/lib64",
    "/usr/lib",
    "/lib",
)

# The model (ASPOSE.md's recipe).
N_EMBD = 64
N_HEAD = 2
N_HEAD_KV = 2
N_FF = 256
N_CTX = 4096
N_ROT = 32
N_BLOCKS = 1
RMS_EPS = 1e-5
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
WORDS = ("\u2581the", "\u2581a", "\u2581hello", "\u2581world", "\u2581text", "\u2581word")
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SEED = 20240601


def make_tiny_gguf(path: Path) -> Path:
    """Write a tiny valid llama-architecture GGUF (~400 kB, all f32) at *path*; return *path*.

    One block, embedding 64, 2 heads / 2 KV heads, feed forward 256, context 4096, rope dims
    32, rms eps 1e-5; a SentencePiece ("llama") vocab of ``<unk> <s> </s>``, the 256 byte
    tokens ``<0x00>``..``<0xFF>`` and a few words; bos 1 / eos 2 / unk 0; a ChatML template.
    Weights come from a seeded generator: every call writes the same bytes. The residual
    stream stays positive (positive embeddings, tiny attention/FFN outputs) and ``output`` is
    zero except a positive EOS row, so EOS is the only token with a logit (~640 against 0)
    and generation ends at once.
    """
    import gguf
    import numpy as np

    rng = np.random.default_rng(SEED)
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *WORDS]
    types = [
        gguf.TokenType.UNKNOWN,
        gguf.TokenType.CONTROL,
        gguf.TokenType.CONTROL,
        *[gguf.TokenType.BYTE] * 256,
        *[gguf.TokenType.NORMAL] * len(WORDS),
    ]
    scores = [0.0] * (3 + 256) + [-float(i + 1) for i in range(len(WORDS))]
    n_vocab = len(tokens)

    def weights(rows: int, cols: int, scale: float) -> Any:
        return (rng.standard_normal((rows, cols)) * scale).astype(np.float32)

    def ones() -> Any:
        return np.ones(N_EMBD, dtype=np.float32)

    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("ocrd tiny test model")
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_context_length(N_CTX)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(N_BLOCKS)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD_KV)
    writer.add_rope_dimension_count(N_ROT)
    writer.add_layer_norm_rms_eps(RMS_EPS)
    writer.add_vocab_size(n_vocab)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_unk_token_id(UNK_ID)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    # A numpy array of shape (rows, cols) is a ggml tensor with ne = [cols, rows].
    n_embd_kv = N_EMBD // N_HEAD * N_HEAD_KV
    embd = 1.0 + np.abs(weights(n_vocab, N_EMBD, 0.1))
    writer.add_tensor("token_embd.weight", embd.astype(np.float32))
    for i in range(N_BLOCKS):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", ones())
        writer.add_tensor(f"blk.{i}.attn_q.weight", weights(N_EMBD, N_EMBD, 0.02))
        writer.add_tensor(f"blk.{i}.attn_k.weight", weights(n_embd_kv, N_EMBD, 0.02))
        writer.add_tensor(f"blk.{i}.attn_v.weight", weights(n_embd_kv, N_EMBD, 0.02))
        writer.add_tensor(f"blk.{i}.attn_output.weight", weights(N_EMBD, N_EMBD, 0.001))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", ones())
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", weights(N_FF, N_EMBD, 0.02))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", weights(N_FF, N_EMBD, 0.02))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", weights(N_EMBD, N_FF, 0.001))
    writer.add_tensor("output_norm.weight", ones())
    output = np.zeros((n_vocab, N_EMBD), dtype=np.float32)
    output[EOS_ID, :] = 10.0
    writer.add_tensor("output.weight", output)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def persistent_cache(factory: pytest.TempPathFactory) -> Path:
    """``$XDG_CACHE_HOME/ocrd-tests`` (``~/.cache/ocrd-tests``), else a session temp dir."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ocrd-tests"
    try:
        base.mkdir(parents=True, exist_ok=True)
    except OSError:
        return factory.mktemp("ocrd-tests-cache")
    if not os.access(base, os.W_OK | os.X_OK):
        return factory.mktemp("ocrd-tests-cache")
    return base


def fetch_llama_runtime(cache_dir: Path) -> Path | None:
    """Fetch llama.cpp's shared libraries with ``npm pack`` and lay out a flat runtime dir.

    ``npm pack @node-llama-cpp/linux-x64@3.13.0`` writes its tarball (~4 MB, ~11 MB
    unpacked) into *cache_dir*, where it is kept; ``--prefer-offline`` lets npm answer from
    its own cache. ``cache_dir/runtime`` then gets ``libggml-base.so``, every
    ``libggml-cpu-*.so``, real files ``libllama.so`` / ``libggml.so`` copied from the
    ``.b6431.so`` ones and the ``.b6431.so`` names as relative symlinks to them (a second
    real libggml gives a second backend registry and "Failed to load model"). Nothing else
    may go in there: the library dlopens every ``.so`` of that folder (all eight CPU
    variants show up in ``/proc/PID/maps``). The dir is built aside and renamed into place,
    so an existing one is complete. Returns it, or None, with the reason printed, when npm
    or the registry cannot be reached.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    runtime = cache_dir / "runtime"
    if (runtime / "libllama.so").is_file():
        return runtime
    tarball = cache_dir / NPM_TARBALL
    if not tarball.is_file() and not _npm_pack(cache_dir, tarball):
        return None

    staging = Path(tempfile.mkdtemp(prefix="runtime.", dir=cache_dir))
    try:
        with tarfile.open(tarball) as tar:
            for member in tar.getmembers():
                name = Path(member.name).name
                if member.isfile() and member.name.startswith(NPM_BINS) and ".so" in name:
                    source = tar.extractfile(member)
                    assert source is not None
                    (staging / name).write_bytes(source.read())
        for lib in ("libllama", "libggml"):
            versioned = staging / f"{lib}.{LLAMA_BUILD}.so"
            if not versioned.is_file():
                print(f"fetch_llama_runtime: {NPM_TARBALL} has no {versioned.name}")
                return None
            versioned.rename(staging / f"{lib}.so")
            versioned.symlink_to(f"{lib}.so")
        staging.chmod(0o755)
        if runtime.exists():  # not made by this function (its rename is atomic)
            shutil.rmtree(runtime)
        try:
            staging.rename(runtime)
        except OSError:  # another session won the race
            if not (runtime / "libllama.so").is_file():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return runtime


def _npm_pack(cache_dir: Path, tarball: Path) -> bool:
    """Run ``npm pack`` into a private dir of *cache_dir* and move the tarball to *tarball*."""
    npm = shutil.which("npm")
    if npm is None:
        print(f"fetch_llama_runtime: npm is not on PATH, cannot fetch {NPM_PACKAGE}")
        return False
    dest = Path(tempfile.mkdtemp(prefix="npm-pack.", dir=cache_dir))
    argv = [
        npm,
        "pack",
        NPM_PACKAGE,
        "--pack-destination",
        str(dest),
        "--prefer-offline",
        "--fetch-retries=1",
        "--fetch-timeout=20000",
        "--no-update-notifier",
        "--no-fund",
        "--no-audit",
    ]
    try:
        proc = subprocess.run(
            argv, cwd=dest, capture_output=True, text=True, timeout=60, check=False
        )
        packed = dest / NPM_TARBALL
        if proc.returncode != 0 or not packed.is_file():
            lines = (proc.stderr or proc.stdout).strip().splitlines()[:4]
            print(
                f"fetch_llama_runtime: `npm pack {NPM_PACKAGE}` exited {proc.returncode}: "
                + " | ".join(line.removeprefix("npm error ") for line in lines)
            )
            return False
        packed.replace(tarball)
        return True
    except (OSError, subprocess.TimeoutExpired) as exc:
        print(f"fetch_llama_runtime: `npm pack {NPM_PACKAGE}` failed: {exc!r}")
        return False
    finally:
        shutil.rmtree(dest, ignore_errors=True)


def _libdl() -> Path:
    """The real ``libdl.so.2`` of this machine."""
    for directory in LIBDL_DIRS:
        candidate = Path(directory) / "libdl.so.2"
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"no libdl.so.2 in any of {LIBDL_DIRS}")


def _link(link: Path, target: Path | str) -> None:
    """Make *link* a symlink to *target*, replacing an older link atomically."""
    if link.is_symlink() and os.readlink(link) == str(target):
        return
    link.parent.mkdir(parents=True, exist_ok=True)
    temp = link.with_name(f".{link.name}.tmp{os.getpid()}")
    temp.symlink_to(target)
    temp.replace(link)


def _path_without_nvcc(path: str) -> str:
    """*path* minus every directory that holds an executable ``nvcc``."""
    kept = [d for d in path.split(os.pathsep) if d and not os.access(Path(d) / "nvcc", os.X_OK)]
    return os.pathsep.join(kept)


def host_env_and_cwd(
    runtime_dir: Path, work: Path, models: Path, *, data_home: Path
) -> tuple[dict[str, str], Path]:
    """Environment and working directory in which a child's `AsposeAI` loads a model offline.

    Returns ``(env, cwd)`` with ``cwd = work`` (created). On disk it sets up::

        data_home/Aspose.AI.LLM/models -> models                  (absolute symlink)
        data_home/Aspose.AI.LLM/runtimes/b6451/linux-x64-noavx/native -> runtime_dir
        data_home/Aspose.AI.LLM/runtimes/b6451/linux-x64-cuda13.0/native -> runtime_dir
        data_home/ld/libdl.so -> /usr/lib/x86_64-linux-gnu/libdl.so.2

    and the environment is ``os.environ`` with ``XDG_DATA_HOME=data_home``,
    ``DOTNET_SYSTEM_GLOBALIZATION_INVARIANT=1``, no ``CLR_ICU_VERSION_OVERRIDE``,
    ``LD_LIBRARY_PATH=data_home/ld:<absolute noavx native dir>`` (the caller's own value is
    dropped: an empty entry in it would mean the cwd), ``PATH`` without any directory holding
    an ``nvcc``, and every ``*_proxy`` variable pointing at a closed local port.

    Found out beyond ASPOSE.md (measured with aspose-ocr-python-net 26.10.0):

    - The runtime folder is not looked up under the cwd but beside the model folder:
      ``dirname(get_local_path())/runtimes/b6451/<rid>/native``. ASPOSE.md's
      ``<cwd>/Aspose.AI.LLM/runtimes`` is the special case where the local path is relative
      (no ``$XDG_DATA_HOME`` / ``~/.local/share``). With ``XDG_DATA_HOME`` set to an existing
      dir, a runtime under the cwd is never even stat'ed and the load fails with "Failed to
      find or download required binaries for tag 'b6451'".
    - Symlinks work at every level: the rid dir, ``native/``, ``models``; copies are not
      needed. ``LD_LIBRARY_PATH`` may name the native dir through the symlink or the real
      runtime dir.
    - Without the ``libdl.so`` dir on ``LD_LIBRARY_PATH``: "Proxy error(DllNotFoundException):
      Unable to load shared library 'libdl'". Without the native dir on it: "Unable to load
      shared library 'llama'". Debian 12 has only ``libdl.so.2``, no ``libdl.so``.
    - nvcc is searched (like .NET's ``Process.Start``) in the real python binary's directory,
      then the cwd, then ``PATH``; when found the library runs ``nvcc --version`` and
      ``which nvcc`` and picks ``linux-x64-cuda13.0`` (for CUDA 13.0), a rid that accepts
      the CPU-only libraries too. So ``PATH`` is stripped of nvcc and both rid folders are
      filled, in case an nvcc sits next to python.
    - When the runtime is not found, the library tries to download it (also with
      ``allow_auto_download=False``); .NET honours ``HTTP(S)_PROXY``/``ALL_PROXY``, so a dead
      proxy turns that into a quick "Connection refused" instead of a download wherever
      there is network.
    - Every load copies ``libggml-base.so``, ``libggml.so`` and ``libllama.so`` into the cwd
      (the process keeps mapping the ones of the native dir); an existing copy is fine.
    - The model is mapped under its resolved path: through the ``models`` symlink,
      ``/proc/PID/maps`` shows ``realpath(models)/<dir>/<file>``, not the symlink's path.
    - With the runtime found but no file named like the default model, the load fails with
      "AI model is not available locally and automatic download is disabled", and the
      exception type in ``Proxy error(...)`` is an obfuscated name of control characters
      (``\\x02\\x16\\x1a``), not empty.
    - Load (``set_post_processor``) takes ~0.5 s; a whole child (start, import, load) ~1 s.
      Inference on this model (``run_postprocessor`` then ``proc.get_result()``) gives one
      ``AIResult`` per string with ``result == "\\n"`` and ``file_name == ""``, ~0.2 s the
      first time, ~0.04 s after.
    """
    work.mkdir(parents=True, exist_ok=True)
    base = data_home / "Aspose.AI.LLM"
    base.mkdir(parents=True, exist_ok=True)
    _link(base / "models", models.resolve())
    runtime = runtime_dir.resolve()
    for rid in (RID_CPU, RID_CUDA):
        _link(base / "runtimes" / RUNTIME_TAG / rid / "native", runtime)
    ld_dir = data_home / "ld"
    _link(ld_dir / "libdl.so", _libdl())
    native = (base / "runtimes" / RUNTIME_TAG / RID_CPU / "native").absolute()

    env = {
        key: value
        for key, value in os.environ.items()
        if key.lower() not in {"no_proxy", "clr_icu_version_override"}
    }
    env["PATH"] = _path_without_nvcc(env.get("PATH", os.defpath))
    env["LD_LIBRARY_PATH"] = f"{ld_dir.absolute()}{os.pathsep}{native}"
    env["DOTNET_SYSTEM_GLOBALIZATION_INVARIANT"] = "1"
    env["XDG_DATA_HOME"] = str(data_home.absolute())
    for key in ("http_proxy", "https_proxy", "all_proxy"):
        env[key] = env[key.upper()] = DEAD_PROXY
    return env, work


def aspose_available() -> str | None:
    """Why the real `aspose.ocr` cannot be used here (a skip reason), or None when it can.

    The import runs in a child process (in invariant globalization mode, in a temporary
    working directory), so a broken install can neither abort nor litter the test process.
    """
    env = dict(os.environ, DOTNET_SYSTEM_GLOBALIZATION_INVARIANT="1")
    with tempfile.TemporaryDirectory(prefix="aspose-probe.") as cwd:
        try:
            proc = subprocess.run(
                [sys.executable, "-c", "import aspose.ocr, aspose.ocr.ai"],
                env=env,
                cwd=cwd,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"cannot import aspose.ocr in a child process: {exc!r}"
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        last = lines[-1] if lines else f"exit status {proc.returncode}"
        return f"aspose-ocr-python-net cannot be imported by {sys.executable}: {last}"
    return None
