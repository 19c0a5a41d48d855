"""Fetch a required model from its sources into a hidden file, verified: a `Staged`.

Each source is tried in the policy's order; the first whose bytes are the
model wins. A local source is copied (ocrd.act.landing); a remote one is
downloaded (ocrd.fetch) into `.ocrd-tmp-dl-<model key>`, one name per model,
hashed while it streams. What verifies the bytes: the policy's pin, else the
Hub's LFS sha256 of an `hf://` file; a model with neither is taken as the
server sent it, whole (its length checked). Nothing here touches the model's
own name: `ocrd.act.restore` puts a staged file in place.

A download stopped halfway (SIGTERM, a drop that outlasted the retries, a
crash) leaves its file with a record of where the bytes came from (the
extended attribute `user.ocrd.download`: URL, ETag/Last-Modified, length); the
next try resumes from the file's end when the server still has that version.
A file that cannot be resumed (no record, another version, wrong bytes, a
full disk) is removed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ocrd.act.fs import ActionError, Log, hidden_name
from ocrd.act.landing import Chaser, copy_into
from ocrd.core.errors import Interrupted
from ocrd.core.model import Action
from ocrd.core.names import DOWNLOAD_PREFIX, TMP_PREFIX
from ocrd.core.sources import Source, SourceKind, parse_source, redact, shown
from ocrd.fetch.transport import Cancelled, FetchError, Settings
from ocrd.observe.hashing import Progress
from ocrd.openfile import NotRegularError, give_to_owner_of, mount_id, open_regular

if TYPE_CHECKING:
    from ocrd.fetch.transport import Transport

RESTORE_MARGIN = 64 * 1024 * 1024  # free space kept beyond the restored file
RECORD = "user.ocrd.download"  # the extended attribute of a partial download
MODEL_MODE = 0o644  # a downloaded model: readable by the workers that load it


@dataclass(frozen=True)
class Staged:
    """A verified copy of a required model under a hidden name in the model dir."""

    tmp: str
    ident: tuple[int, int]  # (device, inode): what was verified
    size: int
    mtime_ns: int
    sha256: str
    source: str  # the source it came from, as the policy writes it
    resumed: bool = False  # a remote download that continued an earlier one


Fetch = Callable[[Action, int], Staged]  # stages one restore's model, relative to a dir fd


class Pending(Exception):
    """The model is being downloaded beside the loop: a later cycle puts it in place."""


@dataclass
class Progressing:
    """A download in progress, as status shows it."""

    model: str
    source: str
    done: int = 0
    total: int | None = None
    started: float = 0.0


def partial_name(model: str) -> str:
    """The hidden name of *model*'s download (one per model: a resume finds it)."""
    return DOWNLOAD_PREFIX + hashlib.sha256(model.encode()).hexdigest()[:16]


def free_space(dir_fd: int) -> int:
    vfs = os.fstatvfs(dir_fd)
    return vfs.f_bavail * vfs.f_frsize


def _room(dir_fd: int, need: int, what: str) -> None:
    free = free_space(dir_fd)
    if free < need + RESTORE_MARGIN:
        raise ActionError(
            f"not enough free space in the model dir for {what}: {free} bytes free, "
            f"{need} + {RESTORE_MARGIN} (margin) needed"
        )


def _sources(action: Action) -> list[Source]:
    texts = action.sources or ((action.source,) if action.source else ())
    return [parse_source(t) for t in texts]


class _Sink:
    """Where a download's bytes land: hashed behind the writer, progress reported."""

    def __init__(
        self, fd: int, dir_fd: int, progressing: Progressing, progress: Progress | None
    ) -> None:
        self.fd, self.dir_fd, self.progressing, self.progress = fd, dir_fd, progressing, progress
        self.chaser = Chaser(fd)

    def landed(self, end: int) -> None:
        self.chaser.landed(end)
        self.progressing.done = end
        if self.progress is not None:  # may raise: the daemon is stopping
            what = f"downloading {self.progressing.model}"
            self.progress(what, end, self.progressing.total or 0)

    def restart(self) -> None:
        self.chaser.stop()
        self.chaser = Chaser(self.fd)
        self.progressing.done = 0

    def room(self, need: int) -> None:
        _room(self.dir_fd, need, self.progressing.model)


def _read_record(fd: int) -> dict[str, object] | None:
    try:
        raw = os.getxattr(fd, RECORD)
    except OSError:
        return None
    try:
        record = json.loads(raw)
    except (ValueError, RecursionError):  # not JSON, or nested to make the parser give up
        return None
    return record if isinstance(record, dict) else None


def _write_record(fd: int, record: dict[str, object]) -> None:
    """Best effort: without user xattrs (an old tmpfs) a restart starts over."""
    with contextlib.suppress(OSError):
        os.setxattr(fd, RECORD, json.dumps(record, sort_keys=True).encode())


def _open_partial(dir_fd: int, name: str) -> int:
    """Open (or create) a model's download file: a regular file of ocrd's, locked."""
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
    try:
        fd = os.open(name, flags, 0o600, dir_fd=dir_fd)
    except OSError as exc:
        raise ActionError(f"cannot open the download file {name}: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        owners = {os.geteuid(), os.fstat(dir_fd).st_uid}
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_uid not in owners:
            raise ActionError(
                f"{name} is not a download of ocrd's (not a plain file of its own); left as it is"
            )
        if mount_id(fd) not in (None, mount_id(dir_fd)):  # a file bind-mounted over it
            raise ActionError(f"{name} is a mount point, not a download of ocrd's; left as it is")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ActionError(f"{name} is being downloaded by another process") from None
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _drop(dir_fd: int, name: str, fd: int) -> None:
    """Remove the download file *name* if it is still the one open as *fd*."""
    st = os.fstat(fd)
    with contextlib.suppress(OSError):
        now = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
            os.unlink(name, dir_fd=dir_fd)


class Fetcher:
    """Stages required models from their sources: `fetcher(action, dir_fd) -> Staged`.

    *progress* is called as bytes land (it may raise Interrupted to stop);
    *cancel* stops a download from another thread (the daemon's SIGTERM);
    *watch* is told about the download in progress (status).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        log: Log,
        progress: Progress | None = None,
        cancel: threading.Event | None = None,
        watch: Callable[[Progressing | None], None] | None = None,
    ) -> None:
        self.settings, self.log, self.progress = settings, log, progress
        self.cancel = cancel or threading.Event()
        self.watch = watch
        self._transport: Transport | None = None

    def __call__(self, action: Action, dir_fd: int) -> Staged:
        failures: list[tuple[str, str]] = []
        sources = _sources(action)
        if not sources:
            raise ActionError("no source to restore it from")
        for source in sources:
            try:
                if source.kind is SourceKind.LOCAL:
                    return self._copy(action, source, dir_fd)
                return self._download(action, source, dir_fd)
            except (ActionError, FetchError) as exc:
                failures.append((shown(source.text), str(exc)))
                more = {"next": "the next source"} if source is not sources[-1] else {}
                fields = {"model": action.name, "source": shown(source.text), "error": str(exc)}
                if source.remote:
                    self.log.warning("download.failed", **fields, **more)
                elif len(sources) > 1:
                    self.log.warning("restore.source_failed", **fields, **more)
        if len(failures) == 1:
            raise ActionError(failures[0][1])
        each = "; ".join(f"{text}: {error}" for text, error in failures)
        raise ActionError(f"no source worked ({each}); nothing replaced")

    # -- a local file ---------------------------------------------------------------

    def _copy(self, action: Action, source: Source, dir_fd: int) -> Staged:
        assert source.path is not None
        path = str(source.path)
        try:
            # Non-blocking open, then fstat: a FIFO or a device as the source is refused,
            # never read (a FIFO nobody writes to would hang the cycle with the lock held).
            src_fd = open_regular(path, follow=True)
        except NotRegularError as exc:
            raise ActionError(f"source {exc}; point `source` at the model file itself") from None
        except OSError as exc:
            raise ActionError(f"source {path}: {exc.strerror or exc}") from None
        tmp = hidden_name(TMP_PREFIX)
        try:
            st = os.fstat(src_fd)
            _room(dir_fd, st.st_size, action.name)
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(src_fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            # Read and write: the hash is taken of what landed, read back behind the copy.
            flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            dst_fd = os.open(tmp, flags, 0o600, dir_fd=dir_fd)
            try:
                with Chaser(dst_fd) as chaser:

                    def step(done: int) -> None:
                        if self.progress is not None:
                            # may raise: the daemon is stopping
                            self.progress(f"copying {action.name}", done, st.st_size)

                    total = copy_into(src_fd, dst_fd, chaser, step)
                    os.fchmod(dst_fd, stat.S_IMODE(st.st_mode) & 0o755 | 0o400)
                    give_to_owner_of(dst_fd, os.fstat(dir_fd))
                    os.fsync(dst_fd)
                    sha, hashed = chaser.finish()
                if hashed != total:
                    raise ActionError(f"the copy of {path} was {hashed} bytes, not {total}")
                landed = os.fstat(dst_fd)
            except BaseException:
                _drop(dir_fd, tmp, dst_fd)
                raise
            finally:
                os.close(dst_fd)
        finally:
            os.close(src_fd)
        staged = Staged(
            tmp, (landed.st_dev, landed.st_ino), total, landed.st_mtime_ns, sha, source.text
        )
        if action.sha256 is not None and sha != action.sha256:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dir_fd)
            raise ActionError(
                f"source {path} has sha256 {sha[:12]}…, not the pinned "
                f"{action.sha256[:12]}…; nothing replaced"
            )
        return staged

    # -- the network ----------------------------------------------------------------

    def _download(self, action: Action, source: Source, dir_fd: int) -> Staged:
        from ocrd.fetch.transport import Transport

        transport = Transport(self.settings, self.cancel)
        self._transport = transport
        try:
            return self._download_with(transport, action, source, dir_fd)
        finally:
            transport.close()
            self._transport = None

    def _download_with(
        self, transport: Transport, action: Action, source: Source, dir_fd: int
    ) -> Staged:
        from ocrd.fetch import hub
        from ocrd.fetch.stream import Partial, Validators, fetch_body

        expected = action.sha256
        size = None
        headers: dict[str, str] = {}
        if source.kind is SourceKind.HUB:
            found = hub.resolve(source, transport)
            url, headers, size = found.url, found.headers, found.size
            if found.sha256 is not None:
                if expected is not None and expected != found.sha256:
                    raise ActionError(
                        f"the policy pins sha256 {expected[:12]}…, but the Hub says "
                        f"{found.sha256[:12]}… for {shown(source.text)} at commit "
                        f"{(found.commit or '?')[:12]}; fix the pin or the revision"
                    )
                expected = found.sha256
        else:
            assert source.url is not None
            url = source.url
        name = partial_name(action.name)
        fd = _open_partial(dir_fd, name)
        keep = False
        progressing = Progressing(action.name, shown(source.text), 0, size, time.time())
        try:
            sink = _Sink(fd, dir_fd, progressing, self.progress)
        except BaseException:
            os.close(fd)
            raise
        try:
            offset = os.fstat(fd).st_size
            record = _read_record(fd) if offset else None
            partial = None
            if record is not None and record.get("source") == source.text:
                partial = Partial(
                    url if record.get("url") == url else "",
                    Validators(_text(record.get("etag")), _text(record.get("last_modified"))),
                    _int(record.get("total")),
                )
                progressing.done = offset
                sink.chaser.landed(offset)  # hash what is there before the rest comes
            self._tell(progressing)

            def started(found: Partial) -> None:
                progressing.total = found.total
                _write_record(
                    fd,
                    {
                        "model": action.name,
                        "source": source.text,
                        "url": found.url,
                        "etag": found.validators.etag,
                        "last_modified": found.validators.last_modified,
                        "total": found.total,
                    },
                )

            begun = time.monotonic()
            fields: dict[str, object] = {"model": action.name, "source": shown(source.text)}
            fields["url"] = redact(url)
            if size is not None:
                fields["bytes"] = size
            if partial is not None:
                self.log.info(
                    "download.resumed", **fields, offset=offset, reason="what an earlier run left"
                )
            else:
                self.log.info("download.started", **fields)
            try:
                transfer = fetch_body(
                    transport,
                    url,
                    sink,
                    headers=headers,
                    what=f"the model {action.name}",
                    partial=partial,
                    offset=offset,
                    expected_size=size,
                    started=started,
                    resuming=lambda at, why: self.log.info(
                        "download.resumed",
                        model=action.name,
                        source=shown(source.text),
                        offset=at,
                        reason=why,
                    ),
                )
            except (Cancelled, Interrupted):
                keep = True  # what landed is resumed next time
                raise
            except FetchError as exc:
                keep = exc.retry and _read_record(fd) is not None and os.fstat(fd).st_size > 0
                raise
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise ActionError(
                        f"the model dir's filesystem filled up during the download "
                        f"({exc.strerror}); the partial file was removed"
                    ) from None
                raise ActionError(f"writing the download failed: {exc.strerror or exc}") from None
            os.fchmod(fd, MODEL_MODE)
            give_to_owner_of(fd, os.fstat(dir_fd))
            os.fsync(fd)
            sha, hashed = sink.chaser.finish()
            if hashed != transfer.total:
                raise ActionError(f"hashed {hashed} bytes of a {transfer.total}-byte download")
            if expected is not None and sha != expected:
                what = "pinned" if action.sha256 else "Hub's LFS"
                raise ActionError(
                    f"the downloaded bytes have sha256 {sha[:12]}…, not the {what} "
                    f"{expected[:12]}…; nothing put in place"
                )
            landed_st = os.fstat(fd)
            keep = True
            self.log.info(
                "download.finished",
                model=action.name,
                source=shown(source.text),
                bytes=transfer.total,
                sha256=sha,
                seconds=round(time.monotonic() - begun, 3),
                resumed=len(transfer.resumed),  # from an earlier run's file, or a drop
                restarted=transfer.restarted,
                retries=transfer.retries,
                verified="pin" if action.sha256 else ("hub" if expected else "length"),
            )
            return Staged(
                name,
                (landed_st.st_dev, landed_st.st_ino),
                transfer.total,
                landed_st.st_mtime_ns,
                sha,
                source.text,
                resumed=bool(transfer.resumed) or partial is not None,
            )
        finally:
            with contextlib.suppress(Exception):
                sink.chaser.stop()
            if not keep:
                _drop(dir_fd, name, fd)
            os.close(fd)
            self._tell(None)

    def _tell(self, progressing: Progressing | None) -> None:
        if self.watch is not None:
            self.watch(progressing)

    def abort(self) -> None:
        """From another thread: stop the download in progress at once."""
        self.cancel.set()
        transport = self._transport
        if transport is not None:
            transport.abort()


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and value >= 0 else None
