"""Hostile users and hostile networks against downloads (`source:` on http(s):// and hf://).

A hostile user plants or swaps things at the download's hidden name
`.ocrd-tmp-dl-<key>` (at the start, mid-download, between verification and the
link into place), forges its `user.ocrd.download` record, points `download.netrc` or
`download.ca_bundle` at a FIFO or a root-only file, swaps the model dir under the
daemon. A hostile network lies in Content-Length / Content-Range / X-Linked-Size,
sends endless bodies, redirects to file:// or to huge bodies, dribbles headers or
body bytes. Each test runs the real CLI or daemon against a real server on
127.0.0.1; windows are held open with strace (delay_enter), never hit by luck.

Tests that pass document a line that held. A test marked xfail(strict=True) is a bug
found by this review (see its reason); it passes once the bug is fixed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import signal
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ocrd.act.fetching import RECORD, partial_name
from tests.support.cli import OCRD, Result
from tests.support.daemon import Daemons
from tests.support.http import LAST_MODIFIED, ModelServer, etag_for
from tests.support.hub import hub_env
from tests.support.policy import policy_data, save_policy, write_policy
from tests.support.users import ensure_test_user
from tests.support.wait import wait_for

MiB = 1024 * 1024
NAME = "m.bin"
PATH = "/m.bin"
PARTIAL = partial_name(NAME)
BODY = random.Random(11).randbytes(MiB)
STRACE = shutil.which("strace")
ROOT = os.geteuid() == 0
MOUNT, UMOUNT = shutil.which("mount"), shutil.which("umount")
needs_strace = pytest.mark.skipif(STRACE is None, reason="strace is not installed")
needs_root = pytest.mark.skipif(
    not ROOT or MOUNT is None or UMOUNT is None, reason="needs root (mount, mknod)"
)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- running ocrd ---------------------------------------------------------------------------


@pytest.fixture
def net_env(env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """The CLI's environment: no proxy, no $NETRC, no huggingface_hub setting from outside."""
    drop = {"http_proxy", "https_proxy", "all_proxy", "no_proxy", "netrc"}
    clean = {k: v for k, v in env.items() if k.lower() not in drop and not k.startswith("HF_")}
    return hub_env(clean, hf_home=tmp_path / "hf", endpoint="http://127.0.0.1:9")


@pytest.fixture
def run(net_env: dict[str, str]) -> Callable[..., Result]:
    def go(*args: str | Path, timeout: float = 30, extra: dict[str, str] | None = None) -> Result:
        proc = subprocess.run(
            [OCRD, *map(str, args)],
            capture_output=True,
            text=True,
            env={**net_env, **(extra or {})},
            timeout=timeout,
            check=False,
        )
        return Result(proc)

    return go


@pytest.fixture
def server() -> Iterator[ModelServer]:
    with ModelServer() as running:
        yield running


def write(policy: Path, models: Path, *items: dict[str, Any], **download: Any) -> Path:
    settings = {"retries": 1, "connect_timeout": "5s", "read_timeout": "5s", **download}
    return write_policy(policy, policy_data(models, required=list(items), download=settings))


def item(source: str, *, pinned: bool = True, body: bytes = BODY) -> dict[str, Any]:
    found: dict[str, Any] = {"name": NAME, "source": source}
    if pinned:
        found["sha256"] = sha(body)
    return found


def errors(r: Result) -> list[str]:
    return [e["error"] for e in r.logs() if e["event"] == "action.failed"]


def clear_failure(r: Result) -> str:
    """The one failed action's error: a sentence, not an internal error or a traceback."""
    assert "internal error" not in r.err and "Traceback" not in r.err, r
    assert r.code != 0, r
    [error] = errors(r)
    return error


def placed(models: Path) -> bytes | None:
    try:
        return (models / NAME).read_bytes()
    except FileNotFoundError:
        return None


def size_of(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return -1


def start(env: dict[str, str], argv: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


def finish(proc: subprocess.Popen[str], timeout: float = 30) -> Result:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate(timeout=10)
        raise
    return Result(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))


def record(source: str, body: bytes, **fields: Any) -> bytes:
    found = {
        "model": NAME,
        "source": source,
        "url": source,
        "etag": etag_for(body),
        "last_modified": LAST_MODIFIED,
        "total": len(body),
        **fields,
    }
    return json.dumps(found).encode()


# -- a server that says exactly what a test tells it to ------------------------------------

Answer = tuple[bytes, bytes | Iterable[bytes], bool]  # head, body, close afterwards


def head(status: int, headers: list[tuple[str, object]]) -> bytes:
    lines = [f"HTTP/1.1 {status} X", *(f"{k}: {v}" for k, v in headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class Liar:
    """A raw HTTP/1.1 server on 127.0.0.1: `answer(index, request_text)` gives each answer
    (its head, its body or chunks of it, whether to close); None says nothing more.
    `sent` counts the body bytes written."""

    def __init__(self, answer: Callable[[int, str], Answer | None]) -> None:
        self.answer, self.requests, self.sent = answer, [], 0
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self.port = self._sock.getsockname()[1]
        self._stop = threading.Event()
        self._conns: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._accept = threading.Thread(target=self._loop, daemon=True)
        self._accept.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def _loop(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self._conns.append(conn)
            thread = threading.Thread(target=self._one, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _one(self, conn: socket.socket) -> None:
        buf = b""
        with contextlib.suppress(OSError):
            while not self._stop.is_set():
                while b"\r\n\r\n" not in buf:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                request, buf = buf.split(b"\r\n\r\n", 1)
                self.requests.append(request.decode("latin-1"))
                out = self.answer(len(self.requests) - 1, self.requests[-1])
                if out is None:
                    return
                top, body, close = out
                conn.sendall(top)
                for chunk in [body] if isinstance(body, bytes) else body:
                    if self._stop.is_set():
                        return
                    conn.sendall(chunk)
                    self.sent += len(chunk)
                if close:  # a graceful end: the client reads all that was sent
                    conn.shutdown(socket.SHUT_WR)
                    conn.settimeout(5)
                    while conn.recv(65536):
                        pass
                    return

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes the accept(2) in progress
        self._accept.join(5)
        self._sock.close()
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(5)
        for conn in self._conns:
            conn.close()


@pytest.fixture
def liar() -> Iterator[Callable[[Callable[[int, str], Answer | None]], Liar]]:
    made: list[Liar] = []

    def make(answer: Callable[[int, str], Answer | None]) -> Liar:
        made.append(Liar(answer))
        return made[-1]

    yield make
    for one in made:
        one.close()


def dribble(every: float, stop: threading.Event, byte: bytes = b"X") -> Iterator[bytes]:
    """One byte every *every* seconds until *stop*: never silent for a read_timeout."""
    while not stop.wait(every):
        yield byte


def requested_range(text: str) -> int | None:
    found = re.search(r"(?im)^range: bytes=(\d+)-", text)
    return int(found.group(1)) if found else None


# == 1. the download's hidden name, planted or swapped ======================================


def _plant(kind: str, target: Path, outside: Path) -> None:
    if kind == "symlink":
        target.symlink_to(outside)
    elif kind == "fifo":
        os.mkfifo(target)
    elif kind == "dir":
        target.mkdir()
    elif kind == "chardev":
        os.mknod(target, 0o600 | stat.S_IFCHR, os.makedev(1, 5))  # /dev/zero
    elif kind == "socket":  # bound by a relative name: the whole path outgrows sun_path
        with socket.socket(socket.AF_UNIX) as sock, contextlib.chdir(target.parent):
            sock.bind(target.name)
    elif kind == "hardlink":
        os.link(outside, target)
    elif kind == "bind":
        target.write_bytes(b"")
        subprocess.run([MOUNT, "--bind", str(outside), str(target)], check=True)
    elif kind == "other-user":
        user = ensure_test_user()
        target.write_bytes(b"x" * 1000)
        target.chmod(0o600)
        os.chown(target, user.pw_uid, user.pw_gid)


@needs_root
@pytest.mark.parametrize(
    "kind", ["symlink", "fifo", "dir", "chardev", "socket", "hardlink", "bind", "other-user"]
)
def test_anything_planted_at_the_download_name_is_left_alone(
    run, server, models, policy, tmp_path, kind
):
    """Nothing outside the model dir is read, written or removed; nothing is fetched or put
    in place; the planted entry stays as it was; the error is a sentence."""
    server.serve(PATH, BODY)
    outside = tmp_path / "outside"
    outside.write_bytes(b"outside\n")
    outside.chmod(0o600)
    target = models / PARTIAL
    _plant(kind, target, outside)
    before = os.lstat(target)
    try:
        p = write(policy, models, item(server.url(PATH)))
        r = run("--config", p, "apply")
        assert r.code != 0, r
        assert "internal error" not in r.err, r
        assert placed(models) is None
        assert server.seen == []
        assert outside.read_bytes() == b"outside\n"
        after = os.lstat(target)
        assert (after.st_ino, after.st_mode, after.st_uid) == (
            before.st_ino,
            before.st_mode,
            before.st_uid,
        )
        events = r.events()
        assert "model_dir.suspicious" in events or "left as it is" in " ".join(errors(r)), r
    finally:
        if kind == "bind":
            subprocess.run([str(UMOUNT), str(target)], check=False)


def _openat_count(argv: list[str], env: dict[str, str], log: Path, name: str) -> int:
    """How many openat calls ocrd's main thread makes up to the one that opens *name*."""
    assert STRACE is not None
    subprocess.run(
        [STRACE, "-qq", "-o", str(log), "-e", "trace=openat", *argv],
        capture_output=True,
        env=env,
        timeout=60,
        check=False,
    )
    lines = log.read_text().splitlines()
    return 1 + next(i for i, line in enumerate(lines) if name in line)


@needs_strace
@needs_root
def test_a_device_swapped_in_after_the_scan_is_refused_at_open(
    net_env, server, models, policy, tmp_path
):
    """The open of the download file is held 1.5 s (strace); a character device appears
    under the name meanwhile: refused and left as it is (a hard link to a file outside,
    swapped in the same way, was refused too while reviewing; see the planted kinds)."""
    assert STRACE is not None
    server.serve(PATH, BODY)
    p = write(policy, models, item(server.url(PATH)))
    argv = [OCRD, "--config", str(p), "apply"]
    subprocess.run(argv, capture_output=True, env=net_env, timeout=60, check=False)
    (models / NAME).unlink()  # a warm state dir: the count is the attacked run's
    count = _openat_count(argv, net_env, tmp_path / "count.log", PARTIAL)
    (models / NAME).unlink()
    outside = tmp_path / "outside"
    outside.write_bytes(b"outside\n")
    log = tmp_path / "attack.log"
    wrapped = [STRACE, "-qq", "-o", str(log), "-e", "trace=openat"]
    wrapped += ["-e", f"inject=openat:delay_enter=1500000:when={count}", *argv]
    proc = start(net_env, wrapped)
    wait_for(lambda: log.exists() and PARTIAL in log.read_text(), what="the held open")
    _plant("chardev", models / PARTIAL, outside)
    r = finish(proc)
    assert "left as it is" in clear_failure(r)
    assert placed(models) is None
    assert stat.S_ISCHR(os.lstat(models / PARTIAL).st_mode)  # left as it was


def test_the_partial_swapped_mid_download_for_a_link_out_is_not_followed(
    net_env, server, models, policy, tmp_path
):
    """Mid-download the name is renamed away and a symlink to a file outside takes it:
    the bytes go on into ocrd's own file, the outside file is untouched, nothing is put in
    place, and the error says the download changed."""
    server.serve(PATH, BODY)
    release = server.stall(PATH, after=100_000)
    outside = tmp_path / "outside"
    outside.write_bytes(b"outside\n")
    p = write(policy, models, item(server.url(PATH)))
    proc = start(net_env, [OCRD, "--config", str(p), "apply"])
    try:
        wait_for(lambda: size_of(models / PARTIAL) == 100_000, what="the held download")
        os.rename(models / PARTIAL, tmp_path / "moved-away")
        (models / PARTIAL).symlink_to(outside)
    finally:
        release.set()
    r = finish(proc)
    assert "changed" in clear_failure(r) or "symbolic link" in clear_failure(r)
    assert outside.read_bytes() == b"outside\n"
    assert placed(models) is None
    assert (models / PARTIAL).is_symlink()


@needs_strace
def test_a_file_swapped_in_between_verification_and_link_is_never_put_in_place(
    net_env, server, models, policy, tmp_path
):
    assert STRACE is not None
    server.serve(PATH, BODY)
    p = write(policy, models, item(server.url(PATH)))
    secret = tmp_path / "root-only"
    secret.write_bytes(b"root-only secret\n")
    secret.chmod(0o600)
    log = tmp_path / "strace.log"
    wrapped = [STRACE, "-f", "-qq", "-o", str(log), "-e", "trace=link,linkat"]
    wrapped += ["-e", "inject=link,linkat:delay_enter=1500000:when=1"]
    proc = start(net_env, [*wrapped, OCRD, "--config", str(p), "apply"])
    wait_for(lambda: log.exists() and "link" in log.read_text(), what="the held link(2)")
    os.link(secret, models / "evil")
    os.rename(models / "evil", models / PARTIAL)
    r = finish(proc)
    assert not (models / NAME).exists() or os.stat(models / NAME).st_ino != secret.stat().st_ino
    assert placed(models) in (None, BODY)
    if placed(models) is None:
        assert "model.restored" not in r.events(), r


# == 2. the resume record ==================================================================


def test_a_forged_record_naming_another_url_is_never_resumed(run, server, models, policy):
    """The forged record says this source but another URL: the bytes under the name are
    thrown away and the model is fetched whole."""
    server.serve(PATH, BODY)
    path = models / PARTIAL
    path.write_bytes(b"\0forged" * 1000)
    path.chmod(0o600)
    os.setxattr(path, RECORD, record(server.url(PATH), BODY, url="http://evil.invalid/x"))
    p = write(policy, models, item(server.url(PATH), pinned=False))
    r = run("--config", p, "apply")
    assert r.code == 0, r
    assert placed(models) == BODY
    [got] = [s for s in server.seen if s.method == "GET"]
    assert "range" not in got.headers


def test_a_forged_record_claiming_a_huge_total_changes_nothing(run, server, models, policy):
    server.serve(PATH, BODY)
    path = models / PARTIAL
    path.write_bytes(BODY[:1000])
    path.chmod(0o600)
    os.setxattr(path, RECORD, record(server.url(PATH), BODY, total=10**40))
    p = write(policy, models, item(server.url(PATH)))
    r = run("--config", p, "apply")
    assert r.code == 0, r
    assert placed(models) == BODY


def test_a_deeply_nested_record_is_not_an_internal_error(run, server, models, policy):
    server.serve(PATH, BODY)
    path = models / PARTIAL
    path.write_bytes(BODY[:1000])
    path.chmod(0o600)
    os.setxattr(path, RECORD, b"[" * 3900)
    p = write(policy, models, item(server.url(PATH)))
    r = run("--config", p, "apply")
    assert "internal error" not in r.err, r
    assert placed(models) == BODY


# == 3. a server that lies =================================================================


N = len(BODY)
LIES: dict[str, Callable[[int, str], Answer | None]] = {
    # More bytes than Content-Length: only Content-Length bytes are the body.
    "more-than-content-length": lambda i, t: (
        head(200, [("Content-Length", N), ("ETag", '"e"')]),
        BODY + b"EXTRA" * 1000,
        True,
    ),
    "negative-content-length": lambda i, t: (
        head(200, [("Content-Length", -5), ("ETag", '"e"'), ("Connection", "close")]),
        BODY,
        True,
    ),
    "content-range-total-unknown": lambda i, t: (
        head(206, [("Content-Length", N), ("Content-Range", f"bytes 0-{N - 1}/*")]),
        BODY,
        True,
    ),
}
REFUSED: dict[str, tuple[Callable[[int, str], Answer | None], str]] = {
    "two-content-lengths": (
        lambda i, t: (
            head(200, [("Content-Length", N), ("Content-Length", N + 1)]),
            BODY,
            True,
        ),
        "Content-Length",
    ),
    "content-range-garbage": (
        lambda i, t: (
            head(206, [("Content-Length", N), ("Content-Range", "bytes lies")]),
            BODY,
            True,
        ),
        "Content-Range",
    ),
    "chunked-beyond-content-length": (
        lambda i, t: (
            head(200, [("Content-Length", 10), ("Transfer-Encoding", "chunked")]),
            b"%x\r\n" % N + BODY + b"\r\n0\r\n\r\n",
            True,
        ),
        "more than",
    ),
    "redirect-to-file": (
        lambda i, t: (
            head(302, [("Location", "file:///etc/passwd"), ("Content-Length", 0)]),
            b"",
            False,
        ),
        "not http(s)",
    ),
}


@pytest.mark.parametrize("lie", list(LIES))
def test_a_server_lie_that_still_gives_the_right_bytes_is_handled(run, liar, models, policy, lie):
    served = liar(LIES[lie])
    p = write(policy, models, item(served.url(PATH), pinned=False))
    r = run("--config", p, "apply")
    assert r.code == 0, r
    assert placed(models) == BODY


@pytest.mark.parametrize("lie", list(REFUSED))
def test_a_server_lie_is_refused_with_a_clear_error(run, liar, models, policy, lie):
    answer, said = REFUSED[lie]
    served = liar(answer)
    p = write(policy, models, item(served.url(PATH), pinned=False))
    r = run("--config", p, "apply")
    assert said in clear_failure(r)
    assert placed(models) is None
    assert not (models / PARTIAL).exists()


def test_a_206_from_another_offset_on_resume_is_not_spliced(run, liar, models, policy):
    """Cut after half; asked for the rest, the server answers 206 from byte 0: ocrd starts
    over instead of writing byte 0 at the cut."""

    def answer(i: int, text: str) -> Answer:
        if i == 0:
            return head(200, [("Content-Length", N), ("ETag", '"e"')]), BODY[: N // 2], True
        cr = ("Content-Range", f"bytes 0-{N - 1}/{N}")
        return head(206, [("Content-Length", N), ("ETag", '"e"'), cr]), BODY, True

    served = liar(answer)
    p = write(policy, models, item(served.url(PATH), pinned=False))
    r = run("--config", p, "apply")
    assert r.code == 0, r
    assert placed(models) == BODY


def test_a_206_to_a_request_without_range_is_not_taken_as_the_start(run, liar, models, policy):
    def answer(i: int, text: str) -> Answer:
        at = requested_range(text) or N // 2  # unasked: the second half
        cr = ("Content-Range", f"bytes {at}-{N - 1}/{N}")
        return head(206, [("Content-Length", N - at), ("ETag", '"e"'), cr]), BODY[at:], True

    served = liar(answer)
    p = write(policy, models, item(served.url(PATH), pinned=False))
    run("--config", p, "apply")
    assert placed(models) in (None, BODY)


def test_a_total_that_changes_between_requests_is_refused(run, liar, models, policy):
    def answer(i: int, text: str) -> Answer:
        if i == 0:
            return head(200, [("Content-Length", N), ("ETag", '"e"')]), BODY[: N // 2], True
        at, big = requested_range(text) or 0, BODY + BODY
        cr = ("Content-Range", f"bytes {at}-{len(big) - 1}/{len(big)}")
        return head(206, [("Content-Length", len(big) - at), ("ETag", '"e"'), cr]), big[at:], True

    served = liar(answer)
    p = write(policy, models, item(served.url(PATH), pinned=False))
    r = run("--config", p, "apply")
    # Never spliced: nothing, or one version's body whole (the server's new one, fetched
    # again from its start once its length no longer matched what had landed).
    assert placed(models) in (None, BODY, BODY + BODY), r
    if placed(models) == BODY + BODY:
        [finished] = [e for e in r.logs() if e["event"] == "download.finished"]
        assert finished["restarted"] >= 1, finished


def test_a_416_for_another_version_does_not_complete_an_old_partial(run, liar, models, policy):
    new = random.Random(12).randbytes(1000)

    def answer(i: int, text: str) -> Answer:
        if requested_range(text) is not None:  # If-Range ignored
            cr = [("Content-Range", "bytes */1000"), ("ETag", '"new"'), ("Content-Length", 0)]
            return head(416, cr), b"", False
        return head(200, [("Content-Length", len(new)), ("ETag", '"new"')]), new, False

    served = liar(answer)
    path = models / PARTIAL
    path.write_bytes(BODY[:1000])  # the head of the old version
    path.chmod(0o600)
    os.setxattr(path, RECORD, record(served.url(PATH), BODY, etag='"old"'))
    p = write(policy, models, item(served.url(PATH), pinned=False))
    run("--config", p, "apply")
    assert placed(models) == new


@pytest.mark.parametrize("header", ["Content-Length", "X-Linked-Size"])
def test_a_superscript_digit_in_a_length_header_is_a_clear_error(
    run, server, models, policy, tmp_path, header
):
    hub = "/acme/r/resolve/main/m.bin"
    server.serve(hub if header == "X-Linked-Size" else PATH, BODY, headers={header: "\u00b2"})
    source = "hf://acme/r/m.bin" if header == "X-Linked-Size" else server.url(PATH)
    # A body of no usable length on a kept-alive connection ends at the read timeout.
    p = write(policy, models, item(source, pinned=False), read_timeout="1s")
    r = run("--config", p, "apply", extra={"HF_ENDPOINT": server.base})
    if header == "X-Linked-Size" and r.code == 0:
        # A Hub size that is no number is no size: the file is checked against the
        # Hub's sha256 and its own length instead, and that is no internal error.
        assert placed(models) == BODY, r
        assert "Traceback" not in r.out + r.err
        return
    clear_failure(r)


def test_an_absurd_content_length_is_refused_before_the_body(run, liar, models, policy):
    stop = threading.Event()
    served = liar(
        lambda i, t: (
            head(200, [("Content-Length", 10**30)]),
            dribble(0.01, stop, b"\0" * 4096),
            True,
        )
    )
    p = write(policy, models, item(served.url(PATH), pinned=False))
    r = run("--config", p, "apply")
    stop.set()
    assert "free space" in clear_failure(r)
    assert served.sent < 64 * 4096


def test_a_redirect_to_a_10_gb_body_is_refused_before_the_body(
    run, liar, policy, tmp_path, tmpfs_at
):
    models = tmp_path / "small"
    models.mkdir()
    tmpfs_at(models, "80m")
    stop = threading.Event()

    def answer(i: int, text: str) -> Answer:
        if i == 0:
            return head(302, [("Location", "/big"), ("Content-Length", 0)]), b"", False
        return (
            head(200, [("Content-Length", 10 * 1024**3)]),
            dribble(0.01, stop, b"\0" * 4096),
            True,
        )

    served = liar(answer)
    p = write(policy, models, item(served.url(PATH), pinned=False))
    r = run("--config", p, "apply")
    stop.set()
    assert "free space" in clear_failure(r)
    assert served.sent < 64 * 4096
    assert os.listdir(models) == [".ocrd-lock"]


def test_an_endless_body_without_length_keeps_the_free_space_margin(
    run, liar, policy, tmp_path, tmpfs_at
):
    models = tmp_path / "small"
    models.mkdir()
    tmpfs_at(models, "80m")  # 16 MiB beyond the margin
    stop = threading.Event()
    served = liar(
        lambda i, t: (head(200, [("Connection", "close")]), dribble(0, stop, b"\7" * 65536), True)
    )
    p = write(policy, models, item(served.url(PATH), pinned=False))
    r = run("--config", p, "apply", timeout=60)
    stop.set()
    assert "free space" in clear_failure(r)
    assert served.sent < 40 * MiB, served.sent


def test_a_hub_body_without_length_stops_at_the_hubs_size(run, liar, models, policy):
    def answer(i: int, text: str) -> Answer:
        if text.startswith("HEAD"):
            meta = [("X-Linked-Size", N), ("X-Linked-Etag", f'"{sha(BODY)}"')]
            return head(200, [*meta, ("Content-Length", N), ("ETag", '"e"')]), b"", False
        body = (b"\7" * 65536 for _ in range(512))  # 32 MiB
        return head(200, [("ETag", '"e"'), ("Connection", "close")]), body, True

    served = liar(answer)
    p = write(policy, models, item("hf://acme/r/m.bin", pinned=False))
    r = run("--config", p, "apply", extra={"HF_ENDPOINT": served.url("")})
    clear_failure(r)
    # Stopped soon after the Hub's size (what the server "sent" includes the loopback's
    # socket buffers, several MiB), far from the 32 MiB it would send.
    assert served.sent <= N + 16 * MiB, served.sent


# == 4. names, URLs and headers =============================================================


@pytest.mark.parametrize(
    "source",
    [
        "{base}/m.bin\r\nX-Injected: yes",
        "{base}/m\r\nX-Injected: yes\r\n\r\nGET /x.bin",
        "hf://acme/r/m\r\nX-Injected: yes.bin",
        "hf://acme/r/%2e%2e/%2e%2e/m.bin",
        "hf://acme/r@..%2F..%2Fx/a%2F..%2Fm.bin",
    ],
    ids=["crlf-url", "request-smuggling", "crlf-hub-path", "hub-dotdot", "hub-encoded-slash"],
)
def test_no_header_or_path_can_be_injected_through_a_source(run, server, models, policy, source):
    p = write(policy, models, item(source.format(base=server.base)))
    r = run("--config", p, "apply", extra={"HF_ENDPOINT": server.base})
    assert "internal error" not in r.err, r
    assert server.seen, r
    for seen in server.seen:
        assert "x-injected" not in seen.headers
        assert "\r" not in seen.path and "\n" not in seen.path and " " not in seen.path
        assert "/../" not in seen.path and not seen.path.startswith("/x.bin")
    assert len(server.seen) <= 3  # one request per try: nothing smuggled in after it


def test_a_model_name_with_crlf_and_odd_unicode_sends_nothing_of_it(run, server, models, policy):
    server.serve(PATH, BODY)
    name = "m\r\nX-Injected: yes\u202e\u2028.bin"
    p = write(policy, models, {"name": name, "sha256": sha(BODY), "source": server.url(PATH)})
    r = run("--config", p, "apply")
    assert r.code == 0, r
    assert (models / name).read_bytes() == BODY
    [got] = server.seen
    assert got.path == PATH and "x-injected" not in got.headers


# == 5. credentials, CA bundles, and what is logged =========================================


def _leaks(run: Callable[..., Result], p: Path, secrets: list[str], **kw: Any) -> list[str]:
    """Where the secrets show: the apply's output, `plan --json`, `check`."""
    found = []
    for args in (("apply",), ("plan", "--json"), ("check",)):
        r = run("--config", p, *args, **kw)
        said = r.out + r.err
        found += [f"{' '.join(args)}: {s}" for s in secrets if s in said]
    return found


def test_netrc_passwords_and_hf_token_never_show(run, server, models, policy, tmp_path):
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1 login alice password s3cretPW\n")
    netrc.chmod(0o600)
    server.serve(PATH, BODY)
    server.serve("/acme/r/resolve/main/g.bin", BODY)
    p = write(
        policy,
        models,
        item(server.url(PATH)),
        {"name": "g.bin", "source": "hf://acme/r/g.bin", "sha256": sha(BODY)},
        netrc=str(netrc),
    )
    extra = {"HF_ENDPOINT": server.base, "HF_TOKEN": "hf_T0KENSECRET"}
    secrets = ["s3cretPW", "hf_T0KENSECRET", "YWxpY2U6czNjcmV0UFc"]
    assert _leaks(run, p, secrets, extra=extra) == []
    assert placed(models) == BODY


@pytest.mark.parametrize("kind", ["fifo", "group-readable-symlink"])
def test_a_netrc_that_is_a_fifo_or_a_readable_link_is_refused_at_once(
    run, server, models, policy, tmp_path, kind
):
    server.serve(PATH, BODY)
    netrc = tmp_path / "netrc"
    if kind == "fifo":
        os.mkfifo(netrc)
    else:
        shadow = tmp_path / "shadow"
        shadow.write_text("root:$y$j9T$HASHSECRET:19000:0:99999:7:::\n")
        shadow.chmod(0o640)
        netrc.symlink_to(shadow)
    p = write(policy, models, item(server.url(PATH)), netrc=str(netrc))
    r = run("--config", p, "apply", timeout=15)
    assert "netrc" in clear_failure(r)
    assert "HASHSECRET" not in r.out + r.err
    assert server.seen == []


@pytest.mark.parametrize("text", ["password-with-space", "shadow-line"])
def test_a_netrc_that_does_not_parse_never_shows_its_contents(
    run, server, models, policy, tmp_path, text
):
    server.serve(PATH, BODY)
    target = tmp_path / "root-only"
    if text == "password-with-space":
        target.write_text("machine 127.0.0.1 login alice password hunter2 SECRETTAIL\n")
    else:
        target.write_text("root:$y$j9T$SECRETTAIL:19000:0:99999:7:::\n")
    target.chmod(0o600)
    netrc = tmp_path / "netrc"
    netrc.symlink_to(target)
    p = write(policy, models, item(server.url(PATH)), netrc=str(netrc))
    assert _leaks(run, p, ["SECRETTAIL"]) == []


@needs_strace
def test_a_netrc_swapped_for_a_fifo_after_its_check_does_not_hang(
    net_env, server, models, policy, tmp_path
):
    assert STRACE is not None
    server.serve(PATH, BODY)
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1 login a password b\n")
    netrc.chmod(0o600)
    p = write(policy, models, item(server.url(PATH)), netrc=str(netrc))
    log = tmp_path / "strace.log"
    wrapped = [STRACE, "-f", "-qq", "-o", str(log), "-P", str(netrc), "-e", "trace=openat"]
    wrapped += ["-e", "inject=openat:delay_enter=1000000:when=1", OCRD, "--config", str(p)]
    proc = start(net_env, [*wrapped, "apply"])
    wait_for(lambda: log.exists() and "openat" in log.read_text(), what="the held open")
    netrc.unlink()
    os.mkfifo(netrc)
    try:
        proc.wait(timeout=4)
    except subprocess.TimeoutExpired:
        # Let the blocked open(2) go (a writer comes and goes), so that ocrd ends.
        os.close(os.open(netrc, os.O_WRONLY | os.O_NONBLOCK))
        proc.communicate(timeout=30)
        pytest.fail("`ocrd apply` hung on a netrc swapped for a FIFO")
    proc.communicate(timeout=10)


def test_a_ca_bundle_that_is_a_fifo_does_not_hang(run, models, policy, tmp_path):
    trustme = pytest.importorskip("trustme")
    fifo = tmp_path / "ca.pem"
    os.mkfifo(fifo)
    with ModelServer(tls=trustme.CA()) as tls:
        tls.serve(PATH, BODY)
        p = write(policy, models, item(tls.url(PATH)), ca_bundle=str(fifo))
        r = run("--config", p, "apply", timeout=5)
        assert "ca_bundle" in clear_failure(r)


def test_netrc_default_credentials_do_not_follow_a_redirect(run, server, models, policy, tmp_path):
    netrc = tmp_path / "netrc"
    netrc.write_text(
        "machine 127.0.0.1 login alice password s3cret\ndefault login anon password DEFAULTPW\n"
    )
    netrc.chmod(0o600)
    with ModelServer() as other:
        other.serve(PATH, BODY)
        server.redirect(PATH, other.url(PATH).replace("127.0.0.1", "localhost"))
        p = write(policy, models, item(server.url(PATH)), netrc=str(netrc))
        r = run("--config", p, "apply")
        assert r.code == 0, r
        assert [s.headers.get("authorization") for s in other.seen] == [None]


def test_a_signed_redirect_url_never_appears_in_an_error(run, server, models, policy):
    server.serve(PATH, BODY)
    server.redirect("/a.bin", "/b.bin?X-Amz-Signature=SIGSECRET1")
    server.redirect("/b.bin", "/c.bin?X-Amz-Signature=SIGSECRET2")
    server.redirect("/c.bin", PATH)
    p = write(policy, models, item(server.url("/a.bin")), max_redirects=1)
    r = run("--config", p, "apply")
    clear_failure(r)
    assert "SIGSECRET" not in r.out + r.err


def test_a_signed_source_url_query_is_never_logged(run, server, models, policy):
    server.serve(PATH, BODY)
    p = write(policy, models, item(server.url(PATH) + "?X-Amz-Signature=POLICYSIG"))
    assert _leaks(run, p, ["POLICYSIG"]) == []


def test_an_hf_source_asks_nothing_and_writes_nothing_else(run, server, models, policy, tmp_path):
    server.serve("/api/agent-harnesses", b'{"harnesses": {}}', content_type="application/json")
    server.serve("/acme/r/resolve/main/m.bin", BODY)
    p = write(policy, models, item("hf://acme/r/m.bin"))
    extra = {"HF_ENDPOINT": server.base, "HF_HUB_DISABLE_TELEMETRY": ""}
    r = run("--config", p, "apply", extra=extra)
    assert r.code == 0, r
    assert [s.path for s in server.seen if "agent-harnesses" in s.path] == []
    assert list((tmp_path / "hf").iterdir()) == []


def test_a_hub_request_carries_one_user_agent(run, server, models, policy):
    server.serve("/acme/r/resolve/main/m.bin", BODY)
    p = write(policy, models, item("hf://acme/r/m.bin"))
    r = run("--config", p, "apply", extra={"HF_ENDPOINT": server.base})
    assert r.code == 0, r
    for seen in server.seen:
        assert ", " not in seen.headers["user-agent"], seen.headers["user-agent"]


# == 6. two runs at once ===================================================================


def test_a_second_apply_during_a_download_is_refused_and_the_first_finishes(
    net_env, run, server, models, policy
):
    server.serve(PATH, BODY)
    release = server.stall(PATH, after=100_000)
    p = write(policy, models, item(server.url(PATH)))
    first = start(net_env, [OCRD, "--config", str(p), "apply"])
    try:
        wait_for(lambda: size_of(models / PARTIAL) == 100_000, what="the held download")
        second = run("--config", p, "apply")
        assert second.code != 0 and "another ocrd" in second.err, second
        assert size_of(models / PARTIAL) == 100_000  # the second touched nothing
    finally:
        release.set()
    r = finish(first)
    assert r.code == 0, r
    assert placed(models) == BODY


# == 7. the daemon ==========================================================================


class Dribbler:
    """Accepts, reads the request, then dribbles a byte every 0.3 s forever: in the headers
    (`headers=True`: the answer never begins) or in a body of 100 000 bytes."""

    def __init__(self, *, headers: bool) -> None:
        self.headers = headers
        self.stop = threading.Event()

        def answer(i: int, text: str) -> Answer:
            if self.headers:
                return b"HTTP/1.1 200 OK\r\n", dribble(0.3, self.stop), False
            top = head(200, [("Content-Length", 100_000), ("ETag", '"e"')])
            return top, dribble(0.3, self.stop, b"\1"), False

        self.server = Liar(answer)

    def close(self) -> None:
        self.stop.set()
        self.server.close()


def daemon_policy(policy: Path, models: Path, url: str, pin: str, **download: Any) -> Path:
    settings = {"retries": 1, "read_timeout": "2s", **download}
    data = policy_data(
        models, required=[{"name": NAME, "sha256": pin, "source": url}], download=settings
    )
    return save_policy(policy, data)


@pytest.mark.parametrize("headers", [True, False], ids=["in-headers", "in-body"])
def test_sigterm_stops_a_slowloris_download_at_once(daemons: Daemons, models, policy, headers):
    """A byte every 0.3 s: read_timeout (1 s) never fires; SIGTERM still ends the daemon
    within STOP_WAIT (1 s) and a little."""
    slow = Dribbler(headers=headers)
    try:
        daemon_policy(policy, models, slow.server.url(PATH), sha(BODY), read_timeout="1s")
        daemon = daemons.start(policy)
        daemon.wait("download.started", timeout=20)
        wait_for(lambda: slow.server.requests, what="the request")
        time.sleep(1.5)  # past read_timeout: the dribble keeps the connection alive
        assert daemon.alive()
        code, elapsed = daemon.stop(signal.SIGTERM, timeout=10)
        assert code == 0, daemon
        assert elapsed < 2.0, f"took {elapsed:.2f}s; {daemon!r}"
        assert placed(models) is None
    finally:
        slow.close()


def test_a_reload_changing_the_pin_mid_download_verifies_the_new_pin(
    daemons: Daemons, server: ModelServer, models, policy
):
    """The server's file changes and the pin with it while the old file is half-way: the
    old download is aborted, its partial is not spliced onto the new file, and what is put
    in place is the new file."""
    new = random.Random(13).randbytes(N)
    server.serve(PATH, BODY)
    server.stall(PATH, after=300_000)
    daemon_policy(policy, models, server.url(PATH), sha(BODY), read_timeout="30s")
    daemon = daemons.start(policy)
    daemon.wait("download.started", timeout=20)
    wait_for(lambda: size_of(models / PARTIAL) == 300_000, what="the held download")
    mark = daemon.mark()
    server.change(PATH, new)
    server.stall(PATH, after=10**9)  # later GETs are not held; the first stays held
    daemon_policy(policy, models, server.url(PATH), sha(new), read_timeout="30s")
    daemon.wait("policy.reloaded", after=mark, timeout=20)
    restored = daemon.wait("model.restored", after=mark, timeout=20)
    assert restored["sha256"] == sha(new)
    assert placed(models) == new
    assert daemon.alive()


def test_a_reload_during_a_download_stuck_in_its_headers_starts_the_new_one(
    daemons: Daemons, models, policy
):
    slow = Dribbler(headers=True)
    try:
        daemon_policy(policy, models, slow.server.url(PATH), sha(BODY))
        daemon = daemons.start(policy)
        daemon.wait("download.started", timeout=20)
        wait_for(lambda: slow.server.requests, what="the request")
        mark = daemon.mark()
        daemon_policy(policy, models, slow.server.url(PATH), sha(b"another pin"))
        daemon.wait("policy.reloaded", after=mark, timeout=20)
        daemon.wait_until(
            lambda: bool(
                daemon.seen("download.started", after=mark)
                or daemon.seen("action.failed", after=mark)
            ),
            what="the new download's start, or its failure",
            timeout=20,
        )
        assert not daemon.seen("action.failed", after=mark), daemon.seen("action.failed")
    finally:
        slow.close()


def test_a_model_dir_swapped_during_a_daemon_download(
    daemons: Daemons, server: ModelServer, models, policy, tmp_path
):
    body = random.Random(14).randbytes(3 * MiB)
    server.serve(PATH, body)
    release = server.stall(PATH, after=MiB)
    daemon_policy(policy, models, server.url(PATH), sha(body), read_timeout="30s")
    daemon = daemons.start(policy)
    daemon.wait("download.started", timeout=20)
    wait_for(lambda: size_of(models / PARTIAL) == MiB, what="the held download")
    old = tmp_path / "models.old"
    os.rename(models, old)
    models.mkdir()
    mark = daemon.mark()
    daemon.wait("model_dir.suspicious", after=mark, timeout=20)
    release.set()
    time.sleep(1.0)  # time for the rest to arrive, if the download was let go on
    daemon.send(signal.SIGHUP)  # the operator confirms the new dir
    daemon.wait_until(
        lambda: bool(
            daemon.seen("model.restored", after=mark) or daemon.seen("action.failed", after=mark)
        ),
        what="the restore in the confirmed dir",
        timeout=20,
    )
    failed = [e["error"] for e in daemon.seen("action.failed", after=mark)]
    assert not any("Errno" in e for e in failed), failed
    # The held-back view stopped the download: what landed in the old dir stays as it
    # was (a partial, resumable should that dir come back), never completed there.
    left = [n for n in os.listdir(old) if n.startswith(".ocrd-tmp-")]
    assert left in ([], [PARTIAL]), left
    if left:
        assert size_of(old / PARTIAL) < len(body)
    assert not (old / NAME).exists()
