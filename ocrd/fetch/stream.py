"""Stream one URL's body into a file descriptor, resuming with Range after a drop.

The caller owns the file (a hidden `.ocrd-tmp-*` in the model dir) and what
lands in it: `Sink.landed` is told after every write how far the file is
written (it hashes behind the writer and reports progress), `Sink.restart`
when the bytes so far must be thrown away (the server's file changed), and
`Sink.room` is asked before the first byte of a body whether the filesystem
has room for the rest of it.

A dropped connection, a read timeout or a 5xx answer is retried with backoff
(`download.retries`); after a drop the request asks only for the rest
(`Range: bytes=N-`), conditional on the validators of what landed so far
(`If-Range:` with a strong ETag, else Last-Modified), so a file changed on the
server meanwhile is fetched whole, never spliced. Without validators ocrd does
not splice either: it starts over. An HTML page (an error page or a login
portal answering 200), a compressed body, a body shorter or longer than the
server said, a 404: each ends the download with a FetchError that says so.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.client import HTTPException
from typing import Protocol

import urllib3.exceptions as u3

from ocrd.core.sources import redact
from ocrd.fetch.transport import Answer, Cancelled, FetchError, Transport, http_error
from ocrd.fetch.transport import length as as_length

CHUNK = 1024 * 1024  # at most one read from the socket, one write to the file
ROOM_EVERY = 16 * CHUNK  # a body of no said length: free space looked at this often
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)", re.ASCII)


class Sink(Protocol):
    fd: int

    def landed(self, end: int) -> None: ...  # bytes [0, end) of the file are written
    def restart(self) -> None: ...  # the file is empty again: hash from the start
    def room(self, need: int) -> None: ...  # raise if *need* more bytes cannot fit


@dataclass(frozen=True)
class Validators:
    """What identifies the version of a body: a resume is valid only against the same."""

    etag: str | None = None
    last_modified: str | None = None

    @classmethod
    def of(cls, headers: Mapping[str, str]) -> Validators:
        return cls(headers.get("ETag") or None, headers.get("Last-Modified") or None)

    def if_range(self) -> str | None:
        """The If-Range value: a strong ETag, else the date; None: a resume is unsafe."""
        if self.etag is not None and not self.etag.startswith("W/"):
            return self.etag
        return self.last_modified

    def same(self, other: Validators) -> bool:
        if self.etag is not None and other.etag is not None:
            return self.etag == other.etag
        if self.last_modified is not None and other.last_modified is not None:
            return self.last_modified == other.last_modified
        return False


@dataclass(frozen=True)
class Partial:
    """What a partly downloaded file holds: from which URL, which version, how much of it."""

    url: str
    validators: Validators
    total: int | None


@dataclass
class Transfer:
    """What one `fetch_body` did."""

    asked: str  # the URL requested (what a resume asks again)
    url: str  # where the body came from, after redirects
    total: int
    validators: Validators
    length: int | None = None  # the body's whole length, as the server said it
    resumed: list[int] = field(default_factory=list)  # the offsets it resumed from
    restarted: int = 0  # times it had to start over
    retries: int = 0


def _sniff_html(chunk: bytes) -> bool:
    head = chunk[:512].lstrip().lower()
    return head.startswith((b"<!doctype html", b"<html", b"<head", b"<body"))


def _title(chunk: bytes) -> str:
    match = re.search(rb"<title[^>]*>(.*?)</title>", chunk[:4096], re.IGNORECASE | re.DOTALL)
    if match is None:
        return ""
    text = match.group(1).decode("utf-8", "replace").strip()
    return f" titled {' '.join(text.split())[:80]!r}"


def _not_the_model(answer: Answer, what: str, first: bytes) -> FetchError:
    return FetchError(
        f"{redact(answer.url)} answered with an HTML page{_title(first)} (HTTP {answer.status}, "
        f"{answer.headers.get('Content-Type', 'no Content-Type')}), not {what}; nothing "
        "was put in place",
        status=answer.status,
    )


def _span(answer: Answer) -> tuple[int, int | None]:
    """(first byte, total length or None) of a 200 or 206 answer's body."""
    if answer.status == 206:
        match = _CONTENT_RANGE.fullmatch(answer.headers.get("Content-Range", "").strip())
        if match is None:
            raise FetchError(
                f"{redact(answer.url)} sent a partial answer without a usable Content-Range"
            )
        total = None if match.group(3) == "*" else int(match.group(3))
        return int(match.group(1)), total
    length = answer.headers.get("Content-Length")
    return 0, as_length(length)


class _Dropped(Exception):
    """The body ended before the server's length: resume from where it stopped."""

    def __init__(self, at: int, why: str) -> None:
        super().__init__(why)
        self.at = at


def fetch_body(
    transport: Transport,
    url: str,
    sink: Sink,
    *,
    headers: Mapping[str, str] | None = None,
    what: str = "the model",
    partial: Partial | None = None,
    offset: int = 0,
    expected_size: int | None = None,
    started: Callable[[Partial], None] | None = None,
    resuming: Callable[[int, str], None] | None = None,
) -> Transfer:
    """Download *url* into `sink.fd`; the file ends holding exactly the body.

    *partial* and *offset*: what the file already holds (a download resumed after a
    restart); used only when its URL is this one and it has validators. *started*
    is called with the body's URL, validators and length before its first byte is
    written (the caller records them, so that a later start can resume);
    *resuming* with the offset and the reason before it asks for the rest after a drop.
    """
    base = dict(headers or {})
    base["Accept-Encoding"] = "identity"
    resumable = partial is not None and partial.url == url and partial.validators.if_range()
    pos = offset if resumable else 0
    transfer = Transfer(url, url, 0, partial.validators if pos and partial else Validators())
    if pos and partial is not None:
        transfer.length = partial.total
    if offset and not pos:
        _truncate(sink)
    failures = 0
    while True:
        request = dict(base)
        if pos and transfer.validators.if_range() is not None:
            request["Range"] = f"bytes={pos}-"
            request["If-Range"] = transfer.validators.if_range() or ""
            if not transfer.resumed or transfer.resumed[-1] != pos:
                transfer.resumed.append(pos)
        elif pos:  # what landed cannot be matched to a version of the body: start over
            pos = _start_over(sink, transfer)
        try:
            answer = transport.open("GET", url, request)
            try:
                whole = _receive(
                    transport, answer, sink, transfer, pos, what, expected_size, started
                )
            finally:
                transport.done()
                answer.close()
        except _Dropped as exc:
            pos, error = exc.at, FetchError(f"{exc} after {exc.at} bytes", retry=True)
            if resuming is not None and pos and transfer.validators.if_range() is not None:
                resuming(pos, str(exc))
        except FetchError as exc:
            if not exc.retry:
                raise
            error = exc
        else:
            if whole:
                return transfer
            pos = _start_over(sink, transfer)  # the server would not send the rest
            continue
        failures += 1
        transfer.retries = failures
        if failures > transport.settings.retries:
            # Still worth trying later (and what landed is kept for that): retry=True.
            raise FetchError(
                f"{error}; gave up after {failures - 1} retries (download.retries)", retry=True
            )
        transport.backoff(failures, error.wait)


def _truncate(sink: Sink) -> None:
    os.ftruncate(sink.fd, 0)
    sink.restart()


def _start_over(sink: Sink, transfer: Transfer) -> int:
    _truncate(sink)
    transfer.restarted += 1
    transfer.validators = Validators()
    transfer.length = None
    return 0


def _receive(
    transport: Transport,
    answer: Answer,
    sink: Sink,
    transfer: Transfer,
    pos: int,
    what: str,
    expected_size: int | None,
    started: Callable[[Partial], None] | None,
) -> bool:
    """Read one answer into the file from *pos*: True when the body is whole, False
    when the server will not send the rest (start over); _Dropped to resume."""
    status = answer.status
    if status == 416 and pos:
        # Nothing left after pos: whole if the server's length is what landed, of the
        # version that landed (a proxy may answer 416 whatever If-Range says).
        match = re.fullmatch(
            r"bytes\s+\*/(\d+)", answer.headers.get("Content-Range", "").strip(), re.ASCII
        )
        said = Validators.of(answer.headers)
        same = said == Validators() or transfer.validators.same(said)
        if match is not None and int(match.group(1)) == pos == transfer.length and same:
            transfer.total = pos
            return True
        return False
    if status not in (200, 206):
        raise http_error(status, answer.url, answer.headers, what=answer.url)
    encoding = answer.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise FetchError(
            f"{redact(answer.url)} sent the body {encoding}-encoded, though asked for it as it is"
        )
    first, end = _span(answer)
    validators = Validators.of(answer.headers)
    if status == 206 and not pos and first != 0:
        raise FetchError(
            f"{redact(answer.url)} sent a part from byte {first} (HTTP 206) when asked for "
            "the whole file",
            retry=True,
        )
    if pos and status == 200:  # the whole body again (another version, or no ranges)
        pos = _start_over(sink, transfer)
    elif pos and (
        first != pos
        or not transfer.validators.same(validators)
        or (transfer.length is not None and end != transfer.length)
    ):
        return False  # not the rest of the version that landed: ask for all of it
    if "text/html" in answer.headers.get("Content-Type", "").lower():
        raise _not_the_model(answer, what, answer.raw.read(4096))
    if expected_size is not None and end is not None and end != expected_size:
        raise FetchError(
            f"{redact(answer.url)} is {end} bytes, but the source's metadata says {expected_size}"
        )
    if end is not None:
        sink.room(end - pos)
    transfer.url, transfer.validators, transfer.length = answer.url, validators, end
    if started is not None:
        started(Partial(transfer.asked, validators, end))
    here = pos
    while True:
        try:
            # What has arrived, up to a block: progress and a resume never wait for a
            # whole block to come in over a slow link.
            chunk = answer.raw.read1(CHUNK, decode_content=False)
        except (HTTPException, OSError, u3.HTTPError) as exc:  # a drop, a read timeout
            if transport.cancel.is_set():
                raise Cancelled("stopped") from None
            transfer.total = here
            why = f"the connection to {redact(answer.url)} dropped ({type(exc).__name__})"
            raise _Dropped(here, why) from exc
        if not chunk:
            break
        if transport.cancel.is_set():
            raise Cancelled("stopped")
        if here == 0 and _sniff_html(chunk):
            raise _not_the_model(answer, what, chunk)
        if end is not None and here + len(chunk) > end:
            raise FetchError(f"{redact(answer.url)} sent more than the {end} bytes it announced")
        if end is None and expected_size is not None and here + len(chunk) > expected_size:
            raise FetchError(
                f"{redact(answer.url)} sent more than the {expected_size} bytes the source's "
                "metadata says"
            )
        _write_all(sink.fd, chunk, here)
        here += len(chunk)
        if end is None and here // ROOM_EVERY != (here - len(chunk)) // ROOM_EVERY:
            sink.room(0)  # no length said: the free-space margin is kept as it comes
        sink.landed(here)  # may raise (Interrupted: the daemon is stopping)
    if transport.cancel.is_set():
        raise Cancelled("stopped")
    transfer.total = here
    if end is not None and here < end:
        raise _Dropped(here, f"{redact(answer.url)} ended the body at {here} of {end} bytes")
    return True


def _write_all(fd: int, chunk: bytes, at: int) -> None:
    view = memoryview(chunk)
    while view:
        n = os.pwrite(fd, view, at)
        view, at = view[n:], at + n
