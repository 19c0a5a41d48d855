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
TARGET = 0.3  # seconds: issue 13, with pydantic-settings back as the settings engine
# The figure before it came back (ocrd's own OCRD_* reader), from bench/RESULTS.md.
OLD_FIGURE = "193 ms before pydantic-settings came back (RESULTS.md, same command)"


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
            f"<= {TARGET} s",
            c <= TARGET,
            b,
            "python -c pass",
            "; ".join(filter(None, [note, OLD_FIGURE])),
        )
    ]


if __name__ == "__main__":
    main(run, "startup: ocrd check wall time")
