"""`ocrd apply` restores required models from the network: real CLI runs against a real
HTTP(S) server on 127.0.0.1 (tests/support/http.py) that drops, fails, redirects, stalls
and changes what it serves, and records every request it got.

Each test looks at three things: what the server was asked (and how many body bytes it
wrote), what ocrd logged and exited with, and what the model dir holds afterwards (the
model in place with the right bytes, or nothing, and never a `.ocrd-tmp-*` left behind
unless a resume needs it).
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.support.cli import OCRD, Result
from tests.support.http import LAST_MODIFIED, ModelServer, ca_bundle, etag_for
from tests.support.policy import policy_data, write_policy
from tests.support.wait import wait_for

if TYPE_CHECKING:
    import trustme

MiB = 1024 * 1024
NAME = "m.bin"
PATH = "/m.bin"
PARTIAL = ".ocrd-tmp-dl-" + hashlib.sha256(NAME.encode()).hexdigest()[:16]
RECORD = "user.ocrd.download"
MARGIN = 64 * MiB  # free space ocrd keeps beyond a restored file


def payload(size: int, seed: int = 1) -> bytes:
    """*size* bytes that differ at every offset from any other seed's."""
    return random.Random(seed).randbytes(size)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


BODY = payload(3 * MiB)


# -- fixtures and helpers -------------------------------------------------------------------


@pytest.fixture
def net_env(env: dict[str, str]) -> dict[str, str]:
    """The CLI's environment with no proxy and no $NETRC from the shell running the tests."""
    drop = {"http_proxy", "https_proxy", "all_proxy", "no_proxy", "netrc"}
    return {k: v for k, v in env.items() if k.lower() not in drop}


@pytest.fixture
def run(net_env: dict[str, str]) -> Callable[..., Result]:
    def go(*args: str | Path, timeout: float = 60) -> Result:
        proc = subprocess.run(
            [OCRD, *map(str, args)],
            capture_output=True,
            text=True,
            env=net_env,
            timeout=timeout,
            check=False,
        )
        return Result(proc)

    return go


@pytest.fixture
def server() -> Iterator[ModelServer]:
    with ModelServer() as running:
        yield running


@pytest.fixture
def ca() -> trustme.CA:
    module = pytest.importorskip("trustme")
    made: trustme.CA = module.CA()
    return made


def required(**entry: Any) -> dict[str, Any]:
    return {"name": NAME, **entry}


def write(policy: Path, models: Path, *items: dict[str, Any], **download: Any) -> Path:
    """A policy restoring *items* into *models*, with fast download settings."""
    settings = {"retries": 2, "connect_timeout": "5s", "read_timeout": "10s", **download}
    data = policy_data(models, required=list(items), download=settings)
    return write_policy(policy, data)


def entries(models: Path) -> set[str]:
    return set(os.listdir(models))


def leftovers(models: Path) -> set[str]:
    return {n for n in entries(models) if n.startswith(".ocrd-tmp-")}


def logged(r: Result, event: str) -> list[dict[str, Any]]:
    return [line for line in r.logs() if line["event"] == event]


def failure(r: Result) -> str:
    """The error of the one failed action of *r*."""
    failed = logged(r, "action.failed")
    assert len(failed) == 1, r
    assert failed[0]["model"] == NAME, failed
    error: str = failed[0]["error"]
    return error


def assert_restored(models: Path, r: Result, body: bytes) -> dict[str, Any]:
    """*body* is in place as the model, nothing hidden is left, apply said so; the
    download.finished line."""
    assert r.code == 0, r
    assert (models / NAME).read_bytes() == body
    assert entries(models) == {NAME, ".ocrd-lock"}, entries(models)
    [restored] = logged(r, "model.restored")
    assert (restored["model"], restored["bytes"], restored["sha256"]) == (
        NAME,
        len(body),
        sha(body),
    )
    [finished] = logged(r, "download.finished")
    assert (finished["bytes"], finished["sha256"]) == (len(body), sha(body))
    return finished


def assert_nothing_placed(models: Path, r: Result) -> None:
    assert r.code != 0, r
    assert not (models / NAME).exists()
    assert leftovers(models) == set(), entries(models)
    assert logged(r, "model.restored") == []


def gets(server: ModelServer, path: str = PATH) -> list[Any]:
    return [s for s in server.requests_for(path) if s.method == "GET"]


def netrc_file(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text, encoding="ascii")
    path.chmod(mode)
    return path


def basic(login: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{login}:{password}".encode()).decode()


def start(env: dict[str, str], policy: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [OCRD, "--config", str(policy), "apply"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def finish(proc: subprocess.Popen[str], timeout: float = 60) -> Result:
    out, err = proc.communicate(timeout=timeout)
    return Result(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))


def size_of(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return -1


# -- the plain download -----------------------------------------------------------------------


def test_download_restores_the_pinned_model(run, server, models, policy):
    server.serve(PATH, BODY)
    p = write(policy, models, required(sha256=sha(BODY), source=server.url(PATH)))
    r = run("--config", p, "apply")
    finished = assert_restored(models, r, BODY)
    assert finished["verified"] == "pin"
    assert (finished["resumed"], finished["restarted"], finished["retries"]) == (0, 0, 0)
    [started] = logged(r, "download.started")
    assert (started["model"], started["source"]) == (NAME, server.url(PATH))
    [restored] = logged(r, "model.restored")
    assert restored["source"] == server.url(PATH)
    [got] = server.requests_for(PATH)
    assert got.method == "GET"
    assert got.sent == len(BODY)
    assert "range" not in got.headers
    assert got.headers.get("accept-encoding") == "identity"
    assert (models / NAME).stat().st_mode & 0o777 == 0o644


def test_download_without_a_pin_is_checked_for_its_length(run, server, models, policy):
    server.serve(PATH, BODY)
    p = write(policy, models, required(source=server.url(PATH)))
    r = run("--config", p, "apply")
    assert assert_restored(models, r, BODY)["verified"] == "length"


# -- resuming -------------------------------------------------------------------------------


def test_resume_after_a_drop_fetches_only_the_rest(run, server, models, policy):
    cut = 1 * MiB
    server.serve(PATH, BODY)
    server.drop_after(PATH, cut)
    p = write(policy, models, required(sha256=sha(BODY), source=server.url(PATH)))
    r = run("--config", p, "apply")
    finished = assert_restored(models, r, BODY)
    assert (finished["resumed"], finished["restarted"], finished["retries"]) == (1, 0, 1)
    first, second = gets(server)
    assert "range" not in first.headers
    assert first.sent == cut
    assert second.headers["range"] == f"bytes={cut}-"
    assert second.headers["if-range"] == etag_for(BODY)
    assert second.sent == len(BODY) - cut
    assert sum(s.sent for s in server.seen) == len(BODY)  # not a byte fetched twice
    [resumed] = logged(r, "download.resumed")
    assert resumed["offset"] == cut
    assert "dropped" in resumed["reason"]


def test_resume_with_a_weak_etag_uses_last_modified(run, server, models, policy):
    """A weak ETag cannot make a range conditional (RFC 9110 13.1.5): Last-Modified does."""
    cut = 1 * MiB
    server.serve(PATH, BODY, etag='W/"weak-1"')
    server.drop_after(PATH, cut)
    p = write(policy, models, required(sha256=sha(BODY), source=server.url(PATH)))
    r = run("--config", p, "apply")
    assert_restored(models, r, BODY)
    _, second = gets(server)
    assert second.headers["range"] == f"bytes={cut}-"
    assert second.headers["if-range"] == LAST_MODIFIED
    assert sum(s.sent for s in server.seen) == len(BODY)


def test_without_validators_a_drop_starts_over(run, server, models, policy):
    """No ETag, no Last-Modified: what landed cannot be matched to a version, so no Range."""
    cut = 1 * MiB
    server.serve(PATH, BODY, etag=None, last_modified=None)
    server.drop_after(PATH, cut)
    p = write(policy, models, required(sha256=sha(BODY), source=server.url(PATH)))
    r = run("--config", p, "apply")
    finished = assert_restored(models, r, BODY)
    assert finished["restarted"] == 1
    _, second = gets(server)
    assert "range" not in second.headers
    assert second.sent == len(BODY)


def test_a_file_changed_between_drop_and_resume_is_fetched_whole(net_env, server, models, policy):
    """The first GET is cut after `cut` bytes of the old file; before ocrd asks for the
    rest the server's file changes: the If-Range no longer matches, the range is not
    honoured, and ocrd must not splice the new tail onto the old head."""
    cut = 1 * MiB
    old, new = BODY, payload(len(BODY), seed=2)
    server.serve(PATH, old)
    server.drop_after(PATH, cut)
    release = server.stall(PATH, after=cut)  # hold the first GET at the cut
    p = write(policy, models, required(sha256=sha(new), source=server.url(PATH)))
    proc = start(net_env, p)
    try:
        wait_for(
            lambda: [s.sent for s in gets(server)] == [cut],
            what="the first GET to have sent the bytes before the cut",
        )
        server.change(PATH, new)
    finally:
        release.set()  # the first GET is now cut
    r = finish(proc)
    finished = assert_restored(models, r, new)
    assert finished["restarted"] >= 1
    requests = gets(server)
    assert requests[1].headers["range"] == f"bytes={cut}-"
    assert requests[1].headers["if-range"] == etag_for(old)
    assert requests[-1].sent == len(new)  # the new file, whole, from its first byte
    assert sum(s.sent for s in requests[1:]) == len(new)  # and only once


def test_retries_used_up_keep_the_partial_and_the_next_run_resumes_it(run, server, models, policy):
    cut = 1 * MiB
    server.serve(PATH, BODY)
    server.drop_after(PATH, cut, times=2)  # the first GET and its one retry
    p = write(policy, models, required(sha256=sha(BODY), source=server.url(PATH)), retries=1)
    r = run("--config", p, "apply")
    assert r.code != 0, r
    assert "retries" in failure(r)
    assert not (models / NAME).exists()
    assert leftovers(models) == {PARTIAL}
    assert (models / PARTIAL).read_bytes() == BODY[: 2 * cut]
    record = json.loads(os.getxattr(models / PARTIAL, RECORD))
    assert record["source"] == server.url(PATH)
    assert record["etag"] == etag_for(BODY)
    assert record["total"] == len(BODY)

    again = run("--config", p, "apply")
    assert_restored(models, again, BODY)
    third = gets(server)[2]
    assert third.headers["range"] == f"bytes={2 * cut}-"
    assert third.headers["if-range"] == etag_for(BODY)
    assert sum(s.sent for s in server.seen) == len(BODY)
    [resumed] = logged(again, "download.resumed")
    assert resumed["offset"] == 2 * cut


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_a_partial_left_by_a_killed_run_is_resumed(net_env, run, server, models, policy, sig):
    held = 1 * MiB
    server.serve(PATH, BODY)
    release = server.stall(PATH, after=held)
    p = write(policy, models, required(sha256=sha(BODY), source=server.url(PATH)))
    proc = start(net_env, p)
    try:
        wait_for(
            lambda: size_of(models / PARTIAL) == held,
            what=f"{PARTIAL} to hold the {held} bytes sent before the stall",
        )
        proc.send_signal(sig)
        proc.communicate(timeout=10)  # a stalled read (read_timeout 10 s) must not hold it
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
    assert proc.returncode != 0
    assert not (models / NAME).exists()
    assert size_of(models / PARTIAL) == held
    record = json.loads(os.getxattr(models / PARTIAL, RECORD))
    assert (record["source"], record["url"], record["etag"], record["total"]) == (
        server.url(PATH),
        server.url(PATH),
        etag_for(BODY),
        len(BODY),
    )
    release.set()  # later GETs are not held
    before = len(gets(server))

    r = run("--config", p, "apply")
    finished = assert_restored(models, r, BODY)
    assert finished["resumed"] >= 1
    assert finished["restarted"] == 0
    [resumed] = logged(r, "download.resumed")
    assert resumed["offset"] == held
    [again] = gets(server)[before:]
    assert again.headers["range"] == f"bytes={held}-"
    assert again.headers["if-range"] == etag_for(BODY)
    assert again.sent == len(BODY) - held


def test_a_partial_that_fails_the_pin_after_resuming_is_removed(
    net_env, run, server, models, policy
):
    """A killed run left the head of the file; meanwhile the pin is changed to another
    file's: the resumed download fails its pin and nothing of it is kept."""
    held = 1 * MiB
    server.serve(PATH, BODY)
    release = server.stall(PATH, after=held)
    p = write(policy, models, required(sha256=sha(BODY), source=server.url(PATH)))
    proc = start(net_env, p)
    try:
        wait_for(lambda: size_of(models / PARTIAL) == held, what="the partial download")
        proc.kill()
        proc.communicate(timeout=10)
    finally:
        release.set()
    p = write(policy, models, required(sha256=sha(b"other"), source=server.url(PATH)))
    r = run("--config", p, "apply")
    assert_nothing_placed(models, r)
    assert "sha256" in failure(r)


def leave_partial(models: Path, data: bytes, record: dict[str, Any] | None) -> Path:
    """A partial download as an earlier run leaves it: the bytes, and its record."""
    path = models / PARTIAL
    path.write_bytes(data)
    path.chmod(0o600)
    if record is not None:
        os.setxattr(path, RECORD, json.dumps(record).encode())
    return path


def record_of(url: str, body: bytes, **fields: Any) -> dict[str, Any]:
    return {
        "model": NAME,
        "source": url,
        "url": url,
        "etag": etag_for(body),
        "last_modified": LAST_MODIFIED,
        "total": len(body),
        **fields,
    }


def test_a_partial_that_is_already_whole_is_verified_without_the_body(run, server, models, policy):
    """A run killed after the last byte landed: the range asked for is past the end (416),
    and what landed is the model."""
    server.serve(PATH, BODY)
    leave_partial(models, BODY, record_of(server.url(PATH), BODY))
    p = write(policy, models, required(sha256=sha(BODY), source=server.url(PATH)))
    r = run("--config", p, "apply")
    assert_restored(models, r, BODY)
    [asked] = gets(server)
    assert asked.headers["range"] == f"bytes={len(BODY)}-"
    assert asked.sent == 0


def test_a_partial_of_an_older_version_is_not_spliced(run, server, models, policy):
    """The record's ETag is the old file's; the server has a new one: fetched whole."""
    old, new = BODY, payload(len(BODY), seed=7)
    server.serve(PATH, new)
    leave_partial(models, old[: 1 * MiB], record_of(server.url(PATH), old))
    p = write(policy, models, required(sha256=sha(new), source=server.url(PATH)))
    r = run("--config", p, "apply")
    finished = assert_restored(models, r, new)
    assert finished["restarted"] >= 1
    requests = gets(server)
    assert requests[0].headers.get("if-range") == etag_for(old)
    assert requests[-1].sent == len(new)
    assert sum(s.sent for s in requests) == len(new)


@pytest.mark.parametrize(
    "record",
    [None, "another source", "not json"],
    ids=["no-record", "another-source", "garbled-record"],
)
def test_a_partial_that_cannot_be_matched_is_fetched_anew(run, server, models, policy, record):
    """Bytes without a usable record of where they came from are never resumed."""
    server.serve(PATH, BODY)
    path = leave_partial(models, b"\0garbage" * 100_000, None)
    if record == "another source":
        other = record_of("http://mirror.invalid/m.bin", BODY)
        os.setxattr(path, RECORD, json.dumps(other).encode())
    elif record == "not json":
        os.setxattr(path, RECORD, b"{not json")
    p = write(policy, models, required(sha256=sha(BODY), source=server.url(PATH)))
    r = run("--config", p, "apply")
    assert_restored(models, r, BODY)
    [asked] = gets(server)
    assert "range" not in asked.headers
    assert asked.sent == len(BODY)


def test_a_stale_partial_of_a_model_in_place_is_removed(run, server, models, policy):
    """The model is there and good: its old partial download is a leftover, not kept."""
    server.serve(PATH, BODY)
    (models / NAME).write_bytes(BODY)
    leave_partial(models, BODY[:MiB], record_of(server.url(PATH), BODY))
    p = write(policy, models, required(sha256=sha(BODY), source=server.url(PATH)))
    r = run("--config", p, "apply")
    assert r.code == 0, r
    assert entries(models) == {NAME, ".ocrd-lock"}
    assert (models / NAME).read_bytes() == BODY
    assert server.seen == []


# -- verification and refusals ----------------------------------------------------------------


def test_wrong_bytes_for_the_pin_put_nothing_in_place(run, server, models, policy):
    server.serve(PATH, payload(len(BODY), seed=3))
    p = write(policy, models, required(sha256=sha(BODY), source=server.url(PATH)))
    r = run("--config", p, "apply")
    assert_nothing_placed(models, r)
    error = failure(r)
    assert "sha256" in error
    assert sha(BODY)[:12] in error
    assert len(gets(server)) == 1  # a wrong file is not fetched again


def test_404_is_not_retried_and_says_not_found(run, server, models, policy):
    p = write(policy, models, required(sha256=sha(BODY), source=server.url("/nowhere.bin")))
    r = run("--config", p, "apply")
    assert_nothing_placed(models, r)
    error = failure(r)
    assert "404" in error
    assert "not found" in error.lower() or "is not on" in error
    assert len(server.seen) == 1


def test_401_says_to_give_credentials_in_the_netrc(run, server, models, policy):
    server.serve(PATH, BODY)
    server.fail(PATH, 401)
    p = write(policy, models, required(sha256=sha(BODY), source=server.url(PATH)))
    r = run("--config", p, "apply")
    assert_nothing_placed(models, r)
    error = failure(r)
    assert "401" in error
    assert "netrc" in error
    assert len(server.seen) == 1


# Error answers as servers send them: empty (Content-Length: 0, as many proxies and load
# balancers answer a 429 or 503), a short text that arrives with the headers, and a page
# bigger than what http.client reads ahead. Each must leave the keep-alive connection
# usable (or closed) for the retry: an unread answer handed back to the pool makes the
# next request on it fail with ResponseNotReady, spending the retry on nothing.
ERROR_BODIES = {
    "empty": b"",
    "short": b"try again later\n",
    "page": b"try again later\n" * 4096,
}


@pytest.mark.parametrize("body", ERROR_BODIES, ids=list(ERROR_BODIES))
def test_500_twice_then_200_succeeds_with_retries(run, server, models, policy, body):
    server.serve(PATH, BODY)
    server.fail(PATH, 500, times=2, body=ERROR_BODIES[body])
    p = write(policy, models, required(sha256=sha(BODY), source=server.url(PATH)), retries=2)
    r = run("--config", p, "apply")
    finished = assert_restored(models, r, BODY)
    assert finished["retries"] == 2
    assert len(gets(server)) == 3


@pytest.mark.parametrize("body", ERROR_BODIES, ids=list(ERROR_BODIES))
@pytest.mark.parametrize("status", [408, 429, 502, 503, 504])
def test_a_retryable_status_is_retried(run, server, models, policy, status, body):
    """`Retry-After: 0`: the retry goes out at once, on the connection of the error."""
    server.serve(PATH, BODY)
    server.fail(PATH, status, times=1, body=ERROR_BODIES[body], headers={"Retry-After": "0"})
    p = write(policy, models, required(sha256=sha(BODY), source=server.url(PATH)), retries=1)
    r = run("--config", p, "apply")
    assert assert_restored(models, r, BODY)["retries"] == 1
    assert len(gets(server)) == 2


def test_retry_after_is_honoured(run, server, models, policy):
    server.serve(PATH, BODY)
    server.fail(PATH, 503, times=1, headers={"Retry-After": "2"})
    p = write(policy, models, required(sha256=sha(BODY), source=server.url(PATH)), retries=1)
    begun = time.monotonic()
    r = run("--config", p, "apply")
    took = time.monotonic() - begun
    finished = assert_restored(models, r, BODY)
    assert finished["retries"] == 1
    assert finished["seconds"] >= 1.9, finished  # not the 0.5 s backoff
    assert took >= 1.9


@pytest.mark.parametrize("body", ERROR_BODIES, ids=list(ERROR_BODIES))
def test_500_beyond_the_retries_fails_and_says_so(run, server, models, policy, body):
    server.serve(PATH, BODY)
    server.fail(PATH, 500, body=ERROR_BODIES[body])
    p = write(policy, models, required(sha256=sha(BODY), source=server.url(PATH)), retries=2)
    r = run("--config", p, "apply")
    assert_nothing_placed(models, r)
    error = failure(r)
    assert "HTTP 500" in error
    assert "gave up after 2 retries" in error
    assert len(gets(server)) == 3  # the first try and two retries


def test_a_server_silent_past_read_timeout_is_resumed(run, server, models, policy):
    """Every GET goes silent after 1 MiB of its body: each read timeout is a drop, and
    each retry asks only for the rest."""
    server.serve(PATH, BODY)
    server.stall(PATH, after=1 * MiB)
    p = write(
        policy,
        models,
        required(sha256=sha(BODY), source=server.url(PATH)),
        read_timeout="500ms",
        retries=2,
    )
    r = run("--config", p, "apply")
    finished = assert_restored(models, r, BODY)
    assert (finished["retries"], finished["restarted"]) == (2, 0)
    ranges = [s.headers.get("range") for s in gets(server)]
    assert ranges == [None, f"bytes={MiB}-", f"bytes={2 * MiB}-"]
    assert [e["offset"] for e in logged(r, "download.resumed")] == [MiB, 2 * MiB]


@pytest.fixture
def refusing_port() -> Iterator[int]:
    """A port on 127.0.0.1 that refuses connections: bound (so nothing else takes it),
    never listening."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def test_a_refused_connection_is_retried_then_fails(run, models, policy, refusing_port):
    url = f"http://127.0.0.1:{refusing_port}/m.bin"
    p = write(policy, models, required(sha256=sha(BODY), source=url), retries=1)
    r = run("--config", p, "apply")
    assert_nothing_placed(models, r)
    error = failure(r)
    assert "127.0.0.1" in error
    assert "gave up after 1 retries" in error


def test_a_refused_connection_says_refused_not_timed_out(run, models, policy, refusing_port):
    url = f"http://127.0.0.1:{refusing_port}/m.bin"
    p = write(policy, models, required(sha256=sha(BODY), source=url), retries=0)
    r = run("--config", p, "apply")
    assert_nothing_placed(models, r)
    error = failure(r)
    assert "refused" in error.lower()
    assert "timed out" not in error


@pytest.mark.parametrize(
    ("content_type", "page"),
    [
        ("text/html; charset=utf-8", b"<p>Please log in</p>" * 100),
        (
            "application/octet-stream",
            b"<!DOCTYPE html>\n<html><head><title>Sign in</title></head><body>x</body></html>",
        ),
        ("application/octet-stream", b"  <html><body>Service unavailable</body></html>"),
    ],
    ids=["content-type", "doctype", "html-tag"],
)
def test_an_html_page_answering_200_is_refused(run, server, models, policy, content_type, page):
    server.serve(PATH, page, content_type=content_type)
    p = write(policy, models, required(source=server.url(PATH)))  # no pin: only the sniff
    r = run("--config", p, "apply")
    assert_nothing_placed(models, r)
    assert "HTML" in failure(r)
    assert len(gets(server)) == 1


def test_a_compressed_body_is_refused(run, server, models, policy):
    server.serve(PATH, BODY, headers={"Content-Encoding": "gzip"})
    p = write(policy, models, required(source=server.url(PATH)))
    r = run("--config", p, "apply")
    assert_nothing_placed(models, r)
    assert "gzip" in failure(r)
    assert gets(server)[0].headers.get("accept-encoding") == "identity"


# -- redirects --------------------------------------------------------------------------------


def test_redirects_are_followed(run, server, models, policy):
    server.serve("/files/m-v1.bin", BODY)
    server.redirect(PATH, "/r1", status=301)
    server.redirect("/r1", "/r2", status=302)
    server.redirect("/r2", "/r3", status=307)
    server.redirect("/r3", "/files/m-v1.bin", status=308)
    p = write(policy, models, required(sha256=sha(BODY), source=server.url(PATH)), max_redirects=4)
    r = run("--config", p, "apply")
    assert_restored(models, r, BODY)
    assert [s.path for s in server.seen] == [PATH, "/r1", "/r2", "/r3", "/files/m-v1.bin"]


def test_a_relative_redirect_is_resolved_against_the_url(run, server, models, policy):
    server.serve("/files/m-v2.bin", BODY)
    server.redirect("/files/latest.bin", "m-v2.bin", status=302)  # Location: m-v2.bin
    url = server.url("/files/latest.bin")
    p = write(policy, models, required(sha256=sha(BODY), source=url))
    r = run("--config", p, "apply")
    assert_restored(models, r, BODY)
    assert [s.path for s in server.seen] == ["/files/latest.bin", "/files/m-v2.bin"]


def test_a_resume_after_a_redirect_asks_again_and_fetches_only_the_rest(
    run, server, models, policy
):
    cut = 1 * MiB
    server.serve("/files/m.bin", BODY)
    server.redirect(PATH, "/files/m.bin")
    server.drop_after("/files/m.bin", cut)
    p = write(policy, models, required(sha256=sha(BODY), source=server.url(PATH)))
    r = run("--config", p, "apply")
    assert_restored(models, r, BODY)
    _, second = gets(server, "/files/m.bin")
    assert second.headers["range"] == f"bytes={cut}-"
    assert sum(s.sent for s in server.seen) == len(BODY)


@pytest.mark.parametrize("hops", [3, 4])
def test_more_redirects_than_max_redirects_are_refused(run, server, models, policy, hops):
    """A chain of *hops* redirects with max_redirects 3: 3 are followed, 4 are not."""
    server.serve("/end.bin", BODY)
    chain = [PATH, *(f"/hop{i}" for i in range(1, hops)), "/end.bin"]
    for here, there in itertools.pairwise(chain):
        server.redirect(here, there)
    p = write(policy, models, required(sha256=sha(BODY), source=server.url(PATH)), max_redirects=3)
    r = run("--config", p, "apply")
    if hops <= 3:
        assert_restored(models, r, BODY)
        assert [s.path for s in server.seen] == chain
    else:
        assert_nothing_placed(models, r)
        assert "max_redirects" in failure(r)
        assert [s.path for s in server.seen] == chain[:4]  # the 4th redirect is not followed


def test_a_redirect_loop_is_refused(run, server, models, policy):
    server.redirect(PATH, "/b")
    server.redirect("/b", PATH)
    p = write(policy, models, required(sha256=sha(BODY), source=server.url(PATH)), max_redirects=5)
    r = run("--config", p, "apply")
    assert_nothing_placed(models, r)
    assert "redirect" in failure(r)
    assert len(server.seen) == 6  # the request and 5 redirects, not retried


# -- mirrors --------------------------------------------------------------------------------


def test_the_second_mirror_serves_when_the_first_404s(run, server, models, policy):
    first, second = server.url("/gone/m.bin"), server.url("/mirror2/m.bin")
    server.serve("/mirror2/m.bin", BODY)
    p = write(policy, models, required(sha256=sha(BODY), sources=[first, second]))
    r = run("--config", p, "apply")
    finished = assert_restored(models, r, BODY)
    assert finished["source"] == second
    [restored] = logged(r, "model.restored")
    assert restored["source"] == second
    [failed] = logged(r, "download.failed")
    assert failed["source"] == first
    assert "404" in failed["error"]
    assert failed.get("next")
    assert len(server.requests_for("/gone/m.bin")) == 1


def test_a_mirror_with_the_wrong_bytes_is_passed_over(run, server, models, policy):
    first, second = server.url("/stale/m.bin"), server.url("/good/m.bin")
    server.serve("/stale/m.bin", payload(len(BODY), seed=4))
    server.serve("/good/m.bin", BODY)
    p = write(policy, models, required(sha256=sha(BODY), sources=[first, second]))
    r = run("--config", p, "apply")
    assert_restored(models, r, BODY)
    [restored] = logged(r, "model.restored")
    assert restored["source"] == second
    [failed] = logged(r, "download.failed")
    assert failed["source"] == first
    assert "sha256" in failed["error"]


def test_every_mirror_failing_says_so_for_each(run, server, models, policy):
    first, second = server.url("/a/m.bin"), server.url("/b/m.bin")
    server.serve("/b/m.bin", b"<html><body>portal</body></html>", content_type="text/html")
    p = write(policy, models, required(sha256=sha(BODY), sources=[first, second]))
    r = run("--config", p, "apply")
    assert_nothing_placed(models, r)
    error = failure(r)
    assert first in error and second in error
    assert "404" in error and "HTML" in error


# -- HTTPS ----------------------------------------------------------------------------------


def test_https_with_the_test_ca_in_ca_bundle_works(run, ca, models, policy, tmp_path):
    bundle = ca_bundle(ca, tmp_path / "ca.pem")
    with ModelServer(tls=ca) as tls:
        tls.serve(PATH, BODY)
        assert tls.url(PATH).startswith("https://")
        item = required(sha256=sha(BODY), source=tls.url(PATH))
        p = write(policy, models, item, ca_bundle=str(bundle))
        r = run("--config", p, "apply")
        assert_restored(models, r, BODY)
        assert len(gets(tls)) == 1


def test_https_without_the_ca_bundle_fails_the_handshake(run, ca, models, policy):
    """The system CAs do not know the test CA: nothing is requested, nothing retried."""
    with ModelServer(tls=ca) as tls:
        tls.serve(PATH, BODY)
        p = write(policy, models, required(sha256=sha(BODY), source=tls.url(PATH)))
        r = run("--config", p, "apply")
        assert_nothing_placed(models, r)
        assert gets(tls) == []  # the handshake failed: no request was made
        assert "retries" not in failure(r)  # a certificate does not get better by retrying


def test_https_without_the_ca_bundle_says_tls_and_names_ca_bundle(run, ca, models, policy):
    with ModelServer(tls=ca) as tls:
        tls.serve(PATH, BODY)
        p = write(policy, models, required(sha256=sha(BODY), source=tls.url(PATH)))
        r = run("--config", p, "apply")
        assert_nothing_placed(models, r)
        error = failure(r)
        assert "TLS" in error
        assert "ca_bundle" in error
        assert "no network" not in error


def test_an_https_redirect_to_http_is_refused(run, ca, server, models, policy, tmp_path):
    server.serve(PATH, BODY)
    bundle = ca_bundle(ca, tmp_path / "ca.pem")
    with ModelServer(tls=ca) as tls:
        tls.redirect(PATH, server.url(PATH))
        p = write(
            policy, models, required(sha256=sha(BODY), source=tls.url(PATH)), ca_bundle=str(bundle)
        )
        r = run("--config", p, "apply")
        assert_nothing_placed(models, r)
        assert "unencrypted" in failure(r)
        assert len(tls.seen) == 1
    assert server.seen == []


# -- credentials ----------------------------------------------------------------------------


def test_netrc_credentials_are_sent_to_their_host(run, server, models, policy, tmp_path):
    server.serve(PATH, BODY)
    netrc = netrc_file(tmp_path / "netrc", "machine 127.0.0.1 login alice password s3cret\n")
    p = write(policy, models, required(sha256=sha(BODY), source=server.url(PATH)), netrc=str(netrc))
    r = run("--config", p, "apply")
    assert_restored(models, r, BODY)
    [got] = gets(server)
    assert got.headers["authorization"] == basic("alice", "s3cret")
    assert "s3cret" not in r.out + r.err
    assert basic("alice", "s3cret").split()[1] not in r.out + r.err


def test_netrc_from_the_environment_is_used_without_download_netrc(
    net_env, server, models, policy, tmp_path
):
    server.serve(PATH, BODY)
    netrc = netrc_file(tmp_path / "netrc", "machine 127.0.0.1 login carol password pw9\n")
    p = write(policy, models, required(sha256=sha(BODY), source=server.url(PATH)))
    proc = subprocess.run(
        [OCRD, "--config", str(p), "apply"],
        capture_output=True,
        text=True,
        env={**net_env, "NETRC": str(netrc)},
        timeout=60,
        check=False,
    )
    assert_restored(models, Result(proc), BODY)
    assert gets(server)[0].headers["authorization"] == basic("carol", "pw9")


def test_netrc_for_another_host_sends_no_credentials(run, server, models, policy, tmp_path):
    server.serve(PATH, BODY)
    netrc = netrc_file(tmp_path / "netrc", "machine example.com login alice password s3cret\n")
    p = write(policy, models, required(sha256=sha(BODY), source=server.url(PATH)), netrc=str(netrc))
    r = run("--config", p, "apply")
    assert_restored(models, r, BODY)
    assert "authorization" not in gets(server)[0].headers


def test_a_netrc_others_can_read_is_refused(run, server, models, policy, tmp_path):
    server.serve(PATH, BODY)
    netrc = netrc_file(
        tmp_path / "netrc", "machine 127.0.0.1 login alice password s3cret\n", mode=0o644
    )
    p = write(policy, models, required(sha256=sha(BODY), source=server.url(PATH)), netrc=str(netrc))
    r = run("--config", p, "apply")
    assert_nothing_placed(models, r)
    error = failure(r)
    assert "netrc" in error
    assert "0644" in error or "other users" in error
    assert "s3cret" not in r.out + r.err
    assert server.seen == []  # refused before any request


def test_credentials_do_not_follow_a_redirect_to_another_host(
    run, server, models, policy, tmp_path
):
    netrc = netrc_file(tmp_path / "netrc", "machine 127.0.0.1 login alice password s3cret\n")
    with ModelServer() as other:
        other.serve(PATH, BODY)
        elsewhere = other.url(PATH).replace("127.0.0.1", "localhost")
        server.redirect(PATH, elsewhere)
        p = write(
            policy, models, required(sha256=sha(BODY), source=server.url(PATH)), netrc=str(netrc)
        )
        r = run("--config", p, "apply")
        assert_restored(models, r, BODY)
        [asked] = server.requests_for(PATH)
        assert asked.headers["authorization"] == basic("alice", "s3cret")
        [moved] = gets(other)
        assert moved.headers["host"].startswith("localhost:")
        assert "authorization" not in moved.headers


def test_a_redirect_to_another_host_gets_that_hosts_own_credentials(
    run, server, models, policy, tmp_path
):
    netrc = netrc_file(
        tmp_path / "netrc",
        "machine 127.0.0.1 login alice password s3cret\n"
        "machine localhost login bob password hunter2\n",
    )
    with ModelServer() as other:
        other.serve(PATH, BODY)
        server.redirect(PATH, other.url(PATH).replace("127.0.0.1", "localhost"))
        p = write(
            policy, models, required(sha256=sha(BODY), source=server.url(PATH)), netrc=str(netrc)
        )
        r = run("--config", p, "apply")
        assert_restored(models, r, BODY)
        assert server.requests_for(PATH)[0].headers["authorization"] == basic("alice", "s3cret")
        assert gets(other)[0].headers["authorization"] == basic("bob", "hunter2")


@pytest.mark.parametrize("field", ["source", "sources"])
def test_a_source_url_with_credentials_is_refused_by_check(run, server, models, policy, field):
    url = server.url(PATH).replace("http://", "http://alice:s3cret@")
    item = required(sha256=sha(BODY), **{field: url if field == "source" else [url]})
    p = write(policy, models, item)
    r = run("--config", p, "check")
    assert r.code == 2, r
    said = r.out + r.err
    assert "netrc" in said
    assert "s3cret" not in said
    r = run("--config", p, "apply")
    assert r.code != 0, r
    assert "s3cret" not in r.out + r.err
    assert server.seen == []
    assert not (models / NAME).exists()


def test_check_sources_asks_each_source_with_head_only(run, server, models, policy):
    server.serve(PATH, BODY)
    good, gone = server.url(PATH), server.url("/gone.bin")
    p = write(
        policy,
        models,
        required(sha256=sha(BODY), source=good),
        {"name": "g.bin", "source": gone},
    )
    r = run("--config", p, "check", "--sources")
    assert r.code != 0, r
    lines = r.out.splitlines()
    assert any(x.startswith("ok:") and good in x and str(len(BODY)) in x for x in lines), r
    assert any(x.startswith("error:") and gone in x and "404" in x for x in lines), r
    assert {s.method for s in server.seen} == {"HEAD"}  # nothing downloaded
    assert entries(models) <= {".ocrd-lock"}


# -- free space -----------------------------------------------------------------------------


def test_too_little_room_for_the_content_length_is_refused_before_the_body(
    run, server, policy, tmp_path, tmpfs_at
):
    """On a 66 MiB tmpfs a 1 MiB model fits (with the 64 MiB margin), a 4 MiB one does not:
    the check is against the announced length, before any byte of the body is read (the
    server dribbles it: reading it all would take seconds and show in `sent`)."""
    models = tmp_path / "small"
    models.mkdir()
    tmpfs_at(models, f"{(MARGIN + 2 * MiB) // MiB}m")  # 66 MiB
    big, small = payload(4 * MiB, seed=5), payload(1 * MiB, seed=6)
    server.serve("/big.bin", big)
    server.slow("/big.bin", delay=0.1, chunk=64 * 1024)
    server.serve("/small.bin", small)
    p = write(
        policy,
        models,
        {"name": "big.bin", "sha256": sha(big), "source": server.url("/big.bin")},
        {"name": "small.bin", "sha256": sha(small), "source": server.url("/small.bin")},
    )
    r = run("--config", p, "apply")
    assert r.code != 0, r
    assert (models / "small.bin").read_bytes() == small
    assert not (models / "big.bin").exists()
    assert {n for n in entries(models) if n.startswith(".ocrd-tmp-")} == set()
    [failed] = logged(r, "action.failed")
    assert failed["model"] == "big.bin"
    assert "free space" in failed["error"]
    assert str(len(big)) in failed["error"]
    [asked] = gets(server, "/big.bin")
    assert asked.sent <= 4 * 64 * 1024, asked  # a few chunks at most, not the body


def test_a_disk_filling_up_mid_download_removes_the_partial(
    run, server, policy, tmp_path, tmpfs_at
):
    """No Content-Length: the free space cannot be checked first; the 1 MiB tmpfs fills."""
    models = tmp_path / "tiny"
    models.mkdir()
    tmpfs_at(models, "1m")
    server.serve(PATH, BODY, send_length=False)
    p = write(policy, models, required(sha256=sha(BODY), source=server.url(PATH)))
    r = run("--config", p, "apply")
    assert_nothing_placed(models, r)
    error = failure(r)
    assert "filled up" in error
    assert entries(models) <= {".ocrd-lock"}
    vfs = os.statvfs(models)
    assert vfs.f_bfree * vfs.f_frsize >= 1 * MiB - 64 * 1024  # the space is given back
    assert len(gets(server)) == 1  # not retried: the disk is still full


# -- progress on a terminal -----------------------------------------------------------------


def test_a_big_download_shows_progress_on_a_terminal_only(
    run: Callable[..., Result],
    server: ModelServer,
    models: Path,
    policy: Path,
    net_env: dict[str, str],
) -> None:
    """Over 256 MiB, `ocrd apply` on a terminal shows "downloading NAME: N% of …" on
    stderr; in a pipe it prints nothing of the kind."""
    import pty

    big = os.urandom(300 * MiB)
    server.serve(PATH, big)
    p = write(policy, models, required(sha256=sha(big), source=server.url(PATH)))
    piped = run("--config", p, "apply")
    assert piped.code == 0, piped
    assert "downloading" not in piped.err
    (models / NAME).unlink()
    leader, follower = pty.openpty()
    seen = b""
    try:
        proc = subprocess.Popen(
            [OCRD, "--config", str(p), "apply"],
            stdout=subprocess.DEVNULL,
            stderr=follower,
            env=net_env,
        )
        os.close(follower)
        follower = -1
        while True:  # read while it runs: a full terminal buffer would hold it up
            try:
                got = os.read(leader, 4096)
            except OSError:  # EIO: the other side is closed and drained
                break
            if not got:
                break
            seen += got
        assert proc.wait(timeout=120) == 0
    finally:
        if follower != -1:
            os.close(follower)
        os.close(leader)
    assert b"downloading m.bin: " in seen, seen[-500:]
    assert b"100% of 0.3 GiB" in seen, seen[-500:]
    assert sha((models / NAME).read_bytes()) == sha(big)
