"""Hashing a large pinned model: ``ocrd plan`` with a cold and a warm hash cache vs openssl."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from _common import (
    CACHE_DIR,
    PYTHON,
    Row,
    clean_env,
    fs_type,
    log,
    main,
    median,
    ocrd,
    run_cmd,
    scratch_dir,
    tool,
    write_policy,
)

NAME = "hashing"
RUNS = 5
CHUNK = 1 << 20


def data_file(size: int) -> tuple[Path, str]:
    """The cached random data file of ``size`` bytes and its sha256 (created once, reused)."""
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    path = CACHE_DIR / f"model-{size >> 20}MiB.bin"
    sha_path = path.with_suffix(".sha256")
    if not (path.exists() and path.stat().st_size == size and sha_path.exists()):
        log(f"{NAME}: writing {size >> 20} MiB of random data to {path} (once)")
        tmp = path.with_suffix(".part")
        with open(tmp, "wb") as f:
            for _ in range(size // CHUNK):
                f.write(os.urandom(CHUNK))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        out = subprocess.run(
            [tool("openssl"), "dgst", "-sha256", "-r", str(path)],
            capture_output=True,
            text=True,
            check=True,
        )
        sha_path.write_text(out.stdout.split()[0])
    return path, sha_path.read_text().strip()


# `ocrd plan` in this interpreter, printing at exit how many bytes the process
# read (rchar in /proc/self/io: every read(2), imports included).
READ_PROBE = """
import atexit, sys
def report():
    with open("/proc/self/io") as f:
        fields = dict(line.split(": ") for line in f.read().splitlines())
    sys.stderr.write("RCHAR %s\\n" % fields["rchar"])
atexit.register(report)
from ocrd.cli import main
sys.argv = ["ocrd", "--config", sys.argv[1], "plan"]
main()
"""


def bytes_read(policy: Path) -> int:
    """Bytes one ``ocrd plan`` with *policy* reads, from its /proc/self/io at exit."""
    r = subprocess.run(
        [PYTHON, "-c", READ_PROBE, str(policy)],
        capture_output=True,
        text=True,
        env=clean_env(),
        check=False,
    )
    for line in r.stderr.splitlines():
        if line.startswith("RCHAR "):
            return int(line.split()[1])
    raise RuntimeError(f"no RCHAR line from the probe: {r.stderr[-500:]}")


def run(quick: bool) -> list[Row]:
    """Median of cold-cache plan, warm-cache plan, empty-dir plan (start-up) and openssl."""
    size = (256 if quick else 2048) << 20
    source, sha = data_file(size)
    with scratch_dir("hash-", str(CACHE_DIR)) as work:
        models, empty = work / "models", work / "empty"
        models.mkdir()
        empty.mkdir()
        os.link(source, models / "big.bin")  # same inode: no copy, same page cache
        pin = {"name": "big.bin", "sha256": sha}
        startup_policy = write_policy(work / "startup.yaml", empty, work / "state-empty")
        openssl = [tool("openssl"), "dgst", "-sha256", str(models / "big.bin")]
        run_cmd(openssl, check=True)  # warm the page cache: both sides read from memory
        cold, warm, start, base = [], [], [], []
        for i in range(RUNS):
            state = work / f"state-{i}"  # a fresh state dir = an empty hash cache
            policy = write_policy(work / f"p{i}.yaml", models, state, required=[pin])
            cold.append(ocrd(policy, "plan")[0])
            warm.append(ocrd(policy, "plan")[0])
            start.append(ocrd(startup_policy, "plan")[0])
            base.append(run_cmd(openssl, check=True)[0])
            log(
                f"{NAME} run {i + 1}/{RUNS}: cold {cold[-1]:.3f}s warm {warm[-1]:.3f}s "
                f"startup {start[-1]:.3f}s openssl {base[-1]:.3f}s"
            )
        # The warm plan reads nothing of the model: its bytes read beyond an empty-dir plan.
        extra_read = bytes_read(policy) - bytes_read(startup_policy)
        fs = fs_type(work)
    s = median(start)
    hash_cold = median(cold) - s
    # The warm figure is a few ms beside a ~250 ms start-up: take the median of each run's
    # warm - start-up pair (measured back to back), not the difference of two medians.
    hash_warm = median([w - st for w, st in zip(warm, start, strict=True)])
    b = median(base)
    what = f"{size >> 20} MiB, {fs}, page cache warm"
    note = f"ocrd start-up (plan on an empty dir, median {s * 1000:.0f} ms) subtracted"
    return [
        Row(
            NAME,
            f"plan, empty cache, minus start-up ({what})",
            hash_cold,
            "s",
            "<= 1.05x openssl",
            hash_cold / b <= 1.05,
            b,
            "openssl dgst -sha256",
            note,
        ),
        Row(
            NAME,
            "plan, warm cache, minus start-up",
            hash_warm * 1000,
            "ms",
            "< 10 ms",
            hash_warm < 0.010,
            note=f"median of paired (warm - start-up); warm total {median(warm) * 1000:.0f} ms",
        ),
        Row(
            NAME,
            "plan, warm cache: bytes read beyond an empty-dir plan (rchar)",
            extra_read / 1024,
            "KiB",
            "reads nothing of the model",
            extra_read < size // 100,
            note=f"of a {size >> 20} MiB model; /proc/self/io rchar at exit, imports included",
        ),
        Row(NAME, "ocrd start-up (plan on empty dir)", s, "s", "-", None),
    ]


if __name__ == "__main__":
    main(run, "hashing: sha256 of a pinned model, cold and warm hash cache")
