"""Restores from the network in the daemon (`ocrd run`): downloads beside the loop.

A required model whose `source:` is an http:// URL is downloaded in a thread of the
daemon's own while its cycles go on (ocrd.daemon.downloads): the cycle that plans the
restore starts the download and leaves that restore out, the next cycle after the
download is verified links the model into place. Everything here is real: the daemon
is a subprocess, the server a real HTTP server on 127.0.0.1 (tests/support/http.py)
that holds a body half-way (`stall`) so that a test can look at, signal or kill the
daemon at a known byte, and the files are on disk.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ocrd.act.fetching import RECORD, partial_name
from ocrd.fetch.stream import CHUNK
from tests.support.cli import ocrd
from tests.support.daemon import Daemon, Daemons
from tests.support.files import digest, leftovers, make_model, sha256
from tests.support.http import ModelServer, etag_for
from tests.support.policy import policy_data, read_status, save_policy, status_when
from tests.support.wait import wait_for

MODEL = "big.bin"
PATH = "/big.bin"
MIB = 1024 * 1024
# A few MB, not a whole number of the daemon's 1 MiB reads (its last read is a short one).
SIZE = 3 * MIB + 12_345
PARTIAL = partial_name(MODEL)
PARTIAL_RE = re.compile(r"\.ocrd-tmp-dl-[0-9a-f]{16}")
STRACE = shutil.which("strace")
TIMEOUT = 30.0  # generous, bounded: a download of a few MB over the loopback takes ms


def body_of(seed: int, size: int = SIZE) -> bytes:
    """Random bytes, the same for a seed: a wrong offset in a resume changes the sha256."""
    return random.Random(seed).randbytes(size)


def download_policy(
    policy: Path, models: Path, url: str | None, body: bytes, **overrides: Any
) -> Path:
    """A fast policy (tests/support/policy.py) that requires MODEL from *url*, pinned to
    *body*'s sha256 (no `required:` at all when *url* is None), pruning `old_*` at once."""
    required = [] if url is None else [{"name": MODEL, "sha256": sha256(body), "source": url}]
    data = policy_data(
        models,
        required=required,
        prune={"action": "delete"},
        download={"retries": 2, "read_timeout": "30s"},
        **overrides,
    )
    return save_policy(policy, data)


def size_of(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return None


def has_record(path: Path) -> bool:
    try:
        return RECORD in os.listxattr(path)
    except FileNotFoundError:
        return False


def record_of(path: Path) -> dict[str, Any]:
    found: dict[str, Any] = json.loads(os.getxattr(path, RECORD))
    return found


def gets(server: ModelServer) -> list[Any]:
    return [s for s in server.requests_for(PATH) if s.method == "GET"]


def wait_held(server: ModelServer, models: Path, point: int, landed: int) -> None:
    """Wait until the server has written *point* body bytes (and holds the rest) and the
    daemon's download file holds *landed* of them, with its record."""
    partial = models / PARTIAL

    def held() -> bool:
        found = gets(server)
        return (
            bool(found)
            and found[-1].sent == point
            and has_record(partial)
            and size_of(partial) == landed
        )

    wait_for(
        held,
        timeout=TIMEOUT,
        what=f"the server to hold the body at {point} bytes and {partial.name} to hold "
        f"{landed} (sent: {[s.sent for s in gets(server)]}, file: {size_of(partial)})",
    )


def own_tmp(models: Path) -> list[str]:
    """ocrd's half-done work in the model dir (`.ocrd-tmp-*`, `.ocrd-deleting-*`)."""
    return leftovers(models)


def first_cycle_after_start(daemon: Daemon) -> dict[str, Any]:
    daemon.wait_cycles(1, timeout=TIMEOUT)
    return daemon.cycles()[0]


@pytest.fixture
def server() -> Iterator[ModelServer]:
    with ModelServer() as running:
        yield running


# -- 1. the download runs beside the cycles ---------------------------------------------------


def test_a_stalled_download_holds_up_nothing_else_and_lands_when_released(
    daemons: Daemons,
    server: ModelServer,
    models: Path,
    policy: Path,
    status_file: Path,
    denv: dict[str, str],
) -> None:
    """The cycle that starts the download prunes `old_x.bin` in the same pass; status
    shows the bytes so far; once the server sends the rest the model is linked in place."""
    body = body_of(1)
    server.serve(PATH, body)
    point = CHUNK + CHUNK // 2  # not a whole number of the daemon's reads
    release = server.stall(PATH, after=point)
    make_model(models, "old_x.bin", b"old")
    download_policy(policy, models, server.url(PATH), body)

    daemon = daemons.start(policy, first_cycle=False)
    daemon.wait("daemon.started", timeout=TIMEOUT)
    first = first_cycle_after_start(daemon)
    # The very cycle that planned the restore: prune done, restore left out (skipped).
    assert (first["planned"], first["done"], first["skipped"], first["failed"]) == (2, 1, 1, 0)
    assert daemon.seen("model.pruned", model="old_x.bin"), daemon
    pruned_at = daemon.events.index(daemon.seen("model.pruned", model="old_x.bin")[0])
    assert pruned_at < daemon.events.index(first)
    assert not (models / "old_x.bin").exists()
    daemon.wait("download.started", model=MODEL, timeout=TIMEOUT)

    wait_held(server, models, point, point)
    doc = status_when(
        status_file,
        lambda d: any(x["model"] == MODEL and x["done"] > 0 for x in d.get("downloads", [])),
        what="status.json to show the download's progress",
        timeout=TIMEOUT,
    )
    [shown] = [x for x in doc["downloads"] if x["model"] == MODEL]
    assert shown["source"] == server.url(PATH)
    assert 0 < shown["done"] <= point
    assert shown["total"] == len(body)
    assert isinstance(shown["started"], float)
    # `ocrd status` says so in words: what, from where, how far.
    said = ocrd("--config", policy, "status", env=denv)
    line = [x for x in said.stdout.splitlines() if x.startswith("downloading: ")]
    assert line and line[0].startswith(f"downloading: {MODEL} from {server.url(PATH)}: "), said
    assert line[0].endswith("%)"), said
    assert not daemon.seen("model.restored"), daemon
    assert not (models / MODEL).exists()
    assert daemon.alive()
    # Refreshed while the download runs, though no cycle runs meanwhile (~every 2 s).
    # (The download file's appearance may still be waking a cycle: let them settle.)
    cycles = daemon.settle(timeout=TIMEOUT)
    settled = read_status(status_file)
    assert settled is not None
    status_when(
        status_file,
        lambda d: d["updated_at"] > settled["updated_at"] and d["downloads"],
        what="status.json rewritten while the download is held",
        timeout=10.0,
    )
    assert len(daemon.cycles()) == cycles, daemon

    mark = daemon.mark()
    release.set()
    finished = daemon.wait("download.finished", model=MODEL, after=mark, timeout=TIMEOUT)
    assert finished["bytes"] == len(body)
    assert finished["sha256"] == sha256(body)
    restored = daemon.wait("model.restored", model=MODEL, after=mark, timeout=TIMEOUT)
    assert restored["sha256"] == sha256(body)
    assert digest(models / MODEL) == sha256(body)
    assert own_tmp(models) == []
    status_when(
        status_file,
        lambda d: d["downloads"] == [] and not d["degraded"] and d["pending"] == [],
        what="status.json without the finished download",
        timeout=TIMEOUT,
    )
    # One GET did it all: nothing was asked twice.
    assert [s.sent for s in gets(server)] == [len(body)]


# -- 2. SIGTERM during a download, then a resume ----------------------------------------------


def test_sigterm_stops_a_stalled_download_at_once_and_the_next_start_resumes_it(
    daemons: Daemons, server: ModelServer, models: Path, policy: Path, status_file: Path
) -> None:
    body = body_of(2)
    server.serve(PATH, body)
    point = 2 * CHUNK  # a whole number of the daemon's reads: every byte sent is on disk
    # The resume asks for less than `point` bytes, so the same stall does not hold it.
    assert len(body) - point < point
    server.stall(PATH, after=point)  # never released: only close() lets that GET go
    download_policy(policy, models, server.url(PATH), body)

    daemon = daemons.start(policy)
    daemon.wait("download.started", model=MODEL, timeout=TIMEOUT)
    wait_held(server, models, point, point)

    code, elapsed = daemon.stop(signal.SIGTERM, timeout=10)
    assert code == 0, daemon
    assert elapsed < 2.0, f"took {elapsed:.2f}s to stop; {daemon!r}"
    assert daemon.seen("daemon.stopped"), daemon
    assert not daemon.seen("download.finished"), daemon
    assert not daemon.seen("model.restored"), daemon
    stopped = read_status(status_file)
    assert stopped is not None
    assert (stopped["state"], stopped["downloads"]) == ("stopped", [])

    assert not (models / MODEL).exists()
    assert own_tmp(models) == [PARTIAL], os.listdir(models)
    assert PARTIAL_RE.fullmatch(PARTIAL)
    partial = models / PARTIAL
    assert size_of(partial) == point
    record = record_of(partial)
    assert record["source"] == server.url(PATH)
    assert record["total"] == len(body)
    assert record["etag"] == etag_for(body)
    [first_get] = gets(server)
    assert first_get.sent == point
    assert "range" not in first_get.headers

    again = daemons.start(policy, first_cycle=False)
    resumed = again.wait("download.resumed", model=MODEL, timeout=TIMEOUT)
    assert resumed["offset"] == point
    restored = again.wait("model.restored", model=MODEL, timeout=TIMEOUT)
    assert restored["sha256"] == sha256(body)
    assert digest(models / MODEL) == sha256(body)
    assert own_tmp(models) == []

    found = gets(server)
    assert len(found) == 2, found
    second = found[1]
    assert second.headers.get("range") == f"bytes={point}-"
    assert second.headers.get("if-range") == etag_for(body)
    assert second.sent == len(body) - point
    # Across both runs the server sent the body once, not once and a bit, not twice.
    assert sum(s.sent for s in found) == len(body)
    again.stop()


# -- 3. SIGKILL at seeded points ------------------------------------------------------------


POINTS = [
    pytest.param(31, 1, id="seed31-byte1"),
    pytest.param(32, int(SIZE * 0.4), id="seed32-40pct"),
    pytest.param(33, CHUNK, id="seed33-one-read"),
    pytest.param(34, int(SIZE * 0.9), id="seed34-90pct"),
]


@pytest.mark.parametrize("then", ["apply", "run"])
@pytest.mark.parametrize(("seed", "point"), POINTS)
def test_sigkill_during_a_download_leaves_nothing_under_the_real_name(
    daemons: Daemons,
    server: ModelServer,
    models: Path,
    policy: Path,
    denv: dict[str, str],
    seed: int,
    point: int,
    then: str,
) -> None:
    """A daemon killed while the server holds the body at *point*: the model's own name
    never holds a partial file, and the next `ocrd apply` or `ocrd run` puts the right
    model in place (resuming what landed) and leaves nothing of ocrd's behind."""
    body = body_of(seed)
    server.serve(PATH, body)
    release = server.stall(PATH, after=point)
    make_model(models, "keep.bin", b"keep")
    download_policy(policy, models, server.url(PATH), body)

    daemon = daemons.start(policy)
    daemon.wait("download.started", model=MODEL, timeout=TIMEOUT)
    landed = point  # every byte sent is on disk: reads return what has arrived
    wait_held(server, models, point, landed)
    assert not (models / MODEL).exists()

    daemon.kill()
    assert daemon.finish(timeout=10) == -signal.SIGKILL
    assert not (models / MODEL).exists()
    assert own_tmp(models) == [PARTIAL], os.listdir(models)
    partial = models / PARTIAL
    assert has_record(partial)
    kept = size_of(partial)
    assert kept == landed
    release.set()  # later GETs are not held (the killed one's socket is gone)
    before = len(gets(server))

    if then == "apply":
        result = ocrd("--config", policy, "apply", env=denv, timeout=TIMEOUT * 2)
        assert result.returncode == 0, result
        events = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
        names = [e["event"] for e in events]
        assert "model.restored" in names, result
    else:
        again = daemons.start(policy, first_cycle=False)
        again.wait("model.restored", model=MODEL, timeout=TIMEOUT)
        events = list(again.events)
        again.stop()

    assert digest(models / MODEL) == sha256(body)
    assert (models / "keep.bin").read_bytes() == b"keep"
    assert own_tmp(models) == [], os.listdir(models)
    later = gets(server)[before:]
    assert later, "the restart never asked the server"
    if kept:
        # What landed before the kill was kept and continued, not fetched again.
        assert [e["offset"] for e in events if e["event"] == "download.resumed"][:1] == [kept]
        assert later[0].headers.get("range") == f"bytes={kept}-"
        assert sum(s.sent for s in later) == len(body) - kept
    else:
        assert "range" not in later[0].headers
        assert sum(s.sent for s in later) == len(body)


# -- 4. a download that fails, then a policy that fixes it ---------------------------------


def test_a_failed_download_is_reported_and_a_fixed_source_restores_the_model(
    daemons: Daemons, server: ModelServer, models: Path, policy: Path, status_file: Path
) -> None:
    body = body_of(4)
    server.serve(PATH, body)
    wrong = server.url("/no-such-model.bin")  # 404
    download_policy(policy, models, wrong, body)

    daemon = daemons.start(policy, first_cycle=False)
    failed = daemon.wait("download.failed", model=MODEL, timeout=TIMEOUT)
    assert failed["source"] == wrong
    assert "404" in failed["error"]
    action = daemon.wait("action.failed", model=MODEL, timeout=TIMEOUT)
    assert "404" in action["error"]
    doc = status_when(
        status_file,
        lambda d: (
            d["degraded"]
            and any(MODEL in r for r in d["degraded_reasons"])
            and any(e["where"] == MODEL and "404" in e["error"] for e in d["errors"])
        ),
        what="status.json to report the failed download",
        timeout=TIMEOUT,
    )
    assert doc["state"] == "running"
    assert doc["downloads"] == []
    assert not (models / MODEL).exists()
    assert own_tmp(models) == [], os.listdir(models)

    # Still running, still pruning.
    mark = daemon.mark()
    make_model(models, "old_y.bin", b"old")
    daemon.wait("model.pruned", model="old_y.bin", after=mark, timeout=TIMEOUT)
    assert not (models / "old_y.bin").exists()
    assert daemon.alive()
    assert not daemon.seen("model.restored"), daemon

    # The operator fixes the source; the daemon sees the edit on its own.
    mark = daemon.mark()
    download_policy(policy, models, server.url(PATH), body)
    daemon.wait("policy.reloaded", after=mark, timeout=TIMEOUT)
    daemon.wait("download.started", model=MODEL, after=mark, timeout=TIMEOUT)
    restored = daemon.wait("model.restored", model=MODEL, after=mark, timeout=TIMEOUT)
    assert restored["source"] == server.url(PATH)
    assert digest(models / MODEL) == sha256(body)
    assert own_tmp(models) == []
    status_when(
        status_file,
        lambda d: not d["degraded"] and d["downloads"] == [] and d["pending"] == [],
        what="status.json healthy again",
        timeout=TIMEOUT,
    )
    assert daemon.alive()


# -- 5. a reload that drops the model while it downloads -----------------------------------


def test_a_reload_that_drops_the_model_aborts_its_download_and_cleans_up(
    daemons: Daemons, server: ModelServer, models: Path, policy: Path, status_file: Path
) -> None:
    body = body_of(5)
    server.serve(PATH, body)
    point = CHUNK + CHUNK // 2
    server.stall(PATH, after=point)  # never released: only the abort ends that GET
    download_policy(policy, models, server.url(PATH), body)

    daemon = daemons.start(policy)
    daemon.wait("download.started", model=MODEL, timeout=TIMEOUT)
    wait_held(server, models, point, point)

    mark = daemon.mark()
    download_policy(policy, models, None, body)  # no `required:` any more
    daemon.wait("policy.reloaded", after=mark, timeout=TIMEOUT)
    removed = daemon.wait("recovery.removed", path=PARTIAL, after=mark, timeout=TIMEOUT)
    assert removed["what"] == "rolled back"
    wait_for(
        lambda: own_tmp(models) == [],
        timeout=TIMEOUT,
        what=f"no .ocrd-tmp-* left (found {own_tmp(models)})",
    )
    status_when(
        status_file,
        lambda d: d["downloads"] == [] and not d["degraded"],
        what="status.json without the aborted download",
        timeout=TIMEOUT,
    )
    assert not (models / MODEL).exists()
    assert not daemon.seen("download.finished"), daemon
    assert not daemon.seen("model.restored"), daemon
    assert daemon.alive()
    assert read_status(status_file) is not None
    assert len(gets(server)) == 1  # nothing asked again


# -- 6. SIGKILL between a verified download and its link into place --------------------------


@pytest.mark.skipif(STRACE is None, reason="strace is not installed")
def test_sigkill_at_the_link_into_place_keeps_the_verified_download_for_the_next_start(
    daemons: Daemons, server: ModelServer, models: Path, policy: Path, tmp_path: Path
) -> None:
    """The daemon is killed at the link(2) that would put the verified download under the
    model's name (its only link in the run): the name stays empty, the whole download
    stays, and the next start finds it complete (416 for the rest) instead of fetching
    the body again."""
    assert STRACE is not None
    body = body_of(6)
    server.serve(PATH, body)
    download_policy(policy, models, server.url(PATH), body)
    wrapper = [
        STRACE,
        "-f",
        "-qq",
        "-o",
        str(tmp_path / "strace.log"),
        "-e",
        "trace=link,linkat",
        "-e",
        "inject=link,linkat:signal=KILL:when=1",
    ]
    daemon = daemons.start(policy, wrapper=wrapper, first_cycle=False)
    assert daemon.finish(timeout=TIMEOUT) != 0, daemon
    assert daemon.seen("download.finished", model=MODEL), daemon
    assert not daemon.seen("model.restored"), daemon
    # Killed at *its* link: the verified file, linked through its descriptor.
    assert re.search(
        r'linkat\([^\n]*"/proc/self/fd/\d+"[^\n]*"big.bin"', (tmp_path / "strace.log").read_text()
    )
    assert not (models / MODEL).exists()
    assert own_tmp(models) == [PARTIAL], os.listdir(models)
    assert size_of(models / PARTIAL) == len(body)
    assert has_record(models / PARTIAL)
    assert [s.sent for s in gets(server)] == [len(body)]

    again = daemons.start(policy, first_cycle=False)
    resumed = again.wait("download.resumed", model=MODEL, timeout=TIMEOUT)
    assert resumed["offset"] == len(body)
    again.wait("model.restored", model=MODEL, timeout=TIMEOUT)
    assert digest(models / MODEL) == sha256(body)
    assert own_tmp(models) == []
    later = gets(server)[1:]
    assert [s.headers.get("range") for s in later] == [f"bytes={len(body)}-"]
    assert sum(s.sent for s in later) == 0  # nothing of the body came twice
    again.stop()


# -- bytes land as they arrive; one resume is counted once ----------------------------------


def test_bytes_already_received_land_in_the_download_file(
    daemons: Daemons, server: ModelServer, models: Path, policy: Path, status_file: Path
) -> None:
    """A server that sent 100 000 bytes and then pauses: those bytes are on disk (and in
    status), so a SIGTERM now keeps them and the next start asks only for the rest."""
    body = body_of(7)
    server.serve(PATH, body)
    point = 100_000
    release = server.stall(PATH, after=point)
    download_policy(policy, models, server.url(PATH), body)
    daemon = daemons.start(policy)
    daemon.wait("download.started", model=MODEL, timeout=TIMEOUT)
    wait_for(
        lambda: [s.sent for s in gets(server)] == [point] and has_record(models / PARTIAL),
        timeout=TIMEOUT,
        what="the server to hold the body",
    )
    # The loopback delivers 100 000 bytes in well under a millisecond; 5 s is plenty.
    wait_for(
        lambda: size_of(models / PARTIAL) == point,
        timeout=5.0,
        what=f"{PARTIAL} to hold the {point} bytes sent (holds {size_of(models / PARTIAL)})",
    )
    status_when(
        status_file,
        lambda d: [x["done"] for x in d["downloads"]] == [point],
        what="status.json to show the bytes received",
        timeout=5.0,
    )
    code, _ = daemon.stop()
    assert code == 0
    release.set()  # the resumed request is not held
    again = daemons.start(policy, first_cycle=False)
    again.wait("model.restored", model=MODEL, timeout=TIMEOUT)
    assert gets(server)[1].headers.get("range") == f"bytes={point}-"


def test_download_finished_counts_one_resume_once(
    daemons: Daemons, server: ModelServer, models: Path, policy: Path
) -> None:
    body = body_of(8)
    server.serve(PATH, body)
    point = 2 * CHUNK
    release = server.stall(PATH, after=point)
    download_policy(policy, models, server.url(PATH), body)
    daemon = daemons.start(policy)
    wait_held(server, models, point, point)
    code, _ = daemon.stop()
    assert code == 0
    release.set()
    again = daemons.start(policy, first_cycle=False)
    finished = again.wait("download.finished", model=MODEL, timeout=TIMEOUT)
    assert (finished["retries"], finished["restarted"]) == (0, 0)
    assert len(gets(server)) == 2  # one GET in each run: the second one resumed once
    assert finished["resumed"] == 1, finished
