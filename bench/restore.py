"""Restoring a pinned 2 GiB model from a local source vs cp && sync && openssl dgst.

Each run starts from an empty model dir: `ocrd apply` copies the source into a
hidden file, hashes what landed (in a thread, one block behind the copy),
checks the pin, flushes and links it into place. The baseline does the same
work with the usual tools, in series: copy, flush, then verify the copy.
"""

from __future__ import annotations

import shutil

from _common import (
    Row,
    log,
    main,
    median,
    ocrd,
    remove_tree,
    run_cmd,
    scratch_dir,
    tool,
    write_policy,
)
from hashing import data_file

NAME = "restore"
MODEL = "en_ocr_v1.bin"


def run(quick: bool) -> list[Row]:
    """Alternate ocrd apply and the baseline on empty dirs; medians."""
    size = (256 if quick else 2048) << 20
    runs = 3 if quick else 5
    source, sha = data_file(size)
    if shutil.disk_usage(source.parent).free < 3 * size:
        return [Row(NAME, "restore", None, "s", "-", None, note="not enough free disk")]
    with scratch_dir("ocrd-bench-restore-") as work:
        models, state, base = work / "models", work / "state", work / "base"
        state.mkdir()
        required = [{"name": MODEL, "sha256": sha, "source": str(source)}]
        policy = write_policy(work / "policy.yaml", models, state, required=required)
        dst = base / MODEL
        baseline = [
            "sh",
            "-c",
            f'{tool("cp")} "$1" "$2" && {tool("sync")} "$2" && {tool("openssl")} dgst -sha256 "$2"',
            "sh",
            str(source),
            str(dst),
        ]
        run_cmd([tool("cat"), str(source)])  # the source in the page cache, as for both sides
        ours: list[float] = []
        theirs: list[float] = []
        note = ""
        for i in range(runs):
            for d in (models, base):
                remove_tree(d)
                d.mkdir()
            steps = [
                ("ocrd", lambda: ocrd(policy, "apply", check=False)),
                ("base", lambda: run_cmd(baseline)),
            ]
            for who, step in steps if i % 2 == 0 else steps[::-1]:
                elapsed, result = step()
                (ours if who == "ocrd" else theirs).append(elapsed)
                if who == "ocrd":
                    landed = models / MODEL
                    if (
                        result.returncode != 0
                        or not landed.exists()
                        or landed.stat().st_size != size
                    ):
                        note = f"apply exited {result.returncode}; the model did not land whole"
                elif result.returncode != 0 or sha not in result.stdout.decode():
                    note = "the baseline failed or hashed something else"
            log(f"{NAME} run {i + 1}/{runs}: ocrd {ours[-1]:.3f}s baseline {theirs[-1]:.3f}s")
        for d in (models, base):
            remove_tree(d)
    o, b = median(ours), median(theirs)
    what = f"restore {size >> 20} MiB from a local source (ext4, source in page cache)"
    return [
        Row(NAME, what, o, "s", "<= 1.0x cp && sync && openssl dgst", o <= b, b,
            "cp && sync && openssl dgst -sha256", note),
    ]  # fmt: skip


if __name__ == "__main__":
    main(run, "restore: a pinned model from a local source")
