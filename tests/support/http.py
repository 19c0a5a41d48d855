"""A real HTTP(S) server on 127.0.0.1 for the tests of model downloads: no mocks.

`ModelServer` serves bodies at paths from a `ThreadingHTTPServer` in a daemon thread
(port 0), speaks HTTP/1.1 with keep-alive, and can misbehave the way real servers and
networks do: cut a body short (`drop_after`), answer errors (`fail`), redirect, dribble
(`slow`), hang mid-body (`stall`) and change what it serves (`change`). Every request it
received is in `seen`, with the body bytes it wrote for it.

    with ModelServer() as server:
        server.serve("/m.gguf", data)
        fetch(server.url("/m.gguf"))
        assert server.requests_for("/m.gguf")[-1].sent == len(data)

Ranges: `Range: bytes=N-`, `bytes=N-M` and `bytes=-S` give 206 with `Content-Range`, or
416 when nothing of the body is in range; a multi-range or malformed `Range` is ignored
(200, the whole body), and so is any `Range` whose `If-Range` is neither the current ETag
nor the current Last-Modified. `If-None-Match` and `If-Modified-Since` give 304.

A path matches its requests with or without their query string. What `fail`, `redirect`
and an unknown path answer goes to every method; `drop_after`, `slow` and `stall` shape
only the bodies of GETs (a 200 or 206).

trustme is imported only when a `ModelServer` is given a CA, so this module imports
without it.
"""

from __future__ import annotations

import contextlib
import datetime
import email.utils
import hashlib
import re
import socket
import socketserver
import ssl
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Final, Literal

if TYPE_CHECKING:
    import trustme

HOST: Final = "127.0.0.1"
LAST_MODIFIED: Final = "Mon, 01 Jan 2024 00:00:00 GMT"  # what `serve` sends by default
NOT_FOUND: Final = (
    b"<html><head><title>404 Not Found</title></head><body><h1>Not Found</h1></body></html>\n"
)
CHUNK: Final = 65536  # body bytes per write, unless `slow` says otherwise
HANDSHAKE_TIMEOUT: Final = 5.0  # a TLS client that connects and says nothing is let go
POLL: Final = 0.05  # how often serve_forever looks whether close() wants it to stop


class _Auto:
    """The default of `serve(etag=...)`: the ETag `etag_for` makes from the body."""

    def __repr__(self) -> str:
        return "AUTO"


AUTO: Final = _Auto()


def etag_for(body: bytes) -> str:
    """The ETag `serve` and `change` give *body*: its sha256, 16 hex digits, quoted."""
    return f'"{hashlib.sha256(body).hexdigest()[:16]}"'


def ca_bundle(ca: trustme.CA, path: Path) -> Path:
    """Write *ca*'s certificate as PEM to *path*, for a client's CA bundle; return *path*."""
    ca.cert_pem.write_to_path(path)
    return path


@dataclass(frozen=True)
class Seen:
    """One request as the server received it."""

    method: str
    path: str  # with the query string
    headers: dict[str, str]  # names lower-cased; repeated headers joined with ", "
    sent: int  # body bytes the server wrote for it (so far, while it is being answered)


@dataclass(frozen=True)
class _Resource:
    body: bytes
    etag: str | None
    last_modified: str | None
    content_type: str
    headers: dict[str, str]
    send_length: bool


@dataclass
class _Failure:
    status: int
    times: int | None  # None: always
    body: bytes
    headers: dict[str, str]


@dataclass
class _Drop:
    nbytes: int
    times: int


@dataclass(frozen=True)
class _Slow:
    delay: float
    chunk: int


@dataclass(frozen=True)
class _Stall:
    after: int
    event: threading.Event


@dataclass
class _Plan:
    """How to write one GET's body: where to cut it, stall it, and how fast."""

    limit: int  # write this many bytes of the body, then (if cut) close the connection
    cut: bool
    chunk: int = CHUNK
    delay: float = 0.0
    stall: _Stall | None = None


def _match(path: str, keys: Mapping[str, object]) -> str | None:
    """The key of *keys* that the request path *path* (maybe with a query) is for."""
    if path in keys:
        return path
    bare = path.split("?", 1)[0]
    return bare if bare in keys else None


def _merge(base: Mapping[str, str], extra: Mapping[str, str]) -> dict[str, str]:
    """*base* with *extra* over it, header names compared without case."""
    merged = {k: v for k, v in base.items() if k.lower() not in {e.lower() for e in extra}}
    return {**merged, **extra}


def _later(date: str) -> str:
    """An RFC 7231 date a day after *date* (or now, if *date* is no date)."""
    try:
        when = email.utils.parsedate_to_datetime(date)
    except (TypeError, ValueError):
        when = datetime.datetime.now(datetime.timezone.utc)
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    later = (when + datetime.timedelta(days=1)).astimezone(datetime.timezone.utc)
    return email.utils.format_datetime(later, usegmt=True)


_RANGE = re.compile(r"bytes=\s*(\d*)\s*-\s*(\d*)\s*", re.IGNORECASE)
Unsatisfiable = Literal["unsatisfiable"]


def _parse_range(value: str, total: int) -> tuple[int, int] | Unsatisfiable | None:
    """[start, stop) of one byte range of a body of *total* bytes; None to ignore it."""
    m = _RANGE.fullmatch(value.strip())
    if m is None:
        return None  # malformed, another unit, or several ranges: serve the whole body
    first, last = m.group(1), m.group(2)
    if not first:
        if not last:
            return None
        suffix = int(last)
        if suffix == 0 or total == 0:
            return "unsatisfiable"
        return max(0, total - suffix), total
    start = int(first)
    if last and int(last) < start:
        return None
    if start >= total:
        return "unsatisfiable"
    stop = min(int(last) + 1, total) if last else total
    return start, stop


def _cut(conn: socket.socket) -> None:
    """End the TCP connection under *conn* now, with no TLS close_notify."""
    with contextlib.suppress(OSError):
        socket.socket.shutdown(conn, socket.SHUT_RDWR)


class _Server(ThreadingHTTPServer):
    owner: ModelServer
    daemon_threads = True

    def server_bind(self) -> None:
        # HTTPServer.server_bind asks getfqdn(): a reverse DNS lookup nobody here needs.
        socketserver.TCPServer.server_bind(self)
        self.server_name = HOST
        self.server_port = self.server_address[1]

    def handle_error(self, request: object, client_address: object) -> None:
        # A client gone mid-answer, a refused TLS handshake: keep them off stderr.
        self.owner._errors.append(sys.exc_info()[1])


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    server_version = "ocrd-tests-modelserver/1"
    request: socket.socket
    _index = -1  # this request's place in `seen`

    def log_message(self, format: str, *args: object) -> None:
        pass

    # -- the connection -----------------------------------------------------------------

    def setup(self) -> None:
        owner = self.server.owner
        owner._register(self)  # from here on, close() cuts this connection
        try:
            if owner._closing.is_set():
                raise ConnectionAbortedError("the server is closing")
            if owner._tls is not None:
                self.request.settimeout(HANDSHAKE_TIMEOUT)
                self.request = owner._tls.wrap_socket(self.request, server_side=True)
                self.request.settimeout(None)
        except BaseException:
            owner._unregister(self)
            if isinstance(self.request, ssl.SSLSocket):
                self.request.close()
            raise
        super().setup()

    def finish(self) -> None:
        try:
            with contextlib.suppress(OSError):
                super().finish()
        finally:
            self.server.owner._unregister(self)
            if isinstance(self.request, ssl.SSLSocket):
                self.request.close()  # the server closes only the plain socket it accepted

    # -- requests -----------------------------------------------------------------------

    def do_GET(self) -> None:
        self._answer(head=False)

    def do_HEAD(self) -> None:
        self._answer(head=True)

    def _not_allowed(self) -> None:
        self._index = self.server.owner._record(self._seen())
        self.close_connection = True  # a request body we did not read may follow
        with contextlib.suppress(OSError):
            self._simple(405, b"", {"Allow": "GET, HEAD", "Connection": "close"}, head=False)

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_allowed

    def _seen(self) -> Seen:
        headers: dict[str, str] = {}
        for name, value in self.headers.items():
            key = name.lower()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        return Seen(method=self.command, path=self.path, headers=headers, sent=0)

    def _answer(self, *, head: bool) -> None:
        owner = self.server.owner
        self._index = owner._record(self._seen())
        try:
            self._respond(head=head)
        except OSError:  # the client went away, or close() cut the connection
            self.close_connection = True

    def _respond(self, *, head: bool) -> None:
        owner = self.server.owner
        failure, redirect, resource = owner._route(self.path)
        if failure is not None:
            headers = {"Content-Type": "text/plain; charset=utf-8"} if failure.body else {}
            self._simple(failure.status, failure.body, _merge(headers, failure.headers), head)
        elif redirect is not None:
            to, status = redirect
            location = owner.url(to) if to.startswith("/") else to
            self._simple(status, b"", {"Location": location}, head)
        elif resource is None:
            self._simple(404, NOT_FOUND, {"Content-Type": "text/html; charset=utf-8"}, head)
        else:
            self._resource(resource, head)

    def _simple(self, status: int, body: bytes, headers: Mapping[str, str], head: bool) -> None:
        self._start(status, _merge({"Content-Length": str(len(body))}, headers))
        if not head:
            self._write(body)

    def _start(self, status: int, headers: Mapping[str, str]) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()

    def _validators(self, res: _Resource) -> dict[str, str]:
        headers = {}
        if res.etag is not None:
            headers["ETag"] = res.etag
        if res.last_modified is not None:
            headers["Last-Modified"] = res.last_modified
        return headers

    def _not_modified(self, res: _Resource) -> bool:
        tags = self.headers.get("If-None-Match")
        if tags is not None:
            if res.etag is None:
                return False
            wanted = {t.strip().removeprefix("W/") for t in tags.split(",")}
            return "*" in wanted or res.etag.removeprefix("W/") in wanted
        since = self.headers.get("If-Modified-Since")
        if since is None or res.last_modified is None:
            return False
        try:
            return email.utils.parsedate_to_datetime(
                res.last_modified
            ) <= email.utils.parsedate_to_datetime(since)
        except (TypeError, ValueError):
            return False

    def _range_applies(self, res: _Resource) -> bool:
        """A Range counts unless an If-Range names a version this is not."""
        condition = self.headers.get("If-Range")
        if condition is None:
            return True
        condition = condition.strip()
        strong = res.etag is not None and not res.etag.startswith("W/")
        return (strong and condition == res.etag) or condition == res.last_modified

    def _resource(self, res: _Resource, head: bool) -> None:
        total = len(res.body)
        common = {"Accept-Ranges": "bytes", **self._validators(res)}
        if self._not_modified(res):
            self._start(304, _merge(common, res.headers))
            return
        start, stop, status = 0, total, 200
        wanted = self.headers.get("Range")
        if wanted is not None and self._range_applies(res):
            span = _parse_range(wanted, total)
            if isinstance(span, str):  # unsatisfiable
                self._simple(416, b"", {**common, "Content-Range": f"bytes */{total}"}, head)
                return
            if span is not None:
                (start, stop), status = span, 206
        headers = {"Content-Type": res.content_type, **common}
        if status == 206:
            headers["Content-Range"] = f"bytes {start}-{stop - 1}/{total}"
        if res.send_length:
            headers["Content-Length"] = str(stop - start)
        else:
            headers["Connection"] = "close"  # the end of the body is the end of the connection
        self._start(status, _merge(headers, res.headers))
        if not res.send_length:
            self.close_connection = True
        if not head:
            self._body(memoryview(res.body)[start:stop])

    def _body(self, body: memoryview) -> None:
        owner = self.server.owner
        plan = owner._plan(self.path, len(body))
        stall = plan.stall
        pos = 0
        while True:
            if stall is not None and pos == stall.after:
                stall.event.wait()
                stall = None
                if owner._closing.is_set():
                    break
            if pos >= plan.limit:
                break
            if pos and plan.delay and owner._closing.wait(plan.delay):
                break
            stop = min(pos + plan.chunk, plan.limit)
            if stall is not None and pos < stall.after < stop:
                stop = stall.after
            self._write(body[pos:stop])
            pos = stop
        if plan.cut or pos < len(body):
            self.close_connection = True
            _cut(self.request)
            self.request.close()  # the fd itself goes when finish() closes rfile and wfile

    def _write(self, data: bytes | memoryview) -> None:
        """Send *data*, counted in `sent` before it can reach the client."""
        owner = self.server.owner
        owner._count(self._index, len(data))
        done = 0
        view = memoryview(data)
        try:
            while done < len(view):
                done += self.request.send(view[done:])
        except OSError:
            owner._count(self._index, done - len(view))
            raise


class ModelServer:
    """A real HTTP (or, given a trustme CA, HTTPS) server on 127.0.0.1 that serves bodies.

    *tls*: serve HTTPS with a certificate for 127.0.0.1 and localhost issued by that CA.
    """

    def __init__(self, *, tls: trustme.CA | None = None) -> None:
        self.seen: list[Seen] = []
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._errors: list[BaseException | None] = []  # what handle_error kept off stderr
        self._live: set[_Handler] = set()
        self._resources: dict[str, _Resource] = {}
        self._failures: dict[str, _Failure] = {}
        self._redirects: dict[str, tuple[str, int]] = {}
        self._drops: dict[str, _Drop] = {}
        self._slows: dict[str, _Slow] = {}
        self._stalls: dict[str, _Stall] = {}
        self._all_stalls: list[threading.Event] = []
        self._generation = 0  # how often change() was given the bytes it already served
        self._tls: ssl.SSLContext | None = None
        if tls is not None:  # trustme's own objects do the work: no import of it needed
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            tls.issue_cert(HOST, "localhost").configure_cert(context)
            self._tls = context
        self._server = _Server((HOST, 0), _Handler)
        self._server.owner = self
        port = self._server.server_address[1]
        self.base = f"{'https' if tls is not None else 'http'}://{HOST}:{port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": POLL},
            name=f"ModelServer:{port}",
            daemon=True,
        )
        self._thread.start()

    def __repr__(self) -> str:
        return f"ModelServer({self.base})"

    def url(self, path: str) -> str:
        """The full URL of *path* on this server."""
        return self.base + (path if path.startswith("/") else f"/{path}")

    # -- what to serve ------------------------------------------------------------------

    def serve(
        self,
        path: str,
        body: bytes,
        *,
        etag: str | _Auto | None = AUTO,
        last_modified: str | None = LAST_MODIFIED,
        content_type: str = "application/octet-stream",
        headers: dict[str, str] | None = None,
        send_length: bool = True,
    ) -> None:
        """Serve *body* at *path*. *etag* defaults to `etag_for(body)`; None sends none,
        as does None for *last_modified*. *headers* are sent too, over any default.
        *send_length*=False: no Content-Length, the body ends when the connection does."""
        resource = _Resource(
            body=bytes(body),
            etag=etag_for(body) if isinstance(etag, _Auto) else etag,
            last_modified=last_modified,
            content_type=content_type,
            headers=dict(headers or {}),
            send_length=send_length,
        )
        with self._lock:
            self._resources[path] = resource

    def change(self, path: str, body: bytes) -> None:
        """New content at *path*: a new ETag (unless it had none) and a Last-Modified a day
        later (unless it had none); everything else as `serve` set it."""
        with self._lock:
            old = self._resources.get(path)
            if old is None:
                raise KeyError(f"{path} is not served; serve() it first")
            etag = None if old.etag is None else etag_for(body)
            if etag is not None and etag == old.etag:  # the same bytes again: still new
                self._generation += 1
                etag = f'{etag[:-1]}-{self._generation}"'
            self._resources[path] = replace(
                old,
                body=bytes(body),
                etag=etag,
                last_modified=None if old.last_modified is None else _later(old.last_modified),
            )

    # -- how to misbehave ---------------------------------------------------------------

    def drop_after(self, path: str, nbytes: int, *, times: int = 1) -> None:
        """The next *times* GETs of *path* send their headers as normal, then only *nbytes*
        of the body, then the TCP connection is cut (shutdown and close, no TLS goodbye)."""
        with self._lock:
            self._drops[path] = _Drop(nbytes=nbytes, times=times)

    def fail(
        self,
        path: str,
        status: int,
        *,
        times: int | None = None,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
    ) -> None:
        """Answer *status* (with *body* and *headers*) to the next *times* requests of
        *path*, whatever their method (None: to all of them), then go back to normal."""
        with self._lock:
            if times is not None and times <= 0:
                self._failures.pop(path, None)
                return
            self._failures[path] = _Failure(status, times, bytes(body), dict(headers or {}))

    def redirect(self, path: str, to: str, *, status: int = 302) -> None:
        """Redirect *path* to *to*: a path on this server or a full URL."""
        with self._lock:
            self._redirects[path] = (to, status)

    def slow(self, path: str, *, delay: float, chunk: int = CHUNK) -> None:
        """Write GET bodies of *path* *chunk* bytes at a time, *delay* seconds apart."""
        if chunk <= 0:
            raise ValueError("chunk must be positive")
        with self._lock:
            self._slows[path] = _Slow(delay=delay, chunk=chunk)

    def stall(self, path: str, *, after: int) -> threading.Event:
        """GETs of *path* send *after* body bytes, then block until the returned event is
        set (then send the rest). Every GET stalls until then; close() sets the event."""
        event = threading.Event()
        if self._closing.is_set():
            event.set()
        with self._lock:
            self._stalls[path] = _Stall(after=after, event=event)
            self._all_stalls.append(event)
        return event

    # -- what happened ------------------------------------------------------------------

    def requests_for(self, path: str) -> list[Seen]:
        """The requests for *path* (with or without a query string), in order."""
        with self._lock:
            return [s for s in self.seen if s.path == path or s.path.split("?", 1)[0] == path]

    # -- the end ------------------------------------------------------------------------

    def close(self) -> None:
        """Stop serving: release every stall, cut open connections, join every thread."""
        with self._lock:
            if self._closing.is_set():
                return
            self._closing.set()
            stalls = list(self._all_stalls)
        for event in stalls:
            event.set()
        self._server.shutdown()
        with self._lock:
            live = list(self._live)
        for handler in live:
            _cut(handler.request)
        self._server.server_close()  # joins the handler threads
        self._thread.join()

    def __enter__(self) -> ModelServer:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- for the handler ----------------------------------------------------------------

    def _register(self, handler: _Handler) -> None:
        with self._lock:
            self._live.add(handler)

    def _unregister(self, handler: _Handler) -> None:
        with self._lock:
            self._live.discard(handler)

    def _record(self, seen: Seen) -> int:
        with self._lock:
            self.seen.append(seen)
            return len(self.seen) - 1

    def _count(self, index: int, nbytes: int) -> None:
        with self._lock:
            seen = self.seen[index]
            self.seen[index] = replace(seen, sent=seen.sent + nbytes)

    def _route(self, path: str) -> tuple[_Failure | None, tuple[str, int] | None, _Resource | None]:
        """What answers a request for *path*: a failure, a redirect, or the resource."""
        with self._lock:
            key = _match(path, self._failures)
            if key is not None:
                failure = self._failures[key]
                if failure.times is not None:
                    failure.times -= 1
                    if failure.times <= 0:
                        del self._failures[key]
                return replace(failure), None, None
            key = _match(path, self._redirects)
            if key is not None:
                return None, self._redirects[key], None
            key = _match(path, self._resources)
            return None, None, None if key is None else self._resources[key]

    def _plan(self, path: str, length: int) -> _Plan:
        """How to write the body (of *length* bytes) of one GET of *path*; uses up a drop."""
        with self._lock:
            plan = _Plan(limit=length, cut=False)
            key = _match(path, self._drops)
            if key is not None:
                drop = self._drops[key]
                drop.times -= 1
                if drop.times <= 0:
                    del self._drops[key]
                plan.limit, plan.cut = min(drop.nbytes, length), True
            key = _match(path, self._slows)
            if key is not None:
                plan.chunk, plan.delay = self._slows[key].chunk, self._slows[key].delay
            key = _match(path, self._stalls)
            if key is not None and not self._stalls[key].event.is_set():
                plan.stall = self._stalls[key]
            return plan
