"""Start-up: ``ocrd check`` wall time vs a bare Python interpreter."""

from __future__ import annotations

from _common import (
    PYTHON,
    Row,
    main,
    make_entries,
    median,
    ocrd,
    run_cmd,
    scratch_dir,
    write_policy,
)

NAME = "startup"
RUNS = 10


def run(quick: bool) -> list[Row]:
    """Median of ``RUNS`` interleaved ``ocrd check`` and ``python -c pass`` (quick: same)."""
    with scratch_dir("ocrd-bench-startup-") as work:
        models = work / "models"
        make_entries(models, 10, 0)
        policy = write_policy(
            work / "policy.yaml", models, work / "state", prune={"prefixes": ["old_"]}
        )
        ocrd(policy, "check", check=False)  # warm the file cache once
        checks, bare = [], []
        note = ""
        for _ in range(RUNS):
            elapsed, result = ocrd(policy, "check", check=False)
            checks.append(elapsed)
            if result.returncode != 0:
                note = f"check exited {result.returncode}"
            bare.append(run_cmd([PYTHON, "-c", "pass"])[0])
    c, b = median(checks), median(bare)
    return [
        Row(
            NAME,
            f"ocrd check, backend none (median of {RUNS})",
            c,
            "s",
            "<= 0.5 s",
            c <= 0.5,
            b,
            "python -c pass",
            note,
        )
    ]


if __name__ == "__main__":
    main(run, "startup: ocrd check wall time")
