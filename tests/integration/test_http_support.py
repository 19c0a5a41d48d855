"""tests/support/http.py: the model server the download tests use behaves like a real one,
seen from real clients (urllib3, http.client) over real sockets on 127.0.0.1."""

from __future__ import annotations

import http.client
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import urllib3
from urllib3.exceptions import ProtocolError, ReadTimeoutError

from tests.support.http import LAST_MODIFIED, ModelServer, ca_bundle, etag_for

if TYPE_CHECKING:
    import trustme

BODY = bytes(range(256)) * 40  # 10 240 bytes, every offset telling
TIMEOUT = urllib3.Timeout(connect=2.0, read=2.0)


@pytest.fixture
def server() -> Iterator[ModelServer]:
    with ModelServer() as running:
        running.serve("/m.bin", BODY)
        yield running


@pytest.fixture
def pool() -> Iterator[urllib3.PoolManager]:
    """A client that neither retries nor follows redirects on its own."""
    with urllib3.PoolManager(retries=False, timeout=TIMEOUT) as manager:
        yield manager


@pytest.fixture
def ca() -> trustme.CA:
    """A CA to sign the server's certificate; the HTTPS tests skip without trustme."""
    module = pytest.importorskip("trustme")
    made: trustme.CA = module.CA()
    return made


def connection(server: ModelServer) -> http.client.HTTPConnection:
    host, port = server.base.rsplit("/", 1)[1].split(":")
    return http.client.HTTPConnection(host, int(port), timeout=2.0)


def test_get_sends_the_whole_body_with_its_validators(
    server: ModelServer, pool: urllib3.PoolManager
) -> None:
    resp = pool.request("GET", server.url("/m.bin?rev=1"), headers={"X-Probe": "yes"})
    assert resp.status == 200
    assert resp.data == BODY
    assert resp.headers["Content-Length"] == str(len(BODY))
    assert resp.headers["Content-Type"] == "application/octet-stream"
    assert resp.headers["Accept-Ranges"] == "bytes"
    assert resp.headers["ETag"] == etag_for(BODY)
    assert resp.headers["Last-Modified"] == LAST_MODIFIED
    [seen] = server.requests_for("/m.bin")
    assert (seen.method, seen.path, seen.sent) == ("GET", "/m.bin?rev=1", len(BODY))
    assert seen.headers["x-probe"] == "yes"

    head = pool.request("HEAD", server.url("/m.bin"))
    assert (head.status, head.data) == (200, b"")
    assert head.headers["Content-Length"] == str(len(BODY))
    assert [s.sent for s in server.seen] == [len(BODY), 0]


@pytest.mark.parametrize("validator", ["ETag", "Last-Modified"])
def test_range_with_a_current_if_range_sends_only_the_rest(
    server: ModelServer, pool: urllib3.PoolManager, validator: str
) -> None:
    first = pool.request("HEAD", server.url("/m.bin"))
    resp = pool.request(
        "GET",
        server.url("/m.bin"),
        headers={"Range": "bytes=4000-", "If-Range": first.headers[validator]},
    )
    assert resp.status == 206
    assert resp.headers["Content-Range"] == f"bytes 4000-{len(BODY) - 1}/{len(BODY)}"
    assert resp.headers["Content-Length"] == str(len(BODY) - 4000)
    assert resp.data == BODY[4000:]
    assert server.seen[-1].sent == len(BODY) - 4000

    bounded = pool.request("GET", server.url("/m.bin"), headers={"Range": "bytes=10-19"})
    assert (bounded.status, bounded.data) == (206, BODY[10:20])
    assert bounded.headers["Content-Range"] == f"bytes 10-19/{len(BODY)}"

    beyond = pool.request("GET", server.url("/m.bin"), headers={"Range": f"bytes={len(BODY)}-"})
    assert beyond.status == 416
    assert beyond.headers["Content-Range"] == f"bytes */{len(BODY)}"
    assert server.seen[-1].sent == 0


def test_a_stale_if_range_gets_the_whole_new_body(
    server: ModelServer, pool: urllib3.PoolManager
) -> None:
    old = pool.request("HEAD", server.url("/m.bin")).headers
    new = BODY[::-1]
    server.change("/m.bin", new)
    for validator in ("ETag", "Last-Modified"):
        resp = pool.request(
            "GET",
            server.url("/m.bin"),
            headers={"Range": "bytes=4000-", "If-Range": old[validator]},
        )
        assert (resp.status, resp.data) == (200, new)
        assert resp.headers["ETag"] == etag_for(new) != old["ETag"]
        assert resp.headers["Last-Modified"] != old["Last-Modified"]
        assert server.seen[-1].sent == len(new)

    cached = pool.request("GET", server.url("/m.bin"), headers={"If-None-Match": old["ETag"]})
    assert (cached.status, cached.data) == (200, new)
    fresh = pool.request("GET", server.url("/m.bin"), headers={"If-None-Match": etag_for(new)})
    assert (fresh.status, fresh.data) == (304, b"")


def test_drop_after_cuts_the_connection_mid_body(
    server: ModelServer, pool: urllib3.PoolManager
) -> None:
    server.drop_after("/m.bin", 1000, times=2)

    resp = pool.request("GET", server.url("/m.bin"), preload_content=False)
    assert resp.status == 200
    assert resp.headers["Content-Length"] == str(len(BODY))  # promised in full
    with pytest.raises(ProtocolError, match="IncompleteRead"):
        resp.read()
    resp.release_conn()

    conn = connection(server)
    try:
        conn.request("GET", "/m.bin", headers={"Range": "bytes=500-"})
        raw = conn.getresponse()
        assert raw.status == 206
        with pytest.raises(http.client.IncompleteRead) as cut:
            raw.read()
        assert cut.value.partial == BODY[500:1500]
    finally:
        conn.close()

    assert pool.request("GET", server.url("/m.bin")).data == BODY  # only twice
    assert [s.sent for s in server.requests_for("/m.bin")] == [1000, 1000, len(BODY)]


def test_fail_answers_the_status_then_goes_back_to_normal(
    server: ModelServer, pool: urllib3.PoolManager
) -> None:
    server.fail("/m.bin", 500, times=1, body=b"oops", headers={"Retry-After": "0"})
    broken = pool.request("GET", server.url("/m.bin"))
    assert (broken.status, broken.data) == (500, b"oops")
    assert broken.headers["Retry-After"] == "0"
    assert pool.request("GET", server.url("/m.bin")).data == BODY

    server.fail("/m.bin", 503)  # times=None: every request from now on
    assert [pool.request("GET", server.url("/m.bin")).status for _ in range(3)] == [503] * 3
    assert len(server.requests_for("/m.bin")) == 5


def test_unknown_paths_are_404_html(server: ModelServer, pool: urllib3.PoolManager) -> None:
    resp = pool.request("GET", server.url("/nope.gguf"))
    assert resp.status == 404
    assert resp.headers["Content-Type"].startswith("text/html")
    assert b"Not Found" in resp.data
    assert resp.data.startswith(b"<html>")


def test_redirect_to_a_path_or_a_url(server: ModelServer, pool: urllib3.PoolManager) -> None:
    server.redirect("/latest", "/m.bin")
    server.redirect("/elsewhere", server.url("/latest"), status=301)

    hop = pool.request("GET", server.url("/elsewhere"), redirect=False)
    assert (hop.status, hop.headers["Location"]) == (301, server.url("/latest"))

    follow = urllib3.Retry(total=3, redirect=3, raise_on_redirect=True)
    resp = pool.request("GET", server.url("/elsewhere"), retries=follow)
    assert (resp.status, resp.data) == (200, BODY)
    assert [s.path for s in server.seen] == ["/elsewhere", "/elsewhere", "/latest", "/m.bin"]


def test_a_body_without_length_ends_with_the_connection(
    server: ModelServer, pool: urllib3.PoolManager
) -> None:
    server.serve("/stream", BODY, send_length=False, etag=None, last_modified=None)
    resp = pool.request("GET", server.url("/stream"))
    assert resp.status == 200
    assert "Content-Length" not in resp.headers
    assert "ETag" not in resp.headers
    assert resp.headers["Connection"] == "close"
    assert resp.data == BODY


def test_keep_alive_serves_one_connection_in_turn(server: ModelServer) -> None:
    conn = connection(server)
    try:
        for _ in range(3):
            conn.request("GET", "/m.bin")
            assert conn.getresponse().read() == BODY
        conn.request("GET", "/missing")
        assert conn.getresponse().read().startswith(b"<html>")
    finally:
        conn.close()
    assert len(server.seen) == 4


def test_slow_still_sends_every_byte(server: ModelServer, pool: urllib3.PoolManager) -> None:
    server.slow("/m.bin", delay=0.01, chunk=2048)
    resp = pool.request("GET", server.url("/m.bin"))
    assert resp.data == BODY
    assert server.seen[-1].sent == len(BODY)


def test_stall_holds_the_body_until_released(server: ModelServer) -> None:
    released = server.stall("/m.bin", after=300)
    with urllib3.PoolManager(retries=False, timeout=urllib3.Timeout(connect=2, read=0.3)) as p:
        resp = p.request("GET", server.url("/m.bin"), preload_content=False)
        assert resp.status == 200
        with pytest.raises(ReadTimeoutError):
            resp.read()
        resp.release_conn()
    assert server.seen[-1].sent == 300

    conn = connection(server)
    try:
        conn.request("GET", "/m.bin")
        raw = conn.getresponse()
        assert raw.read(300) == BODY[:300]
        released.set()
        assert raw.read() == BODY[300:]
    finally:
        conn.close()


def test_close_releases_a_stall_and_returns(server: ModelServer) -> None:
    released = server.stall("/m.bin", after=100)
    conn = connection(server)
    try:
        conn.request("GET", "/m.bin")
        raw = conn.getresponse()
        assert raw.read(100) == BODY[:100]
        started = time.monotonic()
        server.close()
        assert time.monotonic() - started < 2.0
        assert released.is_set()
        with pytest.raises(http.client.IncompleteRead):
            raw.read()
    finally:
        conn.close()


def test_https_with_a_trusted_ca(ca: trustme.CA, tmp_path: Path) -> None:
    bundle = ca_bundle(ca, tmp_path / "ca.pem")
    with ModelServer(tls=ca) as server:
        server.serve("/m.bin", BODY)
        assert server.base.startswith("https://127.0.0.1:")

        refused = pytest.raises(urllib3.exceptions.SSLError, match="CERTIFICATE_VERIFY_FAILED")
        with urllib3.PoolManager(retries=False, timeout=TIMEOUT) as untrusting, refused:
            untrusting.request("GET", server.url("/m.bin"))

        with urllib3.PoolManager(retries=False, timeout=TIMEOUT, ca_certs=str(bundle)) as pool:
            resp = pool.request("GET", server.url("/m.bin"))
            assert (resp.status, resp.data) == (200, BODY)
            by_name = server.url("/m.bin").replace("127.0.0.1", "localhost")
            assert pool.request("GET", by_name).data == BODY

        server.drop_after("/m.bin", 1000)
        context = ssl.create_default_context(cafile=str(bundle))
        port = int(server.base.rsplit(":", 1)[1])
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=2.0, context=context)
        try:
            conn.request("GET", "/m.bin")
            with pytest.raises(http.client.IncompleteRead) as cut:
                conn.getresponse().read()
            assert cut.value.partial == BODY[:1000]
        finally:
            conn.close()
        assert [s.sent for s in server.seen] == [len(BODY), len(BODY), 1000]
