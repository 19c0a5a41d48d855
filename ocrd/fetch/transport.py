"""HTTP(S) requests for downloads: urllib3 pools, proxies, credentials, redirects, errors.

One `Transport` serves one download (or one `ocrd check --sources`): it builds
its pools from the policy's `download:` settings, takes proxies from the
environment (`https_proxy`, `http_proxy`, `all_proxy`, `no_proxy`, as curl and
pip do), credentials per host from a netrc file (`download.netrc`, else
`$NETRC`; never from the policy itself, never logged), verifies TLS against
the system's CAs or `download.ca_bundle`, and follows redirects itself so that
an `Authorization` header never follows a redirect to another host and an
https:// URL is never downgraded to http://.

Errors are `FetchError`s that say what happened in the operator's words and
whether trying again may help; a connection the unit's network sandbox
refused says so, and names the drop-in that allows the mirrors.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import netrc
import os
import random
import socket
import ssl
import stat
import threading
import urllib.parse
import urllib.request
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ocrd.core.sources import redact
from ocrd.openfile import NotRegularError, open_regular

if TYPE_CHECKING:
    import urllib3

    from ocrd.core.policy import Download

USER_AGENT = "ocrd"
REDIRECTS = frozenset({301, 302, 303, 307, 308})
RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
BACKOFF_FIRST = 0.5  # seconds before the first retry; doubled each time
BACKOFF_MAX = 30.0
RETRY_AFTER_MAX = 120.0  # a server's Retry-After is honoured up to this
NETWORK_HINT = (
    "this process has no network (as under the shipped unit's PrivateNetwork=yes, "
    "IPAddressDeny=any, RestrictAddressFamilies=AF_UNIX); to allow the mirrors, install "
    "the drop-in systemd/ocrd-network.conf with their addresses (README, 'Sources on "
    "the network')"
)
# Errors of socket(2)/connect(2) that a network sandbox gives: PrivateNetwork= (no
# route: only the loopback device exists), a seccomp or LSM refusal (EPERM, EACCES).
# IPAddressDeny= only drops packets (a TCP connect times out): see address_filtered.
# RestrictAddressFamilies=AF_UNIX: no IP socket at all (EAFNOSUPPORT).
_SANDBOX_ERRNOS = frozenset(
    {errno.EPERM, errno.EACCES, errno.EAFNOSUPPORT, errno.ENETUNREACH, errno.EHOSTUNREACH}
)


class FetchError(Exception):
    """A download that did not work; `retry`: trying again later may help."""

    def __init__(
        self,
        message: str,
        *,
        retry: bool = False,
        status: int | None = None,
        wait: float | None = None,
    ) -> None:
        super().__init__(message)
        self.retry = retry
        self.status = status
        self.wait = wait  # the server's Retry-After, if it sent one


class Cancelled(Exception):
    """The download was asked to stop (SIGTERM, a reload): what landed stays for a resume."""


@dataclass(frozen=True)
class Settings:
    """What the policy's `download:` section says, as plain values."""

    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    retries: int = 5
    max_redirects: int = 5
    ca_bundle: str | None = None
    netrc: str | None = None

    @classmethod
    def of(cls, download: Download) -> Settings:
        return cls(
            connect_timeout=download.connect_timeout,
            read_timeout=download.read_timeout,
            retries=download.retries,
            max_redirects=download.max_redirects,
            ca_bundle=str(download.ca_bundle) if download.ca_bundle is not None else None,
            netrc=str(download.netrc) if download.netrc is not None else None,
        )


@dataclass
class Answer:
    """A response whose headers have arrived; the body is read from `raw`."""

    status: int
    url: str  # after redirects
    headers: Mapping[str, str]  # case-insensitive (urllib3's HTTPHeaderDict)
    raw: urllib3.BaseHTTPResponse
    method: str = "GET"

    def close(self) -> None:
        """Done with it: a connection whose answer was read to its end goes back to the
        pool; one with a body left unread (an abandoned download) is closed."""
        if self.method == "HEAD" or self.raw.length_remaining == 0:
            with contextlib.suppress(Exception):
                self.raw.drain_conn()
            self.raw.release_conn()
        else:
            self.raw.close()


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urllib.parse.urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return parts.scheme.lower(), (parts.hostname or "").lower(), port


def _netrc_file(settings: Settings) -> str | None:
    if settings.netrc is not None:
        return settings.netrc
    return os.environ.get("NETRC") or None


def _open_file(path: str, what: str) -> int:
    """A descriptor of the regular file *path* (never blocking on a FIFO or device)."""
    try:
        return open_regular(path, follow=True)
    except NotRegularError as exc:
        raise FetchError(f"{what} {exc}; name a plain file") from None
    except OSError as exc:
        raise FetchError(f"{what} {path}: {exc.strerror or exc}") from None


def load_credentials(path: str | None) -> dict[str, tuple[str, str]]:
    """host -> (login, password) from a netrc file; {} without one.

    The file must be a regular file that only its owner can read: credentials that
    other users can read are refused (as ssh refuses a world-readable key). What it
    holds never reaches an error message (a parse error names the line only).
    """
    if path is None:
        return {}
    fd = _open_file(path, "netrc file")
    try:
        st = os.fstat(fd)
        if st.st_mode & 0o077:
            raise FetchError(
                f"netrc file {path} can be read by other users (mode "
                f"{stat.S_IMODE(st.st_mode):04o}); it holds passwords: chmod 600 {path}"
            )
        try:  # the file opened above, whatever is under its name by now
            parsed = netrc.netrc(f"/proc/self/fd/{fd}")
        except netrc.NetrcParseError as exc:
            raise FetchError(
                f"netrc file {path} cannot be parsed (line {exc.lineno}); each entry is "
                "`machine HOST login NAME password SECRET`"
            ) from None
        except (OSError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise FetchError(f"netrc file {path} cannot be read ({why})") from None
    finally:
        os.close(fd)
    found: dict[str, tuple[str, str]] = {}
    for host, (login, _account, password) in parsed.hosts.items():
        found[host.lower()] = (login or "", password or "")
    return found


CA_MAX = 16 * 1024 * 1024  # a CA bundle bigger than this is not one


def load_ca_bundle(path: str) -> str:
    """The PEM text of `download.ca_bundle`, read once (a FIFO is refused, not read)."""
    fd = _open_file(path, "download.ca_bundle")
    try:
        data = os.read(fd, CA_MAX + 1)
    except OSError as exc:
        raise FetchError(f"download.ca_bundle {path}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if len(data) > CA_MAX or b"-----BEGIN CERTIFICATE-----" not in data:
        raise FetchError(
            f"download.ca_bundle {path} holds no PEM certificate (-----BEGIN CERTIFICATE-----)"
        )
    return data.decode("ascii", "replace")


def basic_auth(login: str, password: str) -> str:
    token = base64.b64encode(f"{login}:{password}".encode()).decode("ascii")
    return f"Basic {token}"


def _os_errnos(exc: BaseException) -> Iterator[int]:
    """The errnos of the OSErrors under *exc*, outermost first. An ssl.SSLError's errno
    is OpenSSL's (1 is a failed verification, not EPERM): skipped."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and not isinstance(current, ssl.SSLError):
            code = current.errno
            if isinstance(code, int):
                yield code
        current = current.__cause__ or current.__context__


def _sandbox_errno(exc: BaseException) -> int | None:
    """The errno under *exc* that a network sandbox gives, if there is one."""
    return next((code for code in _os_errnos(exc) if code in _SANDBOX_ERRNOS), None)


def address_filtered(url: str) -> bool:
    """Whether the system drops what this process sends to *url*'s address.

    systemd's IPAddressDeny= filters packets, not connect(2): a TCP connect to a
    denied address just times out. A UDP datagram to it fails at once with EPERM,
    so one empty datagram tells a filtered address from a slow one."""
    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    if not host:
        return False
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except OSError:
        return False
    for family, kind, proto, _, address in infos[:2]:
        try:
            with socket.socket(family, kind, proto) as probe:
                probe.sendto(b"", address)
        except PermissionError:
            return True
        except OSError:
            continue
    return False


def network_blocked() -> bool:
    """Whether this process's network namespace has nothing but the loopback device
    (PrivateNetwork=yes). /proc/net/dev lists the reader's own namespace."""
    try:
        with open("/proc/net/dev", encoding="ascii", errors="replace") as f:
            lines = f.read().splitlines()[2:]
    except OSError:
        return False
    devices = {line.split(":", 1)[0].strip() for line in lines if ":" in line}
    return bool(devices) and devices <= {"lo"}


def describe(exc: BaseException, url: str) -> FetchError:
    """A FetchError for a failure below HTTP (DNS, connect, TLS, a dropped connection)."""
    import urllib3.exceptions as u3

    host = urllib.parse.urlsplit(url).hostname or url
    if isinstance(exc, u3.SSLError):
        return FetchError(
            f"TLS with {host} failed ({_reason(exc)}); if the server uses a private CA, "
            "name its certificate in download.ca_bundle"
        )
    code = _sandbox_errno(exc)
    if code in (errno.EPERM, errno.EACCES, errno.EAFNOSUPPORT):
        return FetchError(f"connecting to {host} was refused by the system: {NETWORK_HINT}")
    if isinstance(exc, u3.NameResolutionError) or "Name or service not known" in str(exc):
        if network_blocked():
            return FetchError(f"cannot resolve {host}: {NETWORK_HINT}")
        return FetchError(f"cannot resolve {host} (DNS)", retry=True)
    if code is not None:
        if network_blocked():
            return FetchError(f"cannot reach {host}: {NETWORK_HINT}")
        return FetchError(f"cannot reach {host} ({os.strerror(code)})", retry=True)
    if isinstance(exc, u3.NewConnectionError):  # a subclass of ConnectTimeoutError
        found = next(_os_errnos(exc), None)
        if found == errno.ECONNREFUSED:
            port = urllib.parse.urlsplit(url).port
            at = f" on port {port}" if port else ""
            return FetchError(f"{host} refused the connection (nothing listens{at})", retry=True)
        if found == errno.ETIMEDOUT:
            return _timed_out(host, url)
        why = os.strerror(found) if found else _reason(exc)
        return FetchError(f"cannot connect to {host} ({why})", retry=True)
    if isinstance(exc, u3.ConnectTimeoutError):
        return _timed_out(host, url)
    if isinstance(exc, u3.ReadTimeoutError):
        return FetchError(f"{host} sent nothing for too long (download.read_timeout)", retry=True)
    if isinstance(exc, u3.ProxyError):
        return FetchError(f"the proxy for {host} failed ({_reason(exc)})", retry=True)
    return FetchError(f"the connection to {host} failed ({_reason(exc)})", retry=True)


def _timed_out(host: str, url: str) -> FetchError:
    if address_filtered(url):  # IPAddressDeny=: the packets are dropped, not refused
        return FetchError(f"connecting to {host} was refused by the system: {NETWORK_HINT}")
    return FetchError(f"connecting to {host} timed out", retry=True)


def _reason(exc: BaseException) -> str:
    inner = getattr(exc, "reason", None)
    text = str(inner if inner is not None else exc)
    return text.split(": ", 1)[-1] if "pool" in text.lower() else text


def http_error(status: int, url: str, headers: Mapping[str, str], what: str = "") -> FetchError:
    """The FetchError for an HTTP answer that is not the body."""
    host = urllib.parse.urlsplit(url).hostname or redact(url)
    where = redact(what or url)
    if status in (401, 403):
        return FetchError(
            f"{host} refused {where} (HTTP {status}): give ocrd credentials for {host} in "
            "the netrc file named by download.netrc",
            status=status,
        )
    if status == 404 or status == 410:
        return FetchError(f"{where} is not on {host} (HTTP {status})", status=status)
    if status in RETRY_STATUS:
        return FetchError(
            f"{host} answered HTTP {status} for {where}",
            retry=True,
            status=status,
            wait=retry_after(headers),
        )
    return FetchError(f"{host} answered HTTP {status} for {where}", status=status)


def length(text: str | None) -> int | None:
    """A byte count from a header: ASCII digits only ('²' is a digit to str.isdigit)."""
    if text is None:
        return None
    text = text.strip()
    return int(text) if text.isascii() and text.isdigit() else None


def retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds from a Retry-After header (a number of seconds only), capped."""
    value = headers.get("Retry-After", "")
    try:
        return min(max(float(value), 0.0), RETRY_AFTER_MAX)
    except ValueError:
        return None


def _tracking_pools(sockets: weakref.WeakSet[socket.socket]) -> dict[str, Any]:
    """urllib3's pool classes, with connections that note every socket they open in
    *sockets* (so that `Transport.abort` can shut them, wherever a read waits)."""
    import urllib3.connection as conn
    import urllib3.connectionpool as pools

    class HTTPConnection(conn.HTTPConnection):
        def _new_conn(self) -> socket.socket:
            sock = super()._new_conn()
            sockets.add(sock)
            return sock

    class HTTPSConnection(conn.HTTPSConnection):
        def _new_conn(self) -> socket.socket:
            sock = super()._new_conn()
            sockets.add(sock)
            return sock

    class HTTPPool(pools.HTTPConnectionPool):
        ConnectionCls = HTTPConnection

    class HTTPSPool(pools.HTTPSConnectionPool):
        ConnectionCls = HTTPSConnection

    return {"http": HTTPPool, "https": HTTPSPool}


class Transport:
    """Requests for one download: pools, proxies and credentials as set up once."""

    def __init__(self, settings: Settings, cancel: threading.Event | None = None) -> None:
        import urllib3

        self.settings = settings
        self.cancel = cancel or threading.Event()
        self._credentials = load_credentials(_netrc_file(settings))
        bundle = settings.ca_bundle
        self._ca = load_ca_bundle(bundle) if bundle is not None else None
        self._timeout = urllib3.Timeout(
            connect=settings.connect_timeout, read=settings.read_timeout
        )
        self._pools: dict[str | None, urllib3.PoolManager] = {}
        self._proxies = urllib.request.getproxies_environment()
        self._lock = threading.Lock()
        self._current: urllib3.BaseHTTPResponse | None = None
        self._sockets: weakref.WeakSet[socket.socket] = weakref.WeakSet()

    # -- pools ----------------------------------------------------------------------

    def _pool_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"timeout": self._timeout, "retries": False, "num_pools": 4}
        options["cert_reqs"] = "CERT_REQUIRED"
        if self._ca is not None:
            options["ca_cert_data"] = self._ca
        return options

    def _pool(self, url: str) -> urllib3.PoolManager:
        import urllib3

        scheme, host, _ = _origin(url)
        proxy = None
        if not urllib.request.proxy_bypass_environment(host, self._proxies):  # type: ignore[attr-defined]
            proxy = self._proxies.get(scheme) or self._proxies.get("all")
        if proxy not in self._pools:
            manager: urllib3.PoolManager
            if proxy is None:
                manager = urllib3.PoolManager(**self._pool_options())
            else:
                manager = urllib3.ProxyManager(proxy, **self._pool_options())
            manager.pool_classes_by_scheme = _tracking_pools(self._sockets)
            self._pools[proxy] = manager
        return self._pools[proxy]

    def close(self) -> None:
        for pool in self._pools.values():
            pool.clear()
        self._pools.clear()

    def abort(self) -> None:
        """From another thread: stop now. Every socket of this transport is shut down,
        so a read in progress ends at once: in a body, in the headers (a server
        dribbling its status line), in a TLS handshake."""
        self.cancel.set()
        with self._lock:
            current = self._current
        if current is not None:
            with contextlib.suppress(Exception):  # it may be closing anyway
                current.shutdown()  # urllib3 >= 2.3: the socket, now
        for sock in list(self._sockets):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    # -- requests -------------------------------------------------------------------

    def _headers(
        self, url: str, extra: Mapping[str, str], origin: tuple[str, str, int | None]
    ) -> dict[str, str]:
        headers: dict[str, str] = {}
        for key, value in {"User-Agent": USER_AGENT, **extra}.items():  # one of each, any case
            for old in [k for k in headers if k.lower() == key.lower()]:
                del headers[old]
            headers[key] = value
        moved = _origin(url) != origin
        if moved:  # a redirect to another host: its own credentials only
            headers = {
                k: v for k, v in headers.items() if k.lower() not in ("authorization", "cookie")
            }
        if not any(k.lower() == "authorization" for k in headers):
            host = _origin(url)[1]
            found = self._credentials.get(host)
            if found is None and not moved:  # netrc's `default`: the URL's own host only
                found = self._credentials.get("default")
            if found is not None:
                headers["Authorization"] = basic_auth(*found)
        return headers

    def open(
        self, method: str, url: str, headers: Mapping[str, str], *, follow: bool = True
    ) -> Answer:
        """Send one request (following redirects when *follow*); FetchError if it fails
        below HTTP. The answer may be any status: the caller decides what it means."""
        import urllib3

        origin = _origin(url)
        for _ in range(self.settings.max_redirects + 1):
            if self.cancel.is_set():
                raise Cancelled("stopped")
            try:
                raw = self._pool(url).request(
                    method,
                    url,
                    headers=self._headers(url, headers, origin),
                    preload_content=False,
                    decode_content=False,
                    redirect=False,
                    retries=False,
                )
            except urllib3.exceptions.HTTPError as exc:
                if self.cancel.is_set():
                    raise Cancelled("stopped") from None
                raise describe(exc, url) from None
            with self._lock:
                self._current = raw
            answer = Answer(raw.status, url, raw.headers, raw, method)
            if not follow or raw.status not in REDIRECTS:
                return answer
            location = raw.headers.get("Location")
            with contextlib.suppress(Exception):
                answer.raw.drain_conn()  # a redirect's body is a line or two
            answer.raw.release_conn()
            if not location:
                raise FetchError(f"{redact(url)} redirects (HTTP {raw.status}) nowhere")
            target = urllib.parse.urljoin(url, location)
            if _origin(target)[0] not in ("http", "https"):
                raise FetchError(f"{redact(url)} redirects to {redact(target)}: not http(s)")
            if origin[0] == "https" and _origin(target)[0] == "http":
                raise FetchError(
                    f"{redact(url)} redirects to the unencrypted {redact(target)}; refused"
                )
            if raw.status == 303:
                method = "GET" if method != "HEAD" else method
            url = target
        raise FetchError(
            f"more than {self.settings.max_redirects} redirects (download.max_redirects) "
            f"from {redact(url)}"
        )

    def done(self) -> None:
        """The current body is read or abandoned: nothing to abort any more."""
        with self._lock:
            self._current = None

    def backoff(self, attempt: int, wait: float | None = None) -> None:
        """Sleep before retry *attempt* (1, 2, …): exponential with jitter, or the
        server's Retry-After; Cancelled at once if asked to stop."""
        if wait is None:
            base = min(BACKOFF_FIRST * (2 ** (attempt - 1)), BACKOFF_MAX)
            wait = base * random.uniform(0.5, 1.0)  # noqa: S311 - jitter, not a secret
        if self.cancel.wait(wait):
            raise Cancelled("stopped")
